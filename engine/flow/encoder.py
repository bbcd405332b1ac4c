"""``UpsampleConformerEncoder``: speech-token embeddings (25 Hz) -> hidden frames at the mel rate (50 Hz).

Pre-norm conformer layers (no conv module, no macaron) with ESPnet relative-position self-attention,
a 3-token pre-lookahead convolution, x2 nearest upsampling + causal conv, then 4 more layers.
Spec: shared/spec/cosyvoice2.md §3.3 (hard-coded 512 channels there = ``output_size`` here).

Batched rows may have different lengths; everything that mixes frames is either causal (convs) or masked
(attention keys), so valid frames of a row never see another row's padding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EncoderConfig
from engine.flow.masks import attention_allowed, length_mask


def rel_position_table(T: int, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ESPnet relative sinusoid rows [1, 2T-1, d_model] for relative positions +(T-1) .. -(T-1).

    Even dims sin, odd dims cos of ``r * 10000^(-2i/d_model)``; computed in float32 the same way as
    upstream's table so values agree bit-for-bit regardless of T."""
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                    * -(math.log(10000.0) / d_model))
    rel = torch.arange(T - 1, -T, -1, dtype=torch.float32, device=device).unsqueeze(1)
    pe = torch.zeros(2 * T - 1, d_model, device=device)
    pe[:, 0::2] = torch.sin(rel * div)
    pe[:, 1::2] = torch.cos(rel * div)
    return pe.unsqueeze(0).to(dtype)


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm(eps 1e-5) -> scale by sqrt(d) (``LinearNoSubsampling`` + ESPnet rel-pos enc.)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, idim] -> (scaled [B, T, odim], pos_emb [1, 2T-1, odim])."""
        x = self.out(x) * self.xscale
        return x, rel_position_table(x.size(1), x.size(2), x.device, x.dtype)


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with relative positions (Transformer-XL style, ESPnet variant)."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], allowed bool [B, T, T] (query, key), pos_emb [1, 2T-1, D] -> [B, T, D]."""
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)   # [1, H, 2T-1, dk]
        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (content + position) / math.sqrt(self.d_k)
        masked = ~allowed.unsqueeze(1)
        # -inf then zero (not a finite bias): a fully masked (empty) row gives zeros instead of NaN.
        attn = torch.softmax(scores.masked_fill(masked, -float("inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, self.h * self.d_k)
        return self.linear_out(out)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[..., T, 2T-1] scores over table rows -> [..., T, T] with out[i, j] = x[i, T-1-i+j].

    Table row k holds relative position T-1-k, so out[i, j] is the score for relative position i-j."""
    T = x.size(-2)
    i = torch.arange(T, device=x.device)
    index = (T - 1) - i.unsqueeze(1) + i.unsqueeze(0)
    return x.gather(-1, index.expand(*x.shape[:-1], T))


class FeedForward(nn.Module):
    """Linear -> SiLU -> Linear, applied per frame ([..., d] -> [..., d])."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d, hidden)
        self.w_2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x += MHA(LN(x)); x += FFN(LN(x)); LayerNorm eps 1e-12 as upstream."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, d)
        self.feed_forward = FeedForward(d, hidden)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], allowed bool [B, T, T], pos_emb [1, 2T-1, d] -> [B, T, d]."""
        x = x + self.self_attn(self.norm_mha(x), allowed, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Each frame also reads the next ``lookahead`` frames (real tokens, context tokens, or zeros)."""

    def __init__(self, channels: int, lookahead: int = 3):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, 3)

    def forward(self, x: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """x [B, T, C]; right [B, lookahead, C] = what follows the last frame of the padded tensor
        -> [B, T, C]. (Rows shorter than T must already hold their context/zeros after their end.)"""
        h = torch.cat([x, right], dim=1).transpose(1, 2)
        h = F.leaky_relu(self.conv1(h), 0.01)
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest x``stride`` in time, then a causal conv (left pad 2*stride, kernel 2*stride+1)."""

    def __init__(self, channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C, stride*T]."""
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, lookahead: int = 3, n_up_blocks: int = 4, up_stride: int = 2):
        super().__init__()
        if cfg.input_layer != "linear" or cfg.pos_enc_layer_type != "rel_pos_espnet" \
                or cfg.selfattention_layer_type != "rel_selfattn" or cfg.use_cnn_module \
                or cfg.macaron_style or not cfg.normalize_before:
            raise ValueError(f"unsupported encoder variant {cfg}")
        d = cfg.output_size
        self.cfg = cfg
        self.lookahead = lookahead
        self.up_stride = up_stride
        self.embed = LinearEmbed(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(d, cfg.attention_heads, cfg.linear_units)
                                      for _ in range(cfg.num_blocks))
        self.up_layer = Upsample1D(d, up_stride)
        self.up_embed = LinearEmbed(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, cfg.attention_heads, cfg.linear_units)
                                         for _ in range(n_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def output_size(self) -> int:
        """Hidden width of the encoder output (512 in the released model)."""
        return self.cfg.output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, context: torch.Tensor | None = None,
                has_context: torch.Tensor | None = None,
                streaming: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded batch.

        xs [B, T, input_size] (embedded tokens, frames past ``xs_lens`` ignored); xs_lens int [B];
        context [B, lookahead, input_size] = the next tokens' embeddings that each row's lookahead conv
        reads right after its own last frame (upstream's ``context``); rows with ``has_context`` False
        (bool [B], default all True when context is given) read zeros instead, as upstream does without
        context. streaming: bool or bool [B]; streaming rows use block-causal chunk masks of
        ``static_chunk_size`` (``up_stride`` x that after upsampling).
        Returns (h [B, up_stride*T, output_size] after ``after_norm``, h_lens = up_stride*xs_lens).
        """
        B, T, _ = xs.shape
        valid = length_mask(xs_lens, T)
        x, pos_emb = self.embed(xs)
        # Padded frames must read as zeros: a shorter row's lookahead sees them right after its end.
        x = x * valid.unsqueeze(-1).to(x.dtype)
        right = x.new_zeros(B, self.lookahead, x.size(2))
        if context is not None and context.size(1) > 0:
            ctx, _ = self.embed(context)
            if has_context is not None:
                ctx = ctx * has_context.view(B, 1, 1).to(ctx.dtype)
            # Scatter each row's context to frames [len, len+lookahead) of the padded sequence.
            x = torch.cat([x, right], dim=1)
            idx = xs_lens.to(torch.long).view(B, 1) + torch.arange(self.lookahead, device=x.device)
            x = x.scatter_add(1, idx.unsqueeze(-1).expand(B, self.lookahead, x.size(2)), ctx)
            x, right = x[:, :T], x[:, T:]
        x = self.pre_lookahead_layer(x, right)
        allowed = attention_allowed(valid, self.cfg.static_chunk_size, streaming)
        for layer in self.encoders:
            x = layer(x, allowed, pos_emb)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        h_lens = xs_lens * self.up_stride
        valid = length_mask(h_lens, x.size(1))
        x, pos_emb = self.up_embed(x)
        allowed = attention_allowed(valid, self.cfg.static_chunk_size * self.up_stride, streaming)
        for layer in self.up_encoders:
            x = layer(x, allowed, pos_emb)
        return self.after_norm(x), h_lens
