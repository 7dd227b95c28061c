"""tpflax's plans on jax-models' vision models (PyPI ``jax-models`` 0.0.5, linen), tree-only and traced.

jax-models collects 2022 Flax ports of vision architectures the other probes lack: CaiT (talking-heads
attention, class attention, layer scale), the Pyramid ViT (spatial-reduction attention: keys and values from a
strided conv of the tokens), SegFormer (Mix-FFN with a depthwise conv between its two dense layers; an MLP
decoder that projects every stage, resizes it to the first stage's resolution and fuses the concatenation),
VAN (large-kernel attention: depthwise, dilated depthwise and 1x1 convs gating their input), ConvNeXt, Swin
and PatchConvNet. Tiny widths (``MODELS`` in the script), 32x32 images, batch 8. No layout ships with these
models and none is written by hand here: each tpflax plan is set beside replicated and pure FSDP (the
tree-only target: never worse than either on every number) and beside the other tpflax plan, and each estimate
beside its compiled step.

    pip install --no-deps jax-models==0.0.5
    python benchmarks/probe_jaxmodels.py                 # every model, both meshes (about 4 min)
    python benchmarks/probe_jaxmodels.py --arch segformer --mesh data=2,model=4

Three of its modules compute their drop-path rates with ``jnp.linspace(...)`` and ``.item()`` inside
``__call__``, which no ``jit`` can trace; :func:`available` points their ``jnp`` at one whose ``linspace`` is
NumPy's (the rates are constants). A run of everything writes ``results/probe_jaxmodels.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, IMAGE = 8, 32
PLANS = ("tree", "model", "replicated", "fsdp")
MESHES = ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4})


def available() -> str:
    """'' if jax-models imports (its three traced ``linspace`` calls pointed at NumPy's), else why not."""
    if importlib.util.find_spec("jax_models") is None:
        return "jax-models is not installed (pip install --no-deps jax-models==0.0.5)"
    import jax.numpy as jnp
    import jax_models.models as M
    import numpy as np

    class _Jnp:
        linspace = staticmethod(np.linspace)

        def __getattr__(self, name):
            return getattr(jnp, name)

    for mod in (M.convnext, M.swin_transformer, M.pvit, M.segformer, M.van):
        mod.jnp = _Jnp()
    return ""


def models() -> dict:
    """``{name: (module factory, call kwargs)}`` at tiny widths (the published ones in comments)."""
    import jax_models.models as M

    det = {"deterministic": True}
    return {
        # cait_xxs24: patch 16, d 192, 24 + 2 blocks, 4 heads
        "cait": (lambda: M.cait.CaiT(patch_size=8, embed_dim=64, depth=2, num_heads=4, depth_token_only=1,
                                     num_classes=10, **det), {}),
        # pvit_b0: d (32, 64, 160, 256), heads (1, 2, 5, 8), mlp (8, 8, 4, 4), sr (8, 4, 2, 1)
        "pvt": (lambda: M.pvit.PyramidViT(patch_size=4, embed_dims=(32, 64, 128, 128), num_heads=(1, 2, 4, 4),
                                          mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1),
                                          num_classes=10, **det), {}),
        # segformer_b0: d (32, 64, 160, 256), heads (1, 2, 5, 8), decoder 256
        "segformer": (lambda: M.segformer.SegFormer(4, (32, 64, 128, 128), (1, 2, 4, 4), 0.0, 0.0, 0.0, (1, 1, 1, 1),
                                                    (8, 4, 2, 1), attach_head=True, num_classes=5, decoder_emb=64,
                                                    **det), {}),
        # van_tiny: d (32, 64, 160, 256), mlp (8, 8, 4, 4), depths (3, 3, 5, 2)
        "van": (lambda: M.van.VAN(embed_dims=(32, 64, 128, 128), mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 1, 1),
                                  num_classes=10, **det), det),
        # convnext_tiny: d (96, 192, 384, 768), depths (3, 3, 9, 3)
        "convnext": (lambda: M.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(32, 64, 128, 128), num_classes=10,
                                                 **det), {}),
        # swin_tiny_224: d 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7
        "swin": (lambda: M.swin_transformer.SwinTransformer(patch_size=4, emb_dim=32, depths=(2, 2), num_heads=(2, 4),
                                                            window_size=4, num_classes=10, drop_path=0.0, **det), {}),
        # patchconvnet_s60: d 384, depth 60, mlp 3
        "patchconvnet": (lambda: M.patchconvnet.PatchConvNet(depth=2, dim=64, mlp_ratio=3, num_classes=10,
                                                             dropout=0.0, **det), {}),
    }


def _xent(out, x):
    import jax.numpy as jnp
    import optax

    out = out.reshape(out.shape[0], -1)
    return optax.softmax_cross_entropy_with_integer_labels(out, jnp.zeros(out.shape[0], jnp.int32)).mean()


def _mse(out, x):
    import jax.numpy as jnp

    return jnp.mean(out ** 2)


def build(name: str):
    """The model's Built: concrete variables (jax-models' initialisers do not trace), its loss."""
    import jax
    import jax.numpy as jnp
    from third_party import Built

    make, kw = models()[name]
    m = make()
    sample = (jax.ShapeDtypeStruct((B, IMAGE, IMAGE, 3), jnp.float32),)
    variables = m.init(jax.random.key(0), jnp.zeros(sample[0].shape), **kw)
    return Built(name, m, variables, sample, lambda v, x: m.apply(v, x, **kw), _mse if name == "segformer" else _xent)


def run(names, meshes):
    from linen_probe import fsdp_rules
    from third_party import measure, mesh_label

    import tpflax

    rows = []
    for name in names:
        built = build(name)
        for mesh in meshes:
            calls = {"tree": {"batch": built.sample},
                     "model": {"model": built.fn, "sample": built.sample, "batch": built.sample},
                     "replicated": {"rules": [(r".*", "replicate")]}, "fsdp": {"rules": fsdp_rules(built.params, mesh)}}
            for plan, kw in calls.items():
                r = measure(name, mesh, plan, tpflax.plan(built.params, mesh, **kw), built)
                rows.append(r)
                print(f"{name:<13}{mesh_label(mesh):<16}{plan:<11}"
                      f"{r.error or f'{r.bytes:.0f} B  {r.comm:.0f} comm  {r.flops:.4g} fl  est {r.est_comm / r.comm:.3f}'}",
                      flush=True)
    return rows


def markdown(rows) -> str:
    from linen_probe import closing_lists

    def ratio(a, b):
        return f"{a / b:.3f}" if a is not None and b else "-"

    by = {(r.arch, r.mesh, r.plan): r for r in rows}
    out = ["# tpflax on jax-models' vision models", "", INTRO, "",
           "| model | mesh | plan | bytes/device | comm/step | flops/device | x replicated (bytes / comm / flops) | "
           "est. |", "|---|---|---|---:|---:|---:|---|---:|"]
    worse, off = [], []
    for r in rows:
        if r.error:
            out.append(f"| {r.arch} | {r.mesh} | {r.plan} | {r.error} | | | | |")
            continue
        rep = by.get((r.arch, r.mesh, "replicated"))
        xs = [ratio(getattr(r, k), getattr(rep, k)) for k in ("bytes", "comm", "flops")]
        est = ratio(r.est_comm, r.comm)
        out.append(f"| {r.arch} | {r.mesh} | {r.plan} | {r.bytes:,.0f} | {r.comm:,.0f} | {r.flops:.4g} | "
                   f"{' / '.join(xs)} | {est} |")
        if r.plan == "tree":
            for other in ("replicated", "fsdp"):
                o = by.get((r.arch, r.mesh, other))
                if o and all(getattr(r, k) >= getattr(o, k) * 1.005 for k in ("bytes", "flops")):
                    worse.append(f"- {r.arch} {r.mesh} tree: no fewer bytes or flops than {other}")
        if est != "-" and abs(float(est) - 1) > 0.10:
            off.append(f"- {r.arch} {r.mesh} {r.plan}: estimate {est} of the compiled collectives")
    out += closing_lists("Tree-only plans with no fewer bytes and flops per device than replicated or pure FSDP:",
                         worse, off)
    return "\n".join(out) + "\n" + OBSERVATIONS


INTRO = ("`python benchmarks/probe_jaxmodels.py` (generated; jax-models 0.0.5 with jax 0.10). Tiny widths "
         "(`models()` in the script), 32x32 images, batch 8, softmax cross-entropy (SegFormer: the mean square of "
         "its segmentation map); the adamw train step of `tpflax.make_train_step` compiled on 8 CPU-emulated "
         "devices and measured as `benchmarks/third_party.py` measures (`measure`). **x replicated**: ratio to "
         "every leaf whole (lower is better). **est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` "
         "collective bytes over the compiled ones.")

OBSERVATIONS = """
## Observations (by hand)

Numbers from the table above unless said otherwise; "before" is this round's start (91a1d03).

- **segformer `model`**: the decoder projects every stage with a lone dense (`MLPHead_i`), resizes the three
  coarser ones to the first stage's resolution and concatenates the four. The chooser split the two coarsest
  heads, pricing their gathers at the rows they read (1/16 and 1/64 of the first stage's); XLA carries the split
  through `jax.image.resize` and gathers at the fine resolution. Before: 0.264 / 0.872 / 0.222 of replicated,
  estimate 0.715 of the compiled collectives (data=2,model=4). The trace now records the rows a split reaches
  through an interpolation (`Dataflow.grown`) and both the chooser and the estimate price the gather there
  (`tests/test_upsampled_heads.py`): the heads stay whole, 0.268 / 0.677 / 0.237, estimate 0.932.
- **van `model`**: each attention gates its projected input with a 1x1 conv of it (`u * attn`); the trace pairs
  that conv with the output projection through the product. Split, it makes the gradient of `u`, and so of
  `proj_1` and the depthwise convs behind it, split: XLA:CPU runs their updates split and gathers them back. The
  estimate now follows a split through a product of two kernels' outputs (`Dataflow.gated`,
  `tests/test_gated_input.py`): 0.869 -> 0.976 of the compiled collectives (data=2,model=4). XLA also runs the
  depthwise chain on split channels forward and gathers the 1x1 conv's input, which the estimate does not model.
- **convnext `tree`**: one module per block and no stage module above them, so the first stage's MLP was oriented
  by the later stages' width (`pwconv1` read as a row, a feature-split residual stream): before 0.722 / 0.814 /
  0.415 of replicated (data=2,model=4). A block's own norms of one width now give its residual width
  (`tests/test_stage_widths.py`): the traced plan, 0.726 / 0.589 / 0.620.
- **cait `model`** is above its own tree plan on bytes and flops (0.565 / 0.916 / 0.528 against 0.435 / 1.009 /
  0.315 of replicated, data=2,model=4): talking-heads attention mixes the heads of the scores with two dense
  layers over the heads dim (`proj_l`, `proj_w`), so the fused `qkv` kernel's heads reach a contraction other than
  the output projection and the trace keeps `qkv` and `proj` whole, splitting the 4x4 head-mixing kernels
  instead. Pairing `qkv` with `proj_l` and `proj` together (the scores' head mixing summed over model) is a
  layout the chooser has no candidate for; left open.
- **swin**: tree-only and traced plans are the same, 1.34x replicated's collectives for 0.54x its bytes and 0.44x
  its flops (the chooser's step-time trade at these widths).
- **pvt `model`**: estimate 0.914 and 0.939 of the compiled collectives: the spatial-reduction attention's strided
  conv pairs with the key/value projection across a LayerNorm; within 10%, not broken down.
"""


def main(argv=None) -> int:
    from third_party import mesh_label

    why = available()
    if why:
        print(f"probe_jaxmodels: skipped: {why}")
        return 0
    names = list(models())
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="*", default=names, choices=names)
    ap.add_argument("--mesh", nargs="*", default=[mesh_label(m) for m in MESHES])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    meshes = [{k: int(v) for k, v in (kv.split("=") for kv in m.split(","))} for m in args.mesh]
    rows = run(args.arch, meshes)
    if not args.no_write and set(args.arch) == set(names) and len(meshes) == len(MESHES):
        path = Path(__file__).resolve().parent / "results" / "probe_jaxmodels.md"
        path.write_text(markdown(rows))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
