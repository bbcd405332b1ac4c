"""Streaming token2wav: chunk planning, deadline ordering and the batched flow + HiFT worker."""
