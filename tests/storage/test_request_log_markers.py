"""The request log records markers as the client sent them; the policy's automatic ones are not logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai

from promptcache.proxy.testing.simulator import Simulator

from support.faults import fetch, ledger_rows
from support.proxy import model_config, new_key, running_proxy, settle, text, unique, words


async def test_automatic_breakpoints_are_billed_but_not_logged_as_sent(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url, _ = simulator
    alias, principal = unique("auto"), unique("tenant")
    automatic = {"mode": "lastUserMessage", "ttl": "5m"}
    model = model_config(alias, url + "/v1", "openai", word_tokenizer, automatic=automatic)
    async with running_proxy({"models": [model]}, tmp_path, pg_dsn) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                    max_retries=0)
        messages: Any = [{"role": "system", "content": [text(words("sys", 12), "1h")]},
                         {"role": "user", "content": words("q", 10)}]
        await client.chat.completions.create(model=alias, messages=messages)
        await settle(proxy)
    # Billed with the automatic 5m breakpoint on the user message: 1h 12, 5m 10.
    [row] = await ledger_rows(pg_dsn, principal)
    assert (row["creation_1h"], row["creation_5m"]) == (12, 10)
    [log] = await fetch(pg_dsn, "SELECT chain_tiers, chain_tokens FROM request_log WHERE principal_id = $1", principal)
    assert list(log["chain_tiers"]) == ["1h", None]
    assert list(log["chain_tokens"]) == [12, 22]
