"""SPEC §6: the exact cost of a request from its token split and the tariff in force.

Money is :class:`~decimal.Decimal` end to end. The upstream's usage is the truth for token
totals; our split must fit inside it or it is not used at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType

from promptcache.proxy.domain.classify import Classification
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIERS

MILLION = Decimal(1_000_000)
_ZERO_CREATION: Mapping[str, int] = MappingProxyType({tier: 0 for tier in TIERS})


@dataclass(frozen=True)
class Tariff:
    """One version of a model's prices and multipliers; ``valid_until`` None is the active one."""

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    write_multipliers: Mapping[str, Decimal]
    read_multiplier: Decimal
    version: int = 0
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    @classmethod
    def for_policy(
        cls, model: str, input_per_mtok: Decimal, output_per_mtok: Decimal, policy: CachePolicy
    ) -> Tariff:
        """A not-yet-stored tariff: a model's prices with its policy's multipliers."""
        return cls(model, input_per_mtok, output_per_mtok, policy.write_multipliers, policy.read_multiplier)

    def same_prices(self, other: Tariff) -> bool:
        return (
            self.input_per_mtok == other.input_per_mtok
            and self.output_per_mtok == other.output_per_mtok
            and self.read_multiplier == other.read_multiplier
            and all(self.write_multipliers[t] == other.write_multipliers[t] for t in TIERS)
        )

    def in_force(self, at: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= at) and (
            self.valid_until is None or at < self.valid_until
        )


def tariff_at(tariffs: Sequence[Tariff], at: datetime) -> Tariff | None:
    """The version in force when a request started (the latest one whose window holds ``at``)."""
    matching = [t for t in tariffs if t.in_force(at)]
    return max(matching, key=lambda t: (t.valid_from is not None, t.valid_from or at, t.version), default=None)


@dataclass(frozen=True)
class Split:
    """The billed token split. ``uncached`` is what is left of the prompt after read and creation."""

    prompt: int
    completion: int
    read: int = 0
    creation: Mapping[str, int] = field(default_factory=lambda: _ZERO_CREATION)
    cache_valid: bool = True

    @property
    def creation_tokens(self) -> int:
        return sum(self.creation.values())

    @property
    def uncached(self) -> int:
        return self.prompt - self.read - self.creation_tokens


def reconcile(prompt: int, completion: int, classification: Classification | None) -> Split:
    """Fit our split into the upstream's prompt count.

    No classification (index down, no tokenizer, deadline passed) is list price. If read plus
    creation overshoots the prompt, the read shrinks to fit; if creation alone does, the
    split is corrupt: list price, zero cache fields, and ``cache_valid`` False so nothing is
    written.
    """
    if classification is None:
        return Split(prompt, completion)
    creation = dict(classification.creation)
    created = sum(creation.values())
    if created > prompt or any(v < 0 for v in creation.values()):
        return Split(prompt, completion, cache_valid=False)
    read = min(classification.read_tokens, prompt - created)
    return Split(prompt, completion, read, MappingProxyType(creation))


def cost(split: Split, tariff: Tariff) -> Decimal:
    """(uncached·in + read·in·readMult + Σ creation_t·in·writeMult_t + completion·out) / 10⁶."""
    inp = tariff.input_per_mtok
    total = Decimal(split.uncached) * inp + Decimal(split.read) * inp * tariff.read_multiplier
    for tier, tokens in split.creation.items():
        total += Decimal(tokens) * inp * tariff.write_multipliers[tier]
    total += Decimal(split.completion) * tariff.output_per_mtok
    return total / MILLION


def list_cost(split: Split, tariff: Tariff) -> Decimal:
    """What the request would cost with no cache at all."""
    prompt = Decimal(split.prompt) * tariff.input_per_mtok
    return (prompt + Decimal(split.completion) * tariff.output_per_mtok) / MILLION
