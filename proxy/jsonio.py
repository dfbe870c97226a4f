"""Fast JSON on the request path (orjson), with the standard library for what orjson refuses.

orjson rejects a few inputs ``json`` accepts (NaN, integers beyond 64 bits, lone surrogates);
falling back keeps the accepted language exactly the standard library's, so the parsed values,
and therefore the prefix hashes (always computed with ``json``, SPEC §2), do not depend on which
parser ran.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()
