"""Golden parity of the flow (shared/golden/README.md §5) for any set of that format, full size included.

Cases: ``strict_load`` (model/flow.pt loads strictly), ``noise`` (the fixed CFM noise),
``offline-<name>`` (mel, mu, spks), ``streaming-<name>-<k>`` (each growing-prefix call),
``estimator-full`` / ``estimator-streaming`` (one U-Net call), ``encoder-<k>``, and
``batch-all`` (every offline and streaming call of the set in ONE ``inference_batch`` call).
Mels and intermediates: atol 1e-4 (README §11).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from engine.checkpoint import load_strict, read_state_dict
from engine.flow.cfm import make_noise
from engine.flow.flow import CausalMaskedDiffWithXvec
from tests.golden_parts import common

ATOL = 1e-4


def _cases(set_dir: str) -> dict:
    return common.cases(set_dir, "flow.pt")


@functools.lru_cache(maxsize=2)
def _model(set_dir: str, fused: bool = True) -> CausalMaskedDiffWithXvec:
    """The set's flow model; ``fused``: with the attention projections fused, as ``load_models`` does."""
    model = CausalMaskedDiffWithXvec(common.config(set_dir).flow)
    path = common.weights(set_dir, "flow")
    load_strict(model, read_state_dict(path), path)
    model.decoder.estimator.fuse_projections(fused)
    return model.eval()


def case_ids(set_dir: Path) -> list[str]:
    c = _cases(str(set_dir))
    ids = ["strict_load", "noise"]
    ids += [f"offline-{case['name']}" for case in c["offline"]]
    ids += [f"streaming-{s['name']}-{k}" for s in c["streaming"] for k in range(len(s["calls"]))]
    ids += [f"estimator-{mode}" for mode in c["estimator"]["expected"]]
    ids += [f"encoder-{k}" for k in range(len(c["encoder"]))]
    ids.append("batch-all")
    return ids


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().max().item() if want.numel() else 0.0
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"


def _calls(c: dict) -> list[tuple[str, dict, dict]]:
    """(case id, stream inputs, call) for every single-stream inference case of the set."""
    out = []
    for case in c["offline"]:
        out.append((f"offline-{case['name']}", case, case))
    for s in c["streaming"]:
        for k, call in enumerate(s["calls"]):
            out.append((f"streaming-{s['name']}-{k}", s, call))
    return out


def _single(model: CausalMaskedDiffWithXvec, inputs: dict, call: dict) -> torch.Tensor:
    n = call.get("n_tokens", inputs["token"].shape[1])
    token = inputs["token"][:, :n]
    return model.inference(token, torch.tensor([n], dtype=torch.int32), inputs["prompt_token"],
                           torch.tensor([inputs["prompt_token"].shape[1]], dtype=torch.int32),
                           inputs["prompt_feat"], torch.tensor([inputs["prompt_feat"].shape[1]], dtype=torch.int32),
                           inputs["embedding"], bool(call["streaming"]), bool(call["finalize"]))


def check(set_dir: Path, case_id: str) -> None:
    c = _cases(str(set_dir))
    if case_id == "strict_load":
        _model(str(set_dir))          # raises CheckpointError on any key/shape mismatch
        return
    model = _model(str(set_dir))
    if case_id == "noise":
        rn = c["rand_noise"]
        noise = make_noise()
        assert list(noise.shape) == list(rn["shape"])
        assert hashlib.sha256(noise.numpy().astype("<f4").tobytes()).hexdigest() == rn["sha256"]
        assert abs(noise.double().sum().item() - rn["sum"]) < 1e-6 * max(1.0, abs(rn["sum"]))
        head = rn["head"]
        assert torch.equal(model.decoder.noise(head.shape[1], "cpu")[0], head)
        return
    if case_id.startswith(("offline-", "streaming-")):
        _, inputs, call = next(x for x in _calls(c) if x[0] == case_id)
        _close(case_id, _single(model, inputs, call), call["expected_mel"])
        if case_id.startswith("offline-"):
            _check_intermediates(model, inputs)
        return
    if case_id.startswith("estimator-"):
        mode = case_id.split("-", 1)[1]
        e = c["estimator"]
        x, mu, cond, spks = e["x"], e["mu"], e["cond"], e["spks"]
        T = x.shape[2]
        for fused in (True, False):      # both ways of projecting q, k and v
            with torch.inference_mode():
                got = _model(str(set_dir), fused).decoder.estimator(
                    torch.cat([x, x]), torch.ones(2, 1, T), torch.cat([mu, torch.zeros_like(mu)]),
                    torch.full((2,), float(e["t"])), torch.cat([spks, torch.zeros_like(spks)]),
                    torch.cat([cond, torch.zeros_like(cond)]), mode == "streaming")
            _close(f"{case_id} (fused={fused})", got, e["expected"][mode])
        return
    if case_id.startswith("encoder-"):
        e = c["encoder"][int(case_id.split("-", 1)[1])]
        context = e["context"] if e["context"].shape[1] > 0 else None
        with torch.inference_mode():
            h, _ = model.encoder(e["xs"], e["xs_lens"], context, None, bool(e["streaming"]))
        _close(case_id, h, e["expected"])
        return
    if case_id == "batch-all":
        calls = _calls(c)
        tokens = [inp["token"][0, :call.get("n_tokens", inp["token"].shape[1])] for _, inp, call in calls]
        mels = model.inference_batch(tokens, [inp["prompt_token"][0] for _, inp, _ in calls],
                                     [inp["prompt_feat"][0] for _, inp, _ in calls],
                                     torch.cat([inp["embedding"] for _, inp, _ in calls]),
                                     [bool(call["streaming"]) for *_, call in calls],
                                     [bool(call["finalize"]) for *_, call in calls])
        for (cid, _, call), mel in zip(calls, mels):
            _close(f"batch-all/{cid}", mel.unsqueeze(0), call["expected_mel"])
        return
    raise AssertionError(f"unknown flow case {case_id!r}")


def _check_intermediates(model: CausalMaskedDiffWithXvec, case: dict) -> None:
    """mu (prompt part included) and spks of an offline case."""
    inp = model.encode_batch([case["token"][0]], [case["prompt_token"][0]], [case["prompt_feat"][0]],
                             case["embedding"], [bool(case["streaming"])], [bool(case["finalize"])])
    _close(f"offline-{case['name']}/mu", inp.mu[:, :, :inp.frames[0]], case["mu"])
    _close(f"offline-{case['name']}/spks", inp.spks, case["spks"])
