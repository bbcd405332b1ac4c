"""Qwen2 decoder (the CosyVoice2 LLM backbone) with a slot-based KV cache for batches of sequences.

Parameter names follow Hugging Face ``Qwen2Model`` (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
..., ``norm``) so that the module nests as ``llm.model.model.*`` inside ``CosyVoice2LM``.

KV cache layout: one tensor per K and V of shape ``[layers, slots, kv_heads, capacity, head_dim]``.
A sequence owns one slot; its tokens occupy positions ``0..len-1`` of that slot. A forward call
feeds each row ``n_i`` new tokens at positions ``start_i..start_i+n_i-1`` (rows are right-padded to
the longest ``n_i``); keys are attended up to the query's own position, so padded query rows and
stale cache entries past a sequence's length are never seen by real queries. Everything is tensor
ops on the device: nothing syncs the host inside the layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import Qwen2Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> same shape and dtype."""
        # Normalise in float32 and cast back before the weight, as HF Qwen2RMSNorm does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@dataclass
class KVCache:
    """K/V storage ``[layers, slots, kv_heads, capacity, head_dim]`` shared by all live sequences."""
    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, cfg: Qwen2Config, slots: int, capacity: int, device, dtype) -> "KVCache":
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def grow(self, slots: int, capacity: int) -> "KVCache":
        """A cache with at least ``slots`` slots and ``capacity`` positions holding this one's content."""
        if slots <= self.slots and capacity <= self.capacity:
            return self
        s, c = max(slots, self.slots), max(capacity, self.capacity)
        shape = (self.k.shape[0], s, self.k.shape[2], c, self.k.shape[4])
        k = self.k.new_zeros(shape)
        v = self.v.new_zeros(shape)
        k[:, :self.slots, :, :self.capacity] = self.k
        v[:, :self.slots, :, :self.capacity] = self.v
        return KVCache(k, v)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class Batch:
    """Where a forward call reads and writes the cache.

    ``slots`` [B] long: cache slot of each row. ``positions`` [B, T] long: absolute position of every
    fed token (padding columns continue the count). ``kv_len``: number of cache positions attended
    (>= every position + 1). ``contiguous``: rows are exactly slots ``0..B-1`` (the cache is read as
    a view instead of gathered)."""
    slots: Tensor
    positions: Tensor
    kv_len: int
    contiguous: bool

    def mask(self) -> Tensor:
        """Bool [B, 1, T, kv_len]: key j is visible to the query at position p iff j <= p."""
        keys = torch.arange(self.kv_len, device=self.positions.device)
        return keys[None, None, None, :] <= self.positions[:, None, :, None]


class Rotary(nn.Module):
    """RoPE with HF Qwen2's inverse frequencies; the table is made lazily (meta-constructible)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: Tensor | None = None

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] -> (cos, sin) float32 [B, 1, T, head_dim]."""
        inv = self._inv_freq
        if inv is None or inv.device != positions.device:
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inv = (1.0 / (self.theta ** exps)).to(positions.device)
            self._inv_freq = inv
        freqs = positions.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, head_dim] by RoPE angles (cos/sin [B, 1, T, head_dim]), HF layout."""
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache_k: Tensor, cache_v: Tensor,
                batch: Batch, mask: Tensor) -> Tensor:
        """x [B, T, hidden] -> [B, T, hidden]; writes this layer's K/V into cache_k/cache_v
        ([slots, kv_heads, capacity, head_dim]) at (batch.slots, batch.positions)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        # cache_k: [slots, kv_heads, capacity, head_dim]; advanced indices around a slice put the
        # indexed dims first, hence the [B, T, kv_heads, head_dim] value.
        rows = batch.slots[:, None]
        cache_k[rows, :, batch.positions] = k.transpose(1, 2)
        cache_v[rows, :, batch.positions] = v.transpose(1, 2)
        if batch.contiguous:
            keys, values = cache_k[:B, :, :batch.kv_len], cache_v[:B, :, :batch.kv_len]
        else:
            keys = cache_k[:, :, :batch.kv_len].index_select(0, batch.slots)
            values = cache_v[:, :, :batch.kv_len].index_select(0, batch.slots)

        # GQA without copying K/V: fold the query heads sharing a KV head into the query length
        # (query head h uses KV head h // group, as HF repeat_kv).
        g = self.n_heads // self.n_kv
        qg = q.reshape(B, self.n_kv, g * T, self.head_dim)
        mg = mask.expand(B, 1, T, batch.kv_len).repeat(1, 1, g, 1) if g > 1 else mask
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mg)
        out = out.reshape(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x)), [..., hidden] -> [..., hidden]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cache_k, cache_v, batch, mask):
        """Pre-norm attention and MLP blocks with residuals; x [B, T, hidden]."""
        x = x + self.self_attn(self.input_layernorm(x), rope, cache_k, cache_v, batch, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """HF ``Qwen2Model`` equivalent: ``embed_tokens``, ``layers``, ``norm`` (keys as in llm.pt)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: Tensor, cache: KVCache, batch: Batch) -> Tensor:
        """x [B, T, H] input embeddings -> [B, T, H] hidden states after the final RMSNorm.

        Writes K/V of every fed position into ``cache`` (see the module docstring)."""
        rope = self.rotary(batch.positions)
        mask = batch.mask()
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache.k[i], cache.v[i], batch, mask)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Holds ``model`` and the (tied, unused for TTS) ``lm_head`` so keys read ``model.*``/``lm_head.*``."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class Qwen2Encoder(nn.Module):
    """Upstream's wrapper name level: ``llm.model`` is the causal LM."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2ForCausalLM(cfg)
