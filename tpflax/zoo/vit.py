"""Vision Transformer (linen).

``patch_embed`` (Conv, kernel = stride = patch) + ``cls`` token + ``pos_embed``
-> ``encoderblock_{i}`` (``ln_1``, ``attn`` = ``nn.MultiHeadDotProductAttention``
with ``query/key/value`` kernels ``(d, heads, head_dim)`` and ``out``
``(heads, head_dim, d)``, ``ln_2``, ``mlp/{fc1,fc2}``) -> ``ln_f`` -> ``head``.
The real size is ViT-B/16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import F32, ZooModel, image_batch


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 8
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    n_classes: int = 10
    ln_eps: float = 1e-6
    remat: bool = False  # nn.remat each block: its backward recomputes it
    dtype: Any = F32
    param_dtype: Any = F32

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.n_patches + 1  # + cls token


PRESETS = {
    "tiny": ViTConfig(),
    # ViT-B/16: 86.57M params.
    "vit-b16": ViTConfig(
        image_size=224,
        patch_size=16,
        d_model=768,
        n_heads=12,
        n_layers=12,
        d_ff=3072,
        n_classes=1000,
    ),
}


class ViTMLP(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = nn.gelu(nn.Dense(c.d_ff, name="fc1", **kw)(x), approximate=False)
        return nn.Dense(c.d_model, name="fc2", **kw)(h)


class EncoderBlock(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        ln = dict(epsilon=c.ln_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        h = nn.LayerNorm(name="ln_1", **ln)(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=c.n_heads,
            qkv_features=c.d_model,
            out_features=c.d_model,
            deterministic=True,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="attn",
        )(h)
        x = x + h
        return x + ViTMLP(c, name="mlp")(nn.LayerNorm(name="ln_2", **ln)(x))


class ViT(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(
            c.d_model,
            (p, p),
            (p, p),
            padding="VALID",
            name="patch_embed",
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )(images)
        b = x.shape[0]
        x = x.reshape(b, -1, c.d_model)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c.d_model), c.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.d_model)).astype(x.dtype), x], axis=1)
        pos = self.param(
            "pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], c.d_model), c.param_dtype
        )
        x = x + pos.astype(x.dtype)
        block = nn.remat(EncoderBlock) if c.remat else EncoderBlock
        for i in range(c.n_layers):
            x = block(c, name=f"encoderblock_{i}")(x)
        x = nn.LayerNorm(name="ln_f", epsilon=c.ln_eps, dtype=c.dtype, param_dtype=c.param_dtype)(x)
        return nn.Dense(c.n_classes, name="head", dtype=c.dtype, param_dtype=c.param_dtype)(x[:, 0])


def build(name: str, family: str, size: str, cfg: ViTConfig) -> ZooModel:
    def input_specs(batch: int):
        shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
        return (jax.ShapeDtypeStruct(shape, cfg.dtype),)

    def batch_fn(rng, batch: int):
        return image_batch(rng, batch, cfg.image_size, cfg.in_channels, cfg.n_classes, cfg.dtype)

    return ZooModel(name, family, size, "linen", cfg, ViT(cfg), input_specs, batch_fn)
