# `make demo`: set up .venv and run the embedded default end to end (runs/default/report.md).
# `make test`: set up .venv and run the test suite.
# `make setup-vllm`: .venv with the vLLM engine as well (`--model.engine vllm`).
.PHONY: setup setup-vllm demo test bench

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

bench: setup
	.venv/bin/python benchmarks/bench_synth.py
