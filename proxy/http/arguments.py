"""The proxy's command-line options, apart from the server so that declaring them loads nothing heavy:
``promptcache``'s parser is built for every subcommand, and ``python -m promptcache.proxy`` takes the same."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="proxy config YAML (reloaded when it changes)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    p.add_argument("--redis", help="Redis URL for the accelerator (default: $PROMPTCACHE_REDIS_URL)")
    p.add_argument("--manage-tariffs", action=argparse.BooleanOptionalAction, default=None,
                   help="write tariff versions from the config (default: on outside a cluster)")
    p.add_argument("--degraded-ok", action="store_true",
                   help="report ready even when Postgres is down (requests are then billed at list price)")
    p.add_argument("--spool-dir", help="directory for commits Postgres cannot take yet, kept across restarts "
                                       "(default: $PROMPTCACHE_SPOOL_DIR; without either, in memory)")
    p.add_argument("--spool-max-mb", type=int, default=None, help="bound on the spool (default: 1024)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on this port only, not on --port (so a NetworkPolicy can tell scrapers "
                        "from API clients)")
    p.add_argument("--workers", type=int, default=1,
                   help="proxy processes sharing the port (SO_REUSEPORT), e.g. one per core (default: 1)")
    p.add_argument("--reload-interval", type=float, default=None, help="seconds between config file checks")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--check", action="store_true",
                   help="load the config and its tokenizers, print each model's tokenizer and exit "
                        "(0: valid, 78: invalid, with the reason)")
