"""HiFT batching, streaming vocode batching and checkpoint loading (random tiny weights, no golden data).

Batched vs separate calls are compared stage by stage with atol 1e-4: the math per row is the same,
but convolution kernels may round differently for different batch sizes (speech differs by <= 2.3e-5). The f0 predictor
turns such rounding into f0 differences of ~1e-4 Hz (its classifier weights are ~100/sqrt(C), README
§3), which the source phase integrates over the whole call: the full chain (mel -> f0 -> source ->
speech) of a batched row is therefore held to FULL_CHAIN_ATOL only, and exact batching of the whole
chain is checked with a flat-f0 model (classifier weight 0, bias 120 Hz) whose f0 is batch-invariant.
"""
from __future__ import annotations

import pytest
import torch

from engine.checkpoint import CheckpointError
from engine.config import HiFTConfig, ModelConfig
from engine.hift.hift import HiFTGenerator, load_hift
from engine.hift.source import draw_source_noise
from engine.hift.stft import hann_window, istft, reflect_pad_rows
from engine.token2wav import SOURCE_CACHE_LEN, VocodeItem, vocode_batch
from engine.tools.make_checkpoint import _hift_specials, random_state_dict

BATCH_ATOL = 1e-4        # the golden speech tolerance; measured <= 2.3e-5
F0_ATOL = 1e-3           # Hz, as the golden tolerance
FULL_CHAIN_ATOL = 1e-2
SPF = 480


def _random_sd(cfg: HiFTConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        meta = HiFTGenerator(cfg)
    gen = torch.Generator().manual_seed(seed)
    sd = random_state_dict(meta, gen)
    _hift_specials(sd, gen)
    return sd


@pytest.fixture(scope="module")
def cfg() -> HiFTConfig:
    return ModelConfig.tiny().hift


@pytest.fixture(scope="module")
def sd(cfg) -> dict[str, torch.Tensor]:
    return _random_sd(cfg, seed=3)


@pytest.fixture(scope="module")
def hift(cfg, sd) -> HiFTGenerator:
    m = HiFTGenerator(cfg)
    load_hift(m, sd, "random")
    m.fold_weights()
    return m.eval()


@pytest.fixture(scope="module")
def flat_f0_hift(cfg, sd) -> HiFTGenerator:
    flat = dict(sd)
    flat["f0_predictor.classifier.weight"] = torch.zeros_like(sd["f0_predictor.classifier.weight"])
    flat["f0_predictor.classifier.bias"] = torch.full_like(sd["f0_predictor.classifier.bias"], 120.0)
    m = HiFTGenerator(cfg)
    load_hift(m, flat, "flat f0")
    return m.eval()


def _mel(frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(80, frames, generator=g) * 2 - 4


def _close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = BATCH_ATOL) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def _padded(mels: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Batch with the padding filled with loud garbage, so any leak into real frames shows."""
    lens = [m.shape[1] for m in mels]
    batch = 50 * torch.randn(len(mels), 80, max(lens), generator=torch.Generator().manual_seed(99))
    for i, m in enumerate(mels):
        batch[i, :, :lens[i]] = m
    return batch, lens


def test_meta_construction_full_size():
    with torch.device("meta"):
        m = HiFTGenerator(HiFTConfig())
    sd = m.state_dict()
    assert len(sd) == 328
    assert sum(t.numel() for t in sd.values()) == 20_821_295
    assert sd["ups.0.weight_g"].shape == (512, 1, 1) and sd["ups.0.weight_v"].shape == (512, 256, 16)
    assert sd["resblocks.8.activations2.2.alpha"].shape == (64,)


def test_batched_f0_source_decode_equal_single_calls(hift):
    """Each stage of a batched call on rows of different lengths equals the row alone."""
    mels = [_mel(23, 1), _mel(17, 2), _mel(9, 3)]
    batch, lens = _padded(mels)
    T = batch.shape[-1]
    mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).float()[:, None]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]  # noqa: E731
    with torch.no_grad():
        f0 = hift.f0_predictor(batch, mask)
        singles = [hift.f0_predictor(m[None])[0] for m in mels]
        for i, f in enumerate(singles):
            _close(f0[i, :lens[i]], f, f"row {i} f0", F0_ATOL)
        # Source from the same f0 (padding garbage), batched vs alone.
        f0_in = 1000 * torch.rand(3, T)
        for i, f in enumerate(singles):
            f0_in[i, :lens[i]] = f
        draws = draw_source_noise(3, T * SPF, hift.m_source.dim, torch.device("cpu"), gens(),
                                  [n * SPF for n in lens])
        source = hift.m_source(f0_in, draws, lens)
        for i, (f, g) in enumerate(zip(singles, gens())):
            alone = hift.m_source(f[None], draw_source_noise(1, lens[i] * SPF, hift.m_source.dim,
                                                             torch.device("cpu"), [g]))
            _close(source[i, :, :lens[i] * SPF], alone[0], f"row {i} source given f0")
        # Decoder from the same source (garbage past each row's end).
        source = source + 5 * (1 - mask.repeat_interleave(SPF, dim=-1))
        dec = hift.decode(batch, source, lens)
        for i, mel in enumerate(mels):
            n = lens[i] * SPF
            _close(dec[i, :n], hift.decode(mel[None], source[i:i + 1, :, :n])[0], f"row {i} decode")


def test_batched_inference_equals_single_calls(hift, flat_f0_hift):
    """Full calls (per-row generators, a cached source on one row): exact up to float rounding when f0
    is batch-invariant; with a real f0 predictor within FULL_CHAIN_ATOL (f0 sensitivity, see top)."""
    mels = [_mel(23, 1), _mel(17, 2), _mel(9, 3)]
    batch, lens = _padded(mels)
    cache = [None, 0.3 * torch.randn(1, 1, SOURCE_CACHE_LEN), None]
    for model, atol in ((flat_f0_hift, BATCH_ATOL), (hift, FULL_CHAIN_ATOL)):
        gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
        speech, source = model.inference(batch, lens, cache, gens)
        assert speech.shape == (3, 23 * SPF) and source.shape == (3, 1, 23 * SPF)
        for i, mel in enumerate(mels):
            n = lens[i] * SPF
            s1, src1 = model.inference(mel[None], None, [cache[i]], [torch.Generator().manual_seed(11 + i)])
            _close(source[i, :, :n], src1[0], f"row {i} source", atol)
            _close(speech[i, :n], s1[0], f"row {i} speech", atol)
            assert not speech[i, n:].any() and not source[i, :, n:].any(), f"row {i}: output past its length"
            if cache[i] is not None:
                assert torch.equal(source[i, 0, :SOURCE_CACHE_LEN], cache[i].reshape(-1))


def test_global_rng_equals_cpu_generator_for_one_row(hift):
    mel = _mel(12, 4)[None]
    torch.manual_seed(5)
    s_global, src_global = hift.inference(mel)
    s_gen, src_gen = hift.inference(mel, None, None, [torch.Generator().manual_seed(5)])
    assert torch.equal(src_global, src_gen) and torch.equal(s_global, s_gen)


def _stream_plans() -> list[list[tuple[int, bool]]]:
    # (new mel frames, finalize) per chunk; streams start and end at different steps of the batch.
    return [[(30, False), (50, False), (20, True)],
            [(20, False), (40, True)],
            [(36, False), (50, False), (50, False), (7, True)]]


def test_vocode_batch_equals_per_stream_calls(flat_f0_hift):
    hift = flat_f0_hift
    plans = _stream_plans()
    mels = [[_mel(n, 100 * s + k) for k, (n, _) in enumerate(plan)] for s, plan in enumerate(plans)]

    alone: list[list] = []
    for s, plan in enumerate(plans):
        item, gen, out = VocodeItem(mel=mels[s][0]), torch.Generator().manual_seed(s), []
        for k, (_, fin) in enumerate(plan):
            item.mel, item.finalize, item.generator = mels[s][k], fin, gen
            out.append(vocode_batch(hift, [item])[0])
        assert item.cache is None
        alone.append(out)

    items = [VocodeItem(mel=mels[s][0], generator=torch.Generator().manual_seed(s)) for s in range(len(plans))]
    batched: list[list] = [[] for _ in plans]
    for step in range(max(len(p) for p in plans)):
        live = [s for s in range(len(plans)) if step < len(plans[s])]
        for s in live:
            items[s].mel, items[s].finalize = mels[s][step], plans[s][step][1]
        for s, audio in zip(live, vocode_batch(hift, [items[s] for s in live])):
            batched[s].append(audio)

    for s, plan in enumerate(plans):
        assert items[s].cache is None
        for k, (frames, fin) in enumerate(plan):
            got, want = torch.from_numpy(batched[s][k]), torch.from_numpy(alone[s][k])
            # The first non-final chunk holds back 3840 samples; the final one releases them.
            expected_len = frames * SPF - (SOURCE_CACHE_LEN if k == 0 and not fin else 0) \
                + (SOURCE_CACHE_LEN if k > 0 and fin else 0)
            assert len(got) == len(want) == expected_len, f"stream {s} chunk {k}: sample count"
            assert got.dtype == torch.float32
            _close(got, want, f"stream {s} chunk {k}")
        assert sum(len(a) for a in batched[s]) == SPF * sum(n for n, _ in plan)


def test_load_parametrizations_spelling(cfg, sd, hift):
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
                .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in sd.items()}
    assert any("parametrizations" in k for k in renamed)
    m = HiFTGenerator(cfg)
    load_hift(m, renamed, "renamed")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    mel, source = _mel(10, 7)[None], 0.1 * torch.randn(1, 1, 10 * SPF)
    with torch.no_grad():
        assert torch.equal(m.decode(mel, source), hift.decode(mel, source))


@pytest.mark.parametrize("edit,name", [
    ("drop", "conv_post.weight_g"),
    ("reshape", "ups.1.weight_v"),
    ("extra", "conv_post.weight"),
    ("drop", "resblocks.4.activations1.2.alpha"),
])
def test_bad_checkpoint_names_the_key(cfg, sd, edit, name):
    bad = dict(sd)
    if edit == "drop":
        del bad[name]
    elif edit == "reshape":
        bad[name] = bad[name][:, :, :-1]
    else:
        bad[name] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hift(HiFTGenerator(cfg), bad, "bad.pt")


def test_folded_weights_follow_reloads(cfg, sd):
    m = HiFTGenerator(cfg)
    load_hift(m, sd, "a")
    mel, source = _mel(8, 8)[None], 0.1 * torch.randn(1, 1, 8 * SPF)
    with torch.no_grad():
        before = m.decode(mel, source)
        other = _random_sd(cfg, seed=4)
        load_hift(m, other, "b")
        fresh = HiFTGenerator(cfg)
        load_hift(fresh, other, "b")
        after = m.decode(mel, source)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh.decode(mel, source).detach())


def test_stft_helpers_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g)
    lens = [40, 23, 17]
    padded = reflect_pad_rows(x, 8, lens)
    for i, n in enumerate(lens):
        want = torch.nn.functional.pad(x[i:i + 1, None, :n], (8, 8), mode="reflect")[0, 0]
        assert torch.equal(padded[i, :n + 16], want) and not padded[i, n + 16:].any()
    w = hann_window(16)
    assert torch.allclose(w, torch.hann_window(16, periodic=True), atol=1e-7)
    spec = torch.randn(3, 9, 31, generator=g, dtype=torch.complex64)
    frames = [31, 20, 5]
    mask = (torch.arange(31)[None] < torch.tensor(frames)[:, None]).float()
    y = istft(spec, 16, 4, w, mask)
    for i, f in enumerate(frames):
        want = torch.istft(spec[i:i + 1, :, :f], 16, 4, 16, window=w)[0]
        _close(y[i, :want.shape[0]], want, f"istft row {i}", 1e-5)
        assert not y[i, 4 * (f - 1) + 8:].any()  # the last frame reaches 8 samples past the end


def test_vocode_batch_empty_final_chunks(flat_f0_hift):
    """A final call with no new frames releases exactly the held-back tail; with nothing cached, nothing."""
    first = VocodeItem(mel=_mel(12, 20), generator=torch.Generator().manual_seed(0))
    empty = VocodeItem(mel=torch.zeros(80, 0), finalize=True)
    out = vocode_batch(flat_f0_hift, [first, empty])
    assert [len(a) for a in out] == [12 * SPF - SOURCE_CACHE_LEN, 0] and empty.cache is None
    first.mel, first.finalize = torch.zeros(80, 0), True
    assert len(vocode_batch(flat_f0_hift, [first])[0]) == SOURCE_CACHE_LEN and first.cache is None
