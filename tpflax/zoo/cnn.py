"""ResNet-style CNN with BatchNorm (linen).

``conv_init``/``bn_init`` -> ``block_{i}`` (``conv1``, ``bn1``, ``conv2``, ``bn2``
and ``proj_conv``/``proj_bn`` when the shape changes) -> global average pool ->
``head``. Conv kernels are ``(kh, kw, in, out)``. The real size is ResNet-18.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from ._base import F32, ZooModel, image_batch


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    image_size: int = 32
    in_channels: int = 3
    init_features: int = 16
    init_kernel: int = 3
    init_stride: int = 1
    max_pool: bool = False
    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: tuple[int, ...] = (1, 1, 1)
    n_classes: int = 10
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    remat: bool = False  # nn.remat each residual block: its backward recomputes it
    dtype: Any = F32
    param_dtype: Any = F32


PRESETS = {
    "tiny": CNNConfig(),
    # ResNet-18: 11.69M params.
    "resnet18": CNNConfig(
        image_size=224,
        init_features=64,
        init_kernel=7,
        init_stride=2,
        max_pool=True,
        widths=(64, 128, 256, 512),
        blocks_per_stage=(2, 2, 2, 2),
        n_classes=1000,
    ),
}


class BasicBlock(nn.Module):
    config: CNNConfig
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        conv = dict(use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
        bn = dict(
            use_running_average=not train,
            momentum=c.bn_momentum,
            epsilon=c.bn_eps,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )
        s = (self.strides, self.strides)
        h = nn.Conv(self.features, (3, 3), s, padding="SAME", name="conv1", **conv)(x)
        h = nn.relu(nn.BatchNorm(name="bn1", **bn)(h))
        h = nn.Conv(self.features, (3, 3), padding="SAME", name="conv2", **conv)(h)
        h = nn.BatchNorm(name="bn2", **bn)(h)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), s, name="proj_conv", **conv)(x)
            x = nn.BatchNorm(name="proj_bn", **bn)(x)
        return nn.relu(x + h)


class ResNet(nn.Module):
    config: CNNConfig

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.config
        k, s = c.init_kernel, c.init_stride
        x = nn.Conv(
            c.init_features,
            (k, k),
            (s, s),
            padding="SAME",
            use_bias=False,
            name="conv_init",
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=c.bn_momentum,
            epsilon=c.bn_eps,
            name="bn_init",
            dtype=c.dtype,
            param_dtype=c.param_dtype,
        )(x)
        x = nn.relu(x)
        if c.max_pool:
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        # ``train`` (argument 2, counting the module) is a Python bool: static under remat
        block = nn.remat(BasicBlock, static_argnums=(2,)) if c.remat else BasicBlock
        i = 0
        for stage, (width, n_blocks) in enumerate(zip(c.widths, c.blocks_per_stage, strict=True)):
            for j in range(n_blocks):
                strides = 2 if stage > 0 and j == 0 else 1
                x = block(c, width, strides, name=f"block_{i}")(x, train)
                i += 1
        x = x.mean(axis=(1, 2))
        return nn.Dense(c.n_classes, name="head", dtype=c.dtype, param_dtype=c.param_dtype)(x)


def build(name: str, family: str, size: str, cfg: CNNConfig) -> ZooModel:
    def input_specs(batch: int):
        shape = (batch, cfg.image_size, cfg.image_size, cfg.in_channels)
        return (jax.ShapeDtypeStruct(shape, cfg.dtype),)

    def batch_fn(rng, batch: int):
        return image_batch(rng, batch, cfg.image_size, cfg.in_channels, cfg.n_classes, cfg.dtype)

    return ZooModel(
        name, family, size, "linen", cfg, ResNet(cfg), input_specs, batch_fn, {"train": False}
    )
