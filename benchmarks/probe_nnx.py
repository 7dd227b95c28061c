"""tpflax's plans on Flax NNX models written the way the Flax NNX docs and the JAX AI stack tutorials write them.

Models (tiny widths, the published ratios), each written here from what the docs describe:

* ``minigpt``: the JAX AI stack "Train a miniGPT" tutorial: ``nnx.MultiHeadAttention`` post-LN blocks whose
  kernels carry ``nnx.with_partitioning(init, NamedSharding(mesh, P(None, 'model')))`` (every one, the MLP's
  second Linear and the attention output too), ``nnx.Embed`` token and position tables, an untied head,
  ``feed_forward_dim == embed_dim``; ``minigpt-noann`` the same model without the annotations;
* ``gspmd``: the Flax "Scale up on multiple devices" guide's ``MultiDotReluDot``: ``nnx.vmap``-created
  ``DotReluDot`` layers (a ``(None, 'model')`` Linear, a raw ``nnx.Param`` w2 ``('model', None)`` used by
  ``jnp.dot``, a ``with_sharding_constraint`` between) run with ``jax.lax.scan``;
* ``gemma-gqa`` / ``gemma-mqa`` / ``gemma-mha``: flax's ``examples/gemma`` NNX transformer: an ``Embedder``
  (a raw ``nnx.Param`` table, tied decode), ``Einsum`` q ``(N, D, H)`` and kv ``(2, K, D, H)`` kernels
  (``(3, N, D, H)`` qkv when K == N), rope, ``attn_vec_einsum`` ``(N, H, D)``, a gated-GELU MLP of
  ``nnx.Linear``; heads : kv heads of Gemma 2 2B (8 : 4), Gemma 2B (8 : 1), Gemma 7B (16 : 16);
* ``scan``: a decoder whose blocks are made by ``nnx.split_rngs`` + ``nnx.vmap`` and run by ``nnx.scan``
  with ``nnx.remat`` (the Flax "scan over layers" pattern): GQA ``nnx.LinearGeneral`` q/k/v/o, SwiGLU, RMSNorm;
* ``vit``: the JAX AI stack ViT tutorial: a patch ``nnx.Conv``, a cls token and position ``nnx.Param``s,
  ``nnx.MultiHeadAttention`` + GELU MLP encoder blocks with dropout, a 1000-class head;
* ``lora``: a decoder of ``nnx.LoRALinear`` layers fine-tuned with ``trainable=nnx.LoRAParam`` (every plan,
  the hand one too), as ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains it.

Each is planned as a user would, ``tpflax.plan(nnx.state(model), mesh, model=model, sample=...)`` and
tree-only, trained with ``tpflax.make_train_step(model, ...)``, and measured as ``benchmarks/linen_probe.py``
measures (``third_party.measure``): five plans per model and mesh.

    python benchmarks/probe_nnx.py                    # every model, both meshes
    python benchmarks/probe_nnx.py --arch gemma-gqa --mesh fsdp=2,model=4

A run of every model, mesh and plan writes ``results/probe_nnx.md`` (the table; observations under it are
written by hand, ``--write PATH`` for another file, ``--no-write`` to print only).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from third_party import Built  # noqa: E402

B, S, V = 8, 16, 1000  # vocab not a power of two, divides the tensor axis


def _xent(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def _mse(out, x, *_):
    return jnp.mean((out - x) ** 2)


def _f(mesh):
    return "fsdp" if "fsdp" in mesh else None


# ------------------------------------------------------------------ (1) JAX AI stack miniGPT
class GptBlock(nnx.Module):
    def __init__(self, d, heads, ff, part, *, rngs):
        xavier, zeros, ones = (nnx.initializers.xavier_uniform(), nnx.initializers.zeros_init(),
                               nnx.initializers.ones_init())
        self.mha = nnx.MultiHeadAttention(num_heads=heads, in_features=d, kernel_init=part(xavier, (None, "model")),
                                          bias_init=part(zeros, ("model",)), decode=False, rngs=rngs)
        self.dropout1 = nnx.Dropout(0.1)
        self.layer_norm1 = nnx.LayerNorm(d, epsilon=1e-6, scale_init=part(ones, ("model",)),
                                         bias_init=part(zeros, ("model",)), rngs=rngs)
        self.linear1 = nnx.Linear(d, ff, kernel_init=part(xavier, (None, "model")),
                                  bias_init=part(zeros, ("model",)), rngs=rngs)
        self.linear2 = nnx.Linear(ff, d, kernel_init=part(xavier, (None, "model")),
                                  bias_init=part(zeros, ("model",)), rngs=rngs)
        self.dropout2 = nnx.Dropout(0.1)
        self.layer_norm2 = nnx.LayerNorm(d, epsilon=1e-6, scale_init=part(ones, ("model",)),
                                         bias_init=part(zeros, ("model",)), rngs=rngs)

    def __call__(self, x, training=False):
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1])))
        a = self.dropout1(self.mha(x, mask=mask, decode=False), deterministic=not training)
        h = self.layer_norm1(x + a)
        f = self.dropout2(self.linear2(nnx.relu(self.linear1(h))), deterministic=not training)
        return self.layer_norm2(h + f)


class MiniGPT(nnx.Module):
    """The tutorial's: maxlen 256, embed 256, 8 heads, feed-forward 256, GPT-2's vocab; here 16 / 64 / 8 / 64.

    The tutorial gives the head's bias and the second norm's scale and bias ``P(None, 'model')``, rank 2 on a
    rank-1 leaf, which flax 0.12's eager sharding refuses: ``P('model')`` here, as on its other biases."""

    def __init__(self, annotate, *, rngs, d=64, heads=8, ff=64, layers=2, maxlen=S):
        if annotate:
            mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("batch", "model"))  # the tutorial's mesh

            def part(init, spec):
                return nnx.with_partitioning(init, NamedSharding(mesh, P(*spec)))
        else:
            def part(init, spec):
                return init
        self.token_emb = nnx.Embed(V, d, rngs=rngs)
        self.pos_emb = nnx.Embed(maxlen, d, rngs=rngs)
        self.transformer_blocks = nnx.List([GptBlock(d, heads, ff, part, rngs=rngs) for _ in range(layers)])
        self.output_layer = nnx.Linear(d, V, kernel_init=part(nnx.initializers.xavier_uniform(), (None, "model")),
                                       bias_init=part(nnx.initializers.zeros_init(), ("model",)), rngs=rngs)

    def __call__(self, ids, training=False):
        x = self.token_emb(ids) + self.pos_emb(jnp.arange(ids.shape[1])[None])
        for blk in self.transformer_blocks:
            x = blk(x, training=training)
        return self.output_layer(x)


def minigpt_hand(mesh):
    f = _f(mesh)
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
            (r"mha/out/kernel$", P("model", None, f)),
            (r"linear1/kernel$", P(f, "model")), (r"linear1/bias$", P("model")), (r"linear2/kernel$", P("model", f)),
            (r"output_layer/kernel$", P(f, "model")), (r"output_layer/bias$", P("model")),
            (r"token_emb/embedding$", P("model", f)), (r".*", P())]


# ------------------------------------------------------------------ (2) Flax "Scale up" guide
class DotReluDot(nnx.Module):
    def __init__(self, depth, act, rngs):
        init = nnx.initializers.lecun_normal()
        self.dot1 = nnx.Linear(depth, depth, kernel_init=nnx.with_partitioning(init, (None, "model")),
                               use_bias=False, rngs=rngs)
        self.w2 = nnx.Param(init(rngs.params(), (depth, depth)), sharding=("model", None))
        self.act = act

    def __call__(self, x):
        y = jax.nn.relu(self.dot1(x))
        y = jax.lax.with_sharding_constraint(y, self.act)
        return jnp.dot(y, self.w2[...])


class MultiDotReluDot(nnx.Module):
    """The guide's depth 1024, 2 layers; here 256."""

    def __init__(self, act, depth=256, layers=2, *, rngs):
        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: None})
        def create(r):
            return DotReluDot(depth, act, r)

        self.layers = create(rngs.fork(split=layers))

    def __call__(self, x):
        def body(x, layer):
            return layer(x), None

        return jax.lax.scan(body, x, self.layers)[0]


def gspmd_hand(mesh):
    f = _f(mesh)
    return [(r"dot1/kernel$", P(None, f, "model")), (r"w2$", P(None, "model", f)), (r".*", P())]


# ------------------------------------------------------------------ (3) flax examples/gemma
class Einsum(nnx.Module):
    def __init__(self, eq, shape, *, rngs):
        self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))
        self.eq = eq

    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.w[...])


class RMSNorm(nnx.Module):
    def __init__(self, d, *, rngs):
        self.scale = nnx.Param(jnp.zeros((d,)))

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + self.scale[...])


def apply_rope(x, pos, max_wavelength=10_000):
    h = x.shape[-1]
    frac = 2 * jnp.arange(h // 2) / h
    t = pos[..., None] / (max_wavelength ** frac)
    t = t[..., None, :]
    sin, cos = jnp.sin(t), jnp.cos(t)
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


class GemmaAttention(nnx.Module):
    def __init__(self, heads, kv, d, hd, *, rngs):
        self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (heads, hd, d), rngs=rngs)
        if heads == kv:
            self.qkv_einsum = Einsum("BTD,SNDH->SBTNH", (3, heads, d, hd), rngs=rngs)
        else:
            self.q_einsum = Einsum("BTD,NDH->BTNH", (heads, d, hd), rngs=rngs)
            self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, kv, d, hd), rngs=rngs)
        self.heads, self.kv, self.hd = heads, kv, hd

    def __call__(self, x, pos, mask):
        if self.heads == self.kv:
            q, k, v = self.qkv_einsum(x)
        else:
            q = self.q_einsum(x)
            k, v = self.kv_einsum(x)
        q = apply_rope(q, pos) * self.hd ** -0.5
        k = apply_rope(k, pos)
        b, t, _, _ = q.shape
        qg = q.reshape(b, t, self.kv, self.heads // self.kv, self.hd)  # GQA: query heads grouped per kv head
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, k)
        logits = jnp.where(mask[:, :, None, None, :], logits, -2.3819763e38)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, self.heads, self.hd)
        return self.attn_vec_einsum(enc)


class GemmaMlp(nnx.Module):
    def __init__(self, d, hidden, *, rngs):
        kw = dict(use_bias=False, kernel_init=nnx.initializers.normal(), rngs=rngs)
        self.gate_proj, self.up_proj = nnx.Linear(d, hidden, **kw), nnx.Linear(d, hidden, **kw)
        self.down_proj = nnx.Linear(hidden, d, **kw)

    def __call__(self, x):
        return self.down_proj(nnx.gelu(self.gate_proj(x)) * self.up_proj(x))


class GemmaBlock(nnx.Module):
    def __init__(self, heads, kv, d, hd, hidden, *, rngs):
        self.pre_attention_norm = RMSNorm(d, rngs=rngs)
        self.attn = GemmaAttention(heads, kv, d, hd, rngs=rngs)
        self.pre_ffw_norm = RMSNorm(d, rngs=rngs)
        self.mlp = GemmaMlp(d, hidden, rngs=rngs)

    def __call__(self, x, pos, mask):
        x = x + self.attn(self.pre_attention_norm(x), pos, mask)
        return x + self.mlp(self.pre_ffw_norm(x))


class Gemma(nnx.Module):
    def __init__(self, heads, kv, d, hd, hidden, layers=2, *, rngs):
        self.input_embedding = nnx.Param(nnx.initializers.normal()(rngs.params(), (V, d)))  # Embedder's table
        self.layers = nnx.List([GemmaBlock(heads, kv, d, hd, hidden, rngs=rngs) for _ in range(layers)])
        self.final_norm = RMSNorm(d, rngs=rngs)

    def __call__(self, ids):
        x = self.input_embedding[(ids,)] * jnp.sqrt(self.input_embedding.shape[1]).astype(jnp.float32)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        mask = jnp.tril(jnp.ones((ids.shape[0], ids.shape[1], ids.shape[1]), bool))
        for blk in self.layers:
            x = blk(x, pos, mask)
        return jnp.dot(self.final_norm(x), self.input_embedding[...].T)


GEMMAS = {  # heads, kv heads, width, head_dim, mlp hidden: the ratios of
    "gemma-gqa": (8, 4, 64, 16, 256),   # Gemma 2 2B: 8 : 4 heads, head_dim 256 of width 2304, mlp 4x
    "gemma-mqa": (8, 1, 64, 16, 512),   # Gemma 2B: 8 : 1 (MQA), mlp 8x
    "gemma-mha": (4, 4, 64, 16, 512),   # Gemma 7B: 16 : 16 (qkv_einsum), mlp 8x
}


def gemma_hand(mesh, kv=4):
    """Megatron as Gemma shards it: q heads (and kv heads when they divide the tensor axis, else whole),
    attn_vec a row over heads, gate/up columns, down a row, the tied table vocab-parallel."""
    f = _f(mesh)
    kv_spec = P(None, "model", f, None) if kv % mesh["model"] == 0 else P(None, None, f, None)
    return [(r"qkv_einsum/w$", P(None, "model", f, None)), (r"q_einsum/w$", P("model", f, None)),
            (r"kv_einsum/w$", kv_spec), (r"attn_vec_einsum/w$", P("model", None, f)),
            (r"(gate|up)_proj/kernel$", P(f, "model")), (r"down_proj/kernel$", P("model", f)),
            (r"input_embedding$", P("model", f)), (r".*", P())]


# ------------------------------------------------------------------ (4) nnx.vmap-made, nnx.scan-run decoder
class ScanBlock(nnx.Module):
    def __init__(self, d, heads, kv, ff, *, rngs):
        hd = d // heads
        kw = dict(use_bias=False, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.q = nnx.LinearGeneral(d, (heads, hd), **kw)
        self.k = nnx.LinearGeneral(d, (kv, hd), **kw)
        self.v = nnx.LinearGeneral(d, (kv, hd), **kw)
        self.o = nnx.LinearGeneral((heads, hd), d, axis=(-2, -1), **kw)
        self.gate, self.up = nnx.Linear(d, ff, **kw), nnx.Linear(d, ff, **kw)
        self.down = nnx.Linear(ff, d, **kw)
        self.heads, self.kv = heads, kv

    def __call__(self, x):
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        rep = self.heads // self.kv
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        a = nnx.dot_product_attention(q, k, v, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
        x = x + self.o(a)
        h = self.norm2(x)
        return x + self.down(nnx.silu(self.gate(h)) * self.up(h))


class ScanDecoder(nnx.Module):
    def __init__(self, d=64, heads=8, kv=2, ff=224, layers=4, *, rngs):  # Llama-3 8B: 32 : 8 heads, mlp 3.5x
        self.embed = nnx.Embed(V, d, rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return ScanBlock(d, heads, kv, ff, rngs=rngs)

        self.blocks = make(rngs)
        self.final_norm = nnx.RMSNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, V, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run(x, block):
            return block(x)

        return self.lm_head(self.final_norm(run(self.embed(ids), self.blocks)))


def scan_hand(mesh):
    f = _f(mesh)
    # 2 kv heads < 4 tensor ranks: k and v whole on every rank, as Megatron keeps them
    return [(r"blocks/q/kernel$", P(None, f, "model", None)), (r"blocks/[kv]/kernel$", P(None, f, None, None)),
            (r"blocks/o/kernel$", P(None, "model", None, f)),
            (r"blocks/(gate|up)/kernel$", P(None, f, "model")), (r"blocks/down/kernel$", P(None, "model", f)),
            (r"embed/embedding$", P("model", f)), (r"lm_head/kernel$", P(f, "model")), (r".*", P())]


# ------------------------------------------------------------------ (5) JAX AI stack ViT
class PatchEmbedding(nnx.Module):
    def __init__(self, img, patch, d, *, rngs):
        self.proj = nnx.Conv(3, d, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs)

    def __call__(self, x):
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class VitBlock(nnx.Module):
    def __init__(self, d, heads, mlp, *, rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, dropout_rate=0.1,
                                           decode=False, deterministic=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp1, self.mlp2 = nnx.Linear(d, mlp, rngs=rngs), nnx.Linear(mlp, d, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.drop(self.mlp2(self.drop(nnx.gelu(self.mlp1(self.norm2(x))))))


class ViT(nnx.Module):
    """ViT-B/16's ratios (head_dim 64 -> 16, mlp 4x), 32x32 images in 8x8 patches, ImageNet's 1000 classes."""

    def __init__(self, img=32, patch=8, d=64, heads=4, mlp=256, layers=2, classes=1000, *, rngs):
        n = (img // patch) ** 2
        self.patch_embeddings = PatchEmbedding(img, patch, d, rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d)))
        self.position_embeddings = nnx.Param(nnx.initializers.truncated_normal(0.02)(rngs.params(), (1, n + 1, d)))
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.encoder = nnx.List([VitBlock(d, heads, mlp, rngs=rngs) for _ in range(layers)])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        self.classifier = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, img):
        x = self.patch_embeddings(img)
        cls = jnp.tile(self.cls_token[...], (x.shape[0], 1, 1))
        x = self.dropout(jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...])
        for blk in self.encoder:
            x = blk(x)
        return self.classifier(self.final_norm(x)[:, 0])


def vit_hand(mesh):
    f = _f(mesh)
    return [(r"(query|key|value)/kernel$", P(f, "model", None)), (r"(query|key|value)/bias$", P("model", None)),
            (r"attn/out/kernel$", P("model", None, f)),
            (r"mlp1/kernel$", P(f, "model")), (r"mlp1/bias$", P("model")), (r"mlp2/kernel$", P("model", f)),
            (r"classifier/kernel$", P(f, "model")), (r"classifier/bias$", P("model")), (r".*", P())]


# ------------------------------------------------------------------ (6) nnx.LoRA fine-tune
class LoraBlock(nnx.Module):
    def __init__(self, d, heads, ff, r, *, rngs):
        kw = dict(lora_rank=r, use_bias=False, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.LoRALinear(d, d, **kw) for _ in range(4))
        self.up, self.down = nnx.LoRALinear(d, ff, **kw), nnx.LoRALinear(ff, d, **kw)
        self.heads = heads

    def __call__(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in (self.q(h), self.k(h), self.v(h)))
        a = nnx.dot_product_attention(q, k, v, mask=nnx.make_causal_mask(jnp.ones((b, t))))
        x = x + self.o(a.reshape(b, t, d))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class LoraLM(nnx.Module):
    def __init__(self, d=64, heads=4, ff=256, r=8, layers=2, *, rngs):
        self.embed = nnx.Embed(V, d, rngs=rngs)
        self.blocks = nnx.List([LoraBlock(d, heads, ff, r, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.embed.attend(self.norm(x))


def lora_hand(mesh):
    """The frozen base Megatron, its adapters split like it: a column's B on its output, a row's A on its
    input, the other factor whole."""
    f = _f(mesh)
    # nnx.LoRALinear keeps its factors in a ``lora`` submodule: ``q/lora/lora_b``
    return [(r"/(q|k|v|up)/kernel$", P(f, "model")), (r"/(q|k|v|up)/lora/lora_b$", P(None, "model")),
            (r"/(o|down)/kernel$", P("model", f)), (r"/(o|down)/lora/lora_a$", P("model", None)),
            (r"embed/embedding$", P("model", f)), (r".*", P())]


# ------------------------------------------------------------------ build, plans, run
def build(name: str, mesh: dict[str, int]) -> tuple[Built, Any, dict[str, Any]]:
    """The model (an nnx module, built once per mesh: the guide's constraint names the batch axis), its hand
    layout and the extra keyword arguments every plan of it takes."""
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    rngs, extra, loss, sample = nnx.Rngs(0), {}, _xent, (ids,)
    if name in ("minigpt", "minigpt-noann"):
        m, hand = MiniGPT(name == "minigpt", rngs=rngs), minigpt_hand
    elif name == "gspmd":
        batch = "fsdp" if "fsdp" in mesh else "data"
        act = NamedSharding(_mesh(mesh), P(batch, "model"))
        with jax.set_mesh(_mesh(mesh)):  # as the guide builds it: the annotations shard eagerly
            m = MultiDotReluDot(act, rngs=rngs)
        hand, loss = gspmd_hand, _mse
        sample = (jax.ShapeDtypeStruct((B, 256), jnp.float32),)
    elif name in GEMMAS:
        m = Gemma(*GEMMAS[name], rngs=rngs)
        hand = functools.partial(gemma_hand, kv=GEMMAS[name][1])
    elif name == "scan":
        m, hand = ScanDecoder(rngs=rngs), scan_hand
    elif name == "vit":
        m, hand = ViT(rngs=rngs), vit_hand
        sample = (jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32),)
    elif name == "lora":
        m, hand, extra = LoraLM(rngs=rngs), lora_hand, {"trainable": nnx.LoRAParam}
    else:
        raise SystemExit(f"unknown {name}")
    return Built(name, m, nnx.state(m), sample, m, loss), hand, extra


@functools.cache
def _mesh_cached(items):
    import tpflax

    return tpflax.make_mesh(dict(items))


def _mesh(mesh):
    return _mesh_cached(tuple(mesh.items()))


def fsdp_rules(params: Any, mesh: dict[str, int]) -> list[tuple[str, Any]]:
    """Pure FSDP over tpflax's own paths: each leaf's largest dim dividing the fsdp/data axis."""
    import tpflax

    axis = "fsdp" if "fsdp" in mesh else "data"
    n = mesh[axis]
    rules = []
    for path, d in tpflax.plan(params, mesh, rules=[(r".*", "replicate")]).decisions.items():
        dims = sorted((i for i, s in enumerate(d.shape) if s % n == 0 and s >= n), key=lambda i: -d.shape[i])
        spec = [None] * len(d.shape)
        if dims:
            spec[dims[0]] = axis
        rules.append((f"^{re.escape(path)}$", P(*spec)))
    return rules


NAMES = ("minigpt", "minigpt-noann", "gspmd", *GEMMAS, "scan", "vit", "lora")
PLANS = ("tree", "model", "megatron", "replicated", "fsdp")
DESCRIPTION = ("`python benchmarks/probe_nnx.py` (generated). Flax NNX models written from the Flax NNX docs and "
               "the JAX AI stack tutorials (miniGPT with and without its `NamedSharding` annotations, the \"Scale "
               "up\" guide's `MultiDotReluDot`, flax's examples/gemma with GQA, MQA and a fused qkv einsum, an "
               "`nnx.vmap`/`nnx.scan` decoder, the ViT tutorial's, an `nnx.LoRALinear` fine-tune with "
               "`trainable=nnx.LoRAParam`); tiny widths, the published ratios; planned as "
               "`tpflax.plan(nnx.state(model), mesh, model=model, sample=...)` and tree-only; the adamw step of "
               "`tpflax.make_train_step(model, ...)` compiled on 8 CPU-emulated devices and measured as "
               "`benchmarks/third_party.py` measures. **x hand**: ratio to the Megatron layout by hand (`*_hand` "
               "in the script). **est.**: `tpflax.estimate(..., model=model, backend=\"cpu\")` collective bytes "
               "over the compiled ones.")


def main(argv=None):
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_nnx.md",
                      title="# tpflax on Flax NNX models written as the NNX docs write them", intro=DESCRIPTION,
                      fsdp=fsdp_rules, per_mesh=True)


if __name__ == "__main__":
    sys.exit(main())
