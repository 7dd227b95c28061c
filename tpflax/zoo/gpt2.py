"""GPT-2 decoder (linen) with tied input/output embedding.

``wte`` (vocab x d) and ``wpe`` (ctx x d) embeddings -> ``h_{i}`` blocks
(``ln_1``, ``attn/{query,key,value,out}`` 2-D Dense with bias, ``ln_2``,
``mlp/{c_fc,c_proj}``) -> ``ln_f`` -> logits through ``wte.attend``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import F32, ZooModel, token_batch
from ._layers import causal_attention


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab: int = 256
    seq_len: int = 32  # context length (n_ctx)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256  # 4 * d_model
    ln_eps: float = 1e-5
    remat: bool = False  # nn.remat each block: its backward recomputes it
    dtype: Any = F32
    param_dtype: Any = F32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS = {
    "tiny": GPT2Config(),
    # GPT-2 small: 124.44M params.
    "gpt2-small": GPT2Config(
        vocab=50257, seq_len=1024, d_model=768, n_heads=12, n_layers=12, d_ff=3072
    ),
}


def _dense(c: GPT2Config, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, name=name, dtype=c.dtype, param_dtype=c.param_dtype)


class CausalSelfAttention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, c.n_heads, c.head_dim)

        q = heads(_dense(c, c.d_model, "query")(x))
        k = heads(_dense(c, c.d_model, "key")(x))
        v = heads(_dense(c, c.d_model, "value")(x))
        y = causal_attention(q, k, v).reshape(b, t, c.d_model)
        return _dense(c, c.d_model, "out")(y)


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.gelu(_dense(c, c.d_ff, "c_fc")(x), approximate=True)
        return _dense(c, c.d_model, "c_proj")(h)


class GPT2Block(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        ln = dict(epsilon=c.ln_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        x = x + CausalSelfAttention(c, name="attn")(nn.LayerNorm(name="ln_1", **ln)(x))
        x = x + GPT2MLP(c, name="mlp")(nn.LayerNorm(name="ln_2", **ln)(x))
        return x


class GPT2(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        emb = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        wte = nn.Embed(c.vocab, c.d_model, name="wte", **emb)
        wpe = nn.Embed(c.seq_len, c.d_model, name="wpe", **emb)
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = wte(tokens) + wpe(positions)
        block = nn.remat(GPT2Block) if c.remat else GPT2Block
        for i in range(c.n_layers):
            x = block(c, name=f"h_{i}")(x)
        x = nn.LayerNorm(name="ln_f", epsilon=c.ln_eps, **emb)(x)
        return wte.attend(x)  # tied output projection


def build(name: str, family: str, size: str, cfg: GPT2Config) -> ZooModel:
    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32),)

    def batch_fn(rng, batch: int):
        return token_batch(rng, batch, cfg.seq_len, cfg.vocab)

    return ZooModel(name, family, size, "linen", cfg, GPT2(cfg), input_specs, batch_fn)
