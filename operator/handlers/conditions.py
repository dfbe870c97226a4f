"""Status conditions (docs/design.md#custom-resources): Ready, Reconciling, Stalled, keyed by type.

``lastTransitionTime`` moves only when a condition's status flips, so a user reading
``kubectl describe`` sees when things changed, not when the operator last looked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(current: Iterable[Mapping[str, Any]] | None, updates: Iterable[Condition],
          generation: int | None) -> list[dict[str, Any]]:
    """The full conditions list after ``updates`` (a status merge patch replaces lists whole)."""
    by_type = {c["type"]: dict(c) for c in current or () if isinstance(c, Mapping) and "type" in c}
    for update in updates:
        status = "True" if update.status else "False"
        previous = by_type.get(update.type)
        since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
        entry: dict[str, Any] = {"type": update.type, "status": status, "reason": update.reason,
                                 "message": update.message, "lastTransitionTime": since or now_rfc3339()}
        if generation is not None:
            entry["observedGeneration"] = generation
        by_type[update.type] = entry
    return sorted(by_type.values(), key=lambda c: str(c["type"]))


def is_true(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions or ())


def stalled(reason: str, message: str) -> list[Condition]:
    return [Condition("Ready", False, reason, message), Condition("Reconciling", False, reason, message),
            Condition("Stalled", True, reason, message)]
