"""``CausalMaskedDiffWithXvec``: speech tokens + prompt + x-vector -> 80-bin mel at 50 Hz.

Spec: shared/spec/cosyvoice2.md §3.2/§3.6. State-dict keys are exactly those of the released
``flow.pt`` (§3.7). ``inference_batch`` runs many streams in one batched encoder pass and one batched
CFM solve; each row gives the same mel as its own ``inference`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import load_strict, read_state_dict
from engine.config import FlowConfig
from engine.flow.cfm import CausalConditionalCFM
from engine.flow.encoder import UpsampleConformerEncoder
from engine.flow.masks import length_mask
from engine.flow.prefix import PrefixRecording, PrefixRows, PrefixStore, voice_prefix_frames
from engine.tensors import upload


@dataclass
class FlowInputs:
    """Padded decoder conditions of a batch of B streams (F = max frames)."""
    mu: torch.Tensor                # [B, 80, F] encoder output projected to mel space
    mask: torch.Tensor              # [B, 1, F] 1.0 on each row's valid frames
    spks: torch.Tensor              # [B, 80] projected x-vectors
    cond: torch.Tensor              # [B, 80, F] prompt mel on the first prompt_frames[i] frames, else 0
    streaming: torch.Tensor         # bool [B]
    prompt_frames: list[int]        # 2·P_i
    frames: list[int]               # valid frames per row (prompt included)

    def skip(self, leading: list[int]) -> "FlowInputs":
        """The same rows without their first ``leading[i]`` frames (row i's frame t becomes t − leading[i];
        padded to the longest remaining row)."""
        if not any(leading):
            return self
        B, device = len(leading), self.mu.device
        rest = [f - c for f, c in zip(self.frames, leading)]
        t = upload(leading, torch.long, device).unsqueeze(1) + torch.arange(max(rest), device=device)  # [B, T']
        valid = t < upload(self.frames, torch.long, device).unsqueeze(1)
        idx = t.clamp(max=self.mu.size(2) - 1).unsqueeze(1)

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.gather(2, idx.expand(B, x.size(1), -1))
        return FlowInputs(take(self.mu), valid.unsqueeze(1).to(self.mask.dtype), self.spks, take(self.cond),
                          self.streaming, [p - c for p, c in zip(self.prompt_frames, leading)], rest)


class CausalMaskedDiffWithXvec(nn.Module):
    """Token-to-mel flow model; build on any device (``meta`` included), load flow.pt with load_strict."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_lookahead_len = cfg.pre_lookahead_len
        self.token_mel_ratio = cfg.token_mel_ratio
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder, lookahead=cfg.pre_lookahead_len,
                                                up_stride=cfg.token_mel_ratio)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CausalConditionalCFM(cfg.decoder, mel_dim=cfg.output_size)

    def set_estimator_dtype(self, dtype: torch.dtype) -> None:
        """Run the U-Net estimator in ``dtype`` (e.g. torch.bfloat16); encoder and ODE state stay float32."""
        self.decoder.estimator.to(dtype)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool) -> torch.Tensor:
        """Upstream single-stream call (batch 1).

        token [1, N] and prompt_token [1, P] int ids (lengths [1]); prompt_feat [1, 2P, 80] prompt mel;
        embedding [1, 192] x-vector. Returns the mel frames after the prompt, float32 [1, 80, M] with
        M = 2N if finalize else 2(N-3) (the last 3 tokens then only serve as lookahead context).
        """
        if token.size(0) != 1:
            raise ValueError("inference takes batch 1; use inference_batch for several streams")
        n, p, f = int(token_len[0]), int(prompt_token_len[0]), int(prompt_feat_len[0])
        mel = self.inference_batch([token[0, :n]], [prompt_token[0, :p]], [prompt_feat[0, :f]],
                                   embedding, [streaming], [finalize])[0]
        return mel.unsqueeze(0)

    @torch.inference_mode()
    def inference_batch(self, tokens: list[torch.Tensor], prompt_tokens: list[torch.Tensor],
                        prompt_feats: list[torch.Tensor], embeddings: torch.Tensor,
                        streaming: list[bool], finalize: list[bool], n_timesteps: int = 10,
                        on_step: Callable[[], None] | None = None,
                        prefix: PrefixRows | None = None) -> list[torch.Tensor]:
        """Mel for B independent streams in one encoder pass and one CFM solve.

        tokens[i] int [N_i] and prompt_tokens[i] int [P_i] speech-token ids (25 Hz); prompt_feats[i]
        [2·P_i, 80] prompt mel (50 Hz); embeddings [B, 192] x-vectors; streaming[i] selects chunk
        masks; finalize[i] False holds back the row's own last 3 tokens as lookahead context.
        Returns per row float32 [80, M_i] on the model's device: the frames after the prompt,
        M_i = 2·N_i if finalize else 2·(N_i − 3). Equal (up to float rounding) to separate calls.
        ``on_step`` is called between the Euler steps of the CFM solve (see ``CausalConditionalCFM``).
        ``prefix``: row i's first ``prefix.frames[i]`` frames come from the store's slot
        ``prefix.slots[i]``, recorded by ``record_prefix`` for this row's voice (0 frames: none;
        streaming rows only, at most ``voice_prefix_frames(P_i)``).
        """
        inp = self.encode_batch(tokens, prompt_tokens, prompt_feats, embeddings, streaming, finalize)
        if prefix is not None:
            for i, c in enumerate(prefix.frames):
                if c and (not streaming[i] or c > self.prefix_frames(int(prompt_tokens[i].numel()))):
                    raise ValueError(f"stream {i}: {c} cached frames for a "
                                     f"{'streaming' if streaming[i] else 'full-context'} row of "
                                     f"{int(prompt_tokens[i].numel())} prompt tokens")
            inp = inp.skip(prefix.frames)
        feat = self.decoder(inp.mu, inp.mask, inp.spks, inp.cond, inp.streaming, n_timesteps=n_timesteps,
                            on_step=on_step, prefix=prefix)
        return [feat[i, :, inp.prompt_frames[i]:inp.frames[i]] for i in range(len(tokens))]

    def prefix_frames(self, prompt_tokens: int) -> int:
        """How many leading frames of a streaming call depend only on its voice (``voice_prefix_frames``)."""
        return voice_prefix_frames(prompt_tokens, self.cfg.encoder.static_chunk_size, self.pre_lookahead_len,
                                   self.token_mel_ratio)

    @torch.inference_mode()
    def record_prefix(self, store: PrefixStore, slot: int, prompt_tokens: torch.Tensor, prompt_feat: torch.Tensor,
                      embedding: torch.Tensor, frames: int) -> None:
        """Fill ``slot`` of ``store`` with the voice's first ``frames`` frames (whole 50-frame blocks, at
        most ``prefix_frames(P)``): one streaming solve of those frames alone, recorded.
        prompt_tokens [P] int, prompt_feat [2P, 80], embedding [192] (as ``inference_batch``)."""
        P = int(prompt_tokens.numel())
        if frames % self.decoder.estimator.cfg.static_chunk_size or not 0 < frames <= min(self.prefix_frames(P),
                                                                                           store.frames):
            raise ValueError(f"cannot record {frames} prefix frames of a {P}-token prompt")
        inp = self.encode_batch([prompt_tokens[:0]], [prompt_tokens], [prompt_feat],
                                embedding.reshape(1, -1), [True], [True])
        self.decoder(inp.mu[:, :, :frames], inp.mask[:, :, :frames], inp.spks, inp.cond[:, :, :frames],
                     inp.streaming, n_timesteps=store.steps, prefix=PrefixRecording(store, slot))

    @torch.inference_mode()
    def encode_batch(self, tokens: list[torch.Tensor], prompt_tokens: list[torch.Tensor],
                     prompt_feats: list[torch.Tensor], embeddings: torch.Tensor,
                     streaming: list[bool], finalize: list[bool]) -> FlowInputs:
        """The part of ``inference_batch`` before the CFM solve (same arguments): the batched encoder
        pass and the padded decoder conditions (see ``FlowInputs``)."""
        B = len(tokens)
        if not (len(prompt_tokens) == len(prompt_feats) == len(streaming) == len(finalize) == B
                and embeddings.shape[0] == B):
            raise ValueError("inference_batch: all per-stream arguments need the same length")
        device = self.input_embedding.weight.device
        la, ratio, mel_dim = self.pre_lookahead_len, self.token_mel_ratio, self.cfg.output_size

        lens, prompt_frames = [], []
        for i in range(B):
            n, p = int(tokens[i].numel()), int(prompt_tokens[i].numel())
            if tuple(prompt_feats[i].shape) != (ratio * p, mel_dim):
                raise ValueError(f"stream {i}: prompt_feat {tuple(prompt_feats[i].shape)} must be "
                                 f"[{ratio}*{p}, {mel_dim}] for {p} prompt tokens")
            if not finalize[i] and n <= la:
                raise ValueError(f"stream {i}: finalize=False needs more than {la} tokens, got {n}")
            lens.append(p + n - (0 if finalize[i] else la))
            prompt_frames.append(ratio * p)
        T = max(lens)
        if T == 0:
            raise ValueError("inference_batch: every stream is empty (no prompt and no tokens)")

        # Token ids laid out on the host, then one transfer: row i = prompt ++ tokens, minus the context.
        ids = torch.zeros(B, T, dtype=torch.long)
        ctx_ids = torch.zeros(B, la, dtype=torch.long)
        for i in range(B):
            seq = torch.cat([prompt_tokens[i].reshape(-1), tokens[i].reshape(-1)]).to("cpu", torch.long)
            ids[i, :lens[i]] = seq[:lens[i]]
            if not finalize[i]:
                ctx_ids[i] = seq[lens[i]:]
        ids, ctx_ids = ids.to(device).clamp(min=0), ctx_ids.to(device).clamp(min=0)
        xs_lens = torch.tensor(lens, dtype=torch.long).to(device)
        stream = torch.tensor(streaming, dtype=torch.bool).to(device)
        has_ctx = torch.tensor([not f for f in finalize], dtype=torch.bool).to(device)

        h, h_lens = self.encoder(self.input_embedding(ids), xs_lens, self.input_embedding(ctx_ids),
                                 has_ctx, stream)
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()          # [B, 80, ratio*T]
        spks = self.spk_embed_affine_layer(F.normalize(embeddings.to(device, torch.float32), dim=1))
        # Prompt mels laid out on the host and uploaded once, without blocking: a per-row copy from
        # pageable memory would wait for the encoder queued above.
        cond_host = torch.zeros(B, mu.size(2), mel_dim)
        for i in range(B):
            if prompt_frames[i]:
                cond_host[i, :prompt_frames[i]] = prompt_feats[i].to("cpu", torch.float32)
        cond = upload(cond_host, torch.float32, device).transpose(1, 2).contiguous()
        mask = length_mask(h_lens, mu.size(2)).unsqueeze(1).to(mu.dtype)
        return FlowInputs(mu, mask, spks, cond, stream, prompt_frames, [ratio * n for n in lens])


def load_flow(cfg: FlowConfig, path: str | Path, device: torch.device | str = "cpu") -> CausalMaskedDiffWithXvec:
    """Build the flow, strictly load ``path`` (flow.pt) and move it to ``device`` (eval mode).
    Raises engine.checkpoint.CheckpointError on missing/unexpected/misshapen keys."""
    model = CausalMaskedDiffWithXvec(cfg)
    load_strict(model, read_state_dict(path), path)
    return model.to(device).eval()
