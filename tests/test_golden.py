"""Numerical parity with the reference implementation on every golden set (shared/golden/README.md).

Sets come from ``COSY_GOLDEN_DIRS`` (colon-separated; default ``../shared/golden``): each directory
that holds a ``manifest.json``, or each subdirectory of it that does. Every part listed in a set's
manifest is checked by ``tests/golden_parts/<part>.py``, which exposes

    case_ids(set_dir: Path) -> list[str]
    check(set_dir: Path, case_id: str) -> None     # raises AssertionError on a mismatch

A part whose checker is missing or cannot list its cases is a failing test, never a skip.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def golden_sets() -> list[Path]:
    raw = os.environ.get("COSY_GOLDEN_DIRS") or str(REPO.parent / "shared" / "golden")
    sets: list[Path] = []
    for entry in filter(None, raw.split(":")):
        d = Path(entry).resolve()
        if (d / "manifest.json").exists():
            sets.append(d)
        elif d.is_dir():
            sets.extend(sorted(p for p in d.iterdir() if (p / "manifest.json").exists()))
    return sets


def _params():
    params = []
    sets = golden_sets()
    if not sets:
        return [pytest.param(None, "none", "", None, id="no-golden-sets")]
    for s in sets:
        parts = json.loads((s / "manifest.json").read_text())["parts"]
        for part in parts:
            try:
                mod = importlib.import_module(f"tests.golden_parts.{part}")
                ids = mod.case_ids(s)
            except Exception as exc:  # reported by the test itself
                params.append(pytest.param(s, part, "", exc, id=f"{s.name}-{part}-unavailable"))
                continue
            for cid in ids:
                params.append(pytest.param(s, part, cid, None, id=f"{s.name}-{part}-{cid}"))
    return params


@pytest.mark.parametrize("set_dir,part,case_id,error", _params())
def test_golden(set_dir, part, case_id, error):
    if set_dir is None:
        pytest.fail("no golden set found: set COSY_GOLDEN_DIRS or provide ../shared/golden")
    if error is not None:
        pytest.fail(f"golden part {part!r} of {set_dir} cannot run: {error!r}")
    importlib.import_module(f"tests.golden_parts.{part}").check(set_dir, case_id)
