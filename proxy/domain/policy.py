"""The cache policy: which tiers exist, what they cost, and the limits markers must respect.

Parsed from the ``cache`` section of the proxy config, a ``CachePolicy`` spec, or a replay's
proposed policy; one parser so the three can never disagree on defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from promptcache.proxy.domain.tiers import TIERS

AUTOMATIC_MODES = ("off", "lastBlock", "lastUserMessage")
POLICY_KEYS = frozenset({
    "enabledTtls", "defaultTtl", "writeMultipliers", "readMultiplier", "minPrefixTokens",
    "maxBreakpoints", "lookbackBlocks", "automatic", "ignorePrefixes",
})
"""The ``cache`` keys of docs/design.md#the-request-path; a CachePolicy spec adds ``redis``, which the proxy does not
read."""
DEFAULT_WRITE_MULTIPLIERS: Mapping[str, Decimal] = MappingProxyType(
    {"5m": Decimal("1.25"), "1h": Decimal("2.0"), "24h": Decimal("2.5")}
)
DEFAULT_READ_MULTIPLIER = Decimal("0.1")
MAX_MULTIPLIER = Decimal(100)


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class CachePolicy:
    enabled_ttls: tuple[str, ...] = TIERS
    default_ttl: str = "5m"
    write_multipliers: Mapping[str, Decimal] = field(default_factory=lambda: DEFAULT_WRITE_MULTIPLIERS)
    read_multiplier: Decimal = DEFAULT_READ_MULTIPLIER
    min_prefix_tokens: int = 1024
    max_breakpoints: int = 4
    lookback_blocks: int = 20
    automatic_mode: str = "off"
    automatic_ttl: str | None = None
    ignore_prefixes: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> CachePolicy:
        """Build a policy from camelCase keys (config ``cache`` section or CRD spec)."""
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise PolicyError("cache policy must be a mapping")
        unknown_keys = set(spec) - POLICY_KEYS - {"redis"}
        if unknown_keys:
            raise PolicyError(f"unknown cache policy keys {sorted(unknown_keys)}; known: {sorted(POLICY_KEYS)}")
        enabled = _tiers(spec.get("enabledTtls", list(TIERS)), "enabledTtls")
        if not enabled:
            raise PolicyError("enabledTtls must name at least one tier")
        default_ttl = spec.get("defaultTtl", "5m" if "5m" in enabled else enabled[0])
        if default_ttl not in enabled:
            raise PolicyError(f"defaultTtl {default_ttl!r} is not one of enabledTtls {list(enabled)}")
        raw_writes = spec.get("writeMultipliers", {})
        if not isinstance(raw_writes, Mapping):
            raise PolicyError("writeMultipliers must be a mapping of tier to multiplier")
        unknown = set(raw_writes) - set(TIERS)
        if unknown:
            raise PolicyError(f"writeMultipliers has unknown tiers {sorted(unknown)}; known: {list(TIERS)}")
        writes = {
            tier: _multiplier(raw_writes.get(tier, DEFAULT_WRITE_MULTIPLIERS[tier]), f"writeMultipliers.{tier}")
            for tier in TIERS
        }
        automatic = spec.get("automatic")
        automatic = {} if automatic is None else automatic
        if not isinstance(automatic, Mapping):
            raise PolicyError("automatic must be a mapping with mode and ttl")
        unknown_auto = set(automatic) - {"mode", "ttl"}
        if unknown_auto:
            raise PolicyError(f"automatic: unknown keys {sorted(unknown_auto)}; known: ['mode', 'ttl']")
        mode = automatic.get("mode", "off")
        if mode not in AUTOMATIC_MODES:
            raise PolicyError(f"automatic.mode {mode!r} is not one of {list(AUTOMATIC_MODES)}")
        auto_ttl = automatic.get("ttl")
        if mode != "off":
            auto_ttl = auto_ttl or default_ttl
            if auto_ttl not in enabled:
                raise PolicyError(f"automatic.ttl {auto_ttl!r} is not one of enabledTtls {list(enabled)}")
        ignore = spec.get("ignorePrefixes", [])
        if not isinstance(ignore, list) or not all(isinstance(p, str) and p for p in ignore):
            raise PolicyError("ignorePrefixes must be a list of non-empty strings")
        return cls(
            enabled_ttls=enabled,
            default_ttl=default_ttl,
            write_multipliers=MappingProxyType(writes),
            read_multiplier=_multiplier(spec.get("readMultiplier", DEFAULT_READ_MULTIPLIER), "readMultiplier"),
            min_prefix_tokens=_int(spec.get("minPrefixTokens", 1024), "minPrefixTokens", 0),
            max_breakpoints=_int(spec.get("maxBreakpoints", 4), "maxBreakpoints", 1),
            lookback_blocks=_int(spec.get("lookbackBlocks", 20), "lookbackBlocks", 1),
            automatic_mode=mode,
            automatic_ttl=auto_ttl if mode != "off" else None,
            ignore_prefixes=tuple(ignore),
        )


def _tiers(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise PolicyError(f"{key} must be a list of tiers from {list(TIERS)}")
    unknown = [t for t in value if t not in TIERS]
    if unknown:
        raise PolicyError(f"{key} has unknown tiers {unknown}; known: {list(TIERS)}")
    return tuple(t for t in TIERS if t in value)


def parse_decimal(value: Any, key: str) -> Decimal:
    """Decimals arrive as strings (preferred), ints or YAML floats; bools and junk are errors."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise PolicyError(f"{key} must be a decimal string, got {value!r}")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise PolicyError(f"{key} must be a decimal string, got {value!r}") from None
    if not result.is_finite():
        raise PolicyError(f"{key} must be finite, got {value!r}")
    return result


def _multiplier(value: Any, key: str) -> Decimal:
    result = parse_decimal(value, key)
    if not Decimal(0) <= result < MAX_MULTIPLIER:
        raise PolicyError(f"{key} must be in [0, 100), got {value!r}")
    return result


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def policy_from_document(doc: Any) -> CachePolicy:
    """A policy from a YAML document: a ``CachePolicy`` resource, a config with ``cache``, or bare keys."""
    if isinstance(doc, Mapping) and doc.get("kind") == "CachePolicy":
        doc = doc.get("spec")
    elif isinstance(doc, Mapping) and "cache" in doc:
        doc = doc["cache"]
    return CachePolicy.from_spec(doc)
