"""The Argo CD health checks (Lua) run with a real Lua runtime on sample objects (docs/design.md#packaging)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

ARGOCD = Path(__file__).resolve().parents[2] / "examples" / "argocd"
CONDITIONS = (ARGOCD / "health-conditions.lua").read_text()
PLANREPLAY = (ARGOCD / "health-planreplay.lua").read_text()


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
              summary={"savings_pct": "12.5"}), ("Healthy", "projected savings 12.5%")),
    (resource(1, 1, [cond("Stalled", "True", "EmptyWindow", "no log rows in the window")], phase="Failed"),
     ("Degraded", "EmptyWindow: no log rows in the window")),
])
def test_planreplay_health(obj: dict[str, Any], expected: tuple[str, str]) -> None:
    assert health(PLANREPLAY, obj) == expected


def test_the_argocd_configmap_embeds_exactly_these_scripts() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())["data"]
    assert data["resource.customizations.health.promptcache.io_DeployedModel"] == CONDITIONS
    assert data["resource.customizations.health.promptcache.io_CachePolicy"] == CONDITIONS
    assert data["resource.customizations.health.promptcache.io_PlanReplay"] == PLANREPLAY
