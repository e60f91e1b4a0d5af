# `make demo`: set up .venv and run the embedded default end to end (runs/default/report.md).
# `make test`: set up .venv and run the test suite.
.PHONY: setup demo test bench

setup: .venv/.dail-setup

.venv/.dail-setup: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	.venv/bin/dail run

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_synth.py
