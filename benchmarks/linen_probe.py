"""tpflax's plans on linen models written the way the Flax examples and big_vision write them.

Five plans per model and mesh, measured like ``benchmarks/third_party.py`` (its
``measure``): tree-only, traced (``model=``), a hand Megatron layout, replicated,
pure FSDP.

    python benchmarks/linen_probe.py                    # every model, both meshes
    python benchmarks/linen_probe.py --arch vit mixer --mesh fsdp=2,model=4

A run of every model, mesh and plan writes ``results/linen_probe.md``
(``--write PATH`` for another file, ``--no-write`` to print only).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from third_party import MESHES, Built, fsdp_rules, measure, mesh_label, plan_each  # noqa: E402

B, S, D, H, MLP, V, L = 8, 16, 64, 4, 256, 512, 2

# ------------------------------------------------------------------ (1) flax examples/wmt, lm1b
LP = nn.with_logical_partitioning
KINIT = nn.initializers.xavier_uniform()
BINIT = nn.initializers.normal(stddev=1e-6)


def _lp(init, names, on):
    return LP(init, names) if on else init


def sinusoidal(length, d):
    pos = np.arange(length)[:, None]
    div = np.exp(np.arange(0, d, 2) * -(np.log(10000.0) / d))
    pe = np.zeros((length, d), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return jnp.asarray(pe)[None]


class WMlp(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(MLP, kernel_init=_lp(KINIT, ("embed", "mlp"), self.ann),
                     bias_init=_lp(BINIT, ("mlp",), self.ann))(x)
        y = nn.relu(y)
        return nn.Dense(x.shape[-1], kernel_init=_lp(KINIT, ("mlp", "embed"), self.ann),
                        bias_init=_lp(BINIT, ("embed",), self.ann))(y)


def _ln(ann):
    return nn.LayerNorm(scale_init=_lp(nn.initializers.ones, ("embed",), ann),
                        bias_init=_lp(nn.initializers.zeros, ("embed",), ann))


def _mha(ann):
    # the examples annotate every attention kernel ('embed', 'kv'), though DenseGeneral's are 3-D
    return nn.MultiHeadDotProductAttention(H, qkv_features=D, use_bias=False, deterministic=True,
                                           kernel_init=_lp(KINIT, ("embed", "kv"), ann))


class EncBlock(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x):
        y = _ln(self.ann)(x)
        x = x + _mha(self.ann)(y, y)
        return x + WMlp(self.ann)(_ln(self.ann)(x))


class DecBlock(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x, enc):
        y = _ln(self.ann)(x)
        x = x + _mha(self.ann)(y, y, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
        y = _ln(self.ann)(x)
        x = x + _mha(self.ann)(y, enc)
        return x + WMlp(self.ann)(_ln(self.ann)(x))


class WmtTransformer(nn.Module):
    ann: bool = True

    @nn.compact
    def __call__(self, src, tgt):
        embed = nn.Embed(V, D, embedding_init=_lp(nn.initializers.normal(1.0), ("vocab", "embed"), self.ann),
                         name="shared_embedding")
        x = embed(src) + sinusoidal(src.shape[1], D)
        for i in range(L):
            x = EncBlock(self.ann, name=f"encoderblock_{i}")(x)
        enc = _ln(self.ann)(x)
        y = embed(tgt) + sinusoidal(tgt.shape[1], D)
        for i in range(L):
            y = DecBlock(self.ann, name=f"encoderdecoderblock_{i}")(y, enc)
        y = _ln(self.ann)(y)
        return embed.attend(y) / np.sqrt(D)


def wmt_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"query/kernel$|key/kernel$|value/kernel$", P(f, "model", None)),
            (r"out/kernel$", P("model", None, f)),
            (r"Dense_0/kernel$", P(f, "model")), (r"Dense_0/bias$", P("model")),
            (r"Dense_1/kernel$", P("model", f)),
            (r"shared_embedding/embedding$", P("model", f)),
            (r".*", P())]


# ------------------------------------------------------------------ (2) big_vision ViT, MLP-Mixer
class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform())(x))
        return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform())(x)


class Encoder1DBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(H, kernel_init=nn.initializers.xavier_uniform(),
                                            deterministic=True)(y, y)
        x = x + y
        return x + MlpBlock(MLP, name="MlpBlock_0")(nn.LayerNorm()(x))


class ViT(nn.Module):
    classes: int = 1000

    @nn.compact
    def __call__(self, img):
        x = nn.Conv(D, (8, 8), strides=(8, 8), padding="VALID", name="embedding")(img)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        for i in range(L):
            x = Encoder1DBlock(name=f"encoderblock_{i}")(x)
        x = nn.LayerNorm(name="encoder_norm")(x)[:, 0]
        return nn.Dense(self.classes, kernel_init=nn.initializers.zeros, name="head")(x)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class Mixer(nn.Module):
    classes: int = 1000

    @nn.compact
    def __call__(self, img):
        x = nn.Conv(D, (8, 8), strides=(8, 8), name="stem")(img)
        x = x.reshape(x.shape[0], -1, D)
        for i in range(L):
            x = MixerBlock(128, MLP, name=f"MixerBlock_{i}")(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x).mean(axis=1)
        return nn.Dense(self.classes, kernel_init=nn.initializers.zeros, name="head")(x)


def vit_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
            (r"out/kernel$", P("model", None, f)),
            (r"MlpBlock_0/Dense_0/kernel$", P(f, "model")), (r"MlpBlock_0/Dense_0/bias$", P("model")),
            (r"MlpBlock_0/Dense_1/kernel$", P("model", f)),
            (r"head/kernel$", P(f, "model")), (r"head/bias$", P("model")),  # 1000 classes: vocab-parallel
            (r".*", P())]


def mixer_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"channel_mixing/Dense_0/kernel$", P(f, "model")), (r"channel_mixing/Dense_0/bias$", P("model")),
            (r"channel_mixing/Dense_1/kernel$", P("model", f)),
            (r"token_mixing/Dense_0/kernel$", P(f, "model")), (r"token_mixing/Dense_0/bias$", P("model")),
            (r"token_mixing/Dense_1/kernel$", P("model", f)),
            (r"head/kernel$", P(f, "model")), (r"head/bias$", P("model")),
            (r".*", P())]


# ------------------------------------------------------------------ (3) scan(remat(Block)) decoder
class SBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        hd = D // H
        y = nn.RMSNorm()(x)
        q = nn.DenseGeneral((H, hd), axis=-1, use_bias=False, name="query")(y)
        k = nn.DenseGeneral((H, hd), axis=-1, use_bias=False, name="key")(y)
        v = nn.DenseGeneral((H, hd), axis=-1, use_bias=False, name="value")(y)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        a = nn.dot_product_attention(q, k, v, mask=mask)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="out")(a)
        y = nn.RMSNorm()(x)
        g = nn.Einsum((D, MLP), "bsd,df->bsf", use_bias=False, name="wi_0")(y)
        u = nn.Einsum((D, MLP), "bsd,df->bsf", use_bias=False, name="wi_1")(y)
        x = x + nn.Einsum((MLP, D), "bsf,fd->bsd", use_bias=False, name="wo")(nn.silu(g) * u)
        return x, None


class ScanDecoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        stack = nn.scan(nn.remat(SBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = stack(name="layers")(x, None)
        x = nn.RMSNorm(name="final_norm")(x)
        return nn.Dense(V, use_bias=False, name="lm_head")(x)


def scan_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"(query|key|value)/kernel$", P(None, f, "model", None)), (r"out/kernel$", P(None, "model", None, f)),
            (r"wi_[01]/kernel$", P(None, f, "model")), (r"wo/kernel$", P(None, "model", f)),
            (r"embed/embedding$", P("model", f)), (r"lm_head/kernel$", P(f, "model")), (r".*", P())]


# ------------------------------------------------------------------ (4) ResNet (BatchNorm), UNet (GroupNorm)
class ResBlock(nn.Module):
    filters: int
    strides: tuple = (1, 1)

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9)
        r = x
        y = nn.relu(norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
        y = norm(scale_init=nn.initializers.zeros)(nn.Conv(self.filters, (3, 3), use_bias=False)(y))
        if r.shape != y.shape:
            r = norm(name="norm_proj")(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                                               name="conv_proj")(r))
        return nn.relu(r + y)


class ResNet(nn.Module):
    classes: int = 1000

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (7, 7), (2, 2), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False, name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
        for i, f in enumerate((64, 128, 256)):
            x = ResBlock(f, (2, 2) if i else (1, 1))(x)
            x = ResBlock(f)(x)
        x = nn.ConvTranspose(64, (2, 2), strides=(2, 2), name="up")(x)  # an FPN-ish upsampling tail
        return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


class UNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        skips = []
        for c in (64, 128, 256):
            x = nn.silu(nn.GroupNorm(8)(nn.Conv(c, (3, 3))(x)))
            x = nn.silu(nn.GroupNorm(8)(nn.Conv(c, (3, 3))(x)))
            skips.append(x)
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.silu(nn.GroupNorm(8)(nn.Conv(512, (3, 3), name="mid")(x)))
        for c, s in zip((256, 128, 64), reversed(skips), strict=True):
            x = nn.ConvTranspose(c, (2, 2), strides=(2, 2))(x)
            x = jnp.concatenate([x, s], -1)
            x = nn.silu(nn.GroupNorm(8)(nn.Conv(c, (3, 3))(x)))
        return nn.Conv(3, (1, 1), name="out")(x)


def conv_hand(mesh):
    # a CNN has no Megatron layout: convs/norms replicated over model, fsdp on output channels
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"^params/out/", P()), (r"kernel$", P(None, None, None, f)), (r".*", P())]


def resnet_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"head/kernel$", P(f, "model")), (r"head/bias$", P("model")),
            (r"(conv|Conv|up).*kernel$", P(None, None, None, f)), (r".*", P())]



# ------------------------------------------------------------------ (5) DiT (adaLN-Zero), ConvNeXt, Conformer
def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    hidden: int
    freq: int = 256

    @nn.compact
    def __call__(self, t):
        half = self.freq // 2
        f = jnp.exp(-np.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        e = t[:, None].astype(jnp.float32) * f[None]
        e = jnp.concatenate([jnp.cos(e), jnp.sin(e)], -1)
        e = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02))(e)
        return nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02))(nn.silu(e))


class DiTBlock(nn.Module):
    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, c):
        c = nn.Dense(6 * self.hidden, kernel_init=nn.initializers.zeros)(nn.silu(c))
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = jnp.split(c, 6, axis=-1)
        y = _modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), sh_a, sc_a)
        x = x + g_a[:, None] * nn.MultiHeadDotProductAttention(self.heads, deterministic=True)(y, y)
        y = _modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), sh_m, sc_m)
        y = nn.Dense(self.hidden)(nn.gelu(nn.Dense(4 * self.hidden)(y), approximate=True))
        return x + g_m[:, None] * y


class DiT(nn.Module):
    """kvfrans/jax-diffusion-transformer's DiT, small: 4x4 patches of a 32x32x4 latent."""

    patch: int = 4
    hidden: int = D
    depth: int = L
    heads: int = H
    classes: int = 1000

    @nn.compact
    def __call__(self, x, t, y):
        n, h, w, ch = x.shape
        x = nn.Conv(self.hidden, (self.patch,) * 2, (self.patch,) * 2, padding="VALID", name="x_embedder")(x)
        gh, gw = h // self.patch, w // self.patch
        x = x.reshape(n, gh * gw, self.hidden) + sinusoidal(gh * gw, self.hidden)
        c = TimestepEmbedder(self.hidden, name="t_embedder")(t)
        c = c + nn.Embed(self.classes + 1, self.hidden, embedding_init=nn.initializers.normal(0.02),
                         name="y_embedder")(y)
        for i in range(self.depth):
            x = DiTBlock(self.hidden, self.heads, name=f"blocks_{i}")(x, c)
        shift, scale = jnp.split(nn.Dense(2 * self.hidden, kernel_init=nn.initializers.zeros,
                                          name="final_ada")(nn.silu(c)), 2, axis=-1)
        x = _modulate(nn.LayerNorm(use_bias=False, use_scale=False)(x), shift, scale)
        x = nn.Dense(self.patch * self.patch * ch, kernel_init=nn.initializers.zeros, name="final_linear")(x)
        x = x.reshape(n, gh, gw, self.patch, self.patch, ch).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, w, ch)


def dit_hand(mesh):
    # Megatron on attention and MLP; the adaLN modulations, embedders and the final layer whole. Flax
    # names the MLP's outer (down) Dense first: Dense_1 is the down-projection, Dense_2 the up
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
            (r"out/kernel$", P("model", None, f)),
            (r"blocks_\d+/Dense_2/kernel$", P(f, "model")), (r"blocks_\d+/Dense_2/bias$", P("model")),
            (r"blocks_\d+/Dense_1/kernel$", P("model", f)),
            (r"blocks_\d+/Dense_0/kernel$", P(f, None)),
            (r".*", P())]


class ConvNeXtBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        r = x
        x = nn.Conv(self.dim, (7, 7), padding=3, feature_group_count=self.dim, name="dwconv")(x)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        x = nn.gelu(nn.Dense(4 * self.dim, name="pwconv1")(x))
        x = nn.Dense(self.dim, name="pwconv2")(x)
        gamma = self.param("gamma", nn.initializers.constant(1e-6), (self.dim,))
        return r + gamma * x


class ConvNeXt(nn.Module):
    dims: tuple = (32, 64, 128)
    depths: tuple = (1, 1, 2)
    classes: int = 1000

    @nn.compact
    def __call__(self, x):
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths, strict=True)):
            if i == 0:
                x = nn.Conv(dim, (4, 4), (4, 4), padding="VALID", name="stem_conv")(x)
                x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)
            else:
                x = nn.LayerNorm(epsilon=1e-6, name=f"down_norm_{i}")(x)
                x = nn.Conv(dim, (2, 2), (2, 2), padding="VALID", name=f"down_conv_{i}")(x)
            for j in range(depth):
                x = ConvNeXtBlock(dim, name=f"stage_{i}_{j}")(x)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x.mean(axis=(1, 2)))
        return nn.Dense(self.classes, name="head")(x)


def convnext_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"pwconv1/kernel$", P(f, "model")), (r"pwconv1/bias$", P("model")),
            (r"pwconv2/kernel$", P("model", f)),
            (r"head/kernel$", P(f, "model")), (r"head/bias$", P("model")),
            (r"(stem_conv|down_conv_\d+)/kernel$", P(None, None, None, f)),
            (r".*", P())]


class ConformerFF(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.swish(nn.Dense(4 * self.d, name="w1")(y))
        return nn.Dense(self.d, name="w2")(y)


class ConformerConv(nn.Module):
    d: int
    kernel: int = 15

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.Conv(2 * self.d, (1,), name="pointwise_conv1")(y)
        y = nn.glu(y, axis=-1)
        y = nn.Conv(self.d, (self.kernel,), padding="SAME", feature_group_count=self.d, name="depthwise_conv")(y)
        y = nn.BatchNorm(use_running_average=False, momentum=0.9, name="batch_norm")(y)
        y = nn.swish(y)
        return nn.Conv(self.d, (1,), name="pointwise_conv2")(y)


class ConformerBlock(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        x = x + 0.5 * ConformerFF(self.d, name="ff1")(x)
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, deterministic=True, name="mhsa")(y, y)
        x = x + ConformerConv(self.d, name="conv")(x)
        x = x + 0.5 * ConformerFF(self.d, name="ff2")(x)
        return nn.LayerNorm(name="final_norm")(x)


class Conformer(nn.Module):
    """A Conformer encoder (Gulati et al.): a 4x conv subsampler, blocks, a CTC head."""

    d: int = D
    heads: int = H
    depth: int = L
    vocab: int = V

    @nn.compact
    def __call__(self, feats):
        x = nn.Conv(self.d, (3,), (2,), name="subsample_0")(feats)
        x = nn.Conv(self.d, (3,), (2,), name="subsample_1")(nn.relu(x))
        x = nn.Dense(self.d, name="input_proj")(nn.relu(x))
        for i in range(self.depth):
            x = ConformerBlock(self.d, self.heads, name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="ctc_head")(x)


def conformer_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
            (r"out/kernel$", P("model", None, f)),
            (r"ff[12]/w1/kernel$", P(f, "model")), (r"ff[12]/w1/bias$", P("model")),
            (r"ff[12]/w2/kernel$", P("model", f)),
            (r"ctc_head/kernel$", P(f, "model")), (r"ctc_head/bias$", P("model")),
            (r".*", P())]


# ------------------------------------------------------------------ (6) user-written mixtures of experts
E, FE = 8, 128  # experts, each expert's hidden width
EINIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))


class MoeAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(x).reshape(b, t, H, D // H)
                   for n in ("q_proj", "k_proj", "v_proj"))
        a = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((b, t))))
        return nn.Dense(D, use_bias=False, name="o_proj")(a.reshape(b, t, D))


def _slots(onehot, capacity):
    """``(..., n, e)`` one-hot choices -> ``(..., n, e, capacity)`` one-hot slots; overflow dropped."""
    pos = (jnp.cumsum(onehot, axis=-2) - 1) * onehot
    return jax.nn.one_hot(pos, capacity) * (onehot * (pos < capacity))[..., None]


class MixtralMoE(nn.Module):
    """Mixtral's sparse block, GShard-style: top-2 of the router logits, softmax over the two, a
    capacity-bounded one-hot dispatch per sequence, stacked SwiGLU experts (w1 gate, w3 up, w2 down)."""

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        top_w, top_i = jax.lax.top_k(nn.Dense(E, use_bias=False, name="gate")(x), 2)
        top_w = jax.nn.softmax(top_w, axis=-1)
        cap = int(1.25 * t * 2 / E)
        slots = _slots(jax.nn.one_hot(top_i, E).reshape(b, t * 2, E), cap).reshape(b, t, 2, E, cap)
        dispatch = slots.sum(2)                                   # (b, t, e, c)
        combine = (slots * top_w[..., None, None]).sum(2)
        w1 = self.param("w1", EINIT, (E, d, FE))
        w3 = self.param("w3", EINIT, (E, d, FE))
        w2 = self.param("w2", EINIT, (E, FE, d))
        xe = jnp.einsum("btd,btec->ebcd", x, dispatch)
        h = nn.silu(jnp.einsum("ebcd,edf->ebcf", xe, w1)) * jnp.einsum("ebcd,edf->ebcf", xe, w3)
        return jnp.einsum("ebcd,btec->btd", jnp.einsum("ebcf,efd->ebcd", h, w2), combine)


class SwitchMoE(nn.Module):
    """Switch Transformer's top-1 layer: the batch's tokens as one group, capacity factor 1.0, tokens past
    an expert's capacity dropped (passed through the residual); experts an ``nn.vmap``-ed Dense MLP."""

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        tok = x.reshape(b * t, d)
        probs = jax.nn.softmax(nn.Dense(E, name="router")(tok), axis=-1)
        gate, idx = jax.lax.top_k(probs, 1)
        dispatch = _slots(jax.nn.one_hot(idx[:, 0], E), int(1.0 * b * t / E))   # (n, e, c)
        combine = dispatch * gate[:, :, None]
        experts = nn.vmap(nn.Dense, in_axes=0, out_axes=0, variable_axes={"params": 0},
                          split_rngs={"params": True})
        xe = jnp.einsum("nd,nec->ecd", tok, dispatch)
        h = nn.relu(experts(FE, name="wi")(xe))
        ye = experts(d, name="wo")(h)
        return jnp.einsum("ecd,nec->nd", ye, combine).reshape(b, t, d)


class ExpertMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        g = nn.Dense(FE, use_bias=False, name="gate_proj")(x)
        u = nn.Dense(FE, use_bias=False, name="up_proj")(x)
        return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(nn.silu(g) * u)


class ListMoE(nn.Module):
    """Experts as a Python list of separate modules, every one applied to every token in a loop and
    summed with the top-2 router weights (zero for the experts not chosen)."""

    @nn.compact
    def __call__(self, x):
        top_w, top_i = jax.lax.top_k(jax.nn.softmax(nn.Dense(E, use_bias=False, name="router")(x)), 2)
        w = jnp.einsum("btk,btke->bte", top_w / top_w.sum(-1, keepdims=True), jax.nn.one_hot(top_i, E))
        experts = [ExpertMlp(name=f"experts_{i}") for i in range(E)]
        return sum(w[..., i:i + 1] * ex(x) for i, ex in enumerate(experts))


class MoeDecoder(nn.Module):
    moe: Any

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed_tokens")(ids)
        for i in range(L):
            x = x + MoeAttn(name=f"layers_{i}_attn")(nn.RMSNorm(name=f"layers_{i}_ln1")(x))
            x = x + self.moe(name=f"layers_{i}_moe")(nn.RMSNorm(name=f"layers_{i}_ln2")(x))
        return nn.Dense(V, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


def _moe_shell(mesh):
    """Megatron attention and vocab-parallel embedding/head over model; router and norms whole."""
    f = "fsdp" if "fsdp" in mesh else None
    m = "model" if "model" in mesh else None
    return [(r"(q|k|v)_proj/kernel$", P(f, m)), (r"o_proj/kernel$", P(m, f)),
            (r"embed_tokens/embedding$", P(m, f)), (r"lm_head/kernel$", P(f, m))]


def moe_hand(mesh):
    # stacked experts over the expert axis (over model, as expert parallelism, where there is none)
    f = "fsdp" if "fsdp" in mesh else None
    e = "expert" if "expert" in mesh else "model"
    return [(r"moe/w[13]$", P(e, f, None)), (r"moe/w2$", P(e, None, f)),
            (r"moe/wi/kernel$", P(e, f, None)), (r"moe/wo/kernel$", P(e, None, f)),
            (r"moe/w[io]/bias$", P(e, None)),
            *_moe_shell(mesh), (r".*", P())]


def list_moe_hand(mesh):
    # separate experts cannot split over experts: Megatron inside each expert over model
    f = "fsdp" if "fsdp" in mesh else None
    m = "model" if "model" in mesh else None
    return [(r"(gate|up)_proj/kernel$", P(f, m)), (r"down_proj/kernel$", P(m, f)),
            *_moe_shell(mesh), (r".*", P())]


# ------------------------------------------------------------------ (7) RNNs, Swin, Perceiver IO
HID, TAGS = 128, 48  # the LSTM's hidden width; a tagger's tags (the Penn tagset and its specials)


class LstmLM(nn.Module):
    """A word-level LSTM language model (Zaremba et al.; PyTorch's word_language_model, in Flax's
    ``nn.RNN``): an embedding, two LSTM layers, an untied output ``decoder`` Dense with its bias."""

    hidden: int = HID

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="encoder")(ids)
        for i in range(L):
            x = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"lstm_{i}")(x)
        return nn.Dense(V, name="decoder")(x)


def lstm_hand(mesh):
    # vocab-parallel lookup and logits; the cells whole over model (a split hidden state would be
    # gathered at every step), over fsdp where there is one
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"encoder/embedding$", P("model", f)),
            (r"decoder/kernel$", P(f, "model")), (r"decoder/bias$", P("model")),
            (r"Cell_\d+/\w+/kernel$", P(f, None)), (r".*", P())]


class BiGruTagger(nn.Module):
    """A sequence tagger: an embedding, two bidirectional GRU layers (``nn.Bidirectional`` of two
    ``nn.RNN(nn.GRUCell)``, outputs concatenated), a Dense over the tags."""

    hidden: int = D

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        for i in range(L):
            x = nn.Bidirectional(nn.RNN(nn.GRUCell(self.hidden)), nn.RNN(nn.GRUCell(self.hidden)),
                                 name=f"bigru_{i}")(x)
        return nn.Dense(TAGS, name="tag_head")(x)


def bigru_hand(mesh):
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"embed/embedding$", P("model", f)),
            (r"tag_head/kernel$", P(f, "model")), (r"tag_head/bias$", P("model")),
            (r"Cell_\d+/\w+/kernel$", P(f, None)), (r".*", P())]


def _rel_index(w):
    c = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    r = (c[:, :, None] - c[:, None, :]).transpose(1, 2, 0) + (w - 1)
    return (r[..., 0] * (2 * w - 1) + r[..., 1]).reshape(-1)


def _windows(x, w):
    b, h, wd, c = x.shape
    x = x.reshape(b, h // w, w, wd // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindows(x, w, h, wd):
    c = x.shape[-1]
    x = x.reshape(-1, h // w, wd // w, w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def _shift_mask(h, wd, w, s):
    """Swin's attention mask of the shifted windows: -100 between pixels from different regions."""
    img = np.zeros((1, h, wd, 1))
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    m = np.asarray(_windows(img, w))[..., 0]
    m = m[:, None, :] - m[:, :, None]
    return jnp.asarray(np.where(m != 0, -100.0, 0.0), jnp.float32)


class WindowAttention(nn.Module):
    """Microsoft's Swin ``WindowAttention`` as its Flax ports write it: a fused qkv, a relative
    position bias table indexed by a precomputed array, a shifted-window mask, ``proj``."""

    dim: int
    heads: int
    window: int

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, c = x.shape
        hd = c // self.heads
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
        attn = q @ k.swapaxes(-2, -1)
        table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                           ((2 * self.window - 1) ** 2, self.heads))
        attn = attn + table[_rel_index(self.window)].reshape(n, n, -1).transpose(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(b // nw, nw, self.heads, n, n) + mask[None, :, None]).reshape(b, self.heads, n, n)
        x = (jax.nn.softmax(attn, -1) @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
        return nn.Dense(c, name="proj")(x)


class SwinBlock(nn.Module):
    dim: int
    heads: int
    res: int
    window: int = 4
    shift: int = 0

    @nn.compact
    def __call__(self, x):
        b, _, c = x.shape
        r, w, s = self.res, self.window, self.shift
        y = nn.LayerNorm(name="norm1")(x).reshape(b, r, r, c)
        if s:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
        y = WindowAttention(c, self.heads, w, name="attn")(_windows(y, w), _shift_mask(r, r, w, s) if s else None)
        y = _unwindows(y, w, r, r)
        if s:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + y.reshape(b, r * r, c)
        y = nn.Dense(4 * c, name="fc1")(nn.LayerNorm(name="norm2")(x))
        return x + nn.Dense(c, name="fc2")(nn.gelu(y))


class PatchMerging(nn.Module):
    res: int

    @nn.compact
    def __call__(self, x):
        b, _, c = x.shape
        x = x.reshape(b, self.res, self.res, c)
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = nn.LayerNorm(name="norm")(x.reshape(b, -1, 4 * c))
        return nn.Dense(2 * c, use_bias=False, name="reduction")(x)


class Swin(nn.Module):
    """A small Swin Transformer: 4x4 patches of a 64x64 image (16x16 tokens), windows of 4x4, two stages
    of a regular and a shifted block (64 wide, 4 heads; then 128 wide, 8 heads), a patch merging between."""

    classes: int = 1000

    @nn.compact
    def __call__(self, img):
        x = nn.Conv(D, (4, 4), (4, 4), padding="VALID", name="patch_embed")(img)
        b, r, _, c = x.shape
        x = nn.LayerNorm(name="patch_norm")(x.reshape(b, r * r, c))
        for i, heads in enumerate((H, 2 * H)):
            for j in range(2):
                x = SwinBlock(c, heads, r, shift=2 if j % 2 else 0, name=f"layers_{i}_blocks_{j}")(x)
            if i == 0:
                x = PatchMerging(r, name=f"layers_{i}_downsample")(x)
                r, c = r // 2, 2 * c
        x = nn.LayerNorm(name="norm")(x).mean(axis=1)
        return nn.Dense(self.classes, name="head")(x)


def swin_hand(mesh):
    # Megatron on window attention (the fused qkv split on its fused dim, the naive way) and the MLPs;
    # the relative position tables and the patch merging whole
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"attn/qkv/kernel$", P(f, "model")), (r"attn/qkv/bias$", P("model")),
            (r"attn/proj/kernel$", P("model", f)),
            (r"fc1/kernel$", P(f, "model")), (r"fc1/bias$", P("model")), (r"fc2/kernel$", P("model", f)),
            (r"head/kernel$", P(f, "model")), (r"head/bias$", P("model")),
            (r"reduction/kernel$", P(f, None)), (r".*", P())]


NZ, DZ, SP = 32, 128, 64  # Perceiver IO: latents, their width, the input (and output query) length


class PAttention(nn.Module):
    """deepmind-research perceiver's ``Attention``: q/k/v linears to the qk/v channels split into heads,
    softmax over the keys, an output linear."""

    heads: int
    out: int

    @nn.compact
    def __call__(self, xq, xkv):
        qk = xq.shape[-1]
        q, k, v = (nn.Dense(qk, name=n)(x) for n, x in (("query", xq), ("key", xkv), ("value", xkv)))
        b, n, m, h = q.shape[0], q.shape[1], k.shape[1], self.heads
        q, k, v = q.reshape(b, n, h, -1), k.reshape(b, m, h, -1), v.reshape(b, m, h, -1)
        w = jax.nn.softmax(jnp.einsum("bthd,bThd->bhtT", q, k) * (qk // h) ** -0.5, -1)
        o = jnp.einsum("bhtT,bThd->bthd", w, v).reshape(b, n, -1)
        return nn.Dense(self.out, name="output")(o)


class PMlp(nn.Module):
    widening: int

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        return nn.Dense(c, name="mlp_out")(nn.gelu(nn.Dense(self.widening * c, name="mlp_in")(x)))


class PCrossAttention(nn.Module):
    heads: int = 1
    widening: int = 1
    query_residual: bool = True

    @nn.compact
    def __call__(self, xq, xkv):
        q = nn.LayerNorm(name="q_norm")(xq)
        a = PAttention(self.heads, xq.shape[-1], name="attention")(q, nn.LayerNorm(name="kv_norm")(xkv))
        x = xq + a if self.query_residual else a
        return x + PMlp(self.widening, name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


class PSelfAttention(nn.Module):
    heads: int = H
    widening: int = 4

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(name="norm")(x)
        x = x + PAttention(self.heads, x.shape[-1], name="attention")(y, y)
        return x + PMlp(self.widening, name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


class PerceiverIO(nn.Module):
    """Perceiver IO's masked language model, small: byte embeddings plus trainable positions, a latent
    array cross-attending to them with one head, latent self-attention, a decoder whose output queries
    cross-attend to the latents with one head, logits from the embedding (its ``EmbeddingDecoder``: the
    table transposed and a bias)."""

    @nn.compact
    def __call__(self, ids):
        b, s = ids.shape
        embed = nn.Embed(V, D, name="embed")
        x = embed(ids) + self.param("input_pos", nn.initializers.truncated_normal(0.02), (s, D))[None]
        z = jnp.broadcast_to(self.param("latents", nn.initializers.truncated_normal(0.02), (NZ, DZ)), (b, NZ, DZ))
        z = PCrossAttention(name="encoder_cross_attend")(z, x)
        for i in range(L):
            z = PSelfAttention(name=f"self_attend_{i}")(z)
        q = jnp.broadcast_to(self.param("output_queries", nn.initializers.truncated_normal(0.02), (s, D)), (b, s, D))
        y = PCrossAttention(query_residual=False, name="decoder_cross_attend")(q, z)
        y = nn.Dense(D, name="final_project")(y)
        bias = self.param("logits_bias", nn.initializers.zeros, (V,))
        return embed.attend(y) + bias


def perceiver_hand(mesh):
    # Megatron on the latent self-attention (by heads) and every MLP; the single-head cross-attentions
    # keep q and k whole (one head: a channel split would sum the scores) and pair value with output;
    # the table vocab-parallel with its tied logits and their bias
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"self_attend_\d+/attention/(query|key|value)/kernel$", P(f, "model")),
            (r"self_attend_\d+/attention/(query|key|value)/bias$", P("model")),
            (r"cross_attend/attention/value/kernel$", P(f, "model")),
            (r"cross_attend/attention/value/bias$", P("model")),
            (r"attention/output/kernel$", P("model", f)),
            (r"mlp_in/kernel$", P(f, "model")), (r"mlp_in/bias$", P("model")), (r"mlp_out/kernel$", P("model", f)),
            (r"embed/embedding$", P("model", f)), (r"logits_bias$", P("model")),
            (r".*", P())]
# ------------------------------------------------------------------ (7) T5X (t5x/examples/t5/network.py)
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128


def _t5_bucket(relative_position, num_buckets=T5_BUCKETS, max_distance=T5_MAX_DISTANCE):
    """T5's relative position buckets, causal (t5x ``RelativePositionBiases._relative_position_bucket``)."""
    n = np.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    large = max_exact + (np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
                         / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
    return np.where(n < max_exact, n, np.minimum(large, num_buckets - 1))


class T5RelativePositionBiases(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, qlen, klen):
        rp = _t5_bucket(np.arange(klen)[None, :] - np.arange(qlen)[:, None])
        table = self.param("rel_embedding", _lp(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                                ("heads", "relpos_buckets"), self.ann), (H, T5_BUCKETS))
        one_hot = jnp.asarray(rp[None] == np.arange(T5_BUCKETS)[:, None, None], jnp.float32)
        return jax.lax.dot_general(table, one_hot, (((1,), (0,)), ((), ())))[None]  # (1, heads, q, k)


class T5Attention(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x, mask, bias):
        hd = D // H
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        query_init = lambda *a: init(*a) / np.sqrt(hd)  # noqa: E731 - t5x folds 1/sqrt(depth) into q's init
        proj = functools.partial(nn.DenseGeneral, (H, hd), axis=-1, use_bias=False)
        q = proj(kernel_init=_lp(query_init, ("embed", "heads", "kv"), self.ann), name="query")(x)
        k = proj(kernel_init=_lp(init, ("embed", "heads", "kv"), self.ann), name="key")(x)
        v = proj(kernel_init=_lp(init, ("embed", "heads", "kv"), self.ann), name="value")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias + jnp.where(mask, 0.0, -1e10)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits.astype(jnp.float32)), v)
        return nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="out",
                               kernel_init=_lp(init, ("heads", "kv", "embed"), self.ann))(a)


class T5Mlp(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        dense = functools.partial(nn.DenseGeneral, MLP, use_bias=False,
                                  kernel_init=_lp(init, ("embed", "mlp"), self.ann))
        h = nn.gelu(dense(name="wi_0")(x)) * dense(name="wi_1")(x)  # gated-gelu: ('gelu', 'linear')
        return nn.DenseGeneral(D, use_bias=False, kernel_init=_lp(init, ("mlp", "embed"), self.ann), name="wo")(h)


def _t5_norm(ann, name):
    return nn.RMSNorm(epsilon=1e-6, scale_init=_lp(nn.initializers.ones, ("embed",), ann), name=name)


class T5DecoderLayer(nn.Module):
    ann: bool

    @nn.compact
    def __call__(self, x, mask, bias):
        y = _t5_norm(self.ann, "pre_self_attention_layer_norm")(x)
        x = x + T5Attention(self.ann, name="self_attention")(y, mask, bias)
        return x + T5Mlp(self.ann, name="mlp")(_t5_norm(self.ann, "pre_mlp_layer_norm")(x))


class T5Decoder(nn.Module):
    """t5x's decoder-only T5 (v1.1: gated-gelu, no biases, untied logits): a relative position bias
    table shared by the layers, RMSNorm, ``nn.remat`` layers; ``ann`` boxes every parameter the way
    t5x names them (``param_with_axes``), as ``nn.with_logical_partitioning``."""

    ann: bool = True

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, embedding_init=_lp(nn.initializers.normal(1.0), ("vocab", "embed"), self.ann),
                         name="token_embedder")
        y = embed(ids)
        t = ids.shape[1]
        mask = nn.make_causal_mask(jnp.ones(ids.shape)).astype(bool)
        bias = T5RelativePositionBiases(self.ann, name="relpos_bias")(t, t)
        for i in range(L):
            y = nn.remat(T5DecoderLayer)(self.ann, name=f"layers_{i}")(y, mask, bias)
        y = _t5_norm(self.ann, "decoder_norm")(y)
        return nn.DenseGeneral(V, use_bias=False, name="logits_dense", kernel_init=_lp(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), ("embed", "vocab"), self.ann))(y)


def t5x_hand(mesh):
    # Megatron: q/k/v and wi_0/wi_1 column over heads/mlp, out and wo row; vocab-parallel embedding and logits;
    # the relative position bias table split over heads like the attention scores it is added to
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"out/kernel$", P("model", None, f)),
            (r"wi_[01]/kernel$", P(f, "model")), (r"wo/kernel$", P("model", f)),
            (r"token_embedder/embedding$", P("model", f)), (r"logits_dense/kernel$", P(f, "model")),
            (r"relpos_bias/rel_embedding$", P("model", None)), (r".*", P())]


# ------------------------------------------------------------------ builders
def _xent(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def _mse(out, x, *_):
    return jnp.mean((out - x) ** 2)


def build(name: str) -> tuple[Built, Any]:
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    if name in ("wmt", "wmt-noann"):
        m = WmtTransformer(ann=name == "wmt")
        sample = (ids, ids)
        hand = wmt_hand
    elif name == "vit":
        m, sample, hand = ViT(), (jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32),), vit_hand
    elif name == "mixer":
        m, sample, hand = Mixer(), (jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32),), mixer_hand
    elif name == "scan":
        m, sample, hand = ScanDecoder(), (ids,), scan_hand
    elif name == "resnet":
        m, sample, hand = ResNet(), (jax.ShapeDtypeStruct((B, 64, 64, 3), jnp.float32),), resnet_hand
    elif name == "unet":
        m, sample, hand = UNet(), (jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32),), conv_hand
    elif name == "dit":
        m, hand = DiT(), dit_hand
        sample = (jax.ShapeDtypeStruct((B, 32, 32, 4), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.float32),
                  jax.ShapeDtypeStruct((B,), jnp.int32))
    elif name == "convnext":
        m, sample, hand = ConvNeXt(), (jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32),), convnext_hand
    elif name == "conformer":
        m, sample, hand = Conformer(), (jax.ShapeDtypeStruct((B, 64, 80), jnp.float32),), conformer_hand
    elif name == "lstm":
        m, sample, hand = LstmLM(), (ids,), lstm_hand
    elif name == "bigru":
        m, sample, hand = BiGruTagger(), (ids,), bigru_hand
    elif name == "swin":
        m, sample, hand = Swin(), (jax.ShapeDtypeStruct((B, 64, 64, 3), jnp.float32),), swin_hand
    elif name == "perceiver":
        m, sample, hand = PerceiverIO(), (jax.ShapeDtypeStruct((B, SP), jnp.int32),), perceiver_hand
    elif name in ("t5x", "t5x-noann"):
        m, sample, hand = T5Decoder(ann=name == "t5x"), (ids,), t5x_hand
    elif name in MOES:
        m, sample = MoeDecoder(MOES[name]), (ids,)
        hand = list_moe_hand if name == "moe-list" else moe_hand
    else:
        raise SystemExit(f"unknown {name}")
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), *[jnp.zeros(s.shape, s.dtype) for s in sample]))
    if "batch_stats" in variables:
        def fn(v, *x):
            return m.apply(v, *x, mutable=["batch_stats"])[0]
    else:
        fn = m.apply
    loss = _mse if name in ("unet", "dit") else _xent
    return Built(name, m, variables, sample, fn, loss), hand


MOES = {"moe-mixtral": MixtralMoE, "moe-switch": SwitchMoE, "moe-list": ListMoE}
NAMES = ("wmt", "wmt-noann", "vit", "mixer", "scan", "resnet", "unet", "dit", "convnext", "conformer", *MOES,
         "lstm", "bigru", "swin", "perceiver", "t5x", "t5x-noann")


def probe_main(argv, names, build, results: str, *, title: str | None = None, intro=None, tail: str = "",
               fsdp=fsdp_rules, per_mesh: bool = False, available=None, meshes=MESHES, expand=None) -> int:
    """The command line every probe script runs: five plans per model and mesh, printed, and the markdown table
    written to ``results/<results>`` when every model, mesh and plan ran (``--write PATH`` for another file,
    ``--no-write`` to print only).

    ``build(name)`` returns ``(Built, hand(mesh) -> rules)``; with ``per_mesh``, ``build(name, mesh)`` returns
    ``(Built, hand, extra plan kwargs)``. ``title`` replaces the table's heading, ``intro`` its paragraph (a
    string, or a function of this script's paragraph); ``tail`` is appended (observations by hand);
    ``fsdp(params, mesh)`` gives the pure-FSDP rules. ``available()``, when given, returns why the models cannot
    be built ('' when they can): the run is then skipped, as a success (their library is not a dependency).
    ``meshes`` are the default ``--mesh`` shapes; ``expand(shape)``, when given, is the mesh each is run on
    (a library's own mesh, its extra axes of size 1), labelled in the table by the shape given.
    """
    why = available() if available else ""
    if why:
        print(f"{results.removesuffix('.md')}: skipped: {why}")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="*", default=list(names))
    ap.add_argument("--mesh", nargs="*", default=[mesh_label(m) for m in meshes])
    ap.add_argument("--plans", nargs="*", default=list(PLANS))
    ap.add_argument("--write", default=None, help=f"markdown table path (default: results/{results} "
                                                   "when every model, mesh and plan ran)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    shapes = [{k: int(v) for k, v in (kv.split("=") for kv in m.split(","))} for m in args.mesh]
    table: list[tuple[str, str, str, Any, Any]] = []
    for name in args.arch:
        made = None if per_mesh else build(name)
        for shape in shapes:
            mesh = expand(shape) if expand else shape
            built, hand, extra = build(name, mesh) if per_mesh else (*made, {})
            calls = {"tree": {"batch": built.sample},
                     "model": {"model": built.fn, "sample": built.sample, "batch": built.sample},
                     "megatron": {"rules": hand(mesh)}, "replicated": {"rules": [(r".*", "replicate")]},
                     "fsdp": {"rules": fsdp(built.params, mesh)}}
            plans = plan_each(built.params, mesh, {k: {**extra, **v} for k, v in calls.items() if k in args.plans})
            rows = {pname: measure(name, mesh, pname, p, built) for pname, p in plans.items()}
            ref = rows.get("megatron")
            table += [(name, mesh_label(shape), pname, r, ref) for pname, r in rows.items()]
            for pname, r in rows.items():
                if r.error:
                    print(f"{name:<14}{mesh_label(shape):<16}{pname:<11}{r.error}", flush=True)
                    continue
                rel = ""
                if ref and not ref.error:
                    rel = (f" | x hand {r.bytes / ref.bytes:.3f} / "
                           f"{(r.comm / ref.comm if ref.comm else float('nan')):.3f} / {r.flops / ref.flops:.3f}")
                est = f" est {r.est_comm / r.comm:.3f}" if r.est_comm and r.comm else f" est {r.est_comm}"
                print(f"{name:<14}{mesh_label(shape):<16}{pname:<11}{r.bytes:>11.0f} B {r.comm:>11.0f} comm "
                      f"{r.flops:>10.4g} fl{est}{rel}", flush=True)
    everything = set(args.arch) == set(names) and len(shapes) == len(meshes) and set(args.plans) == set(PLANS)
    path = args.write or (Path(__file__).resolve().parent / "results" / results if everything else None)
    if path and not args.no_write:
        lines = _markdown(table).split("\n")
        lines[0] = title or lines[0]
        lines[2] = intro(lines[2]) if callable(intro) else intro or lines[2]
        Path(path).write_text("\n".join(lines) + tail)
        print(f"wrote {path}")
    return 0


def main(argv=None):
    return probe_main(argv, NAMES, build, "linen_probe.md")


PLANS = ("tree", "model", "megatron", "replicated", "fsdp")


def _markdown(table) -> str:
    """The run as a table: the three numbers, their ratios to the hand layout, the estimate's error."""
    def ratio(a, b):
        return f"{a / b:.3f}" if a is not None and b else "-"

    out = ["# tpflax on linen models nobody here wrote",
           "",
           "`python benchmarks/linen_probe.py` (generated). Models written the way the Flax examples, big_vision "
           "and the models' reference JAX code write them (wmt Transformer with and without logical annotations, "
           "ViT, MLP-Mixer, an `nn.scan(nn.remat)` DenseGeneral/Einsum decoder, a BatchNorm ResNet with "
           "ConvTranspose, a GroupNorm UNet, DiT with adaLN-Zero, ConvNeXt, a Conformer, user-written mixtures of "
           "experts, an LSTM language model, a bidirectional GRU tagger, a Swin Transformer, a Perceiver IO, a t5x-style "
           "decoder with and without logical annotations); "
           "tiny widths; the adamw "
           "train step of `tpflax.make_train_step` compiled on 8 CPU-emulated devices and measured as "
           "`benchmarks/third_party.py` measures (`measure`). **x hand**: ratio to the Megatron layout written "
           "by hand for the model (`*_hand` in the script; lower is better). **est.**: "
           "`tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes over the compiled ones.",
           "",
           "| model | mesh | plan | bytes/device | comm/step | flops/device | x hand (bytes / comm / flops) | est. |",
           "|---|---|---|---:|---:|---:|---|---:|"]
    above, off = [], []
    for name, mesh, pname, r, ref in table:
        if r.error:
            out.append(f"| {name} | {mesh} | {pname} | {r.error} | | | | |")
            continue
        xs = (ratio(r.bytes, ref.bytes), ratio(r.comm, ref.comm), ratio(r.flops, ref.flops)) \
            if ref is not None and not ref.error else ("-",) * 3
        est = ratio(r.est_comm, r.comm)
        out.append(f"| {name} | {mesh} | {pname} | {r.bytes:,.0f} | {r.comm:,.0f} | {r.flops:.4g} | "
                   f"{' / '.join(xs)} | {est} |")
        if pname in ("tree", "model") and any(x != "-" and float(x) > 1.005 for x in xs):
            above.append(f"- {name} {mesh} {pname}: {' / '.join(xs)}")
        if est != "-" and abs(float(est) - 1) > 0.10:
            off.append(f"- {name} {mesh} {pname}: estimate {est} of the compiled collectives")
    out += closing_lists("tpflax plans above the hand layout on some number by more than 0.5%:", above, off)
    return "\n".join(out) + "\n"


def closing_lists(title: str, flagged: list[str], off: list[str]) -> list[str]:
    """A probe table's two closing lists: the plans ``title`` flags, and the estimates more than 10% off."""
    return ["", title, "", *(flagged or ["- none"]), "", "Estimates more than 10% off the compiled collectives:", "",
            *(off or ["- none"])]


if __name__ == "__main__":
    sys.exit(main())
