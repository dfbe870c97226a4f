"""``promptcache proxy``: wire config, storage and the app together, and reload on change."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import uvloop
from aiohttp import web

from promptcache.proxy import policybus
from promptcache.proxy.config import EX_CONFIG, ConfigError, ProxyConfig, load_config
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.http import workers
from promptcache.proxy.http.app import Proxy
from promptcache.proxy.http.arguments import add_arguments
from promptcache.proxy.metrics import Metrics
from promptcache.proxy.runtime import Runtimes
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.redis import RedisAccelerator
from promptcache.proxy.storage.secrets import shared_key
from promptcache.proxy.storage.spool import DiskSpool, MemorySpool, Spool, SpoolError
from promptcache.proxy.storage.store import DEFAULT_SPOOL_BYTES, Store
from promptcache.proxy.storage.tariffs import Tariffs
from promptcache.proxy.tracing import Tracing, provider_from_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

_log = logging.getLogger("promptcache.server")
MAX_WORKERS = 64
WORKER_SPOOL = "worker-"
SALT_KEY = "cache_salt"
"""The ``proxy_secrets`` row keying the forwarded ``cache_salt``."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with whatever ``extra`` fields (request id, model…) a record carries."""

    _skip = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@dataclass
class ProxyOptions:
    config_path: Path
    database_url: str | None = None
    redis_url: str | None = None
    redis_prefix: str = "promptcache:"
    manage_tariffs: bool = True
    degraded_ok: bool = False
    reload_interval: float = 1.0
    tariff_refresh: float = 10.0
    spool_dir: Path | None = None
    spool_max_bytes: int = DEFAULT_SPOOL_BYTES
    metrics_port: int | None = None
    """/metrics on a port of its own (on ``host``), and no longer on the API's port."""
    workers: int = 1
    worker: int = 0
    """This process's index among ``workers`` (its spool is ``worker-<index>``)."""
    tracer_provider: TracerProvider | None = None
    """Where spans go; None: OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else nowhere (:mod:`..tracing`)."""


async def sync_tariffs(config: ProxyConfig, pg: Database | None, manage: bool) -> dict[str, Tariff]:
    """The tariff in force for each model: written from config when we manage them, else read."""
    now = datetime.now(UTC)
    tariffs = Tariffs(pg) if pg is not None else None
    out: dict[str, Tariff] = {}
    for alias, model in config.models.items():
        wanted = Tariff.for_policy(alias, model.input_per_mtok, model.output_per_mtok, model.policy)
        stored: Tariff | None = None
        if tariffs is not None:
            try:
                stored = await tariffs.set(wanted, now) if manage else await tariffs.at(alias, now)
            except IndexUnavailable as exc:
                _log.warning("tariffs unavailable, billing %s from config until Postgres is back: %s", alias, exc)
        out[alias] = stored or wanted
    return out


def open_spool(options: ProxyOptions) -> Spool:
    """The ledger spool: ``worker-<i>`` in the spool directory when there is one, taking over what an earlier
    process left there; worker 0 also adopts the spools of workers an earlier, larger ``--workers`` had."""
    if options.spool_dir is None:
        _log.warning("the ledger spool is in memory: commits waiting for Postgres are lost if this process dies "
                     "(set --spool-dir)")
        return MemorySpool(options.spool_max_bytes)
    spool = DiskSpool.open(options.spool_dir / f"{WORKER_SPOOL}{options.worker}", options.spool_max_bytes)
    if options.worker == 0:
        for other in sorted(options.spool_dir.glob(WORKER_SPOOL + "*")):
            index = other.name.removeprefix(WORKER_SPOOL)
            if other.is_dir() and index.isdigit() and int(index) >= options.workers:
                spool.adopt(other)
    return spool


class ProxyServer:
    """The proxy process: a :class:`Proxy` plus the loops that keep its config and tariffs current."""

    def __init__(self, options: ProxyOptions, config: ProxyConfig, proxy: Proxy) -> None:
        self.options = options
        self.proxy = proxy
        self.file_config = config
        self.policies: dict[str, CachePolicy] = {}
        """Policies published on Redis since the file was written, by ``namespace/name``."""
        self.replicas: dict[str, tuple[str, ...]] = {}
        """Replica lists announced on Redis, by the name in ``upstream.replicasFrom``."""
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        """Where ``--metrics-port`` listens: the API's host (set by :func:`serve`)."""
        self._bus: aioredis.Redis | None = None
        self._config_bytes = b""

    @classmethod
    async def create(cls, options: ProxyOptions) -> ProxyServer:
        config = load_config(options.config_path)
        runtimes = Runtimes()
        runtimes.load(config)  # before any connection: a bad tokenizer is reported as such, not as a timeout
        metrics = Metrics()
        pg: Database | None = None
        if options.database_url:
            pg = await Database.connect(options.database_url, min_size=0, connect_timeout=1.0)
        redis = RedisAccelerator.from_url(options.redis_url, options.redis_prefix) if options.redis_url else None
        store = Store(pg, redis, metrics, spool=open_spool(options))
        tracing = Tracing(options.tracer_provider or provider_from_env())
        proxy = Proxy(config, store, metrics, degraded_ok=options.degraded_ok, runtimes=runtimes, tracing=tracing)
        proxy.apply_config(config, await sync_tariffs(config, pg, options.manage_tariffs))
        server = cls(options, config, proxy)
        server._config_bytes = options.config_path.read_bytes()
        await server._share_salt_key()
        await server._load_budgets()
        return server

    def app(self) -> web.Application:
        app = self.proxy.app(metrics=self.options.metrics_port is None)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _: web.Application) -> None:
        gc.freeze()  # tokenizer vocabularies are large and immortal: keep them out of every collection
        if self.options.metrics_port is not None:
            self._metrics_runner = web.AppRunner(self.proxy.metrics_app(), access_log=None)
            await self._metrics_runner.setup()
            await web.TCPSite(self._metrics_runner, self.host, self.options.metrics_port,
                              reuse_port=self.options.workers > 1).start()
        self.proxy.store.start()
        self._tasks = [asyncio.create_task(self._watch_config()), asyncio.create_task(self._refresh_tariffs())]
        if self.options.redis_url:
            self._bus = aioredis.Redis.from_url(self.options.redis_url)
            self._tasks += [
                asyncio.create_task(policybus.follow(self._bus, self.options.redis_prefix, self._policy_names,
                                                     self._policy_published)),
                asyncio.create_task(policybus.follow_replicas(self._bus, self.options.redis_prefix,
                                                              self._replica_names, self._replicas_published))]

    async def _stop(self, _: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.proxy.store.stop()
        self.proxy.store.spool.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._bus is not None:
            await self._bus.aclose()
        if self.proxy.store.pg is not None:
            await self.proxy.store.pg.close()
        if self.proxy.store.redis is not None:
            await self.proxy.store.redis.close()
        self.proxy.tracing.shutdown()

    async def reload(self) -> bool:
        """Apply the config file if it changed; a broken file keeps the last good config."""
        try:
            raw = self.options.config_path.read_bytes()
        except OSError as exc:
            _log.error("cannot read config, keeping the last good one: %s", exc)
            self.proxy.metrics.config_reloads.labels("error").inc()
            return False
        if raw == self._config_bytes:
            return False
        self._config_bytes = raw
        try:
            config = load_config(self.options.config_path)
            self.proxy.runtimes.load(config)
        except ConfigError as exc:
            _log.error("invalid config, keeping the last good one: %s", exc)
            self.proxy.metrics.config_reloads.labels("error").inc()
            return False
        await self._apply(config)
        self.proxy.metrics.config_reloads.labels("ok").inc()
        _log.info("config reloaded", extra={"digest": config.digest[:12], "models": sorted(config.models)})
        return True

    async def _load_budgets(self) -> None:
        """Budgets known before the first request (then refreshed in the background), when Postgres answers."""
        budgets = self.proxy.store.budgets
        if budgets is None:
            return
        try:
            await budgets.load()
        except IndexUnavailable as exc:
            _log.warning("budgets unavailable, admitting every principal until Postgres answers: %s", exc)

    async def _share_salt_key(self) -> None:
        """Read (or make) the database's cache-salt key once some model forwards a salt; retried with the tariffs."""
        pg, proxy = self.proxy.store.pg, self.proxy
        if pg is None or proxy.salt_key_shared or \
                not any(m.upstream.cache_salt for m in self.file_config.models.values()):
            return
        try:
            proxy.salt_key = await shared_key(pg, SALT_KEY)
        except IndexUnavailable as exc:
            _log.warning("cache-salt key unavailable, salting with this process's own until Postgres is back: %s", exc)
            return
        proxy.salt_key_shared = True

    async def _apply(self, config: ProxyConfig) -> None:
        await self._share_salt_key()
        self.file_config = config
        effective = self._with_published(config)
        tariffs = await sync_tariffs(effective, self.proxy.store.pg, self.options.manage_tariffs)
        self.proxy.apply_config(effective, tariffs)

    def _with_published(self, config: ProxyConfig) -> ProxyConfig:
        """The file's config with the policies and replica lists announced on Redis since."""
        models = {}
        for alias, model in config.models.items():
            if model.cache_policy in self.policies:
                model = replace(model, policy=self.policies[model.cache_policy])
            if model.upstream.replicas_from in self.replicas:
                model = replace(model, upstream=replace(model.upstream,
                                                        replicas=self.replicas[model.upstream.replicas_from]))
            models[alias] = model
        return replace(config, models=models)

    def _replica_names(self) -> list[str]:
        return [m.upstream.replicas_from for m in self.file_config.models.values() if m.upstream.replicas_from]

    async def _replicas_published(self, name: str, urls: tuple[str, ...]) -> None:
        """Follow a model's announced replicas (none: its ``url``, the Service, alone)."""
        if name not in self._replica_names() or self.replicas.get(name) == urls:
            return
        self.replicas[name] = urls
        await self._apply(self.file_config)
        _log.info("upstream replicas updated from Redis", extra={"model": name, "replicas": list(urls)})

    def _policy_names(self) -> list[str]:
        return [m.cache_policy for m in self.file_config.models.values() if m.cache_policy]

    async def _policy_published(self, name: str, policy: CachePolicy) -> None:
        """Apply the policy and re-read tariffs: the operator announces again after writing a new version."""
        if name not in self._policy_names():
            return
        self.policies[name] = policy
        await self._apply(self.file_config)
        _log.info("cache policy updated from Redis", extra={"policy": name})

    async def _watch_config(self) -> None:
        """Hot reload for the life of the process: whatever one round raises is logged and counted, never fatal."""
        while True:
            await asyncio.sleep(self.options.reload_interval)
            try:
                await self.reload()
            except Exception:
                _log.exception("config reload failed, keeping the last good config")
                self.proxy.metrics.config_reloads.labels("error").inc()

    async def _refresh_tariffs(self) -> None:
        """Pick up tariff versions written by the operator, and retry ones Postgres missed."""
        while True:
            await asyncio.sleep(self.options.tariff_refresh)
            try:
                await self._apply(self.file_config)
            except Exception:
                _log.exception("tariff refresh failed; retrying next round")

    @property
    def tariffs(self) -> Mapping[str, Tariff]:
        return {alias: rt.tariff for alias, rt in self.proxy.runtimes.models.items()}


def options_from_env(config_path: str, **overrides: object) -> ProxyOptions:
    options = ProxyOptions(
        config_path=Path(config_path),
        database_url=os.environ.get("PROMPTCACHE_DATABASE_URL"),
        redis_url=os.environ.get("PROMPTCACHE_REDIS_URL"),
        redis_prefix=os.environ.get("PROMPTCACHE_REDIS_PREFIX", "promptcache:"),
        manage_tariffs=os.environ.get("KUBERNETES_SERVICE_HOST") is None,
        spool_dir=Path(os.environ["PROMPTCACHE_SPOOL_DIR"]) if os.environ.get("PROMPTCACHE_SPOOL_DIR") else None,
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(options, key, value)
    return options


@asynccontextmanager
async def serving(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` on this event loop (a free port by default) and yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()


def serve(options: ProxyOptions, host: str, port: int) -> None:
    async def build() -> web.Application:
        server = await ProxyServer.create(options)
        server.host = host
        return server.app()

    web.run_app(build(), host=host, port=port, print=lambda msg: _log.info(msg), access_log=None,
                loop=uvloop.new_event_loop(), reuse_port=options.workers > 1)


def serve_process(options: ProxyOptions, host: str, port: int) -> int:
    """One proxy process until it is stopped; the exit status, with the reason on stderr when it could not start."""
    try:
        serve(options, host, port)
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except IndexUnavailable as exc:
        print(f"database unavailable: {exc}", file=sys.stderr)
        return 2
    except SpoolError as exc:
        print(f"cannot open the ledger spool: {exc}", file=sys.stderr)
        return EX_CONFIG
    return 0


def serve_worker(options: ProxyOptions, host: str, port: int, log_level: str, index: int) -> int:
    """A ``--workers`` process: logging is set up again, since a spawned process starts bare."""
    configure_logging(log_level)
    return serve_process(replace(options, worker=index), host, port)


def check(config_path: str) -> int:
    """``--check``: load the config and every tokenizer it names, as a start would, and serve nothing."""
    try:
        config = load_config(config_path)
        tokenizers = Runtimes().load(config)
    except ConfigError as exc:
        print(f"invalid config: {exc}", file=sys.stderr)
        return EX_CONFIG
    for alias, tokenizer in sorted(tokenizers.items()):
        print(f"{alias}: tokenizer {tokenizer.version if tokenizer else 'none (served without caching)'}")
    return 0


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.check:
        return check(args.config)
    options = options_from_env(
        args.config, database_url=args.database, redis_url=args.redis, manage_tariffs=args.manage_tariffs,
        degraded_ok=args.degraded_ok or None, reload_interval=args.reload_interval,
        spool_dir=Path(args.spool_dir) if args.spool_dir else None,
        spool_max_bytes=args.spool_max_mb << 20 if args.spool_max_mb is not None else None, workers=args.workers,
        metrics_port=args.metrics_port,
    )
    if options.spool_max_bytes <= 0:
        print("--spool-max-mb must be positive", file=sys.stderr)
        return 2
    if options.metrics_port is not None and not (0 < options.metrics_port < 65536 and
                                                 options.metrics_port != args.port):
        print("--metrics-port must be a port from 1 to 65535 other than --port", file=sys.stderr)
        return 2
    if not 1 <= options.workers <= MAX_WORKERS:
        print(f"--workers must be from 1 to {MAX_WORKERS}", file=sys.stderr)
        return 2
    if options.workers == 1:
        return serve_process(options, args.host, args.port)
    return workers.supervise(options.workers, serve_worker, options, args.host, args.port, args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m promptcache.proxy", description="the promptcache proxy")
    add_arguments(parser)
    return run(parser.parse_args(argv))
