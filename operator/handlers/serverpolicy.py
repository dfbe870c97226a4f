"""The security baseline of a sidecar model server (docs/design.md#reconciling-a-deployedmodel).

``spec.server`` is a container a DeployedModel's author writes and the operator's ServiceAccount creates, so
whoever may write a DeployedModel could otherwise run a privileged root container, or mount the node's filesystem,
with the operator's rights. Unless the operator runs with ``PROMPTCACHE_SERVER_SECURITY=unrestricted``, the server
gets the baseline below: what it leaves unset is filled in, what contradicts it is refused (InvalidSpec, naming
every field), a tokenizer volume may not be a hostPath, and the server may read only the Secrets the operator's
``PROMPTCACHE_SERVER_SECRETS`` names (``name`` in any namespace, or ``namespace/name``): the kubelet would hand
the pod any Secret of its namespace, including ones the DeployedModel's author may not read.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from promptcache.operator.errors import SpecError

RESTRICTED, UNRESTRICTED = "restricted", "unrestricted"
BASELINE: dict[str, Any] = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def secret_allowed(name: str, namespace: str, allowed: Collection[str]) -> bool:
    return name in allowed or f"{namespace}/{name}" in allowed


def _field(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _secrets(server: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every Secret the container reads, as (field, name); shapes the CRD refuses are skipped, not crashed on."""
    found = []
    for i, var in enumerate(_items(server.get("env"))):
        ref = _field(_field(var, "valueFrom"), "secretKeyRef")
        if isinstance(ref, Mapping):
            found.append((f"spec.server.env[{i}].valueFrom.secretKeyRef", str(ref.get("name", ""))))
    for i, source in enumerate(_items(server.get("envFrom"))):
        ref = _field(source, "secretRef")
        if isinstance(ref, Mapping):
            found.append((f"spec.server.envFrom[{i}].secretRef", str(ref.get("name", ""))))
    return found


def violations(server: Mapping[str, Any], tokenizer: Mapping[str, Any], namespace: str = "",
               allowed_secrets: Collection[str] = ()) -> list[str]:
    """What in the server container (and the tokenizer volume) breaks the baseline, as ``field: why``."""
    context = server.get("securityContext") or {}
    if not isinstance(context, Mapping):
        return ["spec.server.securityContext: must be an object"]
    where = "spec.server.securityContext"
    found = []
    if context.get("privileged") is True:
        found.append(f"{where}.privileged: a privileged server is not allowed")
    if context.get("allowPrivilegeEscalation") is True:
        found.append(f"{where}.allowPrivilegeEscalation: must be false")
    if context.get("runAsNonRoot") is False:
        found.append(f"{where}.runAsNonRoot: must be true")
    if context.get("runAsUser") == 0:
        found.append(f"{where}.runAsUser: 0 is root")
    capabilities = context.get("capabilities") or {}
    if isinstance(capabilities, Mapping) and capabilities.get("add"):
        found.append(f"{where}.capabilities.add: no capability may be added")
    seccomp = context.get("seccompProfile") or {}
    if isinstance(seccomp, Mapping) and seccomp.get("type") == "Unconfined":
        found.append(f"{where}.seccompProfile.type: Unconfined is not allowed")
    if isinstance(tokenizer.get("volume"), Mapping) and "hostPath" in tokenizer["volume"]:
        found.append("spec.tokenizer.volume.hostPath: the node's filesystem may not be mounted")
    for field, name in _secrets(server):
        if not secret_allowed(name, namespace, allowed_secrets):
            found.append(f"{field}: Secret {name!r} is not one the operator lets servers read "
                         "(PROMPTCACHE_SERVER_SECRETS)")
    secret = _field(tokenizer.get("volume"), "secret")
    if isinstance(secret, Mapping):
        name = str(secret.get("secretName", ""))
        if not secret_allowed(name, namespace, allowed_secrets):
            found.append(f"spec.tokenizer.volume.secret: Secret {name!r} is not one the operator lets servers read "
                         "(PROMPTCACHE_SERVER_SECRETS)")
    return found


def check(spec: Mapping[str, Any], mode: str, namespace: str = "", allowed_secrets: Collection[str] = ()) -> None:
    """InvalidSpec listing every violation, in restricted mode; nothing in unrestricted mode."""
    if mode == UNRESTRICTED:
        return
    found = violations(spec.get("server") or {}, spec.get("tokenizer") or {}, namespace, allowed_secrets)
    if found:
        raise SpecError("InvalidSpec", "the security baseline (PROMPTCACHE_SERVER_SECURITY=restricted) refuses "
                                       + "; ".join(found))


def server_container(server: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The server container as the pod gets it: the baseline filled in under what the spec sets (restricted)."""
    container = dict(server)
    if mode == UNRESTRICTED:
        return container
    given = dict(server.get("securityContext") or {})
    container["securityContext"] = {**BASELINE, **given}
    return container
