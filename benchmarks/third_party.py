"""tpflax's plans on models nobody here wrote: transformers' Flax classes vs a hand Megatron layout.

For every architecture in ``benchmarks/hf_models.py`` (transformers 4.57.x, tiny
configs with the published ratios) and every mesh, five plans:

* ``tree``: ``tpflax.plan(params, mesh)`` (the tree heuristics alone);
* ``model``: ``tpflax.plan(params, mesh, model=fn, sample=...)`` with ``fn`` the
  model's own apply, ``lambda p, *x: hf_model(*x, params=p).logits``;
* ``megatron``: the layout written by hand (``benchmarks/megatron_rules.py``);
* ``replicated``: every leaf whole on every device;
* ``fsdp``: every leaf's largest dim that divides the fsdp (or data) axis split
  over it, nothing over ``model``.

Each plan is measured from the compiled adamw train step
(``tpflax.make_train_step`` + ``tpflax.dry_run`` on 8 CPU-emulated devices):

* bytes per device: XLA's argument + temp + output - alias (outputs that reuse a
  donated argument's buffer are counted once);
* collective bytes per step: the compiled HLO's collectives (``tpflax.hlo``),
  ring-priced like the estimate;
* flops per device: XLA's cost analysis;

and ``tpflax.estimate(plan, adamw, model=fn, sample=..., backend="cpu")``'s
collective bytes beside the compiled ones. Results: ``benchmarks/results/third_party.md``
(and ``third_party.json``, the raw rows, which also lets a run resume).

    pip install -e ".[thirdparty]"
    python benchmarks/third_party.py                        # everything (~35 min on 2 shared cores)
    python benchmarks/third_party.py --arch bert gpt2 --mesh data=2,model=4

``--tpu-widths`` runs ``benchmarks/third_party_tpu.py`` instead: published widths,
2 layers, abstract parameters, compiled for ``tpu-v5e:2x4`` by the TPU compiler
(results in ``benchmarks/results/third_party_tpu.md``).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import hashlib
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_models import ARCHS, BY_NAME, Arch, Built  # noqa: E402
from megatron_rules import megatron_rules  # noqa: E402

PLANS = ("tree", "model", "megatron", "replicated", "fsdp")
MESHES = ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4})
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Numbers:
    """The three numbers of one plan, plus the estimate's collective bytes."""

    arch: str
    mesh: str
    plan: str
    bytes: float | None = None
    comm: float | None = None
    flops: float | None = None
    est_comm: float | None = None
    error: str = ""
    seconds: float = 0.0
    sharded_leaves: int = 0
    # plan_hash(plan) of the plan compiled; "" in rows measured before it was recorded
    plan_hash: str = ""


def mesh_label(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def mesh_entry(e: Any, mesh: dict[str, int]) -> Any:
    """A library's PartitionSpec entry on ``mesh``: its mesh axes of size 1 (or not in the mesh) dropped, as
    the libraries themselves drop them before placing (MaxText's ``remove_size_one_mesh_axis``)."""
    axes = tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a is not None and mesh.get(a, 1) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def next_token_loss(logits: Any, ids: Any) -> Any:
    """Next-token cross-entropy of a language model's ``logits`` on its input ``ids``, in float32."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


def vocab_of(arch: Arch) -> int:
    """The vocabulary (or class count) the hand layout splits."""
    kw = arch.kwargs
    return kw.get("vocab_size") or kw.get("text_config", {}).get("vocab_size") or kw["num_labels"]


def fsdp_rules(params: Any, mesh: dict[str, int]) -> list[tuple[str, Any]]:
    """Pure FSDP: each leaf's largest dim dividing the fsdp/data axis, over that axis.

    Leaves boxed in flax metadata (``nn.with_logical_partitioning``) are unboxed first: flattened boxed,
    each array's path ends in the box's ``value`` (a rule tpflax, whose paths end at the box, never
    matches) and a scalar's shape is the box's. tpflax exports no unboxing helper: flax's own. An NNX
    ``Variable`` (flax 0.12 flattens it to its ``value``) is taken whole, for the same reason.
    """
    import jax
    from jax.sharding import PartitionSpec as P

    is_var = None
    if "flax" in sys.modules:  # a tree can hold flax boxes only if flax is loaded
        from flax import nnx
        from flax.core import meta

        params = meta.unbox(params)  # outside any mesh context: the arrays, no sharding constraint
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731 - an NNX Variable's path ends at it, not its value
    # a library's mesh may carry fsdp=1, and name its data axis otherwise (EasyDeL's dp)
    axis = next((a for a in ("fsdp", "data", "dp", "batch") if mesh.get(a, 1) > 1), "data")
    n = mesh[axis]
    rules = []
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        x = x.value if is_var and is_var(x) else x
        dims = sorted((d for d in range(len(x.shape)) if x.shape[d] % n == 0 and x.shape[d] >= n),
                      key=lambda d: -x.shape[d])
        spec = [None] * len(x.shape)
        if dims:
            spec[dims[0]] = axis
        rules.append((f"^{re.escape(name)}$", P(*spec)))
    return rules


def make_plans(arch: Arch, built: Built, params: Any, mesh: dict[str, int]) -> dict[str, Any]:
    """The five plans, each a Plan or the exception planning raised."""
    kv = arch.kwargs.get("num_key_value_heads")
    rules = {
        # tpflax prices candidates at the batch it is told (plan(..., batch=)); this is the one compiled
        "tree": {"batch": built.sample},
        "model": {"model": built.fn, "sample": built.sample, "batch": built.sample},
        "megatron": {"rules": megatron_rules(arch.name, mesh, vocab=vocab_of(arch), kv_heads=kv)},
        "replicated": {"rules": [(r".*", "replicate")]},
        "fsdp": {"rules": fsdp_rules(params, mesh)},
    }
    return plan_each(params, mesh, rules)


def plan_each(params: Any, mesh: dict[str, int], calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{name: tpflax.plan(params, mesh, **calls[name])}``, or the exception planning raised."""
    import tpflax

    out: dict[str, Any] = {}
    for name, kw in calls.items():
        try:
            out[name] = tpflax.plan(params, mesh, **kw)
        except Exception as e:  # noqa: BLE001 - a failure is a finding, recorded in the table
            out[name] = e
    return out


def measure(arch: str, mesh: dict[str, int], name: str, plan: Any, built: Built,
            compiler_options: dict[str, Any] | None = None) -> Numbers:
    """Compile the adamw step for ``plan`` and read the three numbers (and the estimate).

    ``compiler_options`` go to :func:`tpflax.dry_run` (the tests skip LLVM's optimisations).
    """
    import optax

    import tpflax

    label = mesh_label(mesh)
    if isinstance(plan, Exception):
        return Numbers(arch, label, name, error=f"plan: {type(plan).__name__}: {str(plan)[:300]}")
    t0 = time.perf_counter()
    tx = optax.adamw(1e-3)
    try:
        m = tpflax.make_mesh(mesh)
        ts = tpflax.make_train_step(built.fn, plan, m, tx, sample=built.sample, loss=built.loss)
        dr = tpflax.dry_run(ts, plan, m, compiler_options=compiler_options)
    except Exception as e:  # noqa: BLE001 - a failure is a finding, recorded in the table
        return Numbers(arch, label, name, error=f"step: {type(e).__name__}: {str(e)[:300]}")
    mem = dr.memory
    held = (mem["argument"] or 0) + (mem["temp"] or 0) + (mem["output"] or 0) - (mem["alias"] or 0)
    est, err = estimate_comm(plan, built)
    return Numbers(arch, label, name, float(held), float(dr.comm_total), dr.flops, est, err,
                   time.perf_counter() - t0, sharded_count(plan), plan_hash(plan))


def estimate_comm(plan: Any, built: Built) -> tuple[float | None, str]:
    """The estimate's collective bytes for ``plan`` (CPU backend), or None and the error."""
    import optax

    import tpflax

    try:
        e = tpflax.estimate(plan, optax.adamw(1e-3), model=built.fn, sample=built.sample, loss=built.loss,
                            backend="cpu")
    except Exception as e:  # noqa: BLE001 - recorded, the compiled numbers still count
        return None, f"estimate: {type(e).__name__}: {str(e)[:200]}"
    return e.comm_total, ""


def sharded_count(plan: Any) -> int:
    """Leaves ``plan`` splits over some mesh axis (the table's "sharded leaves" column)."""
    return sum(1 for d in plan.decisions.values() if any(e is not None for e in tuple(d.spec)))


def plan_hash(plan: Any) -> str:
    """A short hash of ``plan``'s specs (each leaf path with its spec, sorted by path; trailing
    unsplit dims dropped): two plans that place any leaf otherwise hash apart, a column/row swap too."""
    def entry(e: Any) -> str:
        return repr(tuple(e) if isinstance(e, (tuple, list)) else e)

    lines = []
    for path, d in sorted(plan.decisions.items()):
        spec = list(tuple(d.spec))
        while spec and spec[-1] is None:
            spec.pop()
        lines.append(f"{path}\t{','.join(entry(e) for e in spec)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def plan_changed(row: Numbers, plan: Any) -> bool:
    """Whether ``plan`` is not the plan ``row``'s compiled numbers were read from: by its hash, or, for
    a row measured before the hash was recorded, by its count of sharded leaves."""
    if row.plan_hash:
        return plan_hash(plan) != row.plan_hash
    return sharded_count(plan) != row.sharded_leaves


def reestimate(rows: list[Numbers]) -> list[Numbers]:
    """``rows`` with the estimate recomputed, compiling again only the rows whose plan changed.

    Each row's plan is made again and estimated. A row whose plan is not the one its compiled numbers
    were read from (another :func:`plan_hash`; for a row without one, another number of sharded
    leaves) is measured again (compiled): the estimate of today's plan beside the collectives of an
    older one compares two programs. (wav2vec2's ``model=`` plan keeps its 32-class ``lm_head``
    whole since a past round; its compiled row was the vocab-split plan's, 22 sharded leaves, so the
    re-estimate read -6% of 943,908 B where today's plan compiles to 891,012 B, 0.0% off.)
    """
    import jax

    out = list(rows)
    for name in dict.fromkeys(r.arch for r in rows if not r.error.startswith(("plan", "step", "build"))):
        built = BY_NAME[name].build()
        params = jax.eval_shape(lambda b=built: b.params)
        for label in dict.fromkeys(r.mesh for r in rows if r.arch == name):
            mesh = {k: int(v) for k, v in (kv.split("=") for kv in label.split(","))}
            plans = make_plans(BY_NAME[name], built, params, mesh)
            for i, r in enumerate(out):
                if r.arch == name and r.mesh == label and not isinstance(plans[r.plan], Exception) and r.comm:
                    if plan_changed(r, plans[r.plan]):
                        out[i] = measure(name, mesh, r.plan, plans[r.plan], built)
                        print(f"{name} {label} {r.plan}: the plan changed ({r.sharded_leaves} -> "
                              f"{out[i].sharded_leaves} sharded leaves, specs {r.plan_hash or '?'} -> "
                              f"{out[i].plan_hash}), measured again", flush=True)
                        continue
                    est, err = estimate_comm(plans[r.plan], built)
                    out[i] = replace(r, est_comm=est, error=err)
    return out


def run_arch(arch: Arch, meshes, done: set[tuple[str, str, str]], sink) -> None:
    """Build ``arch`` once, then plan and measure every (mesh, plan) not already in ``done``."""
    import jax

    try:
        built = arch.build()
    except Exception as e:  # noqa: BLE001 - the model itself did not build
        for mesh in meshes:
            for name in PLANS:
                sink(Numbers(arch.name, mesh_label(mesh), name, error=f"build: {type(e).__name__}: {e}"))
        return
    params = jax.eval_shape(lambda: built.params)  # abstract either way: the step reads shapes
    for mesh in meshes:
        todo = [n for n in PLANS if (arch.name, mesh_label(mesh), n) not in done]
        if not todo:
            continue
        plans = make_plans(arch, built, params, mesh)
        for name in todo:
            row = measure(arch.name, mesh, name, plans[name], built)
            print(f"{arch.name:<11}{mesh_label(mesh):<18}{name:<11}"
                  f"{row.error or f'{row.bytes:.0f} B  {row.comm:.0f} B comm  {row.flops:.3g} flops'}"
                  f"  ({row.seconds:.0f}s)", flush=True)
            sink(row)


def load(path: Path) -> list[Numbers]:
    if not path.exists():
        return []
    return [Numbers(**r) for r in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    from plan_diff import diff_section
    from results_table import write_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=[a.name for a in ARCHS], choices=sorted(BY_NAME))
    ap.add_argument("--mesh", nargs="*", default=[mesh_label(m) for m in MESHES])
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in third_party.json")
    ap.add_argument("--out", default=str(RESULTS / "third_party.md"))
    ap.add_argument("--tpu-widths", action="store_true",
                    help="published widths, 2 layers, abstract params, compiled for tpu-v5e:2x4 "
                         "(benchmarks/third_party_tpu.py; needs libtpu); --arch keeps the published ones")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the json")
    ap.add_argument("--reestimate", action="store_true",
                    help="recompute the estimate of the rows in the json (compiling only rows whose plan "
                         "changed), then rewrite the table")
    ap.add_argument("--diff", action="store_true",
                    help="add the leaves where tree-only/model= differ from the hand layout (plans only)")
    args = ap.parse_args(argv)
    if args.tpu_widths:  # published widths on a TPU target: benchmarks/third_party_tpu.py
        from third_party_tpu import PUBLISHED
        from third_party_tpu import main as tpu_main

        return tpu_main([*(["--fresh"] if args.fresh else []), *(["--table-only"] if args.table_only else []),
                         *(["--reestimate"] if args.reestimate else []),
                         "--mesh", *args.mesh, "--arch", *(a for a in args.arch if a in PUBLISHED)])
    meshes = [{k: int(v) for k, v in (kv.split("=") for kv in m.split(","))} for m in args.mesh]
    raw = Path(args.out).with_suffix(".json")
    rows = [] if args.fresh else load(raw)
    done = {(r.arch, r.mesh, r.plan) for r in rows}

    def sink(row: Numbers) -> None:
        rows.append(row)
        raw.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    t0 = time.perf_counter()
    if args.reestimate:
        rows[:] = reestimate(rows)
        raw.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    for name in [] if args.table_only or args.reestimate else args.arch:
        try:
            run_arch(BY_NAME[name], meshes, done, sink)
        except Exception:  # noqa: BLE001 - keep going; the traceback is in the log
            traceback.print_exc()
    extra = diff_section([BY_NAME[n] for n in args.arch], meshes, make_plans, mesh_label) if args.diff else []
    write_markdown(rows, Path(args.out), extra)
    print(f"{time.perf_counter() - t0:.0f}s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
