"""Helpers shared by the trust/robustness tests."""

from __future__ import annotations

from pathlib import Path


def assert_nothing_written(root: Path, before: set[str]) -> None:
    """No new entry under ``root`` (no half-written output, no empty --out directory)."""
    now = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert now <= before, sorted(now - before)
