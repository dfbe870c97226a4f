"""``promptcache simulate``: the simulated upstream model the demo and the tests use, for a person trying the proxy.

Not a model: it counts the prompt with a real tokenizer and answers a fixed reply, on OpenAI's Chat Completions
and Responses APIs and Anthropic's Messages API, streamed or not, with usage; so a proxy pointed at it bills
exactly as it would bill a model server. docs/design.md#the-simulated-upstream.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands

MAX_LATENCY_MS = 600_000


def register(commands: Commands) -> None:
    p = commands.add_parser("simulate", help="serve a simulated upstream model (not a model: a fixed reply, exact "
                                             "usage) to point a proxy at")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokenizer", default="tiktoken:cl100k_base", help="tiktoken:ENCODING or hf:PATH: how it counts "
                                                                       "prompts (default tiktoken:cl100k_base)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="milliseconds before each answer starts")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from aiohttp import web

    from promptcache.proxy.domain.tokens import TokenizerUnavailable, load_tokenizer, parse_tokenizer_flag
    from promptcache.proxy.testing.simulator import REPLY, Simulator, SimulatorSettings

    if not 0 <= args.latency_ms <= MAX_LATENCY_MS:
        options.fail(f"invalid --latency-ms: {args.latency_ms:g} is not between 0 and {MAX_LATENCY_MS}")
    if not 0 < args.port < 65536:
        options.fail(f"invalid --port: {args.port} is not between 1 and 65535")
    try:
        tokenizer = load_tokenizer(parse_tokenizer_flag(args.tokenizer))
    except TokenizerUnavailable as exc:
        options.fail(f"invalid --tokenizer: {exc}")
    simulator = Simulator(SimulatorSettings(tokenizer, latency=args.latency_ms / 1000, keep_requests=False))
    base = f"http://{args.host}:{args.port}"
    banner = (f"SIMULATED upstream (not a model: it counts prompts with {args.tokenizer} and always answers "
              f"{REPLY!r}) on {base}\n  a proxy model's upstream: url {base}/v1 with api openai or openai-responses; "
              f"url {base} with api anthropic\n  Ctrl-C stops it")
    try:  # the banner once it listens
        web.run_app(simulator.app(), host=args.host, port=args.port, access_log=None,
                    print=lambda _: print(banner, flush=True))
    except OSError as exc:
        options.fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    return 0
