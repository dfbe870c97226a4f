"""The repo's CRDs as documents, and a walk over their schemas, for every test that reads them
(docs/design.md#custom-resources)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from promptcache.operator.constants import MODELS, POLICIES, REPLAYS

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
PLURALS = {"DeployedModel": MODELS, "CachePolicy": POLICIES, "PlanReplay": REPLAYS}
KINDS = list(PLURALS)
Obj = dict[str, Any]


def load_crds(directory: Path = CRD_DIR) -> list[Obj]:
    """Every CRD in ``directory``, one document per file."""
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        found = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(found) == 1, f"{path.name} must hold exactly one document"
        docs.append(found[0])
    return docs


@functools.cache
def _by_kind() -> dict[str, Obj]:
    return {doc["spec"]["names"]["kind"]: doc for doc in load_crds()}


def crd(kind: str) -> Obj:
    """A copy of the kind's CRD, to change freely."""
    return copy.deepcopy(_by_kind()[kind])


def schema(kind: str) -> Obj:
    """The openAPIV3Schema of the kind's one version (a copy)."""
    node: Obj = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return node


def walk(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    """Every schema node under ``node`` with its path (``.*``: a map's values, ``[]``: a list's items)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
