"""Residual MLP in ``flax.nnx``: ``embed_in`` -> ``blocks[i]`` (``norm``, ``up``, ``down``) -> ``head``.

``nnx.state(model)`` paths look like ``blocks/0/up/kernel``; flattened with
``jax.tree_util`` they gain a trailing ``/value`` (the ``nnx.Variable`` field).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ._base import ZooModel
from .mlp import PRESETS as MLP_PRESETS
from .mlp import MLPConfig

# The same sizes as the linen MLP, so the two plans can be compared leaf for leaf.
NNXMLPConfig = MLPConfig
PRESETS = MLP_PRESETS


class Block(nnx.Module):
    def __init__(self, c: NNXMLPConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(c.d_model, **kw)
        self.up = nnx.Linear(c.d_model, c.d_ff, **kw)
        self.down = nnx.Linear(c.d_ff, c.d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class NNXMLP(nnx.Module):
    def __init__(self, c: NNXMLPConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.embed_in = nnx.Linear(c.d_in, c.d_model, **kw)
        # flax 0.12 rejects a plain list of Modules as a pytree attribute: use nnx.List.
        self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.n_layers)])
        self.head = nnx.Linear(c.d_model, c.n_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed_in(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(name: str, family: str, size: str, cfg: NNXMLPConfig) -> ZooModel:
    def factory(rngs: nnx.Rngs) -> NNXMLP:
        return NNXMLP(cfg, rngs=rngs)

    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.d_in), cfg.dtype),)

    def batch_fn(rng, batch: int):
        kx, ky = jax.random.split(rng)
        x = jax.random.normal(kx, (batch, cfg.d_in), cfg.dtype)
        y = jax.random.randint(ky, (batch,), 0, cfg.n_classes, dtype=jnp.int32)
        return {"x": x, "y": y}

    return ZooModel(name, family, size, "nnx", cfg, factory, input_specs, batch_fn)
