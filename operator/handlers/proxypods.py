"""What a model's proxy pods say about its config (docs/design.md#reconciling-a-deployedmodel).

The operator cannot read a tokenizer file that lives in a volume only the pods mount, so the proxy is the judge: one
that refuses its config exits ``EX_CONFIG`` with ``invalid config: <reason>`` as the last line of its log, which
the kubelet keeps as the container's termination message (``terminationMessagePolicy: FallbackToLogsOnError``).
A pod of the model's current config that did so stalls the model with the proxy's own words, instead of leaving
it Reconciling behind a rollout that cannot finish; the model recovers when its Deployment is complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from promptcache.operator.constants import CHECKSUM_ANNOTATION
from promptcache.operator.handlers.conditions import Condition
from promptcache.proxy.config import EX_CONFIG

CONTAINER = "proxy"
REJECTED = "ConfigRejected"
"""Ready's reason while the pods refuse the config; Stalled's is InvalidSpec, as for a spec the operator refuses."""
_PREFIX = "invalid config: "


def checksum(pod: Mapping[str, Any]) -> str | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(CHECKSUM_ANNOTATION)
    return value if isinstance(value, str) else None


def _reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(_PREFIX):
            return line[len(_PREFIX):]
    return lines[-1] if lines else f"the proxy exited {EX_CONFIG} (invalid config) without a message"


def rejection(pod: Mapping[str, Any]) -> str | None:
    """Why the pod's proxy refused its config, if it last exited ``EX_CONFIG`` and is not ready since."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != CONTAINER or status.get("ready"):
            continue
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            terminated = state.get("terminated") or {}
            if terminated.get("exitCode") == EX_CONFIG:
                name = (pod.get("metadata") or {}).get("name", "?")
                return f"proxy pod {name} refused its config: {_reason(str(terminated.get('message') or ''))}"
    return None


def first_rejection(pods: Iterable[Mapping[str, Any]], config_checksum: str) -> str | None:
    """The rejection of the first pod (by name) running ``config_checksum``; older configs' pods do not count."""
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        if checksum(pod) == config_checksum:
            found = rejection(pod)
            if found is not None:
                return found
    return None


def stalled(message: str) -> list[Condition]:
    return [Condition("Ready", False, REJECTED, message), Condition("Reconciling", False, REJECTED, message),
            Condition("Stalled", True, "InvalidSpec", message)]
