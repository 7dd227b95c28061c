"""Mixture-of-experts decoder (linen).

``embed`` -> ``layers_{i}`` (``attn_norm``, ``attn/{query,key,value,out}`` 2-D
Dense without bias and with GQA, ``norm``, ``moe`` = ``router`` Dense ``(d, E)``
plus raw expert params ``wi`` ``(E, d, f)`` and ``wo`` ``(E, f, d)``) -> ``norm``
-> ``lm_head``. Routing is top-k (k=2) over a softmax, renormalised; dispatch is
dense (every expert runs on every token, weighted by the combine weights), which
keeps the model simple and differentiable with no capacity logic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import F32, ZooModel, token_batch
from ._layers import causal_attention, rotary


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    vocab: int = 256
    seq_len: int = 16
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    n_experts: int = 8
    top_k: int = 2
    n_layers: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    remat: bool = False  # nn.remat each block: its backward recomputes it
    dtype: Any = F32
    param_dtype: Any = F32


PRESETS = {
    "tiny": MoEConfig(),
    # Mixtral-8x7B-like dims, but two expert matrices (wi, wo) instead of three: 31.9B params.
    "real": MoEConfig(
        vocab=32000,
        seq_len=4096,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        n_experts=8,
        n_layers=32,
        rope_theta=1e6,
    ),
}


class Attention(nn.Module):
    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        q = nn.Dense(c.n_heads * c.head_dim, name="query", **kw)(x)
        k = nn.Dense(c.n_kv_heads * c.head_dim, name="key", **kw)(x)
        v = nn.Dense(c.n_kv_heads * c.head_dim, name="value", **kw)(x)
        q = rotary(q.reshape(b, t, c.n_heads, c.head_dim), c.rope_theta)
        k = rotary(k.reshape(b, t, c.n_kv_heads, c.head_dim), c.rope_theta)
        v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
        y = causal_attention(q, k, v).reshape(b, t, c.n_heads * c.head_dim)
        return nn.Dense(c.d_model, name="out", **kw)(y)


class MoE(nn.Module):
    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        router = nn.Dense(
            c.n_experts, use_bias=False, name="router", dtype=c.dtype, param_dtype=c.param_dtype
        )
        probs = jax.nn.softmax(router(x).astype(jnp.float32), axis=-1)  # (b, t, E)
        top_p, top_i = jax.lax.top_k(probs, c.top_k)
        top_p = top_p / top_p.sum(axis=-1, keepdims=True)
        combine = jnp.einsum("btk,btke->bte", top_p, jax.nn.one_hot(top_i, c.n_experts))
        # fan-in is the middle (d or f) dim only: the expert dim is a batch dim.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))
        wi = self.param("wi", init, (c.n_experts, c.d_model, c.d_ff), c.param_dtype)
        wo = self.param("wo", init, (c.n_experts, c.d_ff, c.d_model), c.param_dtype)
        h = nn.silu(jnp.einsum("btd,edf->btef", x, wi.astype(c.dtype)))
        h = h * combine[..., None].astype(h.dtype)
        return jnp.einsum("btef,efd->btd", h, wo.astype(c.dtype))


class MoEBlock(nn.Module):
    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        norm = dict(epsilon=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        x = x + Attention(c, name="attn")(nn.RMSNorm(name="attn_norm", **norm)(x))
        return x + MoE(c, name="moe")(nn.RMSNorm(name="norm", **norm)(x))


class MoELM(nn.Module):
    config: MoEConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = nn.Embed(c.vocab, c.d_model, name="embed", **kw)(tokens)
        block = nn.remat(MoEBlock) if c.remat else MoEBlock
        for i in range(c.n_layers):
            x = block(c, name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="norm", epsilon=c.norm_eps, **kw)(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head", **kw)(x)


def build(name: str, family: str, size: str, cfg: MoEConfig) -> ZooModel:
    if not 0 < cfg.top_k <= cfg.n_experts:
        raise ValueError(f"top_k {cfg.top_k} must be in [1, n_experts={cfg.n_experts}]")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads {cfg.n_heads} must be a multiple of n_kv_heads {cfg.n_kv_heads}")

    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32),)

    def batch_fn(rng, batch: int):
        return token_batch(rng, batch, cfg.seq_len, cfg.vocab)

    return ZooModel(name, family, size, "linen", cfg, MoELM(cfg), input_specs, batch_fn)
