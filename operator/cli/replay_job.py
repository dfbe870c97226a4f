"""``promptcache replay-job NAMESPACE/NAME``: what a PlanReplay's Job runs
(docs/design.md#running-a-planreplay).

It replays the resource's current generation and patches the result into its status, as the operator
does for small windows; the database is ``$PROMPTCACHE_DATABASE_URL``, the API the pod's service account.
With ``--shard K`` (a sharded Job's pod) it sums only its shard and leaves the result to the operator.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add_parser("replay-job", help="run a PlanReplay's spec and patch the result into its status, "
                                               "as its Job does")
    p.add_argument("target", metavar="NAMESPACE/NAME", help="the PlanReplay")
    p.add_argument("--shard", type=_index, metavar="K",
                   help="as a pod of a sharded Job: sum shard K of the plan in $PROMPTCACHE_REPLAY_PLAN into Postgres")
    p.set_defaults(func=cmd_replay_job)


def cmd_replay_job(args: argparse.Namespace) -> int:
    namespace, sep, name = args.target.partition("/")
    if not sep or not namespace or not name or "/" in name:
        options.fail(f"replay-job takes NAMESPACE/NAME, got {args.target!r}")
    from promptcache.operator.handlers.planreplay import run_job

    return run_job(namespace, name, args.shard)


def _index(text: str) -> int:
    if not text.isdigit() or len(text) > 4:
        raise argparse.ArgumentTypeError(f"a shard is a number from 0, got {text[:40]!r}")
    return int(text)
