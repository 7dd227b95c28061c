"""Small pure-function building blocks shared by the transformer families."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal scaled dot-product attention with grouped-query support.

    Args:
      q: ``(batch, seq, heads, head_dim)``.
      k, v: ``(batch, seq, kv_heads, head_dim)``; ``heads % kv_heads == 0``.

    Returns:
      ``(batch, seq, heads, head_dim)`` in ``q.dtype``.
    """
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    if n_heads != n_kv:
        # GQA: each kv head serves n_heads // n_kv query heads.
        k = jnp.repeat(k, n_heads // n_kv, axis=-2)
        v = jnp.repeat(v, n_heads // n_kv, axis=-2)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    t_q, t_k = q.shape[1], k.shape[1]
    # jnp, not numpy: under eval_shape the mask stays abstract even at seq 4096.
    mask = jnp.tril(jnp.ones((t_q, t_k), dtype=bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def rotary(x: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form) over ``(batch, seq, heads, head_dim)``."""
    seq, head_dim = x.shape[1], x.shape[-1]
    half = head_dim // 2
    freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]  # (seq, half)
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
