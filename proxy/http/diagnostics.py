"""Cache-miss diagnostics as each API asks for and carries them (docs/design.md#cache-miss-diagnostics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptcache.proxy.domain.blocks import Api
from promptcache.proxy.domain.diagnose import Diagnosis
from promptcache.proxy.domain.errors import BadRequest

HEADER = "x-promptcache-diagnose"
"""OpenAI's APIs: the id of the previous request to compare with (ours, or the upstream's response id)."""
MAX_ID = 256
_ANTHROPIC_NAMES = {"previous_request_not_found": "previous_message_not_found"}
"""Where Anthropic has its own name for a reason."""
_OPENAI_TYPES = {"previous_request_not_found": "comparison_response_not_found", "unavailable": "unavailable"}
"""Reasons OpenAI's ``prompt_cache_diagnostics`` has a type of their own for (nothing was compared)."""


@dataclass(frozen=True)
class Asked:
    previous: str | None
    """The id to compare with; None: diagnostics asked for with nothing to compare yet (a first turn)."""


def asked(body: dict[str, Any], headers: Any, api: Api) -> Asked | None:
    """Whether and against what a request asks for diagnostics; a 400 naming the field for a malformed ask."""
    if api == "anthropic":
        if body.get("diagnostics") is None:
            return None
        ask = body["diagnostics"]
        if not isinstance(ask, dict) or set(ask) - {"previous_message_id"}:
            raise BadRequest("diagnostics must be an object with only previous_message_id")
        return Asked(_ident(ask.get("previous_message_id"), "diagnostics.previous_message_id"))
    options = body.get("prompt_cache_options")
    comparison = options.get("comparison_response_id") if isinstance(options, dict) else None
    sent = headers.get(HEADER)
    if sent is not None:
        return Asked(_ident(sent.strip(), HEADER))
    if api == "openai-responses" and comparison is not None:
        return Asked(_ident(comparison, "prompt_cache_options.comparison_response_id"))
    return None


def _ident(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID or not (value.isascii() and value.isprintable()):
        raise BadRequest(f"{field} must be a request or response id: 1 to {MAX_ID} printable ASCII characters")
    return value


def rendered(api: Api, diagnosis: Diagnosis) -> tuple[str, dict[str, Any]]:
    """The response field and its value: Anthropic's ``diagnostics``, OpenAI's ``prompt_cache_diagnostics``."""
    block = {"block": diagnosis.block} if diagnosis.block is not None else {}
    if api == "anthropic":
        if diagnosis.reason is None:
            return "diagnostics", {"cache_miss_reason": None}
        reason: dict[str, Any] = {"type": _ANTHROPIC_NAMES.get(diagnosis.reason, diagnosis.reason)}
        if diagnosis.reason != "previous_request_not_found":  # as Anthropic's own: nothing was compared
            reason.update(cache_missed_input_tokens=diagnosis.missed_tokens, **block)
        return "diagnostics", {"cache_miss_reason": reason}
    if diagnosis.reason in _OPENAI_TYPES:  # OpenAI's own types for these, as its SDK knows them
        return "prompt_cache_diagnostics", {"type": _OPENAI_TYPES[diagnosis.reason]}
    if diagnosis.reason is None:
        return "prompt_cache_diagnostics", {"type": "cache_hit",
                                            "comparison_reusable_tokens": diagnosis.reusable_tokens}
    return "prompt_cache_diagnostics", {"type": "cache_miss", "reason": diagnosis.reason,
                                        "cache_missed_tokens": diagnosis.missed_tokens,
                                        "comparison_reusable_tokens": diagnosis.reusable_tokens, **block}


def response_id(value: Any) -> str | None:
    """The upstream's id of its answer, as the request log keeps it: a string of at most :data:`MAX_ID` characters
    without NUL; anything else is not kept."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID and "\x00" not in value else None
