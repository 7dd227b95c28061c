"""tpflax's plans on flaxdiff's diffusion models (PyPI ``flaxdiff`` 0.2.x, ``flaxdiff.models``).

Tiny configs of SimpleDiT (adaLN-Zero, RoPE), SimpleMMDiT (SD3-style: separate time and text
modulations per block), the conv Unet (GroupNorm ResBlocks, cross-attention on text) and UViT (long
skips, a learned position table sliced to the patch count, a fused GEGLU), each trained with the
diffusion loss (MSE of the predicted noise; inputs: noisy image, timestep, text context, and the noise
as the target). Five plans per model and mesh, measured like ``benchmarks/linen_probe.py`` (its
``third_party.measure``): tree-only, traced (``model=``), a hand Megatron layout, replicated, pure FSDP.

    pip install --no-deps flaxdiff einops      # not a tpflax dependency
    python benchmarks/probe_flaxdiff.py                      # every model, both meshes
    python benchmarks/probe_flaxdiff.py --arch dit --mesh data=2,model=4

A run of every model, mesh and plan writes ``results/probe_flaxdiff.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, T_CTX, D_CTX = 8, 8, 32  # batch, text tokens, text width


def _stub_matplotlib() -> None:
    """flaxdiff's ``hilbert`` module (imported by every ViT-style model) imports matplotlib for its
    plotting helpers only; the models never call them. A stub keeps matplotlib out of the venv."""
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib") is not None:
        return
    mpl, plt, colors = (types.ModuleType(n) for n in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors"))
    colors.LinearSegmentedColormap = object
    mpl.pyplot, mpl.colors = plt, colors
    sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": plt, "matplotlib.colors": colors})


def available() -> str:
    """'' if flaxdiff's models import, else why not."""
    for mod in ("flaxdiff", "einops"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install --no-deps flaxdiff einops)"
    return ""


# ------------------------------------------------------------------ hand Megatron layouts
def _f(mesh):
    return "fsdp" if "fsdp" in mesh else None


def _attention_hand(f):
    from jax.sharding import PartitionSpec as P
    # NormalAttention: DenseGeneral q/k/v (in, heads, head_dim) split by heads, the output (heads, head_dim, out)
    return [(r"to_[qkv]/kernel$", P(f, "model", None)), (r"to_[qkv]/bias$", P("model", None)),
            (r"to_out_0/kernel$", P("model", None, f))]


def dit_hand(mesh):
    # Megatron on attention (heads) and the MLP (layers_0 column, layers_2 row); the adaLN modulation
    # kernels, the embedders and the final layer whole over model, the modulations fsdp on their input
    from jax.sharding import PartitionSpec as P
    f = _f(mesh)
    return [*_attention_hand(f),
            (r"mlp/layers_0/kernel$", P(f, "model")), (r"mlp/layers_0/bias$", P("model")),
            (r"mlp/layers_2/kernel$", P("model", f)),
            (r"ada_(proj|t_proj|text_proj)/kernel$", P(f, None)),
            (r".*", P())]


def uvit_hand(mesh):
    # Megatron on attention and the GEGLU MLP: the fused [linear | gate] up-projection split on its fused
    # dim as written (rules cannot interleave the halves), net_2 row; the long-skip denses fsdp only
    from jax.sharding import PartitionSpec as P
    f = _f(mesh)
    return [*_attention_hand(f),
            (r"ff/net_0/proj/kernel$", P(f, "model")), (r"ff/net_0/proj/bias$", P("model")),
            (r"ff/net_2/kernel$", P("model", f)),
            (r"up_dense_\d+/kernel$", P(f, None)),
            (r".*", P())]


def unet_hand(mesh):
    # Megatron on the attention (heads) and on each ResBlock's conv1 -> conv2 pair (conv1 and the time
    # projection added to its output split on output channels, norm2 with them, conv2 on input channels);
    # the other convs fsdp on output channels
    from jax.sharding import PartitionSpec as P
    f = _f(mesh)
    return [*_attention_hand(f),
            (r"conv1/conv/kernel$", P(None, None, None, "model")), (r"conv1/conv/bias$", P("model")),
            (r"temb_projection/kernel$", P(f, "model")), (r"temb_projection/bias$", P("model")),
            (r"norm2/(scale|bias)$", P("model")),
            (r"conv2/conv/kernel$", P(None, None, "model", f)),
            (r"^params/ConvLayer_2/", P()),  # the output conv: 3 channels
            (r"conv/kernel$", P(None, None, None, f)),  # the other convs
            (r".*", P())]


# ------------------------------------------------------------------ builders
def _models():
    _stub_matplotlib()
    from flaxdiff.models.simple_dit import SimpleDiT
    from flaxdiff.models.simple_mmdit import SimpleMMDiT
    from flaxdiff.models.simple_unet import Unet
    from flaxdiff.models.simple_vit import UViT

    # published: DiT-B 768 wide, 12 heads of 64, mlp_ratio 4; tiny: 64 wide, 4 heads of 16, mlp_ratio 4
    vit = dict(output_channels=4, emb_features=64, num_heads=4)
    return {
        "dit": (SimpleDiT(patch_size=4, num_layers=2, mlp_ratio=4, **vit), (32, 32, 4), dit_hand),
        "dit-hilbert": (SimpleDiT(patch_size=4, num_layers=2, mlp_ratio=4, use_hilbert=True, **vit),
                        (32, 32, 4), dit_hand),
        "mmdit": (SimpleMMDiT(patch_size=4, num_layers=2, mlp_ratio=4, **vit), (32, 32, 4), dit_hand),
        # UViT's position table has (512 / patch)^2 rows whatever the image: patch 8 keeps it 4,096 rows
        "uvit": (UViT(patch_size=8, num_layers=4, dropout_rate=0.0, norm_groups=0, **vit), (32, 32, 4),
                 uvit_hand),
        # published: depths (64, 128, 256, 512), 8 heads everywhere, 2 res blocks; tiny: 3 levels, 4 heads
        "unet": (Unet(output_channels=3, emb_features=64, feature_depths=(32, 64, 128),
                      attention_configs=({"heads": 4},) * 3, num_res_blocks=2), (16, 16, 3), unet_hand),
    }


NAMES = ("dit", "dit-hilbert", "mmdit", "uvit", "unet")


def _mse(pred, x, t, ctx, noise):
    return ((pred - noise) ** 2).mean()


def build(name: str):
    """(Built, hand) for one flaxdiff model: concrete parameters, the diffusion loss."""
    import jax
    import jax.numpy as jnp
    from third_party import Built

    m, hwc, hand = _models()[name]
    sample = (jax.ShapeDtypeStruct((B, *hwc), jnp.float32), jax.ShapeDtypeStruct((B,), jnp.float32),
              jax.ShapeDtypeStruct((B, T_CTX, D_CTX), jnp.float32), jax.ShapeDtypeStruct((B, *hwc), jnp.float32))
    zeros = [jnp.zeros(s.shape, s.dtype) for s in sample[:3]]
    variables = jax.jit(m.init)(jax.random.key(0), *zeros)

    def fn(v, x, t, ctx, noise):  # the noise is the loss's target only
        return m.apply(v, x, t, ctx)

    return Built(name, m, variables, sample, fn, _mse), hand


# ------------------------------------------------------------------ run
def main(argv=None):
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_flaxdiff.md", title="# tpflax on flaxdiff's diffusion models",
                      intro=lambda line: line.replace(
                          "`python benchmarks/linen_probe.py` (generated).", "`python benchmarks/probe_flaxdiff.py` "
                          "(generated; flaxdiff 0.2.11, tiny configs, the diffusion MSE loss). The rest of this "
                          "paragraph is linen_probe's:"), tail=OBSERVATIONS, available=available)



OBSERVATIONS = """
## Observations (by hand, branch probe-flaxdiff)

Fixed on this branch (before -> after, x hand bytes / comm / flops):

- dit, mmdit `model`: the adaLN modulation Dense sits in a submodule of its own (`AdaLNParams`, `MMAdaLNZero`),
  so the trace did not find the stream it scales; split, XLA feature-split the residual stream (dit data:
  0.544 / 1.260 / 0.803, est. 0.644 -> 0.831 / 1.003 / 0.935, est. 1.083; mmdit data: 0.557 / 1.161 / 0.791,
  est. 0.665 -> 0.847 / 1.143 / 0.919, est. 1.126).
- uvit: every estimate was 1.30x-1.67x of the compiled collectives (the 4,096-row position table's gradient
  counted whole; XLA sums the 16 rows read): now 1.000 on every row.
- uvit `tree` data: the head `final_proj` (64 -> 256) paired "fused by shape" with one of the two long-skip
  projections (128 -> 64): 1.010 / 2.230 / 0.765 -> 1.000 / 1.000 / 1.000.
- unet `tree`: cross-attention kernels oriented by the commonest norm width (32 = the text width = head_dim):
  1.791 / 2.313 / 1.751 (worse than replicated on collectives), est. 0.491 -> 1.985 / 1.133 / 2.067, est. 1.000.

Fixed in the next round (same command):

- unet `tree`: flaxdiff wraps every conv in a `ConvLayer` module of its own (`conv1/conv`, `conv2/conv`), so the
  tree found no ResBlock conv1 -> conv2 chain. A wrapper holding only a conv now names it:
  1.985 / 1.133 / 2.067 -> 1.200 / 0.731 / 1.630 (data), 1.686 / 1.459 / 2.060 -> 1.112 / 0.816 / 1.630 (fsdp).
  The rest is the `min_channels=64` floor: the tiny blocks have 32 channels (published: 128 and up), and
  `min_channels=0` gives 1.025 / 1.069 / 1.000 (data), 0.953 / 1.082 / 0.999 (fsdp). A floor of 0 by default was
  measured and not taken (transformers' wav2vec2, traced: its 32-channel feature extractor split at 3.4x the
  hand layout's collectives).
- dit, mmdit `model`: the time and text embedders (`time_embed/layers_2`, `text_context_proj`) were split as lone
  columns and every block's whole modulation kernels read them, so XLA updated those kernels on the split shard
  and gathered them and both adam moments back (12 gathers in mmdit), which the chooser never priced. A lone
  column now prices the update gathers of the whole leaves its split reaches, and the estimate sums their
  gradients on the shard: mmdit data 0.847 / 1.143 / 0.919 (est. 1.126) -> 0.860 / 0.886 / 0.965 (est. 1.000);
  dit data 0.831 / 1.003 / 0.935 (est. 1.083) -> 0.854 / 0.875 / 0.964 (est. 1.000); fsdp estimates 1.14 -> 1.005.

Still above the hand layout (left for later):

- unet `tree`: 1.630x the flops (the 32-channel floor above). In the thirty-first round each ResBlock's
  `temb_projection`, added to its first conv's output channels, began to split with them as the hand layout
  splits it (`planner/heuristics.py` `_conv_chains`): 1.200 / 0.731 / 1.630 -> 1.181 / 0.679 / 1.630 (data),
  1.112 / 0.816 / 1.630 -> 1.100 / 0.793 / 1.630 (fsdp), estimates 1.001 and 1.000. `model` fsdp=2,model=4:
  1.048x the collectives for 0.933x the bytes (the fsdp chooser's step-time trade).
- uvit fsdp=2,model=4 `tree` 1.207x and `model` 1.194x the collectives for 0.87-0.91x the bytes: more fsdp than
  the hand layout (the 1 MiB position table, the long-skip projections); the chooser's step-time trade on the
  tpu-v5e preset, which the CPU collectives do not weigh.
- dit/mmdit fsdp=2,model=4 `tree`: 1.105x / 1.092x the collectives for 0.94x the bytes (the same fsdp trade).
"""


if __name__ == "__main__":
    sys.exit(main())
