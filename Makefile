# The README's two fresh-machine commands; each does its own set-up (.ci/setup).
.PHONY: demo test lint typecheck bench k8s model-server image

demo:
	@bash .ci/setup
	.venv/bin/promptcache demo

# The real control plane the operator tests run against (built once per machine, then found in the cache).
k8s:
	@bash .ci/k8s/build

# The Dockerfile built with podman on a debootstrap base, no Docker engine or registry (.ci/image; the last line
# printed is the image). `make test` builds it too when missing, for tests/packaging/test_image.py.
image:
	@bash .ci/setup
	@bash .ci/image

# The real model server the billing tests use (llama.cpp's llama-server, built once per machine; test-only, AGPL),
# in the foreground on 127.0.0.1:8080 for a person to try.
model-server:
	@bash .ci/setup
	@bash .ci/engine/build >/dev/null
	cd tests && PROMPTCACHE_ENGINE_BIN="$$(bash ../.ci/engine/build)" ../.venv/bin/python -P -m support.engine

test:
	@bash .ci/setup
	@bash .ci/k8s/build >/dev/null
	@bash .ci/engine/build >/dev/null
	PROMPTCACHE_K8S_BIN="$$(bash .ci/k8s/build)" PROMPTCACHE_ENGINE_BIN="$$(bash .ci/engine/build)" .venv/bin/pytest -q

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
	.venv/bin/python -P bench/overload.py
	.venv/bin/python -P bench/operator.py
	.venv/bin/python -P bench/replay.py
	PROMPTCACHE_ENGINE_BIN="$$(bash .ci/engine/build)" .venv/bin/python -P bench/engine.py
	PROMPTCACHE_ENGINE_BIN="$$(bash .ci/engine/build)" .venv/bin/python -P bench/routing.py
