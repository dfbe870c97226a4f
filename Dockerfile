# One image for every role: `promptcache proxy | operator | replay | migrate | keys | …`.
# `docker build .` builds it on Python 3.11 on Debian bookworm, pinned by digest: the OCI index of
# python:3.11-slim-bookworm (Python 3.11.16, built 2026-08-25) that docker-library/repo-info records
# (repos/python/remote/3.11-slim-bookworm.md). A tag moves; the digest builds the same base until someone changes it.
# `make image` (.ci/image) builds it with podman on a bookworm base made with debootstrap, passed as BASE
# (docs/design.md#image). Both stages use the same BASE: the virtualenv's interpreter is the base's python3.
ARG BASE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${BASE} AS build
WORKDIR /src
# PIP_CERT / SSL_CERT_FILE point at the system bundle for these RUN steps only; `make image` mounts the
# host's /etc/ssl/certs over it while building (never committed), `docker build` uses the base's own.
# The dependencies first, from pyproject.toml alone, so that a source change reuses this layer.
COPY pyproject.toml ./
RUN python3 -m venv /opt/promptcache \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      >/tmp/requirements.txt \
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    /opt/promptcache/bin/python -P -m pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
COPY README.md ./
COPY proxy ./proxy
COPY operator ./operator
# Then the project itself (no test extras), and pip and setuptools out of the virtualenv: nothing runs them.
RUN PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    /opt/promptcache/bin/python -P -m pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && /opt/promptcache/bin/python -P -m pip uninstall --yes --quiet pip setuptools

FROM ${BASE}
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin promptcache
# Only the virtualenv: no wheel directory, no build tree.
COPY --from=build /opt/promptcache /opt/promptcache
# tiktoken caches encodings under TMPDIR; pods mount an emptyDir at /tmp (read-only root filesystem).
ENV PATH=/opt/promptcache/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/opt/promptcache/bin/promptcache"]
CMD ["--help"]
