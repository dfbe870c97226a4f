"""The Argo CD health checks (Lua) run with a real Lua runtime on sample objects (docs/design.md#packaging)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "examples" / "argocd"
CONDITIONS = (ARGOCD / "health-conditions.lua").read_text()
PLANREPLAY = (ARGOCD / "health-planreplay.lua").read_text()
HEALTH_KEYS = {
    "resource.customizations.health.promptcache.io_DeployedModel": CONDITIONS,
    "resource.customizations.health.promptcache.io_CachePolicy": CONDITIONS,
    "resource.customizations.health.promptcache.io_PlanReplay": PLANREPLAY,
}


def lua_value(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: lua_value(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([lua_value(lua, v) for v in value])
    return value


def health(script: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Run the check as Argo CD does: ``obj`` is a global, the chunk returns the health table."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua_value(lua, obj)
    result = lua.execute(script)
    return str(result["status"]), str(result["message"])


def resource(generation: int, observed: int | None, conditions: list[dict[str, str]] | None = None,
             **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "x", "generation": generation}}
    if observed is not None or conditions or status:
        obj["status"] = {**status, "conditions": conditions or []}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


def cond(kind: str, status: str, reason: str = "R", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(("obj", "expected"), [
    (resource(1, None), ("Progressing", "Waiting for the operator to observe the latest spec")),
    (resource(3, 2, [cond("Ready", "True")]), ("Progressing", "Waiting for the operator to observe the latest spec")),
    (resource(2, 2, [cond("Ready", "True", "DeploymentAvailable", "2/2 proxy replicas available"),
                     cond("Stalled", "False")]), ("Healthy", "2/2 proxy replicas available")),
    (resource(2, 2, [cond("Ready", "False", "CachePolicyNotFound", "CachePolicy llm/x does not exist"),
                     cond("Stalled", "True", "CachePolicyNotFound", "CachePolicy llm/x does not exist")]),
     ("Degraded", "CachePolicyNotFound: CachePolicy llm/x does not exist")),
    (resource(1, 1, [cond("Ready", "False", "DeploymentProgressing", "0/2 proxy replicas available"),
                     cond("Stalled", "False")]), ("Progressing", "0/2 proxy replicas available")),
    (resource(1, 1, []), ("Progressing", "Reconciling")),
])
def test_deployedmodel_and_cachepolicy_health(obj: dict[str, Any], expected: tuple[str, str]) -> None:
    assert health(CONDITIONS, obj) == expected


@pytest.mark.parametrize(("obj", "expected"), [
    (resource(1, None), ("Progressing", "Waiting for the replay of the latest spec")),
    (resource(2, 1, phase="Succeeded"), ("Progressing", "Waiting for the replay of the latest spec")),
    (resource(1, 1, phase="Running"), ("Progressing", "replay running")),
    (resource(1, 1, phase="Pending"), ("Progressing", "replay pending")),
    (resource(1, 1, [cond("Ready", "True", "Succeeded")], phase="Succeeded",
              summary={"savingsPct": "12.5"}), ("Healthy", "projected savings 12.5%")),
    (resource(1, 1, [cond("Stalled", "True", "EmptyWindow", "no log rows in the window")], phase="Failed"),
     ("Degraded", "EmptyWindow: no log rows in the window")),
])
def test_planreplay_health(obj: dict[str, Any], expected: tuple[str, str]) -> None:
    assert health(PLANREPLAY, obj) == expected


def test_the_argocd_cm_patch_only_adds_these_scripts() -> None:
    """A patch to merge into Argo CD's own argocd-cm, not a whole ConfigMap to apply over it: it names the
    ConfigMap (no namespace, so a kustomization that sets one still matches it) and adds only the three keys."""
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert set(patch) == {"apiVersion", "kind", "metadata", "data"}
    assert (patch["apiVersion"], patch["kind"], patch["metadata"]) == ("v1", "ConfigMap", {"name": "argocd-cm"})
    assert patch["data"] == HEALTH_KEYS


def test_the_argo_cd_helm_values_hold_the_same_keys() -> None:
    """The same keys as values of Argo CD's Helm chart, which merges configs.cm into the argocd-cm it renders."""
    values = yaml.safe_load((ARGOCD / "argo-cd-values.yaml").read_text())
    assert values == {"configs": {"cm": HEALTH_KEYS}}


def test_no_whole_argocd_configmap_is_shipped() -> None:
    assert sorted(p.name for p in ARGOCD.iterdir()) == [
        "argo-cd-values.yaml", "argocd-cm-patch.yaml", "health-conditions.lua", "health-planreplay.lua"]


def test_the_planreplay_check_reads_status_fields_the_crd_declares() -> None:
    """The Lua reads camelCase status fields the operator writes (a renamed field would silently read nil)."""
    crd = yaml.safe_load((ROOT / "crds" / "promptcache.io_planreplays.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    read = set(re.findall(r"obj\.status\.((?:\w+\.)*\w+)", PLANREPLAY))
    assert "summary.savingsPct" in read
    for path in read:
        node = status
        for part in path.split("."):
            node = node["properties"][part] if node.get("type") == "object" else node["items"]["properties"][part]
