"""What a replay proposes, parsed in one place for its two front ends (docs/design.md#inputs-and-proposals).

A PlanReplay's spec is parsed here field by field; ``promptcache replay`` spells the same fields as
flags (``--tier-override 5m=1h`` is ``tierOverride: {5m: 1h}``) and hands each to the same function,
so the two accept the same proposals. Errors are :class:`SpecError` in the spec's words; the CLI,
which knows which flag a value came from, words its own. The CRD's schema and CEL rules say most of
this already, but an API server that skips them (an old one, or the emulator in tests) must get a
reason, not a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from promptcache.operator.errors import SpecError
from promptcache.proxy.domain.policy import POLICY_KEYS, CachePolicy, PolicyError, parse_decimal
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import format_timestamp, parse_timestamp

UNITS = ("principal", "day", "request")
"""What the bootstrap resamples: a principal's requests, a UTC day's, or each request on its own."""


@dataclass(frozen=True)
class Proposal:
    policy: CachePolicy
    spec: Mapping[str, Any] = field(default_factory=dict)
    """The policy as given (camelCase), echoed in the result's params."""
    tier_override: Mapping[str, str] = field(default_factory=dict)
    price_overrides: Mapping[str, tuple[Decimal, Decimal]] = field(default_factory=dict)

    def tiers(self, recorded: Iterable[str | None]) -> list[str | None]:
        """Recorded tiers mapped by the override, then onto an enabled tier (else the default)."""
        out: list[str | None] = []
        for tier in recorded:
            if tier is not None:
                tier = self.tier_override.get(tier, tier)
                if tier not in self.policy.enabled_ttls:
                    tier = self.policy.default_ttl
            out.append(tier)
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def models(spec: Mapping[str, Any]) -> tuple[str, ...]:
    raw = spec.get("models")
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) and m for m in raw):
        raise SpecError("InvalidSpec", "models must be a non-empty list of DeployedModel aliases")
    return tuple(dict.fromkeys(raw))


def window(spec: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime]:
    """``window`` or ``lastHours`` (ending at ``now``) as ``[since, until)``."""
    bounds, hours = spec.get("window"), spec.get("lastHours")
    if (bounds is None) == (hours is None):
        raise SpecError("InvalidSpec", "set exactly one of window and lastHours")
    if hours is not None:
        if not _is_int(hours) or not 1 <= hours <= 8760:
            raise SpecError("InvalidSpec", f"lastHours must be an integer from 1 to 8760, got {hours!r}")
        return now - timedelta(hours=hours), now
    ends = []
    for key in ("start", "end"):
        value = bounds.get(key) if isinstance(bounds, Mapping) else None
        try:
            ends.append(parse_timestamp(value if isinstance(value, str) else ""))
        except ValueError:
            raise SpecError("InvalidSpec", f"window.{key} must be an RFC 3339 timestamp, got {value!r}") from None
    start, end = ends
    if start >= end:
        raise SpecError("EmptyWindow", f"window.start {format_timestamp(start)} is not before window.end "
                                       f"{format_timestamp(end)}")
    return start, end


def bootstrap(spec: Mapping[str, Any]) -> tuple[int, int, float, str]:
    """(seed, iterations, confidence, unit), with the CRD's defaults."""
    raw = spec.get("bootstrap") or {}
    if not isinstance(raw, Mapping):
        raise SpecError("InvalidSpec", "bootstrap must be an object with iterations, confidence, seed and unit")
    iterations, confidence = raw.get("iterations", 2000), raw.get("confidence", 0.95)
    seed, unit = raw.get("seed", 0), raw.get("unit", "principal")
    if not _is_int(iterations) or not 100 <= iterations <= 100_000:
        raise SpecError("InvalidSpec",
                        f"bootstrap.iterations must be an integer from 100 to 100000, got {iterations!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 < confidence <= 0.999:
        raise SpecError("InvalidSpec", f"bootstrap.confidence must be in (0.5, 0.999], got {confidence!r}")
    if not _is_int(seed) or seed < 0:
        raise SpecError("InvalidSpec", f"bootstrap.seed must be a non-negative integer, got {seed!r}")
    if unit not in UNITS:
        raise SpecError("InvalidSpec", f"bootstrap.unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return seed, iterations, float(confidence), unit


def tier_override(raw: Any) -> dict[str, str]:
    """``tierOverride``: recorded tier to projected tier."""
    raw = raw or {}
    if not isinstance(raw, Mapping) or not all(k in TIERS and v in TIERS for k, v in raw.items()):
        raise SpecError("InvalidSpec", f"tierOverride must map tiers to tiers ({', '.join(TIERS)}), got {raw!r}")
    return dict(raw)


def price_overrides(raw: Any, models: Sequence[str] | None) -> dict[str, tuple[Decimal, Decimal]]:
    """``pricingOverrides``: a replayed model's (input, output) USD per million tokens; None: any model."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise SpecError("InvalidSpec", "pricingOverrides must map model aliases to inputPerMTok and outputPerMTok")
    out = {}
    for model, prices in raw.items():
        if models is not None and model not in models:
            raise SpecError("InvalidSpec", f"pricingOverrides names {model!r}, which is not one of models")
        if not isinstance(prices, Mapping):
            raise SpecError("InvalidSpec", f"pricingOverrides.{model} must have inputPerMTok and outputPerMTok")
        try:
            inp, outp = (parse_decimal(prices.get(key), f"pricingOverrides.{model}.{key}")
                         for key in ("inputPerMTok", "outputPerMTok"))
        except PolicyError as exc:
            raise SpecError("InvalidSpec", str(exc)) from None
        if min(inp, outp) < 0:
            raise SpecError("InvalidSpec", f"pricingOverrides.{model}: prices must not be negative")
        out[model] = (inp, outp)
    return out


def policy_reference(spec: Mapping[str, Any]) -> str | None:
    """The CachePolicy ``cachePolicyRef`` names, or None for an inline ``policy``: exactly one is set."""
    inline, ref = spec.get("policy"), spec.get("cachePolicyRef")
    if (inline is None) == (ref is None):
        raise SpecError("InvalidSpec", "set exactly one of policy and cachePolicyRef")
    if ref is None:
        return None
    name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError("InvalidSpec", "cachePolicyRef.name must name a CachePolicy")
    return name


def policy(source: Any, where: str) -> tuple[CachePolicy, dict[str, Any]]:
    """The proposed policy and its keys as given (echoed in the result, so inline, referenced and file agree).

    ``where`` names the source in messages: ``policy``, ``CachePolicy NS/NAME``, ``invalid policy file F``.
    """
    try:
        proposed = CachePolicy.from_spec(source)
    except PolicyError as exc:
        raise SpecError("InvalidPolicy", f"{where}: {exc}") from None
    # `redis` is part of a CachePolicy spec but not of what replay projects.
    return proposed, {key: value for key, value in (source or {}).items() if key in POLICY_KEYS}
