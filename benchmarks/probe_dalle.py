"""tpflax's plans on dalle-mini's DalleBart (PyPI ``dalle-mini`` 0.1.5), against the partition rules the
library ships for it (``dalle_mini.model.partitions``).

DalleBart is a BART-style encoder-decoder (text tokens in, image tokens out) with the variants DALL-E Mega
trains: GLU feed-forwards with NormFormer layer norms (a parameter-free norm *between* the up projections
and the down projection, over the feed-forward width), no biases, an untied image-token head, and both
layer stacks scanned (``nn.scan`` over ``nn_partitioning.remat``: kernels ``(layers, in, out)``). Tiny
widths with DALL-E Mega's ratios. Five plans per mesh, measured like ``benchmarks/linen_probe.py``:
tree-only, traced (``model=``), the library's own rules (the **hand** column: ``mp`` is the mesh's
``model`` axis; on fsdp=2,model=4 its kernels and embeddings also split their other dim over fsdp),
replicated, pure FSDP.

    pip install --no-deps dalle-mini==0.1.5 einops     # 2022 code: three shims below let it import
    python benchmarks/probe_dalle.py
    python benchmarks/probe_dalle.py --mesh data=2,model=4

dalle-mini imports ``wandb`` (only to download checkpoints), ``jax.experimental.PartitionSpec`` (moved to
``jax.sharding`` since) and annotates with ``jnp.DeviceArray`` (now ``jax.Array``); :func:`available` stubs
the first and aliases the other two before importing it.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, T_TEXT, T_IMAGE = 8, 16, 32  # batch, text tokens, image tokens

# DALL-E Mega (dalle-mini/dalle-mega): d 2048, 24 + 24 layers, 32 heads, GLU ffn 4096, text vocab 50272,
# image vocab 16415 (+1 BOS: 16416 rows), 64 text / 256 image tokens. Tiny: d 64, 2 + 2 layers, 4 heads of
# 16, GLU ffn 128, text vocab 1572 (24.5 x d), image vocab 515 (+1: 516 rows, 8 x d), 16 / 32 tokens.
CONFIG = dict(encoder_vocab_size=1572, image_vocab_size=515, image_length=T_IMAGE, max_text_length=T_TEXT,
              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=128, decoder_ffn_dim=128, d_model=64, activation_function="gelu",
              ln_type="layernorm", ln_positions="normformer", use_glu=True, use_bias=False,
              use_head_scale=False, use_cosine_attention=False, use_swin_position_embeddings=False,
              use_final_ln_encoder=True, use_final_ln_decoder=True, tie_word_embeddings=False,
              force_ln_scale=False, gradient_checkpointing=True, use_scan=True,
              dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
# The library's other attention variants, on its unscanned path (one module per layer): NormFormer's
# per-head scale (``head_scale``, (1, 1, heads, 1)), Swin v2's cosine attention and its relative position
# bias, an ``nn.Embed(q_len, k_len * heads)`` looked up at ``arange(q_len)`` and read as
# ``"q (k h) -> 1 h q k"`` (heads the minor factor of its features).
VARIANTS = {"dalle": {}, "dalle-swin": dict(use_scan=False, use_head_scale=True, use_cosine_attention=True,
                                            use_swin_position_embeddings=True)}


def available() -> str:
    """'' if dalle-mini's model imports (after the two shims), else why not."""
    for mod in ("dalle_mini", "einops", "transformers"):  # the model's own imports
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install --no-deps dalle-mini==0.1.5 einops)"
    import jax.experimental
    import jax.numpy as jnp
    import jax.sharding

    if not hasattr(jax.experimental, "PartitionSpec"):
        jax.experimental.PartitionSpec = jax.sharding.PartitionSpec
    if not hasattr(jnp, "DeviceArray"):  # type annotations of its generate(), evaluated at import
        jnp.DeviceArray = jax.Array
    if "wandb" not in sys.modules and importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = types.ModuleType("wandb")  # dalle_mini.model.utils imports it at the top
    try:
        _modeling()
    except Exception as e:  # noqa: BLE001 - 2022 code on today's stack: say why it does not import
        return f"dalle_mini.model.modeling does not import: {type(e).__name__}: {e}"
    return ""


def _modeling():
    """``dalle_mini.model.modeling`` without running the packages' ``__init__`` (they import the text
    processor's ``emoji`` and ``unidecode``, which the model does not need)."""
    if "dalle_mini.model.modeling" in sys.modules:
        return sys.modules["dalle_mini.model.modeling"]
    spec = importlib.util.find_spec("dalle_mini")
    for name, sub in (("dalle_mini", ""), ("dalle_mini.model", "model")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(Path(spec.origin).parent / sub)]
            sys.modules[name] = pkg
    return importlib.import_module("dalle_mini.model.modeling")


# ------------------------------------------------------------------ the library's layout
def library_rules(mesh):
    """dalle-mini's ``_get_partition_rules`` as tpflax rules (paths end at the leaf; scanned stacks carry a
    leading whole layers dim, as its ``set_partitions(..., use_scan=True)`` adds; unscanned layers are
    ``FlaxBart*Layer_<i>``), ``mp`` -> ``model``. On a
    mesh with fsdp, each split kernel and embedding also splits its other dim over fsdp (ZeRO-3 beside the
    library's tensor split; the library itself trains data-parallel over ``dp``)."""
    from jax.sharding import PartitionSpec as P

    f = "fsdp" if "fsdp" in mesh else None
    out = [(r"embed_positions/embedding$", P("model", f)),
           (r"embed_tokens/embedding$", P("model", f)),
           (r"rel_bias/embedding$", P(None, "model")),
           (r"lm_head/kernel$", P(f, "model"))]
    for layers, lead in ((r"FlaxBart(Encoder|Decoder)Layers/", (None,)), (r"FlaxBart(Encoder|Decoder)Layer_\d+/", ())):
        out += [(rf"{layers}.*(q_proj|k_proj|v_proj)/kernel$", P(*lead, f, "model")),
                (rf"{layers}.*out_proj/kernel$", P(*lead, "model", f)),
                (rf"{layers}.*GLU_\d+/Dense_[01]/kernel$", P(*lead, f, "model")),
                (rf"{layers}.*GLU_\d+/Dense_2/kernel$", P(*lead, "model", f))]
    return [*out, (r"(bias|scale|head_scale|tau)$", P()),
            (r".*", P())]


# ------------------------------------------------------------------ builder
def model(name: str = "dalle"):
    """The tiny DalleBart module (``FlaxBartForConditionalGenerationModule`` of dalle-mini) of ``name``."""
    modeling = _modeling()
    cfg = modeling.DalleBartConfig(**{**CONFIG, **VARIANTS[name]})
    return modeling.FlaxBartForConditionalGenerationModule(config=cfg)


def build_sample() -> tuple:
    """Text ids and image ids as ``jax.ShapeDtypeStruct`` (the image ids are the loss's targets too)."""
    import jax
    import jax.numpy as jnp

    return jax.ShapeDtypeStruct((B, T_TEXT), jnp.int32), jax.ShapeDtypeStruct((B, T_IMAGE), jnp.int32)


def apply_fn(m):
    """``fn(params, text, image)``: the image-token logits (teacher forcing, every mask open)."""
    import jax.numpy as jnp

    def fn(p, text, image):
        pos = jnp.broadcast_to(jnp.arange(text.shape[1]), text.shape)
        dpos = jnp.broadcast_to(jnp.arange(image.shape[1]), image.shape)
        return m.apply({"params": p}, text, jnp.ones_like(text), image, jnp.ones_like(image), pos, dpos).logits
    return fn


def _xent(logits, text, image):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], image[:, 1:]).mean()


def build(name: str = "dalle"):
    """(Built, the library's rules) for the tiny DalleBart: concrete parameters, the image-token loss."""
    import jax
    import jax.numpy as jnp
    from third_party import Built

    m = model(name)
    sample = build_sample()
    zeros = [jnp.zeros(s.shape, s.dtype) for s in sample]
    fn = apply_fn(m)
    pos = [jnp.broadcast_to(jnp.arange(z.shape[1]), z.shape) for z in zeros]
    params = jax.jit(m.init)(jax.random.key(0), zeros[0], jnp.ones_like(zeros[0]), zeros[1],
                             jnp.ones_like(zeros[1]), *pos)["params"]
    return Built(name, m, params, sample, fn, _xent), library_rules


NAMES = tuple(VARIANTS)
INTRO = ("`python benchmarks/probe_dalle.py` (generated; dalle-mini 0.1.5 with jax 0.10, transformers 4.57). "
         "DalleBart at tiny widths with DALL-E Mega's ratios (`CONFIG` in the script), the image-token "
         "cross-entropy; the adamw train step of `tpflax.make_train_step` compiled on 8 CPU-emulated devices and "
         "measured as `benchmarks/third_party.py` measures (`measure`). **x hand**: ratio to the library's own "
         "partition rules (`library_rules` in the script; lower is better). **est.**: `tpflax.estimate(..., "
         "model=fn, backend=\"cpu\")` collective bytes over the compiled ones.")


def main(argv=None):
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_dalle.md", title="# tpflax on dalle-mini's DalleBart",
                      intro=INTRO, tail=OBSERVATIONS, available=available)


OBSERVATIONS = """
## Observations (by hand)

All numbers from the table above; **hand** is dalle-mini's own `_get_partition_rules` (`mp` = `model`).

- **dalle** (DALL-E Mega's variant: scanned, remat, GLU with NormFormer norms): tree-only and `model=` split every
  kernel as the library does (q/k/v and both GLU up projections on their outputs, `out_proj` and `Dense_2` on
  their inputs, the image-token head on its vocabulary, both token tables on their rows), through the scanned
  stacks' leading layers dim and across the parameter-free norm between the GLU's up and down projections
  (XLA sums its statistics over the split features). `model=` also splits that norm's bias with the features it
  is added to, which the library keeps whole. The one difference: the 16- and 32-row position tables, which the
  library splits on their rows and tpflax keeps whole (chosen by cost, as for transformers' BART). Forced split
  on top of the `model=` plan they hold 0.986x the bytes for 1.031x the collectives (data=2,model=4) and
  0.989x / 1.025x (fsdp=2,model=4): the +1.1-1.4% bytes and -2.5-3.2% collectives of the rows above.
- **dalle-swin** (the unscanned path, NormFormer's per-head scale, Swin v2's cosine attention and relative
  position bias): each attention's `rel_bias`, an `nn.Embed(q_len, k_len * heads)` looked up at `arange(q_len)`,
  stayed whole: inside an attention layer only a table with fewer columns than rows (T5's buckets x heads) was
  read as a per-head bias, and this one's row split, the only other candidate, costs more. Whole, its gradient
  comes out of the heads-split scores split and XLA gathers it, so the whole table cost bytes *and*
  collectives: 1.060 / 0.976 / 1.004 (data) and 1.035 / 1.003 / 1.002 (fsdp) tree-only. A table named for a
  relative-position bias now splits on its columns with the scores whatever its width (`planner/leaf_groups.py`,
  `tests/test_patterns.py::test_a_relative_bias_wider_than_its_rows_splits_its_columns_with_the_heads`):
  1.011 / 0.971 / 1.000 and 1.001 / 0.982 / 1.000, the position tables above the only difference left. Split
  on its rows instead (the `model=` plan with a rule) it compiled to 1.08x the collectives of the column split.
- **Estimates** are within 3% of the compiled collectives on every row (worst: the library's own layout, 0.971,
  its row-split position tables).
"""


if __name__ == "__main__":
    sys.exit(main())
