"""CPU tests of the vLLM backend's vLLM-free parts (engine/llm/vllm_backend): unified-id embedding,
llm.pt name mapping, the HF side directory, sampler parameters, the RAS logits-processor math against
an upstream-exact torch RAS (checked on the golden ``ras`` cases), and the bistream chunk planner
against the golden upstream bistream runs. None of this imports vLLM."""
from __future__ import annotations

import asyncio
import json
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig, SamplingConfig
from engine.llm.backend import LLMRequest
from engine.llm import ids as uid
from engine.llm.vllm_backend import hf_config, weights
from engine.llm.vllm_backend.bistream_plan import BistreamPlanner
from engine.llm.vllm_backend.logits_math import EXTRA_KEY, RowParams, apply_rows, ras_log_probs, repeated_mask
from engine.llm.vllm_backend.sampling import request_kwargs, sampler_kwargs
from engine.llm.vllm_backend.unified import embed_unified
from tests.golden_parts.llm import forced_sampler

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO.parent / "shared" / "golden" / "tiny-s1"


@pytest.fixture(scope="module")
def golden_llm():
    return torch.load(GOLDEN / "cases" / "llm.pt", map_location="cpu", weights_only=True)


# -- unified ids ---------------------------------------------------------------------------------
def test_embed_unified_matches_three_tables():
    g = torch.Generator().manual_seed(0)
    speech, special, text = (torch.nn.Embedding(n, 8) for n in (uid.NUM_SPEECH_CLASSES, 2, 300))
    for m in (speech, special, text):
        m.weight.data = torch.randn(m.weight.shape, generator=g)
    ids = torch.tensor([0, 6560, 6561, 6563, uid.SOS_ID, uid.TASK_ID, uid.TEXT_OFFSET, uid.TEXT_OFFSET + 299, 17])
    got = embed_unified(ids.view(3, 3), speech, special, text, 300).view(9, 8)
    want = torch.stack([speech.weight[0], speech.weight[6560], speech.weight[6561], speech.weight[6563],
                        special.weight[0], special.weight[1], text.weight[0], text.weight[299], speech.weight[17]])
    assert torch.equal(got, want)


def test_prefix_layout_in_unified_ids():
    assert uid.prefix_unified_ids([3], [4, 5], [7]) == [uid.SOS_ID, uid.TEXT_OFFSET + 3, uid.TEXT_OFFSET + 4,
                                                       uid.TEXT_OFFSET + 5, uid.TASK_ID, 7]


def test_golden_unified_ids_embed_to_prefix_embeds():
    """The golden teacher-forced prefix embeddings equal our unified lookup over the official tables."""
    sd = torch.load(GOLDEN / "model" / "llm.pt", map_location="cpu", weights_only=True)
    cases = torch.load(GOLDEN / "cases" / "llm.pt", map_location="cpu", weights_only=True)["teacher_forced"]
    look = lambda w: (lambda i: w[i])  # noqa: E731
    for c in cases:
        n = c["prefix_len"]
        ids = c["unified_ids"][:n].long()
        e = embed_unified(ids, look(sd["speech_embedding.weight"]), look(sd["llm_embedding.weight"]),
                          look(sd["llm.model.model.embed_tokens.weight"]), sd["llm.model.model.embed_tokens.weight"].shape[0])
        assert torch.equal(e, c["prefix_embeds"]), c["mode"]


# -- weights -------------------------------------------------------------------------------------
def test_weight_names_cover_official_llm_pt():
    sd = torch.load(GOLDEN / "model" / "llm.pt", map_location="cpu", weights_only=True)
    out = dict(weights.renamed(sd.items()))
    assert "llm.model.lm_head.weight" in sd and len(out) == len(sd) - 1
    assert out["model.embed_tokens.weight"].shape[0] == uid.NUM_SPEECH_CLASSES
    assert out["text_embedding.weight"] is sd["llm.model.model.embed_tokens.weight"]
    assert out["llm_decoder.bias"].shape == (uid.NUM_SPEECH_CLASSES,)
    assert "model.layers.1.self_attn.q_proj.bias" in out and "model.norm.weight" in out
    assert all(k.startswith(("model.", "text_embedding.", "llm_embedding.", "llm_decoder.")) for k in out)
    with pytest.raises(KeyError):
        weights.vllm_name("flow.encoder.embed.weight")


# -- HF config / side directory ------------------------------------------------------------------
def test_qwen2_config_dict_loads_in_transformers():
    from transformers import Qwen2Config
    cfg = ModelConfig().llm
    hf = Qwen2Config(**{k: v for k, v in hf_config.qwen2_config_dict(cfg).items() if k != "architectures"})
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_key_value_heads, hf.head_dim) == (896, 24, 2, 64)
    assert hf.vocab_size == 151936 and not hf.tie_word_embeddings
    ov = hf_config.hf_overrides(cfg)
    assert ov["vocab_size"] == 6564 and ov["text_vocab_size"] == 151936
    assert ov["architectures"] == [hf_config.ARCHITECTURE]


def test_side_dir_links_llm_pt_without_touching_model_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    cfg = ModelConfig.tiny()
    cfg.save(model / "config.json")
    (model / "llm.pt").write_bytes(b"x")
    before = sorted(p.name for p in model.iterdir())
    d1 = hf_config.side_dir(model, tmp_path / "cache")
    d2 = hf_config.side_dir(model, tmp_path / "cache")
    assert d1 == d2 and sorted(p.name for p in model.iterdir()) == before
    conf = json.loads((d1 / "config.json").read_text())
    assert conf["hidden_size"] == 128 and conf["num_key_value_heads"] == 1 and conf["vocab_size"] == 512
    assert (d1 / "llm.pt").resolve() == (model / "llm.pt").resolve()


def test_plugin_entry_point_and_idempotent_register(monkeypatch):
    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert "engine.llm.vllm_backend.plugin:register" in eps.values()
    calls = []

    class Registry:
        archs: set = set()

        @classmethod
        def get_supported_archs(cls):
            return cls.archs

        @classmethod
        def register_model(cls, arch, target):
            calls.append((arch, target))
            cls.archs.add(arch)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=Registry))
    from engine.llm.vllm_backend import plugin
    plugin.register()
    plugin.register()
    assert calls == [(hf_config.ARCHITECTURE, hf_config.MODEL_CLASS)]
    mod, cls = hf_config.MODEL_CLASS.split(":")
    assert (REPO / (mod.replace(".", "/") + ".py")).exists()


# -- sampler parameters --------------------------------------------------------------------------
def test_request_kwargs_ras_and_plain():
    cfg = SamplingConfig()
    common = dict(prompt_len=30, min_len=8, max_len=80, max_model_len=4096, seed=5, greedy=False, cfg=cfg)
    ras = request_kwargs(ras=True, processor=True, **common)
    assert (ras["temperature"], ras["top_k"], ras["top_p"], ras["min_tokens"]) == (1.0, 0, 1.0, 0)
    row = RowParams.from_dict(ras["extra_args"][EXTRA_KEY])
    assert row.ras and row.eos_min_len == 8 and (row.top_k, row.top_p, row.win_size) == (25, 0.8, 10)
    assert ras["stop_token_ids"] == [6561, 6562, 6563] and ras["max_tokens"] == 80 and ras["seed"] == 5
    assert ras["repetition_penalty"] == 1.0 and ras["presence_penalty"] == 0.0
    plain = request_kwargs(ras=True, processor=False, **common)      # no processor: RAS unavailable
    assert (plain["top_k"], plain["top_p"], plain["min_tokens"]) == (25, 0.8, 8) and "extra_args" not in plain
    off = request_kwargs(ras=False, processor=True, **common)
    assert (off["top_k"], off["top_p"]) == (25, 0.8) and not RowParams.from_dict(off["extra_args"][EXTRA_KEY]).ras
    greedy = request_kwargs(**{**common, "greedy": True}, ras=True, processor=True)
    assert greedy["temperature"] == 0.0
    clamp = request_kwargs(**{**common, "prompt_len": 4090}, ras=True, processor=True)
    assert clamp["max_tokens"] == 6
    with pytest.raises(ValueError):
        request_kwargs(**{**common, "prompt_len": 4096}, ras=True, processor=True)


def test_masks_without_processor_use_allowed_ids():
    kw = sampler_kwargs(RowParams(mask_ids=[6561, 6562]), ras=False, processor=False, greedy=False,
                        cfg=SamplingConfig())
    assert len(kw["allowed_token_ids"]) == 6562 and 6561 not in kw["allowed_token_ids"]
    with pytest.raises(ValueError):
        sampler_kwargs(RowParams(force_fill_at=3), ras=False, processor=False, greedy=False, cfg=SamplingConfig())


# -- RAS -----------------------------------------------------------------------------------------
def _nucleus(logp: torch.Tensor, ignore_eos: bool, top_p=0.8, top_k=25):
    """Upstream's kept ids/probabilities (float32 running sum, stable descending sort)."""
    logp = logp.clone()
    if ignore_eos:
        logp[uid.EOS] = float("-inf")
    prob, idx = logp.softmax(dim=0).sort(descending=True, stable=True)
    kept_p, kept_i, cum = [], [], 0.0
    for i in range(len(idx)):
        if cum < top_p and len(kept_p) < top_k:
            cum += prob[i]
            kept_p.append(prob[i])
            kept_i.append(int(idx[i]))
        else:
            break
    return logp, kept_i, torch.tensor(kept_p)


def upstream_ras(logp: torch.Tensor, decoded: list[int], ignore_eos: bool, win_size=10, tau_r=0.1) -> int:
    """Upstream ``sampling_ids`` + ``ras_sampling`` (golden README §4.2), drawing from torch's default
    generator exactly as upstream does (multinomial on CPU)."""
    logp, kept_i, kept_p = _nucleus(logp, ignore_eos)
    top = kept_i[kept_p.multinomial(1, replacement=True)]
    if sum(1 for t in decoded[-win_size:] if t == top) >= win_size * tau_r:
        logp[top] = float("-inf")
        top = logp.softmax(dim=0).multinomial(1, replacement=True).item()
    return top


def upstream_ras_draws(logp, decoded, ignore_eos, n, win_size=10, tau_r=0.1) -> torch.Tensor:
    """``n`` independent upstream RAS draws, vectorised: the same two stages (nucleus draw, then a
    full-softmax redraw without the id when it is repeated), batched per drawn id."""
    logp, kept_i, kept_p = _nucleus(logp, ignore_eos)
    first = torch.tensor(kept_i)[kept_p.multinomial(n, replacement=True)]
    out = first.clone()
    for y in first.unique().tolist():
        if sum(1 for t in decoded[-win_size:] if t == y) >= win_size * tau_r:
            sel = first == y
            lp = logp.clone()
            lp[y] = float("-inf")
            out[sel] = lp.softmax(0).multinomial(int(sel.sum()), replacement=True)
    return out


def test_reference_ras_reproduces_golden(golden_llm):
    for c in golden_llm["ras"]:
        torch.manual_seed(c["seed"])
        assert upstream_ras(c["logp"], c["decoded"], c["ignore_eos"]) == c["expected"], c["name"]


def _closed_form(logp, decoded, ignore_eos):
    rows = {0: (RowParams(ras=True, eos_min_len=1 if ignore_eos else 0, history=list(decoded)), [])}
    return apply_rows(logp.clone()[None], rows)[0]


@pytest.mark.parametrize("name", ["model_1", "temp_2.0", "peaked_repeat", "model_0", "eos_top_ignore_eos"])
def test_ras_closed_form_matches_monte_carlo(golden_llm, name):
    """The processor's log P equals the empirical distribution of the upstream two-stage sampler."""
    c = next(c for c in golden_llm["ras"] if c["name"] == name)
    logp = c["logp"]
    decoded = list(c["decoded"])
    if name == "model_1":   # make several nucleus ids repeated so the fallback mixes
        order = logp.argsort(descending=True)
        decoded = decoded[:-4] + [int(t) for t in order[:4]]
    p = _closed_form(logp, decoded, c["ignore_eos"]).exp().double()
    assert abs(p.sum().item() - 1) < 1e-5
    n = 200_000
    gen_state = torch.get_rng_state()
    torch.manual_seed(1234)
    draws = upstream_ras_draws(logp, decoded, c["ignore_eos"], n)
    torch.set_rng_state(gen_state)
    emp = torch.bincount(draws, minlength=logp.numel()).double() / n
    tv = 0.5 * (emp - p).abs().sum().item()
    # Expected TV of a correct law with n draws is ~ sqrt(k/(2πn)) for k effective outcomes; a wrong
    # law (e.g. ignoring the fallback or the nucleus) is off by far more.
    k = int((p > 1e-4).sum())
    assert tv < 3 * (k / (6.28 * n)) ** 0.5 + 0.005, (name, tv, k)
    # Ids outside the nucleus get mass only through the fallback.
    assert p[uid.EOS] == 0 or not c["ignore_eos"] or p[uid.EOS] < 1e-12


def test_ras_closed_form_exact_small_case():
    """3-token example computed by hand: p = (.5, .3, .2), top_p .8 keeps {0, 1}; 0 repeated."""
    logp = torch.tensor([0.5, 0.3, 0.2]).log()[None]
    rep = torch.tensor([[True, False, False]])
    got = ras_log_probs(logp, rep, torch.tensor([0.8], dtype=torch.float64), torch.tensor([25])).exp()[0]
    pn0, pn1 = 0.5 / 0.8, 0.3 / 0.8
    want = torch.tensor([0.0, pn1 + pn0 * 0.3 / 0.5, pn0 * 0.2 / 0.5])
    assert torch.allclose(got.double(), want.double(), atol=1e-6)
    # Without repetition: plain renormalised nucleus; top_k 1 keeps only the best id.
    got = ras_log_probs(logp, torch.zeros_like(rep), torch.tensor([0.8], dtype=torch.float64), torch.tensor([1])).exp()[0]
    assert torch.allclose(got, torch.tensor([1.0, 0.0, 0.0]))


def test_repeated_mask_threshold_and_placeholders():
    m = repeated_mask([[1, 2, 2, -1], list(range(20))], [10, 10], [0.2, 0.1], 30, "cpu")
    assert m[0].nonzero().flatten().tolist() == [2]             # needs >= 2 occurrences
    assert m[1].nonzero().flatten().tolist() == list(range(10, 20))   # only the last 10


def test_apply_rows_force_masks_and_untouched_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, uid.NUM_SPEECH_CLASSES, generator=g)
    orig = logits.clone()
    rows = {
        0: (RowParams(force_fill_at=2), [5, 6]),
        1: (RowParams(mask_ids=[6561, 6562], force_fill_at=5), [5, 6]),
        3: (RowParams(eos_min_len=3), [1, 2, 3]),
    }
    apply_rows(logits, rows)
    assert logits[0].argmax() == uid.FILL and torch.isinf(logits[0]).sum() == uid.NUM_SPEECH_CLASSES - 1
    assert torch.isinf(logits[1, [6561, 6562]]).all() and torch.equal(logits[1, :6561], orig[1, :6561])
    assert torch.equal(logits[2], orig[2]) and torch.equal(logits[3], orig[3])   # min_len reached
    apply_rows(logits, {3: (RowParams(eos_min_len=4), [1, 2, 3])})
    assert logits[3, uid.EOS] == float("-inf")


def test_row_params_round_trip_and_validation():
    r = RowParams(ras=True, mask_ids=[6561], force_fill_at=3, history=[1, 2])
    assert RowParams.from_dict(r.to_dict()) == r
    for bad in ({"top_p": 0.0}, {"mask_ids": [7000]}, {"force_fill_at": -1}):
        with pytest.raises(ValueError):
            RowParams.from_dict({**r.to_dict(), **bad})


# -- bistream planner ----------------------------------------------------------------------------
_TABLE = {"llm_embedding": lambda i: uid.SOS_ID + i, "text": lambda i: uid.TEXT_OFFSET + i, "speech": lambda i: i}


def _unified(inputs):
    return [_TABLE[t](int(i)) for t, i in inputs]


def _run_planner(b, sampler, max_yield=None):
    """Drive the planner like a transport would: text one id at a time, decode each chunk with
    ``sampler(ignore_eos)``. Returns (forward inputs, yielded)."""
    planner = BistreamPlanner(b["prompt_text"].tolist(), b["prompt_speech_token"].tolist(), tuple(b["mix_ratio"]))
    text = b["text_tokens"].tolist()
    forwards, yielded = [], []

    def run_chunk(chunk):
        forwards.append(list(chunk.ids))
        sampled = []
        while True:
            k = len(sampled)
            if chunk.force_fill_at is not None and k == chunk.force_fill_at:
                t = uid.FILL
            else:
                t = sampler(not chunk.final)
                if t is None:
                    return False
            sampled.append(t)
            if t in chunk.stop_ids:
                break
            assert t < uid.EOS
            yielded.append(t)
            if max_yield and len(yielded) >= max_yield:
                return False
            forwards.append([t])
        planner.finish_chunk(sampled)
        return True

    for t in text + [None]:
        if t is None:
            planner.end_text()
        else:
            planner.add_text([t])
        while (chunk := planner.next_chunk()) is not None:
            if not run_chunk(chunk):
                return forwards, yielded
    assert planner.done
    return forwards, yielded


def test_bistream_planner_matches_golden_forced(golden_llm):
    b = golden_llm["bistream"]
    f = b["forced"]
    forwards, yielded = _run_planner(b, forced_sampler(f))
    want = [_unified(e["inputs"]) for e in f["events"] if e["kind"] == "forward"]
    assert forwards == want
    assert yielded == list(f["yielded"])


def test_bistream_planner_matches_golden_seeded(golden_llm):
    b = golden_llm["bistream"]
    s = b["seeded"]
    returns = iter([x["returned"] for x in s["samples"]])
    forwards, yielded = _run_planner(b, lambda ignore_eos: next(returns, None), max_yield=s["max_tokens"])
    want = [_unified(x) for x in s["forward_inputs"]]
    assert forwards == want[:len(forwards)] and len(forwards) >= len(want) - 1
    assert yielded == list(s["yielded"])


def test_bistream_planner_fed_sequence_and_history():
    """``fed`` (the resubmit prompt) is the concatenation of every forward's inputs; chunks carry the
    decoded history (fills included) and force the fill 15 speech tokens after the previous one."""
    p = BistreamPlanner([], [])
    p.add_text(list(range(12)))
    c1 = p.next_chunk()
    assert c1.ids == [uid.SOS_ID] + uid.text_to_unified(range(5)) and c1.force_fill_at == 15
    assert p.next_chunk() is None                       # one chunk in flight at a time
    assert p.finish_chunk(list(range(100, 115)) + [uid.FILL]) == list(range(100, 115))
    c2 = p.next_chunk()
    assert c2.ids == uid.text_to_unified(range(5, 10)) and c2.force_fill_at == 15 and c2.history[-1] == uid.FILL
    p.finish_chunk([200, uid.FILL])                     # sampled fill after one token
    assert p.next_chunk() is None                       # 2 text ids left: wait
    p.end_text()
    c3 = p.next_chunk()
    # Upstream re-feeds the previous forward's input (token 200) before the leftover text and task id.
    assert c3.final and c3.ids == [200] + uid.text_to_unified([10, 11]) + [uid.TASK_ID]
    p.finish_chunk([300, uid.EOS])
    assert p.done
    assert p.fed == c1.ids + list(range(100, 115)) + c2.ids + [200] + c3.ids + [300]


def test_ras_closed_form_matches_project_torch_ras(golden_llm):
    """Against the project's torch RAS (engine.llm.sampling.sampling_ids, upstream-exact on CPU)."""
    from engine.llm.sampling import sampling_ids
    c = next(c for c in golden_llm["ras"] if c["name"] == "model_1")
    logp = c["logp"]
    order = logp.argsort(descending=True)
    decoded = list(c["decoded"][:-4]) + [int(t) for t in order[:4]]
    p = _closed_form(logp, decoded, False).exp().double()
    gen = torch.Generator().manual_seed(7)
    n = 3000
    draws = torch.tensor([sampling_ids(logp.clone(), decoded, False, SamplingConfig(), gen) for _ in range(n)])
    emp = torch.bincount(draws, minlength=logp.numel()).double() / n
    k = int((p > 1e-4).sum())
    assert 0.5 * (emp - p).abs().sum().item() < 3 * (k / (6.28 * n)) ** 0.5 + 0.01


# -- VLLMBackend plumbing against a fake vLLM (engine semantics of vllm-0.26.md §4) --------------
class _FakeSP:
    def __init__(self, output_kind=None, **kw):
        self.__dict__.update(kw)
        self.output_kind = output_kind


class _Out:
    def __init__(self, toks, finish_reason=None, finished=False):
        self.outputs = [types.SimpleNamespace(token_ids=toks, finish_reason=finish_reason, logprobs=None)]
        self.finished = finished


class _FakeEngine:
    """Greedy decoding with the torch model; a streaming-input session keeps its KV and drops each
    chunk's last sampled id; max_tokens comes from the first chunk; abort ends the stream."""

    def __init__(self, model):
        self.model = model
        self.live: set[str] = set()
        self.aborted: set[str] = set()
        self.output_processor = types.SimpleNamespace(get_num_unfinished_requests=lambda: len(self.live))

    async def abort(self, rid):
        self.aborted.add(rid)

    def _step_token(self, logp, sp, out):
        logits = logp.clone()[None]
        extra = (sp.extra_args or {}).get(EXTRA_KEY) if getattr(sp, "extra_args", None) else None
        if extra:
            apply_rows(logits, {0: (RowParams.from_dict(extra), out)})
        if len(out) < sp.min_tokens:
            logits[0, list(sp.stop_token_ids)] = float("-inf")
        if getattr(sp, "allowed_token_ids", None):
            keep = torch.full_like(logits, float("-inf"))
            keep[0, sp.allowed_token_ids] = 0
            logits = logits + keep
        return int(logits[0].argmax())

    async def _decode(self, rid, seq, ids, sp, max_tokens):
        _, logp = seq.feed(ids)
        out = []
        while True:
            await asyncio.sleep(0)
            if rid in self.aborted:
                yield _Out([], "abort", True)
                return
            t = self._step_token(logp, sp, out)
            out.append(t)
            reason = "stop" if t in sp.stop_token_ids else ("length" if len(out) >= max_tokens else None)
            yield _Out([t], reason)
            if reason:
                return
            _, logp = seq.feed([t])

    async def generate(self, prompt, sp, rid):
        from engine.llm.model import Sequence
        self.live.add(rid)
        seq = Sequence(self.model, 512)
        try:
            if isinstance(prompt, dict):
                async for o in self._decode(rid, seq, prompt["prompt_token_ids"], sp, sp.max_tokens):
                    if o.outputs[0].finish_reason:
                        o.finished = True
                    yield o
                    if o.finished:
                        return
                return
            max_tokens = None
            async for item in prompt:
                max_tokens = max_tokens or item.sampling_params.max_tokens
                async for o in self._decode(rid, seq, item.prompt["prompt_token_ids"], item.sampling_params, max_tokens):
                    yield o
                    if o.finished:
                        return
            yield _Out([], "abort", True)       # input stream closed: session finished
        finally:
            self.live.discard(rid)
            self.aborted.discard(rid)


def _fake_vllm(monkeypatch):
    import dataclasses as dc
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = _FakeSP
    sp_mod = types.ModuleType("vllm.sampling_params")
    sp_mod.RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    proto = types.ModuleType("vllm.engine.protocol")
    proto.StreamingInput = dc.make_dataclass("StreamingInput", ["prompt", ("sampling_params", object, None)])
    for name, mod in {"vllm": vllm, "vllm.sampling_params": sp_mod, "vllm.inputs": inputs,
                      "vllm.engine": types.ModuleType("vllm.engine"), "vllm.engine.protocol": proto}.items():
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.fixture(scope="module")
def tiny_lm():
    from engine.checkpoint import ModelDir, read_state_dict
    from engine.llm.model import CosyVoice2LM
    md = ModelDir(GOLDEN / "model")
    m = CosyVoice2LM(md.config().llm)
    m.load_state_dict(read_state_dict(md.llm))
    return m.eval()


def _fake_backend(tiny_lm, monkeypatch, **opts):
    from engine.llm.vllm_backend.backend import VLLMBackend, VLLMOptions
    _fake_vllm(monkeypatch)
    b = VLLMBackend(GOLDEN / "model", VLLMOptions(greedy=True, max_model_len=512, **opts))
    b.engine = _FakeEngine(tiny_lm)
    return b


async def _texts(pieces):
    for p in pieces:
        await asyncio.sleep(0)
        yield p


@pytest.mark.parametrize("transport,processor", [("session", True), ("resubmit", False)])
def test_backend_bistream_with_fake_vllm_equals_torch_loop(tiny_lm, monkeypatch, transport, processor):
    from tests.gpu.helpers import torch_bistream_greedy
    b = _fake_backend(tiny_lm, monkeypatch, bistream_transport=transport, logits_processor=processor)
    rng = __import__("random").Random(4)
    ptext, pspeech = [rng.randrange(511) for _ in range(4)], [rng.randrange(6561) for _ in range(20)]
    text = [rng.randrange(511) for _ in range(12)]
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    want, _ = torch_bistream_greedy(tiny_lm, ptext, pspeech, pieces, max_total=40)
    req = LLMRequest("bi", [], prompt_text_ids=ptext, prompt_speech_tokens=pspeech, max_tokens=40)

    async def run():
        got = []
        async for toks in b.generate_bistream(req, _texts(pieces)):
            got += toks
        return got
    assert asyncio.run(run()) == want
    assert b.running_requests() == 0


@pytest.mark.parametrize("transport", ["session", "resubmit"])
def test_bistream_stopped_by_its_bound_leaves_no_request_running(tiny_lm, monkeypatch, transport):
    """The vLLM request ends when the consumer's loop ends, not later when the event loop
    finalizes abandoned generators (a long-lived server loop would keep it running meanwhile)."""
    b = _fake_backend(tiny_lm, monkeypatch, bistream_transport=transport)

    async def run():
        n = 0
        async for toks in b.generate_bistream(LLMRequest("bi", [], max_tokens=12), _texts([[1, 2, 3]] * 50)):
            n += len(toks)
        return n, b.running_requests()    # checked before asyncio.run finalizes anything
    assert asyncio.run(run()) == (12, 0)


class _AheadFakeEngine(_FakeEngine):
    """A session as vLLM's async scheduling delivers it to a lagging consumer: the token sampled by
    the step already scheduled after a chunk's stop is merged into the stop delta and clears its
    finish_reason."""

    async def generate(self, prompt, sp, rid):
        inner = super().generate(prompt, sp, rid)
        try:
            async for o in inner:
                if o.outputs[0].finish_reason == "stop" and not o.finished:
                    o = _Out(o.outputs[0].token_ids + [0])
                yield o
        finally:
            await inner.aclose()


def test_session_transport_refuses_async_scheduling_and_tokens_after_a_stop(tiny_lm, monkeypatch):
    """Both fail fast instead of waiting forever for the end of the first chunk."""
    b = _fake_backend(tiny_lm, monkeypatch, bistream_transport="session")
    req = LLMRequest("bi", [], max_tokens=40)

    async def run():
        async for _ in b.generate_bistream(req, _texts([[1, 2, 3]] * 4)):
            pass
    b.engine.vllm_config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(async_scheduling=True))
    with pytest.raises(RuntimeError, match="async scheduling"):
        asyncio.run(asyncio.wait_for(run(), 10))
    b.engine = _AheadFakeEngine(b.engine.model)
    with pytest.raises(RuntimeError, match="after the chunk's stop id"):
        asyncio.run(asyncio.wait_for(run(), 10))
    assert b.running_requests() == 0


def test_backend_generate_and_abort_with_fake_vllm(tiny_lm, monkeypatch):
    from tests.gpu.helpers import torch_greedy
    b = _fake_backend(tiny_lm, monkeypatch)
    req = LLMRequest("g", [5, 6, 7, 8], prompt_speech_tokens=[1, 2, 3], max_tokens=12)
    prompt = uid.prefix_unified_ids([], req.text_ids, req.prompt_speech_tokens)
    want, _, _ = torch_greedy(tiny_lm, prompt, *req.length_bounds())

    async def run():
        got = []
        async for toks in b.generate(req):
            got += toks
        # abort: a long request ends early and leaves nothing running
        long = LLMRequest("long", [1] * 20, min_tokens=400, max_tokens=400)
        n = 0
        async for toks in b.generate(long):
            n += len(toks)
            if n == 5:
                await b.abort("long")
        return got, n
    got, n = asyncio.run(run())
    assert got == [t for t in want if t < uid.EOS]
    assert 5 <= n < 400 and b.running_requests() == 0

    async def fixed():     # an explicit min_tokens bans every stop id before it (benchmarks)
        out = []
        async for toks in b.generate(LLMRequest("fixed", [9, 8], min_tokens=30, max_tokens=30)):
            out += toks
        return out
    assert len(asyncio.run(fixed())) == 30


def test_engine_kwargs(tmp_path):
    from engine.llm.vllm_backend.backend import VLLMOptions, engine_kwargs
    kw = engine_kwargs(GOLDEN / "model", VLLMOptions(config_cache_dir=str(tmp_path), max_num_seqs=64,
                                                     cudagraph_capture_sizes=[1, 8]), ModelConfig.tiny().llm)
    assert kw["skip_tokenizer_init"] and kw["generation_config"] == "vllm" and kw["load_format"] == "pt"
    assert kw["hf_overrides"]["vocab_size"] == 6564 and kw["hf_overrides"]["head_dtype"] == "float32"
    assert kw["logits_processors"] == [hf_config.PROCESSOR] and kw["max_num_seqs"] == 64
    assert kw["cudagraph_capture_sizes"] == [1, 8] and Path(kw["model"]).parent == tmp_path
    assert kw["additional_config"] == {"cosyvoice_pacing": {"tokens_per_s": 100.0, "busy_rows": 4}}
    plain = engine_kwargs(GOLDEN / "model", VLLMOptions(logits_processor=False, config_cache_dir=str(tmp_path)),
                          ModelConfig.tiny().llm)
    assert "logits_processors" not in plain and "additional_config" not in plain


def test_decode_pacer_caps_the_step_rate_of_busy_steps():
    from engine.llm.vllm_backend.pacing import DecodePacer
    now = [0.0]

    def sleep(s):
        now[0] += s
    p = DecodePacer.from_config({"cosyvoice_pacing": {"tokens_per_s": 50, "busy_rows": 3}})
    p.clock, p.sleep = (lambda: now[0]), sleep
    assert DecodePacer.from_config({}) is None and DecodePacer.from_config(None) is None
    for rows in [1, 2, 2, 0]:                  # fewer than busy_rows requests: unpaced
        assert p.wait(rows) == 0.0
        now[0] += 0.005
    starts = []
    for _ in range(5):                         # busy: one step per 20 ms
        p.wait(3)
        starts.append(now[0])
        now[0] += 0.005                        # the step's own work
    assert all(abs(b - a - 0.02) < 1e-9 for a, b in zip(starts, starts[1:]))
    now[0] += 1.0
    assert p.wait(10) == 0.0                   # after an idle second no sleep is owed


def test_decode_hold_holds_steps_of_few_requests_while_a_first_chunk_runs(tmp_path):
    from engine.llm.vllm_backend.backend import VLLMOptions, engine_kwargs
    from engine.llm.vllm_backend.pacing import DecodeHold, DecodePacer
    flow_side = DecodeHold.create()                       # the flow worker's process
    kw = engine_kwargs(GOLDEN / "model", VLLMOptions(config_cache_dir=str(tmp_path)), ModelConfig.tiny().llm,
                       hold_path=flow_side.path)
    p = DecodePacer.from_config(kw["additional_config"])  # the engine core's process maps the same file
    assert p.tokens_per_s == 100.0 and p.hold.path == flow_side.path
    now, call_ends = [0.0], [0.05]

    def sleep(s):
        now[0] += s
        if now[0] >= call_ends[0]:                        # the first chunk's call is over
            flow_side.set(False)
    p.clock, p.sleep = (lambda: now[0]), sleep
    flow_side.set(True)
    assert p.wait(4) == 0.0                               # busy steps are paced, never held
    now[0] = 0.01
    assert p.wait(1) == pytest.approx(0.04, abs=1e-3)     # a lone request waits for the flag to drop
    flow_side.set(True)
    call_ends[0] = float("inf")                           # a flag that never drops holds a step at most
    assert p.wait(2) == pytest.approx(p.hold_max_s, abs=1e-3)
    assert DecodePacer.from_config({"cosyvoice_pacing": {"hold_path": flow_side.path}}).tokens_per_s is None
    flow_side.close(remove=True)
    assert not Path(flow_side.path).exists()


@pytest.mark.parametrize("fails", [False, True])
def test_backend_start_shares_the_hold_file_and_removes_it(tmp_path, monkeypatch, fails):
    from engine.llm.vllm_backend import plugin
    from engine.llm.vllm_backend.backend import VLLMBackend, VLLMOptions
    from engine.llm.vllm_backend.pacing import DecodeHold
    seen = {}

    class FakeAsyncLLM:
        @staticmethod
        def from_engine_args(args):
            seen.update(args.kw)
            if fails:
                raise RuntimeError("no GPU")
            return types.SimpleNamespace(shutdown=lambda: None)
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.AsyncEngineArgs = lambda **kw: types.SimpleNamespace(kw=kw)
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = FakeAsyncLLM
    for name, mod in {"vllm": types.ModuleType("vllm"), "vllm.engine": types.ModuleType("vllm.engine"),
                      "vllm.engine.arg_utils": arg_utils, "vllm.v1": types.ModuleType("vllm.v1"),
                      "vllm.v1.engine": types.ModuleType("vllm.v1.engine"), "vllm.v1.engine.async_llm": async_llm
                      }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(plugin, "register", lambda: None)
    b = VLLMBackend(GOLDEN / "model", VLLMOptions(config_cache_dir=str(tmp_path), warmup_requests=0))
    monkeypatch.setattr(b, "warmup", lambda: asyncio.sleep(0))
    if fails:
        with pytest.raises(RuntimeError):
            asyncio.run(b.start())
    else:
        asyncio.run(b.start())
    path = Path(seen["additional_config"]["cosyvoice_pacing"]["hold_path"])
    if fails:
        assert not path.exists()                        # a failed start leaves no file behind
    else:
        b.hold_decode(True)
        assert DecodeHold(str(path)).is_set()           # what the engine core's pacer reads
    asyncio.run(b.close())
    assert not path.exists()
