"""``promptcache operator``: the Kubernetes operator (kopf) for DeployedModel, CachePolicy and PlanReplay."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add_parser("operator", help="run the Kubernetes operator (kopf) for DeployedModel, CachePolicy, "
                                             "PlanReplay")
    p.add_argument("--namespace", action="append", metavar="NS",
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    import promptcache.operator.main
    from promptcache.operator.handlers.config import EnvironmentError_, OperatorConfig
    from promptcache.operator.handlers.state import OperatorMemo

    try:
        config = OperatorConfig.from_env()
    except EnvironmentError_ as exc:
        print(f"promptcache operator: {exc}", file=sys.stderr)
        return 2
    if config.key_requests:
        promptcache.operator.main.serve_key_requests()
    kopf.configure(verbose=args.verbose)
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace or (), standalone=True,
             liveness_endpoint=args.liveness, memo=OperatorMemo(config=config))
    return 0
