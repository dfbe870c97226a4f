"""Playing the kubelet for a Job's pod: run what its container would run, here, then report how it ended
(docs/design.md#testing). Every role of the image is a ``promptcache`` subcommand, so the container's args run as
``promptcache <args>`` with the container's environment resolved from its Secrets and ConfigMaps."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from support.cluster import Cluster, eventually

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


async def container_env(kube: Cluster, namespace: str, container: Mapping[str, Any]) -> dict[str, str]:
    """The container's ``env``, with ``valueFrom`` Secret and ConfigMap keys read from the cluster."""
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


async def run_job_pod(kube: Cluster, namespace: str, job: str, *, kubeconfig: Path | None = None,
                      within: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Wait for the Job's pod, run its one container's ``promptcache`` command here, and mark the pod Succeeded
    or Failed by the exit code, so the real job controller completes or retries the Job."""

    async def pod() -> dict[str, Any] | None:
        pods = await kube.list("v1", "pods", namespace, label_selector=f"job-name={job}")
        pending = [p for p in pods if (p.get("status") or {}).get("phase", "Pending") == "Pending"]
        return pending[0] if pending else None

    found = await eventually(pod, within=within, what=f"the pod of Job {namespace}/{job}")
    [container] = found["spec"]["containers"]
    assert container.get("command") in (None, ["promptcache"]), container.get("command")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           **await container_env(kube, namespace, container)}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    done = await asyncio.to_thread(subprocess.run, [PROMPTCACHE, *container.get("args", [])], env=env,
                                   capture_output=True, text=True, timeout=120, check=False)
    await kube.play_kubelet(namespace, f"job-name={job}", phase="Succeeded" if done.returncode == 0 else "Failed",
                            only_pending=True)
    return done
