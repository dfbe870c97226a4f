"""Playing the kubelet for a Job's pod: run what its container would run, here, then report how it ended
(docs/design.md#testing). Every role of the image is a ``promptcache`` subcommand and containers give only args,
so a container runs as ``promptcache <args>`` with its environment resolved from its Secrets and ConfigMaps."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from support.cluster import Cluster, Obj, eventually, pod_status

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"


async def container_env(kube: Cluster, namespace: str, container: Mapping[str, Any]) -> dict[str, str]:
    """What the kubelet would put in the container's environment: values, Secret and ConfigMap keys."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = await kube.get("v1", "secrets", namespace, ref["name"])
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = (await kube.get("v1", "configmaps", namespace, ref["name"]))["data"][ref["key"]]
        else:
            raise AssertionError(f"an env source the test cannot play: {var}")
    return env


async def new_pod(kube: Cluster, namespace: str, job: Mapping[str, Any], seen: set[str] | None = None) -> Obj:
    """The pod the job controller created for ``job``, not yet run (and not one of ``seen``)."""
    selector = f"{CONTROLLER_UID}={job['metadata']['uid']}"

    async def created() -> Obj | None:
        for pod in await kube.list("v1", "pods", namespace, label_selector=selector):
            if pod["metadata"]["name"] not in (seen or set()) and \
                    (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                return pod
        return None

    return await eventually(created, within=60, what=f"the job controller to create a pod of {job['metadata']['name']}")


async def run_pod(kube: Cluster, namespace: str, pod: Mapping[str, Any],
                  kubeconfig: Path | None = None) -> tuple[int, str]:
    """Run the pod's one container here, with its environment (and ``kubeconfig`` as the token the pod would
    mount); (exit code, output)."""
    [container] = pod["spec"]["containers"]
    assert "command" not in container, "containers give args only; the image's entrypoint is promptcache"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_") and k != "KUBECONFIG"}
    env = {**base, **await container_env(kube, namespace, container)}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, *container.get("args", []), env=env,
                                                   stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def pod_finished(kube: Cluster, namespace: str, pod: Mapping[str, Any], exit_code: int, *,
                       ago: timedelta = timedelta(0)) -> None:
    """Report the pod Succeeded (exit 0) or Failed as the kubelet would, finished ``ago`` (a failure a minute ago
    has outlived the job controller's retry backoff of 10 s, then 20 s, so it retries at once)."""
    phase = "Succeeded" if exit_code == 0 else "Failed"
    status = pod_status(pod, phase, exit_code=exit_code, at=datetime.now(UTC) - ago)
    await kube.patch("v1", "pods", namespace, pod["metadata"]["name"], {"status": status}, subresource="status")


async def run_job_pod(kube: Cluster, namespace: str, job: str, *,
                      kubeconfig: Path | None = None) -> tuple[int, str]:
    """The Job's next pod, run here and reported finished, so the real job controller completes or retries it."""
    live = await eventually(lambda: kube.get_or_none("batch/v1", "jobs", namespace, job), within=60,
                            what=f"the Job {namespace}/{job}")
    pod = await new_pod(kube, namespace, live)
    code, output = await run_pod(kube, namespace, pod, kubeconfig)
    await pod_finished(kube, namespace, pod, code)
    return code, output
