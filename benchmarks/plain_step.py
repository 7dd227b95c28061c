"""Which train step the estimate's communication describes: tpflax's step vs a plain `jax.jit` step.

Run: python benchmarks/plain_step.py
Writes benchmarks/results/plain_step.md. For each zoo model and mesh it compiles, on 8
CPU-emulated devices, (a) `tpflax.make_train_step` (which constrains the gathered
weights and the batch inside the step) and (b) the hand-written step the README's
"Apply" section teaches: `jax.value_and_grad` + `tx.update` under `jax.jit` with the
plan's in/out shardings and the loss wrapped in `tpflax.gathered_loss(loss, plan, mesh)`
(ZeRO-3, a scanned stack gathered one layer at a time), and (c) the same step with
nothing constrained inside. All are compared with `tpflax.estimate(..., backend="cpu")`,
collective bytes per step (ring bytes one device sends, `tpflax.hlo`). Issue 11 asks
that the estimate describe the step users actually write, or say which step it is for.
FLOPs are read as `tpflax.dry_run` reads them: XLA's cost analysis counts a `while`
body once, so the dot flops of a scan's further iterations are added from the HLO.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402
from tpflax import hlo, zoo  # noqa: E402
from tpflax._src.compiled import read_flops  # noqa: E402

MODELS = ("llama", "llama-scan", "gpt2", "vit", "moe")
MESHES = ({"fsdp": 4, "model": 2}, {"data": 2, "model": 4}, {"fsdp": 8})
BATCH = 8


def plain_comm(m, plan, mesh, tx, how: str) -> tuple[float, float]:
    """(collective bytes, flops) of a hand-written jitted step: the README's (``how="readme"``: the loss in
    ``gathered_loss``), the params pinned by ``constrain(..., gathered=True)`` in the loss (``"constrain"``),
    or a bare one (``"bare"``)."""
    def train_step(variables, opt_state, batch):
        loss_fn = lambda p: m.loss({"params": p}, batch)  # noqa: E731
        if how == "readme":
            loss_fn = tpflax.gathered_loss(loss_fn, plan, mesh)
        elif how == "constrain":
            loss_fn = lambda p: m.loss({"params": tpflax.constrain(p, plan, mesh, gathered=True)}, batch)  # noqa: E731
        loss, g = jax.value_and_grad(loss_fn)(variables["params"])
        updates, opt_state = tx.update(g, opt_state, variables["params"])
        return {"params": optax.apply_updates(variables["params"], updates)}, opt_state, loss

    av = m.abstract_variables()
    ao = jax.eval_shape(tx.init, av["params"])
    sh, osh = tpflax.shardings(plan, mesh), tpflax.optimizer_shardings(tx, plan, mesh)
    step = jax.jit(train_step, in_shardings=(sh, osh, tpflax.batch_sharding(mesh)),
                   out_shardings=(sh, osh, None), donate_argnums=(0, 1))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), m.make_batch(0, BATCH))
    compiled = step.lower(av, ao, batch).compile()
    text = compiled.as_text()
    comm = sum(hlo.summarize(hlo.parse_collectives(text, mesh)).values())  # loop trips counted
    return comm, read_flops(compiled, [], text) or 0.0  # as dry_run reads them: a scan's every trip counted


def row(name: str, shape: dict) -> dict:
    m = zoo.get(name)
    plan = tpflax.plan(m.abstract_variables(), shape)
    mesh = tpflax.make_mesh(shape)
    tx = optax.adamw(1e-3)
    dr = tpflax.dry_run(tpflax.make_train_step(m, plan, mesh, tx, BATCH), plan, mesh)
    est = tpflax.estimate(plan, tx, model=m, batch=BATCH, backend="cpu").comm_total
    (readme, _), (pinned, _), (plain, f_plain) = (plain_comm(m, plan, mesh, tx, h)
                                                  for h in ("readme", "constrain", "bare"))
    return {"model": name, "mesh": ",".join(f"{k}={v}" for k, v in shape.items()), "estimate": est,
            "tpflax": dr.comm_total, "readme": readme, "constrain": pinned, "plain": plain,
            "flops": f_plain / dr.flops if dr.flops else float("nan")}


def err(est: float, got: float) -> str:
    return f"{(est - got) / got * 100:+.1f}%" if got else ("exact" if not est else "n/a")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "plain_step.md"))
    args = ap.parse_args()
    rows = [row(n, s) for n in MODELS for s in MESHES]
    lines = ["# Which step the estimate describes: tpflax's step vs a plain `jax.jit` step", "",
             "`python benchmarks/plain_step.py`. Collective bytes per step (ring bytes one device sends), "
             f"adamw, batch {BATCH}, 8 CPU-emulated devices, jax {jax.__version__}. **tpflax** = "
             "`tpflax.make_train_step`; **README** = the README's Apply step (`jax.jit` with the plan's "
             "in/out shardings, the loss wrapped in `tpflax.gathered_loss(loss, plan, mesh)`); **constrain** = the same step with "
             "`tpflax.constrain(p, plan, mesh, gathered=True)` on the params in the loss instead (a scanned stack "
             "gathered whole before the scan); **bare** = the same step with neither; **bare / tpflax flops**: per-device flops, a scan's every trip counted; **estimate** = `tpflax.estimate(plan, adamw, "
             "model=m, batch=8, backend=\"cpu\")`; errors are the estimate's against each.", "",
             "| model | mesh | estimate | tpflax step | error | README step | error | constrain step | error | "
             "bare step | error | bare / tpflax flops |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mesh']} | {r['estimate']:,.0f} | " + " | ".join(
            f"{r[k]:,.0f} | {err(r['estimate'], r[k])}" for k in ("tpflax", "readme", "constrain", "plain")) + f" | {r['flops']:.2f} |")
    for k, name in (("tpflax", "tpflax's step"), ("readme", "the README's step"), ("constrain", "the constrain step"),
                    ("plain", "the bare step")):
        worst = max(rows, key=lambda r: abs(r["estimate"] - r[k]) / max(r[k], 1))
        lines.append(f"\nLargest estimate error against {name}: {worst['model']} {worst['mesh']}: "
                     f"{err(worst['estimate'], worst[k])}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
