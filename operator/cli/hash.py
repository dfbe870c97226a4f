"""``promptcache hash``: a request's blocks, prefix hashes, breakpoints and forwarded body, as the proxy sees them."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from promptcache.operator.cli import options
from promptcache.proxy.domain.blocks import APIS

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.proxy.domain.policy import CachePolicy


def register(commands: Commands) -> None:
    p = commands.add_parser("hash", help="print a request's blocks, prefix hashes, breakpoints and forwarded body")
    p.add_argument("--api", choices=APIS, required=True)
    p.add_argument("--tokenizer", help="tiktoken:ENCODING or hf:PATH (without it, tokens are null)")
    p.add_argument("--policy", help="CachePolicy YAML (resource, config with `cache:`, or bare keys)")
    p.add_argument("--image-tokens", type=int, default=0, help="tokens counted per image block")
    p.add_argument("file", help="request body JSON, or - for standard input")
    p.set_defaults(func=cmd_hash)


def load_policy_file(path: str | None) -> CachePolicy:
    from promptcache.proxy.domain.nesting import TooDeep, load_yaml
    from promptcache.proxy.domain.policy import CachePolicy, PolicyError, policy_from_document

    if path is None:
        return CachePolicy()
    import yaml

    try:
        return policy_from_document(load_yaml(options.read_input(path)))
    except (yaml.YAMLError, PolicyError, TooDeep) as exc:
        options.fail(f"invalid policy file {path}: {exc}")


def cmd_hash(args: argparse.Namespace) -> int:
    from promptcache.proxy.domain.errors import BadRequest
    from promptcache.proxy.domain.prepare import prepare
    from promptcache.proxy.domain.tokens import (
        BlockCounter,
        TokenizerUnavailable,
        load_tokenizer,
        parse_tokenizer_flag,
    )

    policy = load_policy_file(args.policy)
    counter = None
    if args.tokenizer:
        try:
            counter = BlockCounter(load_tokenizer(parse_tokenizer_flag(args.tokenizer)), args.image_tokens)
        except TokenizerUnavailable as exc:
            options.fail(f"tokenizer unavailable: {exc}")
    try:
        body: Any = json.loads(options.read_input(args.file))
    except json.JSONDecodeError as exc:
        options.fail(f"invalid_request_error: body is not valid JSON: {exc}")
    try:
        prepared = prepare(body, args.api, policy, counter)
    except BadRequest as exc:
        options.fail(f"{exc.code}: {exc}")
    blocks = [
        {
            "index": block.position,
            "role": block.role,
            "hash": block.hash.hex(),
            "tokens": prepared.tokens[i] if prepared.tokens is not None else None,
            "breakpoint": prepared.tiers[i],
        }
        for i, block in enumerate(prepared.hashed)
    ]
    document = {"blocks": blocks, "forward": prepared.forward}
    options.write_output(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    return 0
