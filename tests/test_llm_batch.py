"""Batched LLM decoding equals single-sequence decoding; strict checkpoint loading; key layout."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from engine.checkpoint import CheckpointError, load_strict, read_state_dict
from engine.config import ModelConfig
from engine.llm import ids as uid
from engine.llm.model import CosyVoice2LM, Sequence, load_llm
from engine.llm.qwen2 import Batch

REPO = Path(__file__).resolve().parent.parent


def _tiny_set() -> Path:
    roots = (os.environ.get("COSY_GOLDEN_DIRS") or str(REPO.parent / "shared" / "golden")).split(":")
    for root in filter(None, roots):
        for d in (Path(root), Path(root) / "tiny-s1"):
            if d.name == "tiny-s1" and (d / "model" / "llm.pt").exists():
                return d
    pytest.fail("golden set tiny-s1 not found (COSY_GOLDEN_DIRS or ../shared/golden)")


@functools.lru_cache(maxsize=1)
def _model() -> CosyVoice2LM:
    d = _tiny_set()
    return load_llm(ModelConfig.load(d / "model" / "config.json").llm, d / "model" / "llm.pt")


@functools.lru_cache(maxsize=1)
def _cases() -> list[dict]:
    return torch.load(_tiny_set() / "cases" / "llm.pt", map_location="cpu", weights_only=True)["teacher_forced"]


def _streams() -> list[tuple[list[int], list[int]]]:
    """(prefix unified ids, teacher-forced continuation) of the golden cases: prefixes 29, 7, 13."""
    out = []
    for c in _cases():
        prefix = uid.prefix_unified_ids(c["prompt_text"].tolist(), c["text"].tolist(),
                                        c["prompt_speech_token"].tolist())
        out.append((prefix, c["decoded"].tolist()))
    assert len({len(p) for p, _ in out}) == len(out), "want different prefix lengths"
    return out


@torch.inference_mode()
def _alone(prefix: list[int], decoded: list[int]) -> list[torch.Tensor]:
    seq = Sequence(_model(), capacity=8)      # small: exercises cache growth too
    return [seq.feed(prefix if i == 0 else [decoded[i - 1]])[1] for i in range(len(decoded))]


@torch.inference_mode()
@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 0, 1]])
def test_batched_decode_equals_alone(slots):
    """Prefill all three in one padded forward, then decode the live rows together; rows drop out
    as their continuations end (subsets of slots) and one row is moved to another slot mid-way."""
    model, streams = _model(), _streams()
    slots = list(slots)
    cache = model.new_cache(3, 16)
    cache = cache.grow(4, 64)
    lengths = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    step = 0
    while True:
        rows = [i for i, (_, dec) in enumerate(streams) if step < len(dec)]
        if not rows:
            break
        feeds = [streams[i][0] if step == 0 else [streams[i][1][step - 1]] for i in rows]
        T = max(map(len, feeds))
        ids = torch.tensor([f + [0] * (T - len(f)) for f in feeds])
        starts = torch.tensor([lengths[i] for i in rows])
        row_slots = [slots[i] for i in rows]
        batch = Batch(torch.tensor(row_slots), starts[:, None] + torch.arange(T),
                      int(starts.max()) + T, row_slots == list(range(len(rows))))
        _, logp = model(ids, cache, batch, torch.tensor([len(f) - 1 for f in feeds]))
        for r, i in enumerate(rows):
            got[i].append(logp[r])
            lengths[i] += len(feeds[r])
        if step == 3:       # compaction: move stream 0 into the spare slot 3
            cache.move(slots[0], 3, lengths[0])
            slots[0] = 3
        step += 1

    for i, (prefix, dec) in enumerate(streams):
        ref = _alone(prefix, dec)
        want = _cases()[i]["logp"]
        assert len(got[i]) == len(ref) == len(dec)
        for k in range(len(dec)):
            assert (got[i][k] - ref[k]).abs().max() <= 1e-4, (i, k)
            assert (got[i][k] - want[k]).abs().max() <= 1e-4, (i, k)


def _tiny_sd() -> dict[str, torch.Tensor]:
    return read_state_dict(_tiny_set() / "model" / "llm.pt")


def _fresh() -> CosyVoice2LM:
    cfg = ModelConfig.load(_tiny_set() / "model" / "config.json")
    with torch.device("meta"):
        model = CosyVoice2LM(cfg.llm)
    return model.to_empty(device="cpu")     # how engine.models builds it


def test_strict_loading_accepts_official_keys():
    model = _fresh()
    load_strict(model, _tiny_sd(), "llm.pt")
    assert model.llm.model.lm_head.weight is model.llm.model.model.embed_tokens.weight


@pytest.mark.parametrize("edit,needle", [
    ("missing", "llm.model.model.layers.1.mlp.up_proj.weight"),
    ("extra", "llm.model.model.layers.9.mlp.up_proj.weight"),
    ("misshapen", "speech_embedding.weight"),
])
def test_strict_loading_names_bad_key(edit, needle):
    sd = _tiny_sd()
    if edit == "missing":
        del sd[needle]
    elif edit == "extra":
        sd[needle] = torch.zeros(1)
    else:
        sd[needle] = sd[needle][:-1]
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_strict(_fresh(), sd, "llm.pt")


def test_full_size_keys_on_meta():
    """The real config builds on the meta device with exactly the 295 keys/shapes of llm.pt."""
    with torch.device("meta"):
        model = CosyVoice2LM(ModelConfig().llm)
    sd = model.state_dict()
    assert len(sd) == 295
    assert all(t.is_meta for t in sd.values())
    shapes = {"llm_embedding.weight": (2, 896), "speech_embedding.weight": (6564, 896),
              "llm_decoder.weight": (6564, 896), "llm_decoder.bias": (6564,),
              "llm.model.model.embed_tokens.weight": (151936, 896),
              "llm.model.lm_head.weight": (151936, 896), "llm.model.model.norm.weight": (896,),
              "llm.model.model.layers.23.self_attn.k_proj.bias": (128,),
              "llm.model.model.layers.0.mlp.down_proj.weight": (896, 4864)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("rotary" in k or "inv_freq" in k for k in sd)


def test_embed_routes_unified_ids():
    model = _model()
    ids = torch.tensor([[0, 6563, uid.SOS_ID, uid.TASK_ID, uid.TEXT_OFFSET, uid.TEXT_OFFSET + 511]])
    e = model.embed(ids)[0]
    assert torch.equal(e[0], model.speech_embedding.weight[0])
    assert torch.equal(e[1], model.speech_embedding.weight[6563])
    assert torch.equal(e[2], model.llm_embedding.weight[0])
    assert torch.equal(e[3], model.llm_embedding.weight[1])
    assert torch.equal(e[4], model.backbone.embed_tokens.weight[0])
    assert torch.equal(e[5], model.backbone.embed_tokens.weight[511])


def _ref_draw(logp: torch.Tensor, history: list[int], ignore_eos: bool, ras: bool, u: torch.Tensor,
              cfg) -> int:
    """Plain-loop statement of batched RAS with inverse-CDF draws (the semantics, row by row)."""
    logp = logp.clone().double()
    if ignore_eos:
        logp[uid.EOS] = -float("inf")
    p = logp.softmax(0)
    order = sorted(range(len(p)), key=lambda i: -p[i].item())
    kept, cum = [], 0.0
    for i in order:
        if not (cum < cfg.top_p and len(kept) < cfg.top_k):
            break
        kept.append(i)
        cum += p[i].item()
    target, acc, pick = u[0].item() * sum(p[i].item() for i in kept), 0.0, kept[-1]
    for i in kept:
        acc += p[i].item()
        if target < acc:
            pick = i
            break
    if ras and history[-cfg.win_size:].count(pick) >= cfg.win_size * cfg.tau_r:
        q = p.clone()
        q[pick] = 0
        c = q.cumsum(0)
        pick = int(torch.searchsorted(c, u[1].item() * c[-1].item(), right=True))
    return pick


def test_batched_ras_semantics():
    """batched_ras == the row-by-row statement on random peaked/flat distributions, with and without
    repetition fallback, eos masking and RAS switched off."""
    from engine.config import SamplingConfig
    from engine.llm.sampling import SampleBatch, batched_ras

    cfg = SamplingConfig()
    g = torch.Generator().manual_seed(0)
    B = 48
    temps = torch.tensor([0.3, 1.0, 3.0, 8.0]).repeat(B // 4)
    logp = (torch.randn(B, 6564, generator=g) * temps[:, None]).log_softmax(-1)
    logp[::6, uid.EOS] = 5.0                                  # eos on top for some rows
    logp = logp.log_softmax(-1)
    top = logp.argmax(-1)
    hist = torch.randint(0, 6561, (B, cfg.win_size), generator=g)
    hist[::2, 3] = top[::2]                                   # the likely nucleus id was just decoded
    hist[1::8, :4] = -1                                       # short histories (left padding)
    ignore = torch.rand(B, generator=g) < 0.5
    ras = torch.rand(B, generator=g) < 0.8
    u = torch.rand(B, 2, generator=g)
    u[::3, 0] = 0.99999                                       # draws the last kept entry
    got = batched_ras(logp, SampleBatch(hist, ignore, ras, u), cfg).tolist()
    want = [_ref_draw(logp[i], [t for t in hist[i].tolist() if t >= 0], bool(ignore[i]), bool(ras[i]), u[i], cfg)
            for i in range(B)]
    assert got == want
    assert any(w != top[i] for i, w in enumerate(want) if ras[i] and i % 2 == 0), "fallback not exercised"


@torch.inference_mode()
def test_backbone_matches_transformers_gqa_7to1():
    """The real model's head layout (7 query heads per KV head) against HF Qwen2Model, one-shot and
    in two cached chunks (the tiny golden model only has 2:1)."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2Model as HFQwen2

    from engine.config import Qwen2Config
    from engine.llm.qwen2 import KVCache, Qwen2Model

    dims = dict(hidden_size=112, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
                head_dim=16, intermediate_size=64, vocab_size=50, rope_theta=1e6, rms_norm_eps=1e-6)
    hf = HFQwen2(HFConfig(**dims, attn_implementation="sdpa")).eval()
    g = torch.Generator().manual_seed(0)
    for p in hf.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    cfg = Qwen2Config(**dims)
    ours = Qwen2Model(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(1, 9, 112, generator=g)
    want = hf(inputs_embeds=x).last_hidden_state

    cache = KVCache.allocate(cfg, 2, 16, "cpu", torch.float32)
    got = ours(x, cache, Batch(torch.tensor([1]), torch.arange(9)[None], 9, False))
    assert (got - want).abs().max() <= 1e-5
    cache = KVCache.allocate(cfg, 1, 16, "cpu", torch.float32)
    a = ours(x[:, :5], cache, Batch(torch.tensor([0]), torch.arange(5)[None], 5, True))
    b = ours(x[:, 5:], cache, Batch(torch.tensor([0]), torch.arange(5, 9)[None], 9, True))
    assert (torch.cat([a, b], 1) - want).abs().max() <= 1e-5
