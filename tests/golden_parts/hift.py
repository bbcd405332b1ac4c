"""Golden parity of the HiFT vocoder (shared/golden/README.md §6) for any set of that format.

Cases: ``strict_load`` (model/hift.pt loads, also re-spelled with ``parametrizations`` names) and one
case per ``cases/hift.pt`` entry checking f0 (atol 1e-3 Hz), the deterministic decoder given the stored
source (atol 1e-4), the seeded random draws (``rand_ini`` exact) and the full seeded ``inference`` ->
source and speech (atol 1e-4), once from the global RNG and once from a per-row generator.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.checkpoint import read_state_dict
from engine.hift.hift import HiFTGenerator, load_hift
from engine.hift.source import draw_source_noise
from tests.golden_parts import common

F0_ATOL = 1e-3
ATOL = 1e-4


@functools.lru_cache(maxsize=2)
def _cases(set_dir: str) -> list[dict]:
    return common.cases(set_dir, "hift.pt")["cases"]


@functools.lru_cache(maxsize=1)
def model(set_dir: str) -> HiFTGenerator:
    """The set's HiFT, strictly loaded from model/hift.pt (shared with the token2wav part)."""
    m = HiFTGenerator(common.config(set_dir).hift)
    path = common.weights(set_dir, "hift")
    load_hift(m, read_state_dict(path), path)
    return m.eval()


def case_ids(set_dir: Path) -> list[str]:
    return ["strict_load"] + [c["name"] for c in _cases(str(set_dir))]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"


def _check_load(set_dir: str) -> None:
    path = Path(set_dir) / "model" / "hift.pt"
    sd = read_state_dict(path)
    m = model(set_dir)
    assert set(m.state_dict()) == set(sd), "module keys differ from hift.pt keys"
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
                .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in sd.items()}
    assert renamed.keys() != sd.keys()
    with torch.device("meta"):
        other = HiFTGenerator(m.cfg)
    other = other.to_empty(device="cpu")
    load_hift(other, renamed, "renamed")
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), f"{k} not loaded from its parametrizations spelling"


def check(set_dir: Path, case_id: str) -> None:
    set_dir = str(set_dir)
    if case_id == "strict_load":
        return _check_load(set_dir)
    case = next(c for c in _cases(set_dir) if c["name"] == case_id)
    m = model(set_dir)
    mel, seed = case["mel"], case["seed"]
    cache = [case["cache_source"]] if case.get("cache_source") is not None else None

    with torch.no_grad():
        _close("f0", m.f0_predictor(mel), case["f0"], F0_ATOL)
        _close("speech given stored source", m.decode(mel, case["source"]), case["speech"], ATOL)

    torch.manual_seed(seed)
    draws = draw_source_noise(1, case["source"].shape[-1], m.m_source.dim, torch.device("cpu"))
    assert torch.equal(draws.rand_ini, case["rand_ini"]), "initial phases differ from the seeded reference"

    torch.manual_seed(seed)
    speech, source = m.inference(mel, None, cache)
    _close("source (global RNG)", source, case["source"], ATOL)
    _close("speech (global RNG)", speech, case["speech"], ATOL)

    gen = torch.Generator().manual_seed(seed)
    speech, source = m.inference(mel, [mel.shape[-1]], cache, [gen])
    _close("source (per-row generator)", source, case["source"], ATOL)
    _close("speech (per-row generator)", speech, case["speech"], ATOL)
