"""A Mamba block's fused ``in_proj`` ``[x | z]``: the naive split's reshards, and what removes them.

Run: python benchmarks/fused_xz.py   (about a minute on 2 cores)
Writes benchmarks/results/fused_xz.md. Issue 11 asks that a fused kernel be split piece-aligned
(each tensor rank holding matching channels of every piece) by permuting the fused dim at placement
or sharding a reshaped view, with communication no larger than separate kernels. tests/test_ssm.py's
selective-SSM LM computes ``x, z = jnp.split(in_proj(h), 2, -1)``; the plan (= the hand layout) splits
``in_proj``'s fused dim contiguously over model=4, so ranks 0-1 hold x and ranks 2-3 hold z and XLA
reshards both after the split (forward) and before the concatenate (backward). Each row below
compiles the adamw step on 8 CPU-emulated devices with every other leaf laid out as the plan lays
it; only ``in_proj``'s storage and how the block computes x and z change:

* ``naive``: the model as written, the plan's specs.
* ``sep``: two kernels ``in_x``, ``in_z`` (d -> d_inner each), both column-split: the target.
* ``whole``: ``in_proj`` kept whole.
* ``perm-unperm``: stored permuted (rank r's contiguous shard is ``[x_r | z_r]``), un-permuted
  inside the step (reshape, transpose, reshape), then the model as written.
* ``perm-view``: stored permuted, the matmul on a ``(d, ranks, 2, d_inner/ranks)`` view, its output
  transposed and merged back before the split.
* ``slices``: stored as is, x and z computed apart from the kernel's two halves.
* ``perm-slices``: stored permuted, x and z computed apart from the ``(d, ranks, 2, ...)`` view's
  two pieces (each a contiguous split of d_inner).
* ``perm-einsum``: stored permuted, one matmul on the view giving ``(b, l, ranks, 2, d_inner/ranks)``,
  x and z indexed on its pieces dim and merged ``(ranks, d_inner/ranks)`` (a major split, which a
  sharding holds).
* ``aligned``: the model as written, planned with ``tpflax.plan(..., model=, fused="aligned")``: ``in_proj``
  stored head-aligned (``Interleave``, rank r's block ``[x_r | z_r]``) and the step run through
  ``tpflax.aligned`` by ``make_train_step``. ``tree aligned``: the same from a tree-only plan.
  Below each table, ``tpflax.estimate``'s collective bytes for these two beside the compiled ones.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_ssm import DI, D, V, selective_ssm  # noqa: E402  (the model the test plans, and its sizes)

OUT = Path(__file__).parent / "results" / "fused_xz.md"
N = 4  # tensor ranks (model=4): the permuted storage's rank dim
SAMPLE = (jax.ShapeDtypeStruct((8, 16), jnp.int32),)
MESHES = ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4})
MODES = ("naive", "sep", "whole", "perm-unperm", "perm-view", "slices", "perm-slices", "perm-einsum",
         "aligned", "tree aligned")
ALIGNED = ("aligned", "tree aligned")  # tpflax.plan(..., fused="aligned"), with model= and tree-only


def _xz(mode: str, mod: nn.Module, h):
    if mode in ("naive", "whole"):
        return jnp.split(nn.Dense(2 * DI, use_bias=False, name="in_proj")(h), 2, -1)
    if mode == "sep":
        return nn.Dense(DI, use_bias=False, name="in_x")(h), nn.Dense(DI, use_bias=False, name="in_z")(h)
    w = mod.param("in_proj", nn.initializers.lecun_normal(), (D, 2 * DI))
    w4 = w.reshape(D, N, 2, DI // N)  # permuted storage: dim 1 is the rank, dim 2 the piece
    if mode == "perm-unperm":
        return jnp.split(h @ w4.transpose(0, 2, 1, 3).reshape(D, 2 * DI), 2, -1)
    if mode == "perm-view":
        return jnp.split(jnp.einsum("bld,dnkw->blknw", h, w4).reshape(h.shape[:2] + (2 * DI,)), 2, -1)
    if mode == "perm-einsum":
        y = jnp.einsum("bld,dnkw->blnkw", h, w4)
        return y[:, :, :, 0].reshape(h.shape[:2] + (DI,)), y[:, :, :, 1].reshape(h.shape[:2] + (DI,))
    if mode == "slices":
        return h @ w[:, :DI], h @ w[:, DI:]
    return h @ w4[:, :, 0].reshape(D, DI), h @ w4[:, :, 1].reshape(D, DI)  # perm-slices


class Block(nn.Module):
    mode: str

    @nn.compact
    def __call__(self, h):
        return selective_ssm(self, h, *_xz(self.mode, self, nn.RMSNorm(name="norm")(h)))


class Mamba(nn.Module):
    mode: str = "naive"

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        for i in range(2):
            h = Block(self.mode, name=f"layers_{i}")(h)
        return nn.Dense(V, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm_f")(h))


def _loss(out, ids):
    return jnp.mean(out ** 2)


def measure(mode: str, mesh_shape: dict, base) -> dict:
    m = Mamba("naive" if mode in ALIGNED else mode)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    if mode in ALIGNED:  # tpflax's own plan (model=: base's specs, in_proj stored head-aligned; tree-only: its own)
        kw = {"model": m, "sample": SAMPLE} if mode == "aligned" else {}
        plan = tpflax.plan(v, mesh_shape, fused="aligned", **kw)
    else:
        spec = P() if mode == "whole" else base.decisions["params/layers_0/in_proj/kernel"].spec
        rules = [(r"in_proj(/kernel)?$", spec), (r"in_[xz]/kernel$", spec)]
        rules += [(k + "$", d.spec) for k, d in base.decisions.items() if "in_proj" not in k]
        plan = tpflax.plan(v, mesh_shape, rules=rules)
    mesh = tpflax.make_mesh(mesh_shape)
    step = tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(step, plan, mesh)
    mem = dr.memory
    est = tpflax.estimate(plan, optax.adamw(1e-3), model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    return {"peak": mem["peak"], "comm": dr.comm_total, "flops": dr.flops, "by": dr.comm(),
            "laid": sum(d.layout is not None for d in plan.decisions.values()), "est": est.comm_total}


def same_function(mode: str) -> float:
    """``mode`` on the permuted kernel against the model as written: the largest output difference."""
    ids = jnp.arange(8 * 16, dtype=jnp.int32).reshape(8, 16) % V
    v = Mamba("naive").init(jax.random.key(0), ids)
    def perm(path, x):
        if jax.tree_util.keystr(path).endswith("'in_proj']['kernel']"):
            return x.reshape(D, 2, N, DI // N).transpose(0, 2, 1, 3).reshape(D, 2 * DI)
        return x
    p = jax.tree_util.tree_map_with_path(perm, v)
    p = {"params": {k: ({**b, "in_proj": b["in_proj"]["kernel"]} if "in_proj" in b else b)
                    for k, b in p["params"].items()}}
    a, b = Mamba("naive").apply(v, ids), Mamba(mode).apply(p, ids)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def main() -> int:
    lines = ["# Fused [x | z]: the naive split's reshards, and what removes them", "",
             "`python benchmarks/fused_xz.py`: tests/test_ssm.py's selective-SSM LM (d 64, d_inner 128, "
             "2 blocks), adamw step compiled on 8 CPU-emulated devices. Collective bytes are ring bytes "
             "each device sends per step (`tpflax.hlo`); peak is XLA's per-device peak. See the script's "
             "docstring for the rows.", ""]
    for ms in MESHES:
        m = Mamba()
        base = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), *SAMPLE), ms, model=m, sample=SAMPLE)
        rows = {mode: measure(mode, ms, base) for mode in MODES}
        lines += [f"## mesh {ms}", "", "| layout | peak/device | comm/step | vs naive | flops/device | collectives |",
                  "|---|---|---|---|---|---|"]
        for mode, r in rows.items():
            by = ", ".join(f"{k} {a} {b:,.0f}" for k, v in sorted(r["by"].items()) for a, b in sorted(v.items()))
            lines.append(f"| {mode} | {r['peak']:,} | {r['comm']:,.0f} | {r['comm'] / rows['naive']['comm']:.2f}x "
                         f"| {r['flops']:.4g} | {by} |")
        lines += ["", "The estimate's collective bytes (`tpflax.estimate(plan, adamw, model=..., backend=\"cpu\")"
                  ".comm_total`) for tpflax's plans beside the compiled ones: "
                  + "; ".join(f"{mode} ({rows[mode]['laid']} leaves laid out) {rows[mode]['est']:,.0f} vs "
                              f"{rows[mode]['comm']:,.0f} ({rows[mode]['est'] / rows[mode]['comm']:.3f}x)"
                              for mode in ("naive", *ALIGNED)) + ".", ""]
    lines += [f"On the permuted kernel, perm-slices and perm-einsum compute the model's function: largest "
              f"output difference {same_function('perm-slices'):.2g} and {same_function('perm-einsum'):.2g} "
              "against the model as written on the unpermuted kernel (one device).", "",
              "Storage alone does not remove the reshards: permuted and un-permuted in the step, or read "
              "through a view merged back before the split, the flat fused dim cannot hold a piece-aligned "
              "sharding, so XLA reshards the activations (or the kernel) there, more than the naive split. "
              "Only permuted storage with x and z computed apart (each from its piece of the stored view) "
              "reaches the separate kernels' collectives, and one matmul on the view, indexed on its pieces "
              "dim, goes below them (one all-reduce of the input gradient per block instead of two). Both "
              "need the step to rewrite the model's matmul + split, not a placement alone."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
