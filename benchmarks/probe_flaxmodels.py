"""tpflax's plans on flaxmodels' models (PyPI ``flaxmodels`` 0.1.3, linen), against layouts written by hand.

flaxmodels ports GPT-2, StyleGAN2, ResNet and VGG to Flax for pretrained inference and fine-tuning. Its modules
are written with ``@nn.compact`` and no names: GPT-2's attention is ``Dense_0`` (fused q/k/v, split after the
matmul) and ``Dense_1``, its MLP ``Dense_0`` and ``Dense_1``, its untied head a ``Dense_0`` beside the
transformer, its token and position tables ``Embed_0`` and ``Embed_1``: a name-blind GPT-2 as a user would
find it. StyleGAN2's synthesis layers are modulated convolutions: the ``weight`` of each is scaled per example by
a style (the output of a dense on the latent) and demodulated by the norm of the scaled weight, and the
discriminator ends in a minibatch standard-deviation layer and two dense layers. Tiny widths with the
published ratios (``models()``), batch 8, concrete parameters; each plan is set beside a Megatron layout
written by hand (``*_hand`` below), replicated and pure FSDP.

    pip install --no-deps flaxmodels==0.1.3
    python benchmarks/probe_flaxmodels.py                  # every model, both meshes
    python benchmarks/probe_flaxmodels.py --arch gpt2 --mesh data=2,model=4
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, T, VOCAB = 8, 32, 1000
NAMES = ("gpt2", "stylegan2-g", "stylegan2-d", "resnet18")


def available() -> str:
    """'' if flaxmodels imports (two shims, below), else why not (h5py is its one import beyond jax and flax)."""
    for mod in ("flaxmodels", "h5py"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install --no-deps flaxmodels==0.1.3 h5py)"
    import jax.numpy as jnp
    from flaxmodels.gpt2 import gpt2
    from flaxmodels.gpt2 import ops as gpt2_ops
    from flaxmodels.stylegan2 import discriminator
    from flaxmodels.stylegan2 import ops as stylegan2_ops

    class _Jnp:
        """``jnp`` whose ``reshape`` still takes the ``newshape=`` keyword jax 0.10 removed."""

        @staticmethod
        def reshape(a, shape=None, newshape=None, **kw):
            return jnp.reshape(a, newshape if shape is None else shape, **kw)

        def __getattr__(self, name):
            return getattr(jnp, name)

    for mod in (gpt2, gpt2_ops, discriminator, stylegan2_ops):
        mod.jnp = _Jnp()
    # GPT2LMHeadModel sets ``param_dict`` only when it loads pretrained weights, then reads it either way
    gpt2.GPT2LMHeadModel.param_dict = None
    return ""


def _f(mesh):
    return "fsdp" if "fsdp" in mesh else None


def gpt2_hand(mesh):
    """Megatron for the name-blind GPT-2: the fused q/k/v and the MLP's up kernel split on their outputs."""
    from jax.sharding import PartitionSpec as P

    f = _f(mesh)
    return [(r"GPT2SelfAttention_0/Dense_0/kernel$|GPT2MLP_0/Dense_0/kernel$", P(f, "model")),
            (r"GPT2SelfAttention_0/Dense_0/bias$|GPT2MLP_0/Dense_0/bias$", P("model")),
            (r"GPT2SelfAttention_0/Dense_1/kernel$|GPT2MLP_0/Dense_1/kernel$", P("model", f)),
            (r"GPT2Model_0/Embed_0/embedding$", P("model", f)),
            (r"^Dense_0/kernel$", P(f, "model")),
            (r".*", P())]


def stylegan_g_hand(mesh):
    """Channel-parallel synthesis: in each block the upsampling conv's output channels split, the next conv's
    input channels and the style that scales them; the first block's one conv, the toRGB convs and the mapping
    network whole."""
    from jax.sharding import PartitionSpec as P

    f = _f(mesh)
    block = r"SynthesisBlock_[1-9]\d*"
    return [(rf"{block}/SynthesisLayer_0/weight$", P(None, None, f, "model")),
            (rf"{block}/SynthesisLayer_0/bias$", P("model")),
            (rf"{block}/SynthesisLayer_1/weight$", P(None, None, "model", f)),
            (rf"{block}/SynthesisLayer_1/LinearLayer_0/weight$", P(f, "model")),
            (rf"{block}/SynthesisLayer_1/LinearLayer_0/bias$", P("model")),
            (r".*", P())]


def stylegan_d_hand(mesh):
    """Each residual block's first conv split on its output channels, its second (downsampling) on its input
    channels; the 2048 -> 128 -> 1 head as a column and a row; the rest whole."""
    from jax.sharding import PartitionSpec as P

    f = _f(mesh)
    return [(r"DiscriminatorBlock_\d+/DiscriminatorLayer_0/weight$", P(None, None, f, "model")),
            (r"DiscriminatorBlock_\d+/DiscriminatorLayer_0/bias$", P("model")),
            (r"DiscriminatorBlock_\d+/DiscriminatorLayer_1/weight$", P(None, None, "model", f)),
            (r"^params/LinearLayer_0/weight$", P(f, "model")), (r"^params/LinearLayer_0/bias$", P("model")),
            (r"^params/LinearLayer_1/weight$", P("model", None)),
            (r".*", P())]


def resnet_hand(mesh):
    """Each basic block's first conv split on its output channels (its batch norm with them), its second on its
    input channels; the stem, the shortcut convs and the classifier whole."""
    from jax.sharding import PartitionSpec as P

    f = _f(mesh)
    return [(r"BasicBlock_\d+/Conv_0/kernel$", P(None, None, f, "model")),
            (r"BasicBlock_\d+/BatchNorm_0/(scale|bias|mean|var)$", P("model")),
            (r"BasicBlock_\d+/Conv_1/kernel$", P(None, None, "model", f)),
            (r".*", P())]


def models() -> dict:
    """``{name: (module, sample shapes, hand rules)}`` at tiny widths (the published ones in comments)."""
    import flaxmodels as fm
    import jax
    import jax.numpy as jnp

    # gpt2 (124M): vocab 50257, 1024 positions, d 768, 12 heads, 12 layers, mlp 4d
    cfg = SimpleNamespace(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                          activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          layer_norm_epsilon=1e-5, scale_attn_weights=True)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    img = jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32)
    # stylegan2 ffhq: resolution 1024, z=w=512, 8 mapping layers, fmap_base 32768, fmap_max 512
    return {
        "gpt2": (fm.gpt2.GPT2LMHeadModel(config=cfg), (ids,), gpt2_hand),
        "stylegan2-g": (fm.stylegan2.Generator(resolution=32, z_dim=64, w_dim=64, mapping_layer_features=64,
                                               num_mapping_layers=2, fmap_base=1024, fmap_max=128),
                        (jax.ShapeDtypeStruct((B, 64), jnp.float32),), stylegan_g_hand),
        "stylegan2-d": (fm.stylegan2.Discriminator(resolution=32, fmap_base=1024, fmap_max=128, mbstd_group_size=4),
                        (img,), stylegan_d_hand),
        # resnet18 at its published widths (64..512 channels), 10 classes
        "resnet18": (fm.ResNet18(output="logits", pretrained=None, num_classes=10), (img,), resnet_hand),
    }


def _xent(out, x):
    import jax.numpy as jnp
    import optax

    out = out.reshape(out.shape[0], -1)
    return optax.softmax_cross_entropy_with_integer_labels(out, jnp.zeros(out.shape[0], jnp.int32)).mean()


def _lm(out, ids):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:]).mean()


def _mse(out, x):
    import jax.numpy as jnp

    return jnp.mean(out ** 2)


def build(name: str):
    """(Built, hand rules): concrete variables, the model's call and a loss of its output."""
    import jax
    import jax.numpy as jnp
    from third_party import Built

    m, sample, hand = models()[name]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in sample]
    if name == "gpt2":
        variables = m.init(jax.random.key(0), input_ids=zeros[0])

        def fn(v, x):
            return m.apply(v, input_ids=x)["logits"]
        loss = _lm
    elif name == "stylegan2-g":
        kw = {"noise_mode": "const", "skip_w_avg_update": True, "train": False}
        variables = m.init(jax.random.key(0), zeros[0], **kw)

        def fn(v, z):
            return m.apply(v, z, **kw)
        loss = _mse
    elif name == "resnet18":
        variables = m.init(jax.random.key(0), zeros[0], train=False)

        def fn(v, x):
            return m.apply(v, x, train=False)
        loss = _xent
    else:
        variables = m.init(jax.random.key(0), zeros[0])
        fn, loss = m.apply, _xent
    return Built(name, m, variables, sample, fn, loss), hand


def main(argv=None) -> int:
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_flaxmodels.md", title="# tpflax on flaxmodels' models",
                      intro=INTRO, tail=OBSERVATIONS, available=available)


INTRO = ("`python benchmarks/probe_flaxmodels.py` (generated; flaxmodels 0.1.3 with jax 0.10). Tiny widths "
         "(`models()` in the script; ResNet-18 at its published widths), batch 8; the adamw train step of "
         "`tpflax.make_train_step` compiled on 8 CPU-emulated devices and measured as `benchmarks/third_party.py` "
         "measures (`measure`). **x hand**: ratio to the Megatron layout written by hand in the script (lower is "
         "better). **est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes over the compiled "
         "ones.")

OBSERVATIONS = """
## Observations (by hand)

Numbers from the table above unless said otherwise; "before" is this round's start (7c515f8).

- **The hand layouts** are Megatron as one writes it from the module code: GPT-2's fused q/k/v kernel split
  naively on its `3d` outputs (the name-blind `Dense_0` of each attention), StyleGAN2's convs in
  output-channel/input-channel pairs per synthesis block and per discriminator block, ResNet-18's basic
  blocks likewise; stems, shortcut projections, toRGB convs and the mapping network whole, fsdp on the pairs'
  other channel dim.
- **gpt2** (name-blind, untied head): tree-only and traced both split the fused q/k/v head-aligned (each
  rank holds whole heads of q, k and v) and the untied `Dense_0` head on the vocabulary: 0.56 / 0.87 / 0.49
  of the naive split (data=2,model=4), whose q/k/v pieces XLA reshards.
- **stylegan2-g `model`**, before: `tpflax.plan(..., model=)` raised "tpflax produced an invalid spec" (a
  noise constant `(1, h, w, 1)` split on its size-1 channel dim, read as the channels it is added to); with
  that fixed, 2.1x the collectives of the tree plan (the style dense paired as each conv's column) and an
  estimate 0.39 of the compiled collectives. Five changes (`tests/test_modulated_conv.py`): an operand's
  size-1 dims broadcast by an elementwise op hold copies; the FIR blur (a depthwise conv with a constant
  filter) passes its input's channels; a kernel whose one row per example scales a larger activation is no
  column of the conv reading the product (its split splits the input's gradient, which XLA gathers); a conv
  read by a narrow head conv (toRGB, 3 channels) and by later convs pairs with the head, gathered for the
  others; the estimate counts a weight's demodulation use as a second gradient part and a transposed conv's
  input gradient at its input's size. Now 0.759 / 0.919 / 0.951 of the hand layout and 0.98 of the tree plan's
  bytes and 0.96 of its collectives; estimate 0.984 (replicated: 0.526 -> 0.999).
- **stylegan2-d `model`**, before: the blur in every downsampling block ended the dataflow, so the traced plan
  kept the convs whole, 1.68x the bytes and 3.4x the flops of its tree plan. Now 0.849 / 0.918 / 0.962 of the
  hand layout (its top conv paired with the 2048 -> 128 dense that reads it).
- **Rows above the hand layout, all on fsdp=2,model=4, all the known fsdp trade** (`results/third_party.md`):
  stylegan2-d tree (1.064 comm) and resnet18 tree and `model` (1.021 comm) split their unpaired stems,
  shortcut projections and toRGB/fromRGB convs over fsdp, which the hand layout keeps whole: 0.3-1.3% fewer
  bytes per device for XLA:CPU's whole all-reduce plus gather of each; the chooser prices the reduce-scatter
  XLA:TPU emits.
- **The chooser prices a conv pair per example, not per position** (left open): `Context.tokens` counts the
  batch's examples for an image model and conv uses record no `tokens`, so a conv pair's activation
  collectives and flops are priced for one row per image, while the estimate prices positions. On a toy (a
  3x3 conv read by a 1x1 head and by a later conv, 8 images of 16x16) the chooser splits the pair: 0.75x the
  bytes and 0.70x the flops for 1.63x the collectives of keeping it whole. Priced at the 2,048 positions
  (a batch of 2,048 examples), step time favours the whole layout, but `choose.best` rules that out (it holds
  more bytes and flops), so the pick is the same; where two split layouts compete the per-example price can
  still mislead. Pricing conv pairs at their positions re-prices every traced conv pair of the zoo and the
  probes and needs their rows recompiled.
"""


if __name__ == "__main__":
    sys.exit(main())
