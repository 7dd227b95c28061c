"""tpflax's plans on google-deepmind's ``gemma`` library: Gemma 3 (local/global attention, GQA or MQA with a
stacked ``(2, kv_heads, d, head_dim)`` key/value einsum, QK norm, a stacked transposed ``(2, hidden, d)`` gating
einsum, a tied embedder) and Gemma 3n (AltUp, LAuReL, per-layer embeddings, layers sharing another layer's
key/values), tiny configs keeping the published ratios.

Five plans per model and mesh, measured like ``benchmarks/linen_probe.py`` (its ``measure``): tree-only,
traced (``model=``), a hand Megatron layout, replicated, pure FSDP.

    pip install --no-deps gemma einops
    python benchmarks/probe_gemma.py                     # every model, both meshes
    python benchmarks/probe_gemma.py --arch gemma3-1b --mesh fsdp=2,model=4

The blocks are gemma's own (``gemma.gm.nn._modules.Block``, ``gemma.gm.nn.gemma3n._modules.Block``, their
Embedder and RMSNorm). gemma's ``Transformer`` classes import kauldron, whose typing module imports tensorflow
and needs typeguard >= 3 at import time; neither is needed to run a block. So the top level, a few lines
(embed, blocks, final norm, tied logits, AltUp's projections around the blocks), is restated here from
``gemma/gm/nn/_transformer.py`` and ``gemma/gm/nn/gemma3n/_transformer.py`` without their input
preprocessing (no images: positions are ``arange``, the mask causal), and when kauldron does not import, the
two names gemma's block modules take from it (``kauldron.typing``'s annotation aliases and
``kd.nn.Identity``) are provided by a stub. gemma is no tpflax dependency: without it the script says so and
exits 0.

A run of every model, mesh and plan writes ``results/probe_gemma.md`` (table only: the observations under it
are written by hand; ``--write PATH`` for another file, ``--no-write`` to print).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from third_party import Built  # noqa: E402

B, S, V = 8, 16, 1024  # the published vocab (262,144) is a power of two too
WINDOW = 8  # local layers see half the sequence (512 of 32k published)


def _stub_kauldron() -> None:
    """The two names gemma's block modules import from kauldron, when kauldron itself does not import."""
    try:
        import kauldron.typing  # noqa: F401
        from kauldron import kd  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - any import failure (tensorflow, typeguard) means: stub it
        for name in [m for m in sys.modules if m == "kauldron" or m.startswith("kauldron.")]:
            del sys.modules[name]

    class _Alias:
        def __class_getitem__(cls, item):
            return Any

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x

    typing_ = types.ModuleType("kauldron.typing")
    for name in ("Array", "Bool", "Float", "Int", "UInt8"):
        setattr(typing_, name, _Alias)
    typing_.typechecked = lambda f: f
    kd = types.ModuleType("kauldron.kd")
    kd.nn = types.SimpleNamespace(Identity=Identity)
    root = types.ModuleType("kauldron")
    root.typing, root.kd = typing_, kd
    sys.modules.update({"kauldron": root, "kauldron.typing": typing_, "kauldron.kd": kd})


def _gemma():
    _stub_kauldron()
    from gemma.gm.nn import _layers, _modules
    from gemma.gm.nn.gemma3n import _layers as layers3n
    from gemma.gm.nn.gemma3n import _modules as modules3n
    return _layers, _modules, layers3n, modules3n


def _xent(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def _inputs(ids):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((ids.shape[1],) * 2, bool)), (ids.shape[0],) + (ids.shape[1],) * 2)
    return pos, mask


# ------------------------------------------------------------------ Gemma 3
class Gemma3(nn.Module):
    """``gemma.gm.nn._transformer.Transformer.__call__`` for text: embed (scaled by sqrt(d) in the Embedder),
    gemma's Blocks, the final RMSNorm, tied logits, the optional final soft cap."""

    cfg: dict

    @nn.compact
    def __call__(self, ids):
        _layers, _modules, _, _ = _gemma()
        c = self.cfg
        emb = _modules.Embedder(vocab_size=V, embed_dim=c["d"], name="embedder")
        x = emb.encode(ids)
        pos, mask = _inputs(ids)
        for i, local in enumerate(c["pattern"]):
            kind = _modules.AttentionType.LOCAL_SLIDING if local else _modules.AttentionType.GLOBAL
            _, x = _modules.Block(
                name=f"layer_{i}", num_heads=c["heads"], num_kv_heads=c["kv"], embed_dim=c["d"],
                head_dim=c["hd"], hidden_dim=c["ffw"], use_post_attn_norm=True, use_post_ffw_norm=True,
                attn_type=kind, query_pre_attn_scalar=c["hd"] ** -0.5, transpose_gating_einsum=True,
                rope_base_frequency=10_000 if local else 1_000_000, sliding_window_size=WINDOW,
                use_qk_norm=True)(x, pos, None, mask)
        x = _layers.RMSNorm(name="final_norm")(x)
        logits = emb.decode(x)
        if c.get("softcap"):
            logits = jnp.tanh(logits / c["softcap"]) * c["softcap"]
        return logits


# Published: Gemma3-1B d 1152, 4 heads of 256, 1 kv head, ffw 6912 (6x); 4B d 2560, 8 heads of 256, 4 kv heads,
# ffw 10240 (4x); both 5 local : 1 global. Tiny: the same head counts and d : heads*head_dim, 1 local + 1 global.
GEMMA3 = {
    "gemma3-1b": dict(d=144, heads=4, kv=1, hd=32, ffw=864, pattern=(True, False)),
    "gemma3-4b": dict(d=160, heads=8, kv=4, hd=16, ffw=640, pattern=(True, False)),
    # Gemma3n's attention (8 heads, 2 kv heads) in a Gemma 3 block: GQA with fewer kv heads than tensor ranks
    "gemma3-gqa2": dict(d=128, heads=8, kv=2, hd=16, ffw=512, pattern=(True, False)),
}


def gemma3_hand(kv):
    def hand(mesh):
        """Megatron: q heads a column, k/v heads with them where they divide the tensor axis (else whole on
        every rank), attn_vec a row, the stacked gate/up einsum's hidden dim a column, linear a row, the tied
        table vocab-parallel; fsdp on d."""
        f = "fsdp" if "fsdp" in mesh else None
        kvs = P(None, "model", f, None) if kv % mesh["model"] == 0 else P(None, None, f, None)
        return [(r"embedder/input_embedding$", P("model", f)),
                (r"q_einsum/w$", P("model", f, None)), (r"kv_einsum/w$", kvs),
                (r"attn_vec_einsum/w$", P("model", None, f)),
                (r"gating_einsum$", P(None, "model", f)), (r"mlp/linear$", P("model", f)),
                (r".*", P())]
    return hand


# ------------------------------------------------------------------ Gemma 3n
class Gemma3n(nn.Module):
    """``gemma.gm.nn.gemma3n._transformer.Gemma3nTransformer.__call__`` for text: the per-layer inputs, AltUp's
    projections into and out of its 4 streams, gemma's Blocks with the later layers reading an earlier
    layer's key/values, the final norm, tied logits."""

    cfg: dict

    @nn.compact
    def __call__(self, ids):
        _, _, layers3n, m3n = _gemma()
        c = self.cfg
        n, d, alt = len(c["pattern"]), c["d"], 4
        emb = m3n.Embedder(vocab_size=V, embed_dim=d, num_layers=n, per_layer_input_dim=c["pli"], name="embedder")
        x = emb.encode(ids)
        per_layer = emb.encode_per_layer_input(x, ids)
        pos, mask = _inputs(ids)
        eq = "...F,FD->...D"
        mag = jnp.mean(x ** 2, axis=-1, keepdims=True) ** 0.5
        xs = [x]
        for i in range(1, alt):
            y = layers3n.Einsum((d, d), weight_name=f"altup_projection_{i - 1}", name=f"altup_projection_{i - 1}")(eq, x)
            xs.append(y * mag / jnp.maximum(jnp.mean(y ** 2, axis=-1, keepdims=True) ** 0.5, 1e-12))
        xs[0] = layers3n.reduce_precision(xs[0])
        caches = {}
        for i, local in enumerate(c["pattern"]):
            kind = m3n.AttentionType.LOCAL_SLIDING if local else m3n.AttentionType.GLOBAL
            src = i if i < c["unshared"] else c["unshared"] - (2 if local else 1)
            cache, xs = m3n.Block(
                name=f"layer_{i}", num_heads=c["heads"], num_kv_heads=c["kv"], embed_dim=d, head_dim=c["hd"],
                hidden_dim=c["ffw"], use_post_attn_norm=True, use_post_ffw_norm=True, attn_type=kind,
                query_pre_attn_scalar=1.0, transpose_gating_einsum=True,
                rope_base_frequency=10_000 if local else 1_000_000, sliding_window_size=WINDOW,
                use_qk_norm=True, use_value_norm=True, use_altup=True, altup_coef_clip=120.0,
                activation_sparsity=0.95 if i < c["sparse"] else 0.0, use_laurel=True, laurel_rank=c["laurel"],
                per_layer_input_dim=c["pli"], scale_plus_one=False, guard_against_excess_precision=True,
            )(xs, pos, None, mask, per_layer_input=per_layer[..., i, :],
              kv_shared_cache=caches.get(src) if src != i else None)
            caches[i] = cache
        mag = jnp.mean(xs[0] ** 2, axis=-1, keepdims=True) ** 0.5
        for i in range(1, alt):
            y = layers3n.Einsum((d, d), weight_name=f"altup_unembed_projection_{i - 1}",
                                name=f"altup_unembed_projection_{i - 1}")(eq, xs[i])
            xs[i] = y * mag / jnp.maximum(jnp.mean(y ** 2, axis=-1, keepdims=True) ** 0.5, 1e-12)
        x = jnp.mean(jnp.stack(xs, axis=0), axis=0)
        x = layers3n.RMSNorm(scale_plus_one=False, guard_against_excess_precision=True, name="final_norm")(x)
        return emb.decode(x)


# Published E2B: d 2048, 8 heads of 256 (heads*head_dim = d), 2 kv heads, ffw 8192 (4x), per-layer inputs 256
# (d/8), LAuReL rank 64 (d/32), 4 local : 1 global, the last third of the layers reading earlier key/values,
# activation sparsity in the first third. Tiny: 5 layers, the last 2 sharing.
GEMMA3N = {"gemma3n-e2b": dict(d=128, heads=8, kv=2, hd=16, ffw=512, pli=16, laurel=4,
                               pattern=(True, True, True, True, False), unshared=3, sparse=2)}


def gemma3n_hand(mesh):
    """Megatron on attention and the MLP as in Gemma 3 (2 kv heads: whole on each of 4 ranks), the tied table
    and the per-layer table vocab-parallel; AltUp, LAuReL and the per-layer maps (all d-wide or narrower,
    on the residual streams) whole, fsdp on d."""
    f = "fsdp" if "fsdp" in mesh else None
    return [(r"embedder/input_embedding$", P("model", f)),
            (r"embedder/per_layer_input_embedding$", P("model", None, f)),
            (r"embedder/per_layer_input_projection/w$", P(f, None, None)),
            (r"q_einsum/w$", P("model", f, None)), (r"kv_einsum/w$", P(None, None, f, None)),
            (r"attn_vec_einsum/w$", P("model", None, f)),
            (r"gating_einsum$", P(None, "model", f)), (r"mlp/linear$", P("model", f)),
            (r"altup_(unembed_)?projection_\d+/altup_\w+$", P(f, None)),
            (r"laurel/linear_left/w$", P(f, None)), (r"laurel/linear_right/w$", P(None, f)),
            (r"per_layer_input_gate/w$", P(f, None)), (r"per_layer_projection/w$", P(None, f)),
            (r"modality_router/w$", P(f, None)),
            (r".*", P())]


# ------------------------------------------------------------------ builders
NAMES = (*GEMMA3, *GEMMA3N)


def build(name: str) -> tuple[Built, Any]:
    if name in GEMMA3:
        m, hand = Gemma3(GEMMA3[name]), gemma3_hand(GEMMA3[name]["kv"])
    elif name in GEMMA3N:
        m, hand = Gemma3n(GEMMA3N[name]), gemma3n_hand
    else:
        raise SystemExit(f"unknown {name}; one of {', '.join(NAMES)}")
    ids = jax.random.randint(jax.random.key(1), (B, S), 0, V)
    variables = m.init(jax.random.key(0), ids)  # concrete parameters
    sample = (jax.ShapeDtypeStruct((B, S), jnp.int32),)
    return Built(name, m, variables, sample, m.apply, _xent), hand


PLANS = ("tree", "model", "megatron", "replicated", "fsdp")
INTRO = ("`python benchmarks/probe_gemma.py` (generated). gemma 3.3.0's own blocks (`gemma.gm.nn._modules.Block`, "
         "`gemma.gm.nn.gemma3n._modules.Block`) under the text path of its Transformers, tiny widths keeping the "
         "published head counts and ratios (Gemma3-1B: 4 heads, 1 key/value head; 4B: 8 and 4; Gemma 3n's 8 and 2 "
         "also in a Gemma 3 block; Gemma3n-E2B: AltUp, LAuReL, per-layer inputs, the last layers reading earlier "
         "key/values, a sparse gate in the first); float32; the adamw train step of `tpflax.make_train_step` "
         "compiled on 8 CPU-emulated devices and measured as `benchmarks/third_party.py` measures (`measure`). "
         "**x hand**: ratio to the Megatron layout written by hand (`*_hand` in the script; lower is better). "
         "**est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes over the compiled ones.")


def main(argv=None):
    from linen_probe import probe_main

    if importlib.util.find_spec("gemma") is None:
        print("gemma is not installed (pip install --no-deps gemma einops): nothing to probe")
        return 0
    return probe_main(argv, NAMES, build, "probe_gemma.md",
                      title="# tpflax on google-deepmind's gemma (Gemma 3, Gemma 3n)", intro=INTRO)


if __name__ == "__main__":
    sys.exit(main())
