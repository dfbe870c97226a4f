# The README's two fresh-machine commands; each does its own set-up (.ci/setup).
.PHONY: demo test lint typecheck bench

demo:
	@bash .ci/setup
	.venv/bin/promptcache demo

test:
	@bash .ci/setup
	.venv/bin/pytest -q

lint:
	@bash .ci/setup
	.venv/bin/ruff check .

typecheck:
	@bash .ci/setup
	bash .ci/typecheck

bench:
	@bash .ci/setup
	.venv/bin/python -P bench/core.py
	.venv/bin/python -P bench/proxy.py
	.venv/bin/python -P bench/operator.py
	.venv/bin/python -P bench/replay.py
