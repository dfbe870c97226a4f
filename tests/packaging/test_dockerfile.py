"""The Dockerfile's bases (docs/design.md#image): every stage starts from an image pinned by digest, so ``docker
build .`` builds on the same bytes until someone changes the digest, and on the Debian release ``make image`` uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PINNED = re.compile(r"(?P<name>[a-z0-9][a-z0-9._/-]*):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*)@sha256:[0-9a-f]{64}")


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each line that is not a comment or a continuation."""
    found = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(" "):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def base_images() -> list[str]:
    """Every stage's base with the ARG defaults substituted (``FROM ${BASE} AS build`` → the BASE default); a
    stage built on an earlier stage names no image."""
    args: dict[str, str] = {}
    stages: list[str] = []
    images = []
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            ref, *alias = rest.split()
            ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], ref)
            if ref not in stages:
                images.append(ref)
            if alias:
                stages.append(alias[-1])
    return images


def test_every_base_is_pinned_by_digest() -> None:
    images = base_images()
    assert images, "no FROM line found"
    for image in images:
        assert PINNED.fullmatch(image), f"{image}: pin the base as name:tag@sha256:<digest>"


def test_the_base_is_the_release_make_image_builds_on() -> None:
    """``.ci/image`` debootstraps Debian bookworm, whose python3 is 3.11: a plain docker build gets the same
    Debian release and Python minor version, not whatever python:3.11-slim points at this month."""
    suite = re.search(r"^suite=(\w+)$", (ROOT / ".ci" / "image").read_text(), re.MULTILINE)
    assert suite is not None
    for image in base_images():
        match = PINNED.fullmatch(image)
        assert match is not None
        assert match["name"] == "python" and match["tag"] == f"3.11-slim-{suite[1]}", image
