"""Residual MLP (linen): ``embed_in`` -> ``block_{i}`` (``norm``, ``mlp/{up,down}``) -> ``head``."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import F32, ZooModel


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    d_in: int = 32
    d_model: int = 64
    d_ff: int = 256
    n_classes: int = 10
    n_layers: int = 2
    dtype: Any = F32
    param_dtype: Any = F32


PRESETS = {
    "tiny": MLPConfig(),
    "real": MLPConfig(d_in=1024, d_model=4096, d_ff=16384, n_classes=1000, n_layers=8),
}


class FeedForward(nn.Module):
    """``up`` (d -> f), GELU, ``down`` (f -> d): the column/row pair."""

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = nn.Dense(c.d_ff, name="up", **dense)(x)
        h = nn.gelu(h)
        return nn.Dense(c.d_model, name="down", **dense)(h)


class MLPBlock(nn.Module):
    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = nn.LayerNorm(name="norm", dtype=c.dtype, param_dtype=c.param_dtype)(x)
        return x + FeedForward(c, name="mlp")(h)


class MLP(nn.Module):
    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = nn.Dense(c.d_model, name="embed_in", **dense)(x)
        for i in range(c.n_layers):
            x = MLPBlock(c, name=f"block_{i}")(x)
        return nn.Dense(c.n_classes, name="head", **dense)(x)


def build(name: str, family: str, size: str, cfg: MLPConfig) -> ZooModel:
    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.d_in), cfg.dtype),)

    def batch_fn(rng, batch: int):
        kx, ky = jax.random.split(rng)
        x = jax.random.normal(kx, (batch, cfg.d_in), cfg.dtype)
        y = jax.random.randint(ky, (batch,), 0, cfg.n_classes, dtype=jnp.int32)
        return {"x": x, "y": y}

    return ZooModel(name, family, size, "linen", cfg, MLP(cfg), input_specs, batch_fn)
