"""``promptcache simulate`` as a person uses it: start it, point a proxy at it, send a request through the SDK; and
its bad arguments."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import openai
import pytest

from promptcache.proxy.domain.tokens import TiktokenTokenizer
from promptcache.proxy.testing.simulator import REPLY

from support.faults import free_port
from support.proxy import ledger, new_key, running_proxy, settle, unique

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


@asynccontextmanager
async def simulating(*args: str) -> AsyncIterator[tuple[str, str]]:
    """The command running on a free port: its base URL and the banner it printed."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, "simulate", "--port", str(port), *args,
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readuntil(b"Ctrl-C stops it\n"), 30)).decode()
        base = f"http://127.0.0.1:{port}"  # printed once it listens
        yield base, banner
    finally:
        process.terminate()
        await process.wait()


async def test_a_proxy_pointed_at_it_bills_its_usage(tmp_path: Path, pg_dsn: str) -> None:
    async with simulating() as (base, banner):
        assert banner.startswith(f"SIMULATED upstream (not a model: it counts prompts with tiktoken:cl100k_base "
                                 f"and always answers {REPLY!r}) on {base}\n")
        assert f"url {base}/v1 with api openai" in banner
        config = {"models": [{"alias": "try", "upstream": {"url": base + "/v1", "model": "sim", "api": "openai"},
                              "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
                              "pricing": {"inputPerMTok": "3", "outputPerMTok": "15"}}]}
        async with running_proxy(config, tmp_path, pg_dsn) as proxy:
            principal = unique("sim")
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                        max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="try", messages=[{"role": "user", "content": "hi"}])
            reply = raw.parse()
            await settle(proxy)
    counts = TiktokenTokenizer("cl100k_base")
    prompt, completion = counts.count("hi") + 3, counts.count(REPLY)  # 3: the simulator's per-message overhead
    assert reply.choices[0].message.content == REPLY
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        prompt, completion)
    row = await ledger(pg_dsn, raw.headers["x-request-id"])
    assert (row["principal_id"], row["prompt_tokens"], row["completion_tokens"], row["read_tokens"]) == (
        principal, prompt, completion, 0)


@pytest.mark.parametrize("args, error", [
    (["--latency-ms", "-1"], "invalid --latency-ms: -1 is not between 0 and 600000"),
    (["--latency-ms", "nan"], "invalid --latency-ms: nan is not between 0 and 600000"),
    (["--latency-ms", "1e400"], "invalid --latency-ms: inf is not between 0 and 600000"),
    (["--port", "0"], "invalid --port: 0 is not between 1 and 65535"),
    (["--port", "70000"], "invalid --port: 70000 is not between 1 and 65535"),
    (["--tokenizer", "word"], "invalid --tokenizer: tokenizer must be tiktoken:ENCODING, hf:PATH or gguf:PATH, "
                              "got 'word'"),
    (["--tokenizer", "hf:/nowhere/tokenizer.json"], "invalid --tokenizer: "),
])
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], error: str) -> None:
    done = subprocess.run([PROMPTCACHE, "simulate", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


async def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    async with simulating() as (base, _):
        port = base.rsplit(":", 1)[1]
        done = await asyncio.to_thread(subprocess.run, [PROMPTCACHE, "simulate", "--port", port],
                                       capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"cannot listen on 127.0.0.1:{port}: ") and done.stderr.count("\n") == 1
