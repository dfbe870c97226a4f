"""Fast JSON on the request path (orjson), with the standard library for what orjson refuses.

orjson rejects a few inputs ``json`` accepts (NaN, integers beyond 64 bits, lone surrogates);
falling back keeps the accepted language exactly the standard library's, so the parsed values,
and therefore the prefix hashes (always computed with ``json``, docs/design.md#blocks-and-prefix-hashes), do not
depend on which
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


class UnpairedSurrogate(ValueError):
    """An escaped lone surrogate: ``json`` parses it, but it is no Unicode and cannot be hashed or sent."""


def loads_text(raw: bytes) -> Any:
    """:func:`loads` for a document that must be real Unicode: raises :class:`UnpairedSurrogate`.

    orjson refuses lone surrogates itself, so only a document it could not parse is checked,
    and the common case pays nothing.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = json.loads(raw)
    if b"\\u" in raw:
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise UnpairedSurrogate("contains an unpaired UTF-16 surrogate escape") from None
    return value


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()
