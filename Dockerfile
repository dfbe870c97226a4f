# One image for every role: `promptcache proxy | operator | replay | migrate | keys | …`.
# Not built here (this machine has no Docker engine); kept to what a plain `docker build .` needs.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin promptcache
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# tiktoken caches encodings under TMPDIR; pods mount an emptyDir at /tmp (read-only root filesystem).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["promptcache"]
CMD ["--help"]
