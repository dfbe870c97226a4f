"""Usage as each API reports it (docs/design.md#billing): read the upstream's totals, write back our split.

Provider cache fields from upstream are never passed through: the totals are taken from them
and the cache fields are replaced by the split we bill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from promptcache.proxy.domain.blocks import Api
from promptcache.proxy.domain.pricing import Split
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import MAX_COUNT

_ANTHROPIC_CACHE_KEYS = ("cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation")
_RESPONSES_CACHE_DETAILS = ("cached_tokens_per_turn", "cache_write_tokens_details")
"""The engine's own cache figures in ``input_tokens_details`` (vLLM's per turn, OpenAI's per 30m/12h), which our
split replaces: ours are per tier in ``cache_creation``."""


def _int(value: Any) -> int | None:
    """A token count as the ledger can hold it; anything else (negative, fractional, huge) is not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


def upstream_totals(usage: Any, api: Api) -> tuple[int, int] | None:
    """(prompt, completion) from an upstream usage object, or None when it is missing or malformed."""
    if not isinstance(usage, Mapping):
        return None
    if api == "openai":
        prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    elif api == "openai-responses":
        prompt, completion = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    else:
        parts = [_int(usage.get(k, 0)) for k in ("input_tokens", "cache_read_input_tokens",
                                                  "cache_creation_input_tokens")]
        prompt = None if any(p is None for p in parts) else sum(p for p in parts if p is not None)
        completion = _int(usage.get("output_tokens"))
    if prompt is None or completion is None:
        return None
    return prompt, completion


def engine_cached(body: Any, api: Api) -> int | None:
    """How many prompt tokens the upstream says it served from its own KV cache, or None when it does not say.

    ``body`` is the response (a completion, a stream chunk, an Anthropic message): OpenAI-style servers (vLLM,
    SGLang, llama-server) report ``usage.prompt_tokens_details.cached_tokens``, llama-server also
    ``timings.cache_n``, and an Anthropic-style upstream ``usage.cache_read_input_tokens``. Read before the
    usage is rewritten, since our split replaces those fields."""
    if not isinstance(body, Mapping):
        return None
    usage = body.get("usage")
    found: int | None = None
    if isinstance(usage, Mapping):
        if api != "anthropic":
            details = usage.get("prompt_tokens_details" if api == "openai" else "input_tokens_details")
            found = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else None
        else:
            found = _int(usage.get("cache_read_input_tokens"))
    timings = body.get("timings")
    if found is None and isinstance(timings, Mapping):
        found = _int(timings.get("cache_n"))
    return found


def _creation(split: Split) -> dict[str, int]:
    return {f"ephemeral_{tier}_input_tokens": split.creation.get(tier, 0) for tier in TIERS}


def openai_usage(split: Split, upstream: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = {k: v for k, v in (upstream or {}).items() if k not in _ANTHROPIC_CACHE_KEYS}
    details = dict(out.get("prompt_tokens_details") or {})
    details.update(cached_tokens=split.read, cache_write_tokens=split.creation_tokens)
    out.update(
        prompt_tokens=split.prompt,
        completion_tokens=split.completion,
        total_tokens=split.prompt + split.completion,
        prompt_tokens_details=details,
        cache_read_input_tokens=split.read,
        cache_creation_input_tokens=split.creation_tokens,
        cache_creation=_creation(split),
    )
    return out


def anthropic_usage(split: Split, upstream: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = dict(upstream or {})
    out.update(
        input_tokens=split.uncached,
        cache_read_input_tokens=split.read,
        cache_creation_input_tokens=split.creation_tokens,
        cache_creation=_creation(split),
        output_tokens=split.completion,
    )
    return out


def responses_usage(split: Split, upstream: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out = {k: v for k, v in (upstream or {}).items() if k not in _ANTHROPIC_CACHE_KEYS}
    upstream_details = out.get("input_tokens_details")
    details = {k: v for k, v in upstream_details.items() if k not in _RESPONSES_CACHE_DETAILS} \
        if isinstance(upstream_details, Mapping) else {}
    details.update(cached_tokens=split.read, cache_write_tokens=split.creation_tokens)
    out.update(
        input_tokens=split.prompt,
        output_tokens=split.completion,
        total_tokens=split.prompt + split.completion,
        input_tokens_details=details,
        cache_read_input_tokens=split.read,
        cache_creation_input_tokens=split.creation_tokens,
        cache_creation=_creation(split),
    )
    return out


def rewrite(split: Split, upstream: Mapping[str, Any] | None, api: Api) -> dict[str, Any]:
    if api == "openai":
        return openai_usage(split, upstream)
    return responses_usage(split, upstream) if api == "openai-responses" else anthropic_usage(split, upstream)
