"""A GGUF tokenizer from a volume (docs/design.md#reconciling-a-deployedmodel): the operator mounts it in the proxy
pods; a proxy pod that cannot load it refuses its config, and the model goes Stalled/InvalidSpec with the proxy's
reason, recovering once the pods load a good file.

The kubelet is played: each proxy pod the real ReplicaSet controller creates is run here (``promptcache`` with the
pod's args and environment, its volumes bind-mounted at their mount paths in a mount namespace of its own), and its
end reported as a kubelet with ``FallbackToLogsOnError`` would.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from promptcache.operator.constants import CHECKSUM_ANNOTATION, MODEL_LABEL, NAME_LABEL, PROXY_APP

from support.cluster import Cluster, Obj, eventually
from support.engine import model_path
from support.gguf import BAD_GGUF, bad_gguf
from support.operator_process import OperatorEnvironment, StartOperator
from support.pods import container_crashed, run_container
from support.proxy import unique
from support.resources import condition, model, policy

MOUNTED = "/etc/promptcache/tokenizer"


async def current_pod(kube: Cluster, ns: str, name: str) -> Obj:
    """The pending proxy pod of the model's current config, once the ReplicaSet made it."""
    async def found() -> Obj | None:
        obj = await kube.get("promptcache.io/v1alpha1", "deployedmodels", ns, name)
        checksum = (obj.get("status") or {}).get("configChecksum")
        for pod in await kube.list("v1", "pods", ns, label_selector=f"{MODEL_LABEL}={name},{NAME_LABEL}={PROXY_APP}"):
            annotations = pod["metadata"].get("annotations") or {}
            if checksum and annotations.get(CHECKSUM_ANNOTATION) == checksum and \
                    (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                return pod
        return None

    return await eventually(found, within=60, what=f"a proxy pod of {name}'s current config")


async def conditions(kube: Cluster, ns: str, name: str) -> dict[str, tuple[str, str, str]]:
    obj = await kube.get("promptcache.io/v1alpha1", "deployedmodels", ns, name)
    return {kind: (c["status"], c["reason"], c["message"])
            for kind in ("Ready", "Reconciling", "Stalled") if (c := condition(obj, kind)) is not None}


async def test_a_gguf_the_proxy_cannot_load_stalls_the_model_until_the_pods_load_one(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, pg_dsn: str,
        tmp_path: Path) -> None:
    """The played kubelet's volume is a hostPath, which the restricted server baseline refuses: unrestricted."""
    ns = await kube.namespace("gguf")
    models = tmp_path / "models"
    models.mkdir()
    await kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg", "namespace": ns},
                       "data": {"dsn": base64.b64encode(pg_dsn.encode()).decode()}})
    alias = unique("smol")
    tokenizer: dict[str, Any] = {"type": "gguf", "volume": {"hostPath": {"path": str(models), "type": "Directory"}},
                                 "path": "missing.gguf"}
    unrestricted = dataclasses.replace(operator_env, extra={"PROMPTCACHE_SERVER_SECURITY": "unrestricted"})
    async with start_operator(namespaces=[ns], environment=unrestricted):
        await kube.create(policy("standard", ns=ns, minPrefixTokens=16))
        await kube.create(model("smol", alias, "standard", ns=ns, tokenizer=tokenizer, proxy={"replicas": 1}))
        for case in sorted(BAD_GGUF, key=lambda c: c != "missing"):  # missing first: the spec starts with it
            bad_gguf(models, case)
            if case != "missing":
                await kube.patch("promptcache.io/v1alpha1", "deployedmodels", ns, "smol",
                                 {"spec": {"tokenizer": {"path": f"{case}.gguf"}}})
            pod = await current_pod(kube, ns, "smol")
            config = yaml.safe_load((await kube.get("v1", "configmaps", ns, "smol-proxy-config"))["data"]["proxy.yaml"])
            assert config["models"][0]["tokenizer"] == {"type": "gguf", "path": f"{MOUNTED}/{case}.gguf"}
            code, output = await run_container(kube, ns, pod, "proxy")
            assert code == 78, output
            reason = f"model '{alias}': cannot load its tokenizer: {BAD_GGUF[case]}".replace(".*/", f"{MOUNTED}/")
            assert re.fullmatch(f"invalid config: {reason}", output.strip().splitlines()[-1]), output
            await container_crashed(kube, ns, pod, "proxy", code, output)

            message = f"proxy pod {pod['metadata']['name']} refused its config: {reason}"

            async def stalled() -> bool:
                found = await conditions(kube, ns, "smol")
                return bool(re.fullmatch(message, found.get("Stalled", ("", "", ""))[2]))  # noqa: B023

            await eventually(stalled, within=30, what=f"the model stalled on the {case} GGUF")
            found = await conditions(kube, ns, "smol")
            assert {kind: value[:2] for kind, value in found.items()} == {
                "Ready": ("False", "ConfigRejected"), "Reconciling": ("False", "ConfigRejected"),
                "Stalled": ("True", "InvalidSpec")}
            assert found["Ready"][2] == found["Stalled"][2]
            warnings = [e["message"] for e in await kube.events(ns, involving="smol")
                        if e["type"] == "Warning" and e["reason"] == "InvalidSpec"]
            assert any(re.fullmatch(message, w) for w in warnings), warnings

        (models / "model.gguf").symlink_to(model_path())
        await kube.patch("promptcache.io/v1alpha1", "deployedmodels", ns, "smol",
                         {"spec": {"tokenizer": {"path": "model.gguf"}}})
        pod = await current_pod(kube, ns, "smol")
        code, output = await run_container(kube, ns, pod, "proxy", "--check")
        assert (code, output.strip().splitlines()[-1]) == (0, f"{alias}: tokenizer gguf:smollm:3cede1a4c51d"), output
        await kube.roll_out(ns, "smol-proxy")

        async def recovered() -> bool:
            found = await conditions(kube, ns, "smol")
            return found.get("Ready", ("",))[0] == "True" and found.get("Stalled", ("",))[0] == "False"

        await eventually(recovered, within=30, what="the model Ready once its pods load the GGUF")
        deployment = await kube.get("apps/v1", "deployments", ns, "smol-proxy")
        spec = deployment["spec"]["template"]["spec"]
        assert {"name": "tokenizer", "hostPath": {"path": str(models), "type": "Directory"}} in spec["volumes"]
        [proxy] = [c for c in spec["containers"] if c["name"] == "proxy"]
        assert {"name": "tokenizer", "mountPath": MOUNTED, "readOnly": True} in proxy["volumeMounts"]
        assert proxy["terminationMessagePolicy"] == "FallbackToLogsOnError"
