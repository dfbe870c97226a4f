"""The chart installed into the real API server with helm-python-sdk (docs/design.md#packaging): install, upgrade
with a changed value, uninstall; and the documented CRD upgrade, which Helm never does for ``crds/``.

Helm waits for the pre-install/pre-upgrade migrations Job. With no kubelet here, the test plays that Job's pod:
it runs the pod's ``promptcache migrate`` against the session's Postgres with the env the pod would get from its
Secret, then marks the pod Succeeded, and the real job controller completes the Job.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import secrets
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from support.cluster import Cluster, eventually, object_path
from support.operator_process import CHART, TEST_IMAGE, render_chart
from support.pods import run_job_pod

CRD_DIR = CHART / "crds"
HOOK = "helm.sh/hook"


def values(redis_url: str, **extra: Any) -> dict[str, Any]:
    return {"image": TEST_IMAGE, "database": {"existingSecret": "pg", "secretKey": "dsn"},
            "redis": {"url": redis_url, "prefix": f"helm{secrets.token_hex(3)}:"}, **extra}


def plural_of(obj: dict[str, Any]) -> tuple[str, str, bool]:
    known = {"ServiceAccount": ("v1", "serviceaccounts", True), "Deployment": ("apps/v1", "deployments", True),
             "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
             "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
             "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
             "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True)}
    return known[obj["kind"]]


async def live(kube: Cluster, obj: dict[str, Any], namespace: str) -> dict[str, Any] | None:
    group_version, plural, namespaced = plural_of(obj)
    return await kube.get_or_none(group_version, plural, namespace if namespaced else None, obj["metadata"]["name"])


def hook_job(chart_values: dict[str, Any], release: str, namespace: str) -> str:
    [job] = [str(o["metadata"]["name"]) for o in render_chart(chart_values, name=release, namespace=namespace)
             if o["kind"] == "Job" and HOOK in (o["metadata"].get("annotations") or {})]
    return job


async def helm_with_hook(kube: Cluster, namespace: str, job: str, action: Any) -> tuple[Any, str]:
    """Run a blocking Helm action in a thread while playing its migrations hook's pod; the hook's output."""
    task = asyncio.create_task(asyncio.to_thread(action))
    code, output = await run_job_pod(kube, namespace, job)
    assert code == 0, output
    return await asyncio.wait_for(task, 120), output


async def test_install_upgrade_uninstall(kube: Cluster, pg_dsn: str, redis_url: str) -> None:
    ns = await kube.namespace("helm")
    release = f"pc{secrets.token_hex(2)}"
    await kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg", "namespace": ns},
                       "data": {"dsn": base64.b64encode(pg_dsn.encode()).decode()}})
    config = helm.Config(kubeconfig_path=str(kube.plane.admin_kubeconfig), namespace=ns)
    try:
        first = values(redis_url)
        job = hook_job(first, release, ns)
        installed, log = await helm_with_hook(
            kube, ns, job, lambda: config.install(CHART, release, first, namespace=ns, timeout=120))
        assert log.strip() == "schema is up to date", log  # the session's database was migrated already
        assert (installed["status"], installed["revision"]) == ("deployed", 1)

        rendered = [o for o in render_chart(first, name=release, namespace=ns)
                    if HOOK not in (o["metadata"].get("annotations") or {})]
        assert sorted(o["kind"] for o in rendered) == [
            "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
        for obj in rendered:
            assert await live(kube, obj, ns) is not None, f"{obj['kind']} {obj['metadata']['name']} was not created"
        [operator] = [o for o in rendered if o["kind"] == "Deployment"]
        deployment = await live(kube, operator, ns)
        assert deployment is not None
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "promptcache:test" and "--verbose" not in container["args"]
        for crd in CRD_DIR.glob("*.yaml"):  # Helm found them installed and left them alone
            name = yaml.safe_load(crd.read_text())["metadata"]["name"]
            assert await kube.get_or_none("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)

        [cluster_role] = [o for o in rendered if o["kind"] == "ClusterRole" and o["metadata"]["name"] == release
                          + "-promptcache"]
        assert (await live(kube, cluster_role, ns) or {})["rules"] == cluster_role["rules"]

        # The upgrade also moves the operator to namespaced RBAC: a Role in its one namespace, and the ClusterRole
        # shrinks to kopf's scanning rules.
        second = values(redis_url, operator={"verbose": True, "namespaces": [ns]})
        upgraded, _ = await helm_with_hook(
            kube, ns, job, lambda: config.upgrade(CHART, release, second, namespace=ns, timeout=120))
        assert (upgraded["status"], upgraded["revision"]) == ("deployed", 2)
        deployment = await live(kube, operator, ns)
        assert deployment is not None
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == [
            "operator", f"--namespace={ns}", "--verbose"]
        scoped = [o for o in render_chart(second, name=release, namespace=ns)
                  if o["kind"] in ("ClusterRole", "Role", "RoleBinding") and "replay" not in o["metadata"]["name"]]
        assert sorted(o["kind"] for o in scoped) == ["ClusterRole", "Role", "RoleBinding"]
        for obj in scoped:
            found = await live(kube, obj, ns)
            assert found is not None and found.get("rules") == obj.get("rules"), obj["kind"]
        assert len((await live(kube, cluster_role, ns) or {})["rules"]) < len(cluster_role["rules"])
        rendered += [o for o in scoped if o["kind"] != "ClusterRole"]

        uninstalled = await asyncio.to_thread(config.uninstall, release, timeout=60)
        assert uninstalled["release"]["status"] == "uninstalled"

        async def all_gone() -> bool:
            return all([await live(kube, obj, ns) is None for obj in rendered])

        await eventually(all_gone, what="the release's objects to be deleted")
        assert await kube.get_or_none("apiextensions.k8s.io/v1", "customresourcedefinitions", None,
                                      "deployedmodels.promptcache.io"), "uninstall keeps the CRDs (and the CRs)"
    finally:
        config.close()


def kubectl(kube: Cluster, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["kubectl", f"--kubeconfig={kube.plane.admin_kubeconfig}", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_crds_upgrade_by_server_side_apply_and_keep_their_objects(kube: Cluster, tmp_path: Path) -> None:
    """The README's CRD upgrade: ``kubectl apply --server-side -f charts/promptcache/crds/`` before
    ``helm upgrade``. A changed CRD is taken, existing objects stay, and applying the chart's again restores it."""
    ns = await kube.namespace("crdup")
    replay = {"apiVersion": "promptcache.io/v1alpha1", "kind": "PlanReplay",
              "metadata": {"name": "keep", "namespace": ns},
              "spec": {"models": ["llama"], "lastHours": 24, "cachePolicyRef": {"name": "standard"}}}
    await kube.create(replay)
    out = await asyncio.to_thread(kubectl, kube, "apply", "--server-side", "--force-conflicts",
                                  "--field-manager=promptcache-crds", "-f", str(CRD_DIR))
    assert out.count("serverside-applied") == 3, out

    path = "promptcache.io_planreplays.yaml"
    changed = yaml.safe_load((CRD_DIR / path).read_text())
    version = changed["spec"]["versions"][0]
    newer = copy.deepcopy(version["additionalPrinterColumns"])
    newer.append({"name": "Upgraded", "type": "string", "jsonPath": ".metadata.name", "priority": 1})
    version["additionalPrinterColumns"] = newer
    (tmp_path / path).write_text(yaml.safe_dump(changed))
    try:
        await asyncio.to_thread(kubectl, kube, "apply", "--server-side", "--force-conflicts",
                                "--field-manager=promptcache-crds", "-f", str(tmp_path / path))

        async def served() -> bool:
            table = await kube.table("promptcache.io/v1alpha1", "planreplays", ns)
            return "Upgraded" in [c["name"] for c in table["columnDefinitions"]]

        await eventually(served, what="the upgraded CRD's new column")
        assert await kube.get_or_none("promptcache.io/v1alpha1", "planreplays", ns, "keep") is not None
    finally:
        await asyncio.to_thread(kubectl, kube, "apply", "--server-side", "--force-conflicts",
                                "--field-manager=promptcache-crds", "-f", str(CRD_DIR / path))

    async def restored() -> bool:
        crd = await kube.call("GET", object_path("apiextensions.k8s.io/v1", "customresourcedefinitions", None,
                                                 changed["metadata"]["name"]))
        columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        return "Upgraded" not in [c["name"] for c in columns]

    await eventually(restored, what="the chart's CRD back")
