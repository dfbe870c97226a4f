"""A configured tokenizer that cannot be loaded makes the config invalid (docs/design.md#tokenizers-and-their-identity):
the proxy refuses to start on it (exit 78, the reason on stderr), ``--check`` says so without serving, and a reload
keeps the last good config, still serving and billing with the tokenizer it had."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from promptcache.proxy.testing.simulator import Simulator

from support.engine import model_path
from support.gguf import BAD_GGUF, bad_gguf
from support.proxy import ledger, model_config, new_key, running_proxy, settle, unique, words

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
SMOLLM = "gguf:smollm:3cede1a4c51d"


def with_tokenizer(config: dict[str, Any], tokenizer: dict[str, str]) -> dict[str, Any]:
    return {"models": [{**config["models"][0], "tokenizer": tokenizer}]}


async def promptcache(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("case", sorted(BAD_GGUF))
async def test_the_proxy_refuses_to_start_on_a_gguf_it_cannot_read(
        tmp_path: Path, simulator: tuple[str, Simulator], word_tokenizer: Path, case: str) -> None:
    config = with_tokenizer({"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]},
                            {"type": "gguf", "path": str(bad_gguf(tmp_path, case))})
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    reason = f"invalid config: model 'chat': cannot load its tokenizer: {BAD_GGUF[case]}"
    for args in (["proxy", "--config", str(path), "--port", "0"], ["proxy", "--check", "--config", str(path)]):
        code, out, err = await promptcache(*args)
        assert code == 78, (args, out, err)
        assert re.fullmatch(reason, err.strip().splitlines()[-1]), err


async def test_check_names_each_models_tokenizer(tmp_path: Path, word_tokenizer: Path) -> None:
    without = model_config("plain", "http://127.0.0.1:9/v1", "openai", word_tokenizer)
    del without["tokenizer"]
    config = {"models": [
        with_tokenizer({"models": [model_config("smol", "http://127.0.0.1:9/v1", "openai", word_tokenizer)]},
                       {"type": "gguf", "path": str(model_path())})["models"][0],
        without,
    ]}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = await promptcache("proxy", "--check", "--config", str(path))
    assert (code, out.splitlines()) == (0, ["plain: tokenizer none (served without caching)",
                                            f"smol: tokenizer {SMOLLM}"]), err


async def test_a_reload_to_an_unloadable_tokenizer_keeps_the_last_good_config(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    good = {"models": [model_config("chat-gguf", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(good, tmp_path, pg_dsn) as running:
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=await new_key(pg_dsn, unique("gguf")),
                                    max_retries=0)
        registry = running.server.proxy.metrics.registry
        word_version = running.server.proxy.runtimes.models["chat-gguf"].tokenizer_version

        def reloads(result: str) -> float:
            return registry.get_sample_value("promptcache_config_reloads_total", {"result": result}) or 0.0

        async def reloaded(result: str, count: float) -> None:
            deadline = time.monotonic() + 10
            while reloads(result) != count:
                assert time.monotonic() < deadline, f"no {result} reload number {count}"
                await asyncio.sleep(0.02)

        async def billed_with() -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="chat-gguf", messages=[{"role": "user", "content": words("g", 10)}])
            raw.parse()
            await settle(running)
            return str((await ledger(pg_dsn, raw.headers["x-request-id"]))["tokenizer_version"])

        caplog.set_level(logging.ERROR, "promptcache.server")
        for count, case in enumerate(sorted(BAD_GGUF), start=1):
            running.write_config(with_tokenizer(good, {"type": "gguf", "path": str(bad_gguf(tmp_path, case))}))
            await reloaded("error", count)
            assert re.search(f"invalid config, keeping the last good one: model 'chat-gguf': cannot load its "
                             f"tokenizer: {BAD_GGUF[case]}", caplog.text), caplog.text
            assert await billed_with() == word_version
        assert reloads("ok") == 0

        running.write_config(with_tokenizer(good, {"type": "gguf", "path": str(model_path())}))
        await reloaded("ok", 1)
        assert await billed_with() == SMOLLM
