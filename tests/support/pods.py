"""Playing the kubelet: run what a pod's container would run, here, then report how it ended (docs/design.md#testing).
Every role of the image is a ``promptcache`` subcommand and containers give only args, so a container runs as
``promptcache <args>`` with its environment resolved from its Secrets and ConfigMaps, and (``run_container``) its
volumes mounted where the pod mounts them, in a mount namespace of its own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import secrets
import shlex
import shutil
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from support.cluster import Cluster, Obj, eventually, pod_status

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"


_FIELD = re.compile(r"metadata\.(name|namespace|uid)|metadata\.(annotations|labels)\['([^']+)'\]")
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _field(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API ``fieldRef`` of the pod (the job controller gives an Indexed Job's pods one)."""
    match = _FIELD.fullmatch(path)
    if match is None:
        raise AssertionError(f"a fieldRef the test cannot play: {path}")
    meta = pod["metadata"]
    return str(meta[match[1]]) if match[1] else str((meta.get(match[2]) or {})[match[3]])


def expand(args: list[str], env: Mapping[str, str]) -> list[str]:
    """``$(VAR)`` in args replaced by the container's variable, ``$$`` by ``$``, as the kubelet does; an unknown
    reference stays as written."""
    def one(match: re.Match[str]) -> str:
        return "$" if match[0] == "$$" else env.get(match[1], match[0])

    return [_REFERENCE.sub(one, arg) for arg in args]


async def container_env(kube: Cluster, namespace: str, container: Mapping[str, Any],
                        pod: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What the kubelet would put in the container's environment: values, Secret and ConfigMap keys, and the
    pod's own fields."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var.get("valueFrom") or {}
        if "fieldRef" in source and pod is not None:
            env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in source:
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
    own = await container_env(kube, namespace, container, pod)
    env = {**base, **own}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, *expand(container.get("args", []), own), env=env,
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


STAGE = Path("/run/promptcache-kubelet")
"""Volumes are staged outside every mount path (``/tmp`` among them) so mounting one cannot hide another's source."""
TERMINATION_TAIL = 2048
"""``FallbackToLogsOnError``: the kubelet keeps the last 2048 bytes (or 80 lines) of the log as the message."""


def _stage_volume(volume: Mapping[str, Any], config_map: Mapping[str, Any] | None, into: Path) -> str:
    """The host directory a pod volume is: a ConfigMap's keys written out, a hostPath as it is."""
    if config_map is not None:
        into.mkdir(parents=True)
        for key, value in (config_map.get("data") or {}).items():
            (into / key).write_text(value)
        for key, value in (config_map.get("binaryData") or {}).items():
            (into / key).write_bytes(base64.b64decode(value))
        return str(into)
    if "hostPath" in volume:
        return str(volume["hostPath"]["path"])
    raise AssertionError(f"a volume the test cannot play: {volume}")


def _mount_script(mounts: list[Mapping[str, Any]], sources: list[str], stage: Path) -> str:
    """Shell that bind-mounts each source at its mount path, then execs its arguments. Every source is first bound
    under ``stage``, so mounting one (``/tmp``) cannot hide another's source; outer paths are mounted first, each
    mount point made before any is remounted read-only."""
    script = ["set -e"]
    for i, source in enumerate(sources):
        script += [f"mkdir -p {stage}/bind-{i}", f"mount --bind {shlex.quote(source)} {stage}/bind-{i}"]
    for i, mount in enumerate(mounts):
        target = shlex.quote(mount["mountPath"])
        script += [f"mkdir -p {target}", f"mount --bind {stage}/bind-{i} {target}"]
    script += [f"mount -o remount,bind,ro {shlex.quote(m['mountPath'])}" for m in mounts if m.get("readOnly")]
    script.append('exec "$@"')
    return "\n".join(script)


def _new_stage() -> Path:
    stage = STAGE / secrets.token_hex(4)
    stage.mkdir(parents=True)
    return stage


def _absent(paths: list[str]) -> list[Path]:
    return [Path(p) for p in paths if not Path(p).exists()]


def _clean(stage: Path, made: list[Path]) -> None:
    """Remove the stage and the empty mount points ``mkdir`` left on the host."""
    shutil.rmtree(stage, ignore_errors=True)
    for path in sorted(made, key=lambda p: -len(str(p))):
        with contextlib.suppress(OSError):
            path.rmdir()


async def run_container(kube: Cluster, namespace: str, pod: Mapping[str, Any], name: str,
                        *extra_args: str) -> tuple[int, str]:
    """Run container ``name`` of ``pod`` here until it exits (``extra_args`` appended, e.g. ``--check``), as root
    in a private mount namespace (``unshare``) where each of its volumes is bind-mounted at its mountPath
    (read-only where the pod says so; an emptyDir is the host's directory as it is); (exit code, output)."""
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == name]
    assert "command" not in container, "containers give args only; the image's entrypoint is promptcache"
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    # An emptyDir is scratch space (/tmp under a read-only root); the host's directory already is, and mounting an
    # empty one there would hide what runs the container (a clone under /tmp, its .venv).
    mounts = sorted((m for m in container.get("volumeMounts") or [] if "emptyDir" not in volumes[m["name"]]),
                    key=lambda m: len(m["mountPath"]))
    stage = _new_stage()
    made = _absent([m["mountPath"] for m in mounts])
    try:
        sources = []
        for i, mount in enumerate(mounts):
            volume = volumes[mount["name"]]
            config_map = await kube.get("v1", "configmaps", namespace, volume["configMap"]["name"]) \
                if "configMap" in volume else None
            sources.append(_stage_volume(volume, config_map, stage / f"source-{i}"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_") and k != "KUBECONFIG"}
        env = {**base, **await container_env(kube, namespace, container)}
        process = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", _mount_script(mounts, sources, stage), "sh",
            PROMPTCACHE, *container.get("args", []), *extra_args, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return process.returncode, output.decode(errors="replace")
    finally:
        _clean(stage, made)


async def container_crashed(kube: Cluster, namespace: str, pod: Mapping[str, Any], name: str, exit_code: int,
                            output: str) -> None:
    """Report container ``name`` of ``pod`` waiting in CrashLoopBackOff after exiting ``exit_code``, the tail of
    ``output`` as its termination message (``terminationMessagePolicy: FallbackToLogsOnError``)."""
    status = pod_status(pod, "Running")
    for entry in status["containerStatuses"]:
        if entry["name"] == name:
            when = entry["state"]["running"]["startedAt"]
            entry.update(ready=False, started=False, restartCount=1,
                         state={"waiting": {"reason": "CrashLoopBackOff",
                                            "message": f"back-off 10s restarting failed container={name}"}},
                         lastState={"terminated": {"exitCode": exit_code, "reason": "Error", "startedAt": when,
                                                   "finishedAt": when,
                                                   "message": output.encode()[-TERMINATION_TAIL:].decode(
                                                       errors="replace")}})
    for entry in status["conditions"]:
        if entry["type"] in ("ContainersReady", "Ready"):
            entry["status"] = "False"
    await kube.patch("v1", "pods", namespace, pod["metadata"]["name"], {"status": status}, subresource="status")
