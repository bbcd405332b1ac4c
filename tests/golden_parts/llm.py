"""Golden parity of the LLM stage (golden README §4): teacher-forced log-probs, RAS sampler, bistream.

Works for any set of the README's format (other seeds/lengths, full-size config): everything is read
from ``<set>/model`` and ``<set>/cases/llm.pt``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from engine.config import SamplingConfig
from engine.llm import ids as uid
from engine.llm.bistream import BistreamState, Outcome
from engine.llm.model import CosyVoice2LM, Sequence, load_llm
from engine.llm.sampling import sampling_ids
from tests.golden_parts import common

LOGP_ATOL = 1e-4
HIDDEN_ATOL = 1e-4


def _cases(set_dir: str) -> dict:
    return common.cases(set_dir, "llm.pt")


@functools.lru_cache(maxsize=1)
def _model(set_dir: str) -> CosyVoice2LM:
    return load_llm(common.config(set_dir).llm, common.weights(set_dir, "llm"))


def case_ids(set_dir: Path) -> list[str]:
    c = _cases(str(set_dir))
    ids = [f"teacher_forced-{i}-{case['mode']}" for i, case in enumerate(c["teacher_forced"])]
    ids += [f"ras-{i}-{case['name']}" for i, case in enumerate(c["ras"])]
    ids += ["bistream-forced", "bistream-seeded"]
    return ids


def check(set_dir: Path, case_id: str) -> None:
    kind, _, rest = case_id.partition("-")
    c = _cases(str(set_dir))
    if kind == "teacher_forced":
        _check_teacher_forced(str(set_dir), c["teacher_forced"][int(rest.split("-")[0])])
    elif kind == "ras":
        _check_ras(c["ras"][int(rest.split("-")[0])], _sampling_cfg(c))
    elif case_id == "bistream-forced":
        _check_bistream_forced(str(set_dir), c["bistream"])
    elif case_id == "bistream-seeded":
        _check_bistream_seeded(str(set_dir), c["bistream"], _sampling_cfg(c))
    else:
        raise AssertionError(f"unknown case {case_id}")


def _sampling_cfg(c: dict) -> SamplingConfig:
    return SamplingConfig(**c["sampling"])


def _table_ids(unified: list[int]) -> list[list]:
    """Unified ids -> the golden ``[table, id]`` spelling of fed inputs."""
    out = []
    for u in unified:
        if u < uid.SOS_ID:
            out.append(["speech", u])
        elif u < uid.TEXT_OFFSET:
            out.append(["llm_embedding", u - uid.SOS_ID])
        else:
            out.append(["text", u - uid.TEXT_OFFSET])
    return out


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol}"


@torch.inference_mode()
def _check_teacher_forced(set_dir: str, case: dict) -> None:
    model = _model(set_dir)
    prompt_text, text = case["prompt_text"].tolist(), case["text"].tolist()
    speech, decoded = case["prompt_speech_token"].tolist(), case["decoded"].tolist()
    prefix = uid.prefix_unified_ids(prompt_text, text, speech)
    assert len(prefix) == case["prefix_len"], f"prefix_len {len(prefix)} != {case['prefix_len']}"
    assert prefix + decoded[:-1] == case["unified_ids"].tolist(), "unified ids differ"
    assert (len(text) * 2, len(text) * 20) == (case["min_len"], case["max_len"]), "min/max len"
    assert case["ignore_eos"].tolist() == [i < case["min_len"] for i in range(len(decoded))], "eos mask steps"
    _close("prefix_embeds", model.embed(torch.tensor(prefix)), case["prefix_embeds"], 1e-6)

    seq = Sequence(model, capacity=len(prefix) + len(decoded))
    for i in range(len(decoded)):
        _, logp = seq.feed(prefix if i == 0 else [decoded[i - 1]])
        _close(f"logp[{i}]", logp, case["logp"][i], LOGP_ATOL)
    assert case["stops_on_eos"] == (decoded[-1] in uid.STOP_IDS), "stop flag"


def _check_ras(case: dict, cfg: SamplingConfig) -> None:
    torch.manual_seed(case["seed"])
    got = sampling_ids(case["logp"].clone(), list(case["decoded"]), bool(case["ignore_eos"]), cfg)
    assert got == case["expected"], f"{case['name']}: sampled {got}, upstream {case['expected']}"
    # The same draws from a private generator (what the backends use) give the same id.
    gen = torch.Generator().manual_seed(case["seed"])
    got = sampling_ids(case["logp"].clone(), list(case["decoded"]), bool(case["ignore_eos"]), cfg, gen)
    assert got == case["expected"], f"{case['name']}: private generator sampled {got}"


def _run_bistream(set_dir: str, b: dict, choose, max_yield: int | None = None):
    """Drive BistreamState like upstream's generator loop; returns (events, hiddens, logps).

    Text ids are handed over one at a time, only when the machine waits for text (upstream pulls
    the next id from its generator exactly then). ``choose(sm, logp)`` returns the sampled id."""
    model = _model(set_dir)
    sm = BistreamState(b["prompt_text"].tolist(), b["prompt_speech_token"].tolist(), b["mix_ratio"])
    assert sm.next_fill_index == b["next_fill_index_initial"], "next_fill_index_initial"
    text = list(b["text_tokens"].tolist())
    seq = Sequence(model, capacity=64)
    events, hiddens, logps, n_yield = [], [], [], 0
    while not sm.done:
        feed = sm.next_input()
        if feed is None:
            if text:
                t = text.pop(0)
                events.append({"kind": "text_in", "id": t})
                sm.push_text([t])
            else:
                sm.end_text()
            continue
        events.append({"kind": "forward", "inputs": _table_ids(feed), "cache_len": seq.length,
                       "mask_len": seq.length + len(feed)})
        h, logp = seq.feed(feed)
        hiddens.append(h)
        logps.append(logp)
        if sm.fill_due():
            tok = uid.FILL
        else:
            tok = choose(sm, logp)
            events.append({"kind": "sample", "ignore_eos": sm.ignore_eos,
                           "n_decoded": len(sm.out_tokens), "returned": tok})
        if sm.accept(tok) is Outcome.EMIT:
            events.append({"kind": "yield", "id": tok})
            n_yield += 1
            if max_yield is not None and n_yield >= max_yield:
                break
    return events, hiddens, logps


def forced_sampler(forced: dict):
    """The deterministic sampler of the golden ``bistream.forced`` run (README §4.3): called with
    ``ignore_eos`` once per sampler call, it returns the fill at the ``fill_at_stream_call``-th
    streaming call, eos after ``n_final_before_eos`` final-phase calls, else the next pool id."""
    state = {"j": 0, "stream_calls": 0, "final_calls": 0}

    def sample(ignore_eos: bool) -> int:
        if ignore_eos:
            state["stream_calls"] += 1
            if state["stream_calls"] == forced["fill_at_stream_call"]:
                return uid.FILL
        else:
            state["final_calls"] += 1
            if state["final_calls"] > forced["n_final_before_eos"]:
                return uid.EOS
        state["j"] += 1
        return forced["pool"][state["j"] - 1]

    return sample


@torch.inference_mode()
def _check_bistream_forced(set_dir: str, b: dict) -> None:
    f = b["forced"]
    sample = forced_sampler(f)
    events, hiddens, logps = _run_bistream(set_dir, b, lambda sm, logp: sample(sm.ignore_eos))
    want = [{k: v for k, v in e.items() if k != "hidden"} for e in f["events"]]
    for i, (g, w) in enumerate(zip(events, want)):
        assert g == w, f"event {i}: got {g}, upstream {w}"
    assert len(events) == len(want), f"{len(events)} events, upstream {len(want)}"
    yielded = [e["id"] for e in events if e["kind"] == "yield"]
    assert yielded == list(f["yielded"]), "yielded ids"
    fwd_hidden = [e["hidden"] for e in f["events"] if e["kind"] == "forward" and "hidden" in e]
    assert len(hiddens) == f["hidden"].shape[0], "forward count"
    for k, h in enumerate(hiddens):
        _close(f"hidden[{k}]", h, f["hidden"][k], HIDDEN_ATOL)
        if k < len(fwd_hidden):
            _close(f"event hidden[{k}]", h, fwd_hidden[k], HIDDEN_ATOL)
        _close(f"logp_top8[{k}]", logps[k][f["logp_top8_ids"][k]], f["logp_top8"][k], LOGP_ATOL)
        _close(f"logp_eos[{k}]", logps[k][uid.EOS:uid.FILL + 1], f["logp_eos"][k], LOGP_ATOL)


@torch.inference_mode()
def _check_bistream_seeded(set_dir: str, b: dict, cfg: SamplingConfig) -> None:
    s = b["seeded"]
    torch.manual_seed(s["seed"])

    def choose(sm, logp):
        return sampling_ids(logp.clone(), list(sm.out_tokens), sm.ignore_eos, cfg)

    events, _, _ = _run_bistream(set_dir, b, choose, max_yield=s["max_tokens"])
    yielded = [e["id"] for e in events if e["kind"] == "yield"]
    assert yielded == list(s["yielded"]), f"yielded ids differ: {yielded} vs {list(s['yielded'])}"
    samples = [{k: e[k] for k in ("ignore_eos", "n_decoded", "returned")} for e in events if e["kind"] == "sample"]
    assert samples == list(s["samples"]), "sampler calls differ"
    inputs = [e["inputs"] for e in events if e["kind"] == "forward"]
    assert inputs == list(s["forward_inputs"]), "forward inputs differ"
