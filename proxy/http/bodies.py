"""Request bodies as sent with ``Content-Encoding`` (docs/design.md#endpoints): decoded here, bounded, or refused.

aiohttp's own decoding answers an undecodable body with a traceback-free but plain-text 400 (or, for deflate, a
500 after the fact) and lets a small gzip expand without bound; here the expanded size is held to the body limit
while decoding, and every failure is a :class:`UndecodableBody` the proxy answers in the calling API's shape.
"""

from __future__ import annotations

import zlib

SUPPORTED = ("identity", "gzip", "x-gzip", "deflate")
"""``br`` and ``zstd`` are refused: their Python decoders cannot bound the size they expand to."""


class UndecodableBody(ValueError):
    """An encoding we do not take, or data that is not what its encoding says."""


class BodyTooLarge(ValueError):
    """The body, decoded, is over the limit."""


def decoded(raw: bytes, header: str, limit: int) -> bytes:
    """``raw`` with every listed ``Content-Encoding`` undone (the last applied first), at most ``limit`` bytes."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding not in SUPPORTED:
            raise UndecodableBody(f"Content-Encoding {coding!r} is not supported; send one of {', '.join(SUPPORTED)}")
        if coding in ("gzip", "x-gzip"):
            raw = _inflate(raw, zlib.MAX_WBITS | 16, coding, limit)
        elif coding == "deflate":  # RFC 9110's deflate is zlib-wrapped; some clients send it raw
            try:
                raw = _inflate(raw, zlib.MAX_WBITS, coding, limit)
            except UndecodableBody:
                raw = _inflate(raw, -zlib.MAX_WBITS, coding, limit)
    return raw


def _inflate(data: bytes, wbits: int, coding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise UndecodableBody(f"request body is not valid {coding} data: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"request body is larger than the {limit}-byte limit once decoded ({coding})")
    if not inflater.eof or inflater.unused_data:
        raise UndecodableBody(f"request body is not valid {coding} data: truncated or followed by extra bytes")
    return out
