"""What the proxy takes as the engine's own cache count (docs/design.md#engine-verified-cache-reads), from each
shape an upstream reports it in, and nothing from a field that is missing, malformed or hostile; and the usage totals
refuse counts no ledger column can hold."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.proxy.domain.blocks import Api
from promptcache.proxy.http.usage import engine_cached, upstream_totals


@pytest.mark.parametrize(("body", "api", "expected"), [
    ({"usage": {"prompt_tokens": 25, "prompt_tokens_details": {"cached_tokens": 24}}}, "openai", 24),
    ({"usage": {"prompt_tokens": 25, "prompt_tokens_details": {"cached_tokens": 24}}, "timings": {"cache_n": 3}},
     "openai", 24),  # the usage field first: it is the API's
    ({"usage": {"prompt_tokens": 25}, "timings": {"cache_n": 24, "prompt_n": 1}}, "openai", 24),
    ({"usage": {"prompt_tokens": 25, "prompt_tokens_details": None}, "timings": {"cache_n": 0}}, "openai", 0),
    ({"usage": {"input_tokens": 1, "cache_read_input_tokens": 24, "output_tokens": 4}}, "anthropic", 24),
    ({"usage": {"input_tokens": 1, "output_tokens": 4}}, "anthropic", None),
    ({"usage": {"prompt_tokens": 25}}, "openai", None),
    ({"usage": {"prompt_tokens": 25, "cache_read_input_tokens": 24}}, "openai", None),  # not OpenAI's field
    ({"usage": {"prompt_tokens_details": {"cached_tokens": -1}}}, "openai", None),
    ({"usage": {"prompt_tokens_details": {"cached_tokens": True}}}, "openai", None),
    ({"usage": {"prompt_tokens_details": {"cached_tokens": "24"}}}, "openai", None),
    ({"usage": {"prompt_tokens_details": {"cached_tokens": 2.5}}}, "openai", None),
    ({"usage": {"prompt_tokens_details": [24]}}, "openai", None),
    ({"timings": {"cache_n": -5}}, "openai", None),
    ({"timings": {"cache_n": 2**31}}, "openai", None),  # more than a ledger column holds: not a count
    ({"usage": {"prompt_tokens_details": {"cached_tokens": 10**400}}}, "openai", None),
    ({"usage": {"cache_read_input_tokens": 2**31 - 1}}, "anthropic", 2**31 - 1),
    ({"timings": "fast"}, "openai", None),
    ({"usage": "none"}, "anthropic", None),
    ([], "openai", None),
    (None, "anthropic", None),
])
def test_the_engines_count(body: Any, api: Api, expected: int | None) -> None:
    assert engine_cached(body, api) == expected


@pytest.mark.parametrize(("usage", "api", "expected"), [
    ({"prompt_tokens": 25, "completion_tokens": 4}, "openai", (25, 4)),
    ({"prompt_tokens": 2**31, "completion_tokens": 4}, "openai", None),
    ({"prompt_tokens": 25, "completion_tokens": 10**30}, "openai", None),
    ({"input_tokens": 1, "cache_read_input_tokens": 24, "output_tokens": 4}, "anthropic", (25, 4)),
    ({"input_tokens": 1, "cache_read_input_tokens": 2**40, "output_tokens": 4}, "anthropic", None),
])
def test_a_usage_total_beyond_a_ledger_column_is_no_usage(usage: Any, api: Api,
                                                          expected: tuple[int, int] | None) -> None:
    """A huge count would fail the ledger's insert after the answer went out; it is refused as no usage (502)."""
    assert upstream_totals(usage, api) == expected
