"""The package's rooms: no import cycles, the domain imports no I/O, and nothing cites a missing document."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"promptcache.proxy": ROOT / "proxy", "promptcache.operator": ROOT / "operator"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every promptcache module ``name`` imports, at module level or inside a function alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_modules_are_found() -> None:
    assert {"promptcache.proxy.domain.classify", "promptcache.proxy.storage.ledger", "promptcache.proxy.http.app",
            "promptcache.operator.main", "promptcache.operator.cli"} <= set(MODULES)


def test_no_import_cycle() -> None:
    # A package's __init__ is imported with any of its modules; that edge is the runtime's, not ours.
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in GRAPH.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_a_cycle_would_be_found() -> None:
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


@pytest.mark.parametrize("room, allowed", [
    ("promptcache.proxy.domain", ("promptcache.proxy.domain",)),
    ("promptcache.proxy.storage",
     ("promptcache.proxy.domain", "promptcache.proxy.storage", "promptcache.proxy.metrics")),
    ("promptcache.proxy", ("promptcache.proxy",)),
])
def test_rooms_import_only_inwards(room: str, allowed: tuple[str, ...]) -> None:
    """The domain is pure, storage knows the domain, and the proxy never imports the operator."""
    wrong = {f"{name} -> {dep}" for name, deps in GRAPH.items() if name == room or name.startswith(room + ".")
             for dep in deps if not any(dep == a or dep.startswith(a + ".") for a in allowed)}
    assert not wrong


def _tracked() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / p for p in listed if (ROOT / p).is_file()]


def test_nothing_cites_a_document_the_repository_lacks() -> None:
    """The design lives in docs/design.md: no file cites the old product document."""
    word = "SP" + "EC"
    citing = [str(p.relative_to(ROOT)) for p in _tracked()
              if p.suffix not in {".png", ".gguf"} and word in p.read_text(encoding="utf-8", errors="replace")]
    assert citing == []


def test_design_links_name_real_sections() -> None:
    """Every link into the design document names one of its headings."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{2,4} (.+)$", design, re.M)}
    cited = {m for p in _tracked() if p.suffix in {".py", ".md", ".yaml", ".toml", ".json", ""}
             for m in re.findall(r"design\.md#([\w\-]+)", p.read_text(encoding="utf-8", errors="replace"))}
    assert cited, "nothing links the design document"
    assert cited - anchors == set()


def test_every_path_the_readme_names_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:proxy|operator|tests|bench|crds|charts|examples|docs|\.ci)/[\w./\-]*)`", readme))
    assert named, "the README names no file"
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
