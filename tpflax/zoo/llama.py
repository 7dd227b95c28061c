"""LLaMA decoder (linen): RMSNorm, rotary embeddings, GQA, SwiGLU, untied head.

``embed`` -> ``layers_{i}`` (``attention_norm``, ``attn/{q,k,v,o}_proj``,
``ffn_norm``, ``mlp/{gate,up,down}_proj``) -> ``norm`` -> ``lm_head``.
q/k/v are ``DenseGeneral`` kernels ``(d, heads, head_dim)``; ``o_proj`` is
``(heads, head_dim, d)``. With ``scan_layers=True`` one ``nn.scan``-ed module
named ``layers`` holds every layer, each leaf with a leading ``n_layers`` dim.
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
class LlamaConfig:
    vocab: int = 256
    seq_len: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_ff: int = 128
    n_layers: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = F32
    param_dtype: Any = F32


_7B = LlamaConfig(
    vocab=32000,
    seq_len=4096,
    d_model=4096,
    n_heads=32,
    n_kv_heads=32,
    head_dim=128,
    d_ff=11008,
    n_layers=32,
)

PRESETS = {
    "tiny": LlamaConfig(),
    "tiny-scan": LlamaConfig(scan_layers=True, remat=True),
    "llama-2-7b": _7B,  # 6.74B params
    "llama-2-7b-scan": dataclasses.replace(_7B, scan_layers=True, remat=True),
    "llama-70b": dataclasses.replace(  # 68.98B params
        _7B, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672, n_layers=80
    ),
    "llama-405b": dataclasses.replace(  # 405.9B params
        _7B,
        vocab=128256,
        seq_len=8192,
        d_model=16384,
        n_heads=128,
        n_kv_heads=8,
        d_ff=53248,
        n_layers=126,
        rope_theta=500000.0,
    ),
}


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        q = nn.DenseGeneral((c.n_heads, c.head_dim), name="q_proj", **kw)(x)
        k = nn.DenseGeneral((c.n_kv_heads, c.head_dim), name="k_proj", **kw)(x)
        v = nn.DenseGeneral((c.n_kv_heads, c.head_dim), name="v_proj", **kw)(x)
        q, k = rotary(q, c.rope_theta), rotary(k, c.rope_theta)
        y = causal_attention(q, k, v)
        return nn.DenseGeneral(c.d_model, axis=(-2, -1), name="o_proj", **kw)(y)


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        gate = nn.Dense(c.d_ff, name="gate_proj", **kw)(x)
        up = nn.Dense(c.d_ff, name="up_proj", **kw)(x)
        return nn.Dense(c.d_model, name="down_proj", **kw)(nn.silu(gate) * up)


class LlamaLayer(nn.Module):
    """One decoder layer. ``scanned=True`` gives the ``(carry, out)`` signature nn.scan wants."""

    config: LlamaConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *_: Any) -> Any:
        c = self.config
        norm = dict(epsilon=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        x = x + LlamaAttention(c, name="attn")(nn.RMSNorm(name="attention_norm", **norm)(x))
        x = x + LlamaMLP(c, name="mlp")(nn.RMSNorm(name="ffn_norm", **norm)(x))
        return (x, None) if self.scanned else x


class Llama(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab, c.d_model, name="embed", dtype=c.dtype, param_dtype=c.param_dtype)(
            tokens
        )
        layer_cls = nn.remat(LlamaLayer, prevent_cse=not c.scan_layers) if c.remat else LlamaLayer
        if c.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=c.n_layers,
            )
            x, _ = stack(c, scanned=True, name="layers")(x)
        else:
            for i in range(c.n_layers):
                x = layer_cls(c, name=f"layers_{i}")(x)
        x = nn.RMSNorm(name="norm", epsilon=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)(x)
        return nn.Dense(
            c.vocab, use_bias=False, name="lm_head", dtype=c.dtype, param_dtype=c.param_dtype
        )(x)


def build(name: str, family: str, size: str, cfg: LlamaConfig) -> ZooModel:
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads {cfg.n_heads} must be a multiple of n_kv_heads {cfg.n_kv_heads}")

    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32),)

    def batch_fn(rng, batch: int):
        return token_batch(rng, batch, cfg.seq_len, cfg.vocab)

    return ZooModel(name, family, size, "linen", cfg, Llama(cfg), input_specs, batch_fn)
