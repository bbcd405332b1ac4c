"""Batched flow == separate calls; strict checkpoint loading; meta construction; fixed noise hygiene.

Uses the golden tiny-s1 ``model/flow.pt`` (see tests/test_golden.py for how sets are found).
Batched-vs-single tolerance: atol 1e-5 on mels whose values reach ~5-10 (only float reordering differs).
"""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import CheckpointError, load_strict, read_state_dict
from engine.config import ModelConfig
from engine.flow.flow import CausalMaskedDiffWithXvec

BATCH_ATOL = 1e-5


def _stream(gen: torch.Generator, n: int, p: int, vocab: int = 6561):
    tokens = torch.randint(0, vocab, (n,), generator=gen, dtype=torch.int32)
    tokens[0], tokens[-1] = 0, vocab - 1                       # edge ids
    prompt = torch.randint(0, vocab, (p,), generator=gen, dtype=torch.int32)
    feat = torch.randn(2 * p, 80, generator=gen)
    return tokens, prompt, feat


def _single(flow, tokens, prompt, feat, emb, streaming, finalize):
    return flow.inference(tokens[None], torch.tensor([len(tokens)]), prompt[None], torch.tensor([len(prompt)]),
                          feat[None], torch.tensor([feat.shape[0]]), emb[None], streaming, finalize)[0]


def test_batch_equals_single_calls(flow):
    gen = torch.Generator().manual_seed(1234)
    # (N, P, streaming, finalize): different prompt/token lengths, chunk boundaries crossed, mixed flags.
    specs = [(40, 8, False, False), (23, 0, True, True), (31, 13, True, False)]
    streams = [_stream(gen, n, p) for n, p, _, _ in specs]
    emb = torch.randn(len(specs), 192, generator=gen)
    streaming = [s for _, _, s, _ in specs]
    finalize = [f for *_, f in specs]

    batched = flow.inference_batch([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams],
                                   emb, streaming, finalize)
    for i, ((n, p, st, fin), (tok, prm, feat)) in enumerate(zip(specs, streams)):
        assert batched[i].shape == (80, 2 * n if fin else 2 * (n - 3)), i
        single = _single(flow, tok, prm, feat, emb[i], st, fin)
        diff = (batched[i] - single).abs().max().item()
        assert diff <= BATCH_ATOL, f"stream {i}: batched vs single max abs diff {diff:.3g}"
    # The rows really differ from each other (guards against a batch that returns one row thrice).
    assert not torch.allclose(batched[0][:, :20], batched[2][:, :20])


def test_batch_order_and_flags_matter(flow):
    """Same stream with streaming on/off must differ (chunk masks are active), and order must not matter."""
    gen = torch.Generator().manual_seed(7)
    tok, prm, feat = _stream(gen, 60, 5)
    emb = torch.randn(1, 192, generator=gen).expand(2, -1)
    a = flow.inference_batch([tok, tok], [prm, prm], [feat, feat], emb, [True, False], [True, True])
    b = flow.inference_batch([tok, tok], [prm, prm], [feat, feat], emb, [False, True], [True, True])
    assert (a[0] - a[1]).abs().max().item() > 1e-3
    assert (a[0] - b[1]).abs().max().item() <= BATCH_ATOL and (a[1] - b[0]).abs().max().item() <= BATCH_ATOL


def test_misshapen_missing_unexpected_keys_raise(set_dir):
    cfg = ModelConfig.load(set_dir / "model" / "config.json").flow
    sd = read_state_dict(set_dir / "model" / "flow.pt")
    bad = dict(sd)
    key = "decoder.estimator.final_proj.weight"
    bad[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    with pytest.raises(CheckpointError, match="misshapen.*final_proj"):
        load_strict(CausalMaskedDiffWithXvec(cfg), bad, "bad.pt")
    missing = {k: v for k, v in sd.items() if k != "encoder.after_norm.bias"}
    with pytest.raises(CheckpointError, match="missing keys.*after_norm.bias"):
        load_strict(CausalMaskedDiffWithXvec(cfg), missing, "missing.pt")
    extra = dict(sd, **{"decoder.rand_noise": torch.zeros(1, 80, 10)})
    with pytest.raises(CheckpointError, match="unexpected keys.*rand_noise"):
        load_strict(CausalMaskedDiffWithXvec(cfg), extra, "extra.pt")


def test_meta_construction_and_noise_hygiene(set_dir, flow):
    cfg = ModelConfig.load(set_dir / "model" / "config.json").flow
    with torch.device("meta"):
        meta = CausalMaskedDiffWithXvec(cfg)
    assert set(meta.state_dict()) == set(read_state_dict(set_dir / "model" / "flow.pt"))
    assert all(t.is_meta for t in meta.state_dict().values())
    fresh = CausalMaskedDiffWithXvec(cfg)        # (random init draws from the global RNG; noise must not)
    state = torch.get_rng_state()
    noise = fresh.decoder.noise(100, "cpu")
    assert torch.equal(torch.get_rng_state(), state), "the fixed noise must not touch the global RNG"
    torch.manual_seed(0)
    assert torch.equal(noise, torch.randn([1, 80, 15000])[:, :, :100])
    assert fresh.decoder.noise(50, "cpu").data_ptr() == noise.data_ptr(), "noise is cached per device/dtype"


def test_bf16_estimator_option(set_dir):
    """The estimator can run in bfloat16; the result stays near the float32 one (loose bound)."""
    cfg = ModelConfig.load(set_dir / "model" / "config.json").flow
    sd = read_state_dict(set_dir / "model" / "flow.pt")
    model = CausalMaskedDiffWithXvec(cfg)
    load_strict(model, sd, "flow.pt")
    gen = torch.Generator().manual_seed(3)
    tok, prm, feat = _stream(gen, 30, 6)
    emb = torch.randn(1, 192, generator=gen)
    ref = model.inference_batch([tok], [prm], [feat], emb, [True], [True])[0]
    model.set_estimator_dtype(torch.bfloat16)
    assert model.decoder.estimator.final_proj.weight.dtype == torch.bfloat16
    out = model.inference_batch([tok], [prm], [feat], emb, [True], [True])[0]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, f"bf16 relative L2 error {rel:.3g}"


@pytest.mark.parametrize("streaming", [False, True])
def test_estimator_valid_frames_ignore_padded_inputs(flow, streaming):
    """The estimator masks only its output (estimator module docstring): whatever finite values the
    padded frames hold, the valid frames equal those of the row run alone, and the padded ones are 0."""
    est = flow.decoder.estimator
    gen = torch.Generator().manual_seed(3)
    T, valid = 120, 77                                   # crosses a 50-frame chunk boundary
    x, mu, cond = (torch.randn(1, 80, valid, generator=gen) for _ in range(3))
    spks, t = torch.randn(1, 80, generator=gen), torch.tensor([0.37])

    def padded(a):   # the valid frames, then large garbage
        return torch.cat([a, 100 * torch.randn(1, 80, T - valid, generator=gen)], dim=2)

    with torch.inference_mode():
        alone = est(x, torch.ones(1, 1, valid), mu, t, spks, cond, streaming)
        mask = (torch.arange(T) < valid).float().view(1, 1, T)
        got = est(padded(x), mask, padded(mu), t, spks, padded(cond), streaming)
    assert (got[..., :valid] - alone).abs().max().item() <= BATCH_ATOL
    assert got[..., valid:].abs().max().item() == 0
