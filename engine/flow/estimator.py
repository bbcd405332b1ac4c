"""``CausalConditionalDecoder``: the 1-D U-Net that predicts the CFM velocity field.

Spec: shared/spec/cosyvoice2.md §3.4. Single resolution level (``channels`` has one entry, as in the
released model): down block (resnet + transformers + causal conv, skip taken before the conv), mid
blocks, up block on concat([x, skip]), final causal block and 1x1 projection.

The forward is free of host syncs and of shapes that depend on tensor values, so a caller can capture
it in a CUDA graph per (rows, frames) bucket. Rows may have different valid lengths (``mask``) and
per-row streaming flags; valid frames of a row never depend on its padded frames: causal convs see only
the past, the other layers act per frame, and padded keys are masked in attention. So, unlike upstream,
the forward multiplies by the mask only at the end (upstream also does before each conv and after each
conv block, which changes only padded frames and costs ~75 kernels a step); padded input frames must
be finite.

A ``prefix`` (engine.flow.prefix) lets a call continue rows whose leading frames were computed before:
every attention layer and causal convolution then asks it for the keys, values and inputs that come
before the call's first frame (a ``PrefixReader``), or hands it its own (a ``PrefixRecorder``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EstimatorConfig
from engine.flow.masks import additive_bias, attention_allowed


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t [B] (float32, in [0, 1]) -> [B, dim] = [sin(scale*t*f_k), cos(scale*t*f_k)],
    f_k = exp(-ln(10000) * k / (dim/2 - 1)), k = 0 .. dim/2-1 (Matcha ``SinusoidalPosEmb``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the time embedding ([B, in_dim] -> [B, out_dim])."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with ``kernel_size - 1`` frames of left context (zeros, or the prefix's inputs before
    frame 0): output frame t sees inputs <= t."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__(in_ch, out_ch, kernel_size)

    def forward(self, x: torch.Tensor, prefix=None) -> torch.Tensor:
        if prefix is None:
            return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))
        return super().forward(prefix.left_context(self, x))


class CausalBlock1D(nn.Module):
    """causal conv k3 -> LayerNorm over channels -> Mish (upstream masks before and after)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # Keys "block.0" / "block.2" mirror upstream's Sequential(conv, transpose, norm, transpose, mish).
        self.block = nn.ModuleDict({"0": CausalConv1d(dim, dim_out, 3), "2": nn.LayerNorm(dim_out)})

    def forward(self, x: torch.Tensor, prefix=None) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, T]."""
        h = self.block["0"](x, prefix)
        return F.mish(self.block["2"](h.transpose(1, 2)).transpose(1, 2))


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.ModuleDict({"1": nn.Linear(time_emb_dim, dim_out)})  # upstream Sequential(Mish, Linear)
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def time_term(self, t_emb: torch.Tensor) -> torch.Tensor:
        """t_emb [B, time_emb_dim] -> the term added after block1, [B, C_out, 1]."""
        return self.mlp["1"](F.mish(t_emb)).unsqueeze(-1)

    def forward(self, x: torch.Tensor, time_term: torch.Tensor, prefix=None) -> torch.Tensor:
        """x [B, C, T], time_term [B, C_out, 1] (``time_term``) -> [B, C_out, T]."""
        h = self.block2(self.block1(x, prefix) + time_term, prefix)
        return h + self.res_conv(x)


class SelfAttention(nn.Module):
    """diffusers-style attention: bias-free q/k/v, output Linear with bias (key ``to_out.0``)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.register_buffer("qkv_weight", None, persistent=False)   # fuse_projections()

    def fuse_projections(self, fused: bool = True) -> None:
        """Also hold the q, k and v weights as one [3 * inner, dim] matrix, so that a call without a
        prefix runs one GEMM instead of three (``fused=False`` drops it). Call after loading weights
        (it copies them)."""
        with torch.no_grad():
            self.qkv_weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]) if fused else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix=None) -> torch.Tensor:
        """x [B, T, dim], bias [B, 1, T, K] additive (K = T, plus the prefix's keys) -> [B, T, dim]."""
        B, T, _ = x.shape
        def split_heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        if prefix is None and self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        elif prefix is None:
            q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(x)), split_heads(self.to_v(x))
        else:
            q, (k, v) = split_heads(self.to_q(x)), prefix.keys_values(self, x)
        # Under autocast q may be lower precision than the bias; SDPA wants them to match.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GELUProj(nn.Module):
    """Linear then exact (erf) GELU; key ``proj`` as diffusers' GELU module."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class GELUFeedForward(nn.Module):
    """Linear -> exact GELU -> Linear; keys ``net.0.proj`` / ``net.2`` as diffusers' FeedForward."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.net = nn.ModuleDict({"0": GELUProj(dim, inner), "2": nn.Linear(inner, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class TransformerBlock(nn.Module):
    """x += Attn(LN1(x)); x += FF(LN3(x)) (Matcha ``BasicTransformerBlock``, self-attention only)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GELUFeedForward(dim, dim * ff_mult)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, prefix=None) -> torch.Tensor:
        """x [B, T, dim], bias additive [B, 1, T, K] -> [B, T, dim]."""
        x = x + self.attn1(self.norm1(x), bias, prefix)
        return x + self.ff(self.norm3(x))


def _transformers(cfg: EstimatorConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))


class CausalConditionalDecoder(nn.Module):
    """The CFM estimator; parameter names are those of ``decoder.estimator.*`` in flow.pt."""

    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        if len(cfg.channels) != 1:
            raise ValueError(f"only a single U-Net level is supported (channels={cfg.channels})")
        if cfg.act_fn != "gelu" or cfg.num_decoding_left_chunks != -1:
            raise ValueError(f"unsupported estimator variant {cfg}")
        self.cfg = cfg
        ch = cfg.channels[0]
        t_dim = 4 * ch
        self.time_mlp = TimestepMLP(cfg.in_channels, t_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(cfg.in_channels, ch, t_dim), _transformers(cfg, ch), CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock1D(ch, ch, t_dim), _transformers(cfg, ch)])
                                        for _ in range(cfg.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * ch, ch, t_dim), _transformers(cfg, ch), CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.out_channels, 1)
        self.register_buffer("time_weight", None, persistent=False)   # fuse_projections()
        self.register_buffer("time_bias", None, persistent=False)

    def resnets(self) -> list[CausalResnetBlock1D]:
        """The resnet blocks in the order the forward runs them (down, mid..., up)."""
        return [self.down_blocks[0][0], *(mid[0] for mid in self.mid_blocks), self.up_blocks[0][0]]

    def fuse_projections(self, fused: bool = True) -> None:
        """Copy weights into fused matrices so that a step runs fewer, larger GEMMs: q/k/v of every
        attention layer (``SelfAttention.fuse_projections``) and the time terms of all resnet blocks
        (one GEMM instead of a Mish and a GEMM per block). Call after loading weights;
        ``fused=False`` drops the copies (the unfused path, same results)."""
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.fuse_projections(fused)
        with torch.no_grad():
            self.time_weight = torch.cat([r.mlp["1"].weight for r in self.resnets()]) if fused else None
            self.time_bias = torch.cat([r.mlp["1"].bias for r in self.resnets()]) if fused else None

    def time_terms(self, t_emb: torch.Tensor) -> list[torch.Tensor]:
        """Each resnet block's ``time_term`` ([B, C_out, 1]), in ``resnets`` order."""
        if self.time_weight is None:
            return [r.time_term(t_emb) for r in self.resnets()]
        return list(F.linear(F.mish(t_emb), self.time_weight, self.time_bias).unsqueeze(-1)
                    .split(self.cfg.channels[0], dim=1))

    def prefix_layers(self) -> tuple[list[SelfAttention], list[CausalConv1d]]:
        """The attention layers and causal convolutions a prefix serves, in a fixed order."""
        return ([m for m in self.modules() if isinstance(m, SelfAttention)],
                [m for m in self.modules() if isinstance(m, CausalConv1d)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, streaming: bool | torch.Tensor = False,
                prefix=None) -> torch.Tensor:
        """Velocity estimate.

        x, mu, cond [B, 80, T]; mask [B, 1, T] (1 = valid frame, 0 = padding); t [B] flow time in [0, 1];
        spks [B, 80]; streaming: bool, or bool [B] per row (50-frame block-causal attention).
        All float tensors in the module's dtype, except ``t`` which may stay float32 (the time embedding
        is computed in float32 and then cast). Returns [B, 80, T], zero at padded frames.
        ``prefix``: None, or a PrefixReader/PrefixRecorder (module docstring); with a reader, rows
        with cached frames must be streaming and their frame 0 must start a 50-frame block.
        """
        dtype = x.dtype
        t_emb = self.time_mlp(timestep_embedding(t.float(), self.cfg.in_channels).to(dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        allowed = attention_allowed(mask[:, 0] > 0, self.cfg.static_chunk_size, streaming)
        past = None if prefix is None else prefix.past_allowed(x.size(-1))
        if past is not None:
            allowed = torch.cat([past, allowed], dim=2)
        bias = additive_bias(allowed, dtype).unsqueeze(1)

        def transformers(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
            h = h.transpose(1, 2)
            for block in blocks:
                h = block(h, bias, prefix)
            return h.transpose(1, 2)

        time_terms = iter(self.time_terms(t_emb))
        resnet, blocks, conv = self.down_blocks[0]
        h = transformers(blocks, resnet(h, next(time_terms), prefix))
        skip = h
        h = conv(h, prefix)
        for resnet, blocks in self.mid_blocks:
            h = transformers(blocks, resnet(h, next(time_terms), prefix))
        resnet, blocks, conv = self.up_blocks[0]
        h = transformers(blocks, resnet(torch.cat([h, skip], dim=1), next(time_terms), prefix))
        h = self.final_block(conv(h, prefix), prefix)
        return self.final_proj(h) * mask
