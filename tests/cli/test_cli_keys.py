"""``promptcache keys list/rotate/revoke`` as a user runs them, in a database of the test's own.

That a real proxy authenticates with a rotated key, and stamps ``last_used_at`` through its least-privilege role,
is in tests/http/test_proxy_least_privilege.py; here the stamp comes from the same lookup the proxy makes.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
async def keys_dsn() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await migrate(dsn)
        yield dsn


def keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, "keys", *args], capture_output=True, text=True, timeout=60, check=False)


def created(out: str) -> tuple[str, str]:
    fields = dict(re.findall(r"^([a-z ]+):\s+(\S+)$", out, re.MULTILINE))
    return fields["key id"], fields["key"]


async def principal_for(dsn: str, key: str) -> str | None:
    db = await Database.connect(dsn)
    try:
        return await ApiKeys(db).principal_for(key)
    finally:
        await db.close()


async def test_list_shows_ids_and_use_never_keys(keys_dsn: str) -> None:
    acme_id, acme_key = created(keys("create", "--principal", "acme", "--database", keys_dsn).stdout)
    globex_id, _ = created(keys("create", "--principal", "globex", "--database", keys_dsn).stdout)
    old_id, old_key = created(keys("create", "--principal", "acme", "--database", keys_dsn).stdout)
    assert keys("revoke", old_id, "--database", keys_dsn).returncode == 0
    assert await principal_for(keys_dsn, acme_key) == "acme"  # the proxy's lookup stamps the use

    listed = keys("list", "--database", keys_dsn)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert re.fullmatch(r"KEY ID +PRINCIPAL +CREATED +REVOKED +LAST USED", lines[0])
    assert [line.split()[:2] for line in lines[1:]] == [[acme_id, "acme"], [globex_id, "globex"]]
    assert re.fullmatch(rf"{acme_id}  acme +{STAMP}  - +{STAMP}", lines[1])
    assert re.fullmatch(rf"{globex_id}  globex +{STAMP}  - +-", lines[2])
    assert acme_key not in listed.stdout and old_key not in listed.stdout

    everything = json.loads(keys("list", "--all", "--output", "json", "--database", keys_dsn).stdout)
    assert [(k["key_id"], k["principal"]) for k in everything] == [(acme_id, "acme"), (old_id, "acme"),
                                                                  (globex_id, "globex")]
    revoked = next(k for k in everything if k["key_id"] == old_id)
    assert revoked["revoked"] is not None and revoked["last_used"] is None
    assert set(revoked) == {"key_id", "principal", "created", "revoked", "last_used"}
    conn = await asyncpg.connect(keys_dsn)
    try:
        digest = await conn.fetchval("SELECT key_hash FROM api_keys WHERE key_id = $1", acme_id)
    finally:
        await conn.close()
    assert digest.hex() not in json.dumps(everything)

    only = keys("list", "--principal", "globex", "--database", keys_dsn).stdout.splitlines()
    assert [line.split()[0] for line in only[1:]] == [globex_id]
    assert keys("list", "--principal", "nobody", "--database", keys_dsn).stdout == "no keys\n"


async def test_rotate_keeps_the_old_key_for_its_grace_period(keys_dsn: str) -> None:
    old_id, old_key = created(keys("create", "--principal", "acme", "--database", keys_dsn).stdout)

    rotated = keys("rotate", old_id, "--grace", "2s", "--database", keys_dsn)

    assert rotated.returncode == 0, rotated.stderr
    new_id, new_key = created(rotated.stdout)
    assert re.search(rf"^old key {old_id} works until {STAMP}$", rotated.stdout, re.MULTILINE)
    assert "shown once" in rotated.stderr and new_key not in rotated.stderr
    assert (await principal_for(keys_dsn, old_key), await principal_for(keys_dsn, new_key)) == ("acme", "acme")
    listed = keys("list", "--database", keys_dsn).stdout.splitlines()
    assert [line.split()[0] for line in listed[1:]] == [old_id, new_id]  # in grace: still in force, end shown
    assert re.fullmatch(rf"{old_id}  acme +{STAMP}  {STAMP}  {STAMP}", listed[1])
    again = keys("rotate", old_id, "--database", keys_dsn)  # a key in its grace period was rotated already
    assert (again.returncode, again.stderr) == (1, f"no active key with id {old_id}\n")

    await asyncio.sleep(2.2)
    assert (await principal_for(keys_dsn, old_key), await principal_for(keys_dsn, new_key)) == (None, "acme")
    assert [line.split()[0] for line in keys("list", "--database", keys_dsn).stdout.splitlines()[1:]] == [new_id]


async def test_revoke_ends_a_grace_period_now(keys_dsn: str) -> None:
    old_id, old_key = created(keys("create", "--principal", "acme", "--database", keys_dsn).stdout)
    assert keys("rotate", old_id, "--grace", "7d", "--database", keys_dsn).returncode == 0
    assert await principal_for(keys_dsn, old_key) == "acme"

    done = keys("revoke", old_id, "--database", keys_dsn)

    assert (done.returncode, done.stdout) == (0, f"revoked {old_id}\n")
    assert await principal_for(keys_dsn, old_key) is None


@pytest.mark.parametrize(("args", "message"), [
    (["rotate", "abc", "--grace", "1 week"], "argument --grace: must be a whole number of s, m, h or d such as 24h, "
                                             "got '1 week'"),
    (["rotate", "abc", "--grace", "9" * 400 + "d"], "argument --grace: must be a whole number"),
    (["list", "--output", "xml"], "argument --output: invalid choice: 'xml'"),
    (["list", "--principal", ""], "argument --principal: "),
])
def test_bad_arguments_exit_2(keys_dsn: str, args: list[str], message: str) -> None:
    done = keys(*args, "--database", keys_dsn)

    assert (done.returncode, done.stdout) == (2, "")
    assert message in done.stderr.splitlines()[-1]


def test_rotating_an_unknown_key_changes_nothing(keys_dsn: str) -> None:
    done = keys("rotate", "000000000000", "--database", keys_dsn)

    assert (done.returncode, done.stdout, done.stderr) == (1, "", "no active key with id 000000000000\n")
    assert keys("list", "--all", "--database", keys_dsn).stdout == "no keys\n"
