"""Dry run: compile a training step on the mesh and read what XLA decided.

``dry_run(step, plan, mesh, example_args)`` lowers and compiles
``jax.jit(step, in_shardings=..., out_shardings=...)`` on ``ShapeDtypeStruct``
arguments that carry their shardings: no data exists and nothing runs. The
compiled program gives XLA's own per-device memory (``memory_analysis()``), its
FLOP count (``cost_analysis()``, with loop bodies' matmuls counted per iteration)
and its collectives (parsed from the HLO text by :mod:`tpflax.hlo`), which :meth:`DryRun.compare` sets beside an
:func:`tpflax.estimate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.compiled import (
    MEMORY_KEYS,
    Fit,
    compile_error,
    fit_verdict,
    read_flops,
    read_memory,
    tpu_out_of_memory,
)
from tpflax._src.cost.optstate import opt_state_specs
from tpflax._src.cost.records import Estimate
from tpflax._src.facts.tree import unboxed
from tpflax._src.hlo import Collective, parse_collectives, summarize
from tpflax._src.model import abstract
from tpflax._src.planner.params import split_params
from tpflax._src.progress import Progress
from tpflax._src.step import (
    TrainStep,
    batch_shardings,
    named_shardings,
    with_shardings,
)

__all__ = ["Comparison", "DryRun", "Row", "dry_run"]


@dataclass(frozen=True)
class DryRun:
    """What XLA compiled for one step.

    Attributes:
        memory: ``{"argument", "output", "temp", "alias", "generated_code", "peak", "reserved"}``
            bytes per device; a value is None when XLA did not report it (0 or -1).
            ``"peak"`` is what the step's buffers need at once in one device's memory
            (:mod:`tpflax._src.compiled` says how it is read per compiler). ``"reserved"``
            (XLA:TPU; None elsewhere) is the part of XLA:TPU's temp block that holds no
            tensor data, 16 KiB slots of tuple index tables counted twice, when they are
            the larger part of the block (a tiny program): it is left out of ``"temp"``
            and ``"peak"``, so plans compare by their data, and ``peak + reserved`` is
            XLA:TPU's own figure, what ``fit`` holds against the HBM. 0 when nothing
            was set apart (every program of more than a few MiB).
        collectives: every collective in the compiled HLO.
        flops: per-device FLOPs of one step: XLA's cost analysis, which counts a
            ``while`` body once, plus the dot and convolution flops of every further
            loop iteration read from the HLO (:func:`tpflax.hlo.dot_flops`), so a
            scanned layer stack's matmuls count once per layer; a loop body's other
            operations stay counted once. The HLO's dot/convolution flops when the
            cost analysis reports none; None when neither has any.
        compile_seconds: lowering + compilation wall time (with ``compiler_options``).
        compiler_options: the XLA options it compiled with (``DEFAULT_COMPILER_OPTIONS``
            on CPU unless given), as sorted ``(name, value)`` pairs.
        mesh: the mesh shape.
        warnings: what XLA did not report, and similar caveats.
        platform: the device platform compiled for.
        fit: the peak against the device's HBM (TPU presets), or None off TPU.
    """

    memory: Mapping[str, int | None]
    collectives: tuple[Collective, ...]
    flops: float | None
    compile_seconds: float
    mesh: Any
    warnings: tuple[str, ...] = ()
    platform: str = ""
    hlo_text: str = field(default="", repr=False)
    fit: Fit | None = None
    compiler_options: tuple[tuple[str, Any], ...] = ()

    def comm(self) -> dict[str, dict[str, float]]:
        """``{kind: {axis label: bytes per step}}``, the estimate's convention."""
        out: dict[str, dict[str, float]] = {}
        for (kind, axis), v in summarize(self.collectives, by="axis").items():
            if v > 0:
                out.setdefault(kind, {})[axis] = v
        return out

    @property
    def comm_total(self) -> float:
        return sum(v for by_axis in self.comm().values() for v in by_axis.values())

    def compare(self, est: Estimate) -> Comparison:
        """The estimate beside the compiled program, with relative errors.

        Rows whose compiled value XLA did not report are kept, marked, and never
        compared against zero.
        """
        rows: list[Row] = []
        mem = self.memory
        rows.append(_row("memory", "arguments (params+state+opt+batch)", est.per_device.arguments,
                         mem.get("argument")))
        rows.append(_row("memory", "outputs (params+state+opt+loss)",
                         est.per_device.params + est.per_device.model_state + est.per_device.opt_state,
                         mem.get("output")))
        rows.append(_row("memory", "temp (grads+activations, XLA's buffers)",
                         est.per_device.grads + est.per_device.activations, mem.get("temp")))
        # what must fit at once: Estimate.peak (its breakdown) against the compiler's peak
        rows.append(_row("memory", "peak (what must fit per device)", est.peak, mem.get("peak")))
        got = self.comm()
        keys = sorted({(k, a) for k, v in est.comm.items() for a in v} | {(k, a) for k, v in got.items()
                                                                          for a in v})
        for kind, axis in keys:
            rows.append(_row("comm", f"{kind} over {axis}", est.comm.get(kind, {}).get(axis, 0.0),
                             got.get(kind, {}).get(axis, 0.0)))
        rows.append(_row("comm", "total collective bytes per step", est.comm_total, self.comm_total))
        return Comparison(tuple(rows), self.warnings)

    def report_lines(self) -> list[str]:
        from tpflax._src.specs import fmt_bytes as fmt

        out = [f"dry run on {self.platform or '?'} mesh {self.mesh}: compiled in {self.compile_seconds:.1f}s"
               + (" without LLVM's optimisations (the numbers below do not depend on them)"
                  if set(SKIP_LLVM.items()) <= set(self.compiler_options) else "")]
        for k in MEMORY_KEYS:
            v = self.memory.get(k)
            if k == "reserved":  # XLA:TPU's slots of tuple index tables, only where the temp block counted them
                if v:
                    out.append(f"  {'reserved bytes':<22}{fmt(v):>16}  (XLA:TPU's temp slots of tuple index "
                               "tables, not tensor data: not in temp or peak)")
                continue
            out.append(f"  {k + ' bytes':<22}{fmt(v) if v is not None else 'not reported by XLA':>16}")
        if self.fit is not None:
            out.append(f"  {self.fit.line()}")
        out.append(f"  {'flops per device':<22}{self.flops if self.flops is not None else 'not reported':>16}")
        out.append(f"  collectives: {len(self.collectives)}")
        for (kind, axis), v in sorted(summarize(self.collectives, by="axis").items()):
            n = sum(c.count for c in self.collectives if c.kind == kind and c.axis_label == axis)
            out.append(f"    {kind:<19}{axis:<16}{n:>5}x {fmt(v):>12}")
        out += [f"  note: {w}" for w in self.warnings]
        return out

    def to_dict(self) -> dict:
        return {"memory": dict(self.memory), "flops": self.flops, "compile_seconds": self.compile_seconds,
                "compiler_options": dict(self.compiler_options), "platform": self.platform, "comm_bytes_per_step": self.comm(),
                "fit": self.fit.to_dict() if self.fit is not None else None,
                "collectives": [c.to_dict() for c in self.collectives], "warnings": list(self.warnings)}


@dataclass(frozen=True)
class Row:
    """One estimate-vs-compiled line. ``rel_error`` is None when XLA reported nothing."""

    section: str
    name: str
    estimated: float
    compiled: float | None
    rel_error: float | None


def _row(section: str, name: str, est: float, got: float | None) -> Row:
    if got is None:
        return Row(section, name, float(est), None, None)
    rel = (0.0 if est == 0 else math.inf) if got == 0 else (est - got) / got
    return Row(section, name, float(est), float(got), rel)


@dataclass(frozen=True)
class Comparison:
    """Estimate vs compiled, row by row (see :meth:`DryRun.compare`)."""

    rows: tuple[Row, ...]
    warnings: tuple[str, ...] = ()

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name or r.name.startswith(name):
                return r
        raise KeyError(name)

    @property
    def memory_error(self) -> float | None:
        """Relative error of params + state + optimizer state + batch vs XLA's argument bytes."""
        return self.row("arguments").rel_error

    @property
    def peak_error(self) -> float | None:
        """Relative error of ``Estimate.peak`` vs the compiled peak (what must fit per device)."""
        return self.row("peak").rel_error

    @property
    def comm_error(self) -> float | None:
        """Relative error of total collective bytes per step vs the compiled HLO."""
        return self.row("total collective").rel_error

    def report_lines(self) -> list[str]:
        from tpflax._src.specs import fmt_bytes as fmt

        out = ["estimated vs compiled (per device)",
               f"  {'':<44}{'estimated':>12}{'compiled':>14}{'error':>9}"]
        for r in self.rows:
            got = fmt(r.compiled) if r.compiled is not None else "not reported"
            if r.rel_error is None:
                err = "n/a"
            elif math.isinf(r.rel_error):
                err = "est only"  # the estimate has it; the compiled program has none
            else:
                err = f"{100 * r.rel_error:+.1f}%"
            out.append(f"  {r.name:<44}{fmt(r.estimated):>12}{got:>14}{err:>9}")
        out += [f"  note: {w}" for w in self.warnings]
        return out

    def to_dict(self) -> dict:
        """Rows as JSON values: a relative error against nothing compiled (infinite) is null, with
        ``"estimate_only": true``, since JSON has no infinity."""
        return {"rows": [{"section": r.section, "name": r.name, "estimated": r.estimated,
                          "compiled": r.compiled,
                          "rel_error": None if r.rel_error is not None and math.isinf(r.rel_error) else r.rel_error,
                          **({"estimate_only": True} if r.rel_error is not None and math.isinf(r.rel_error) else {})}
                         for r in self.rows],
                "warnings": list(self.warnings)}


# ---------------------------------------------------------------------------
# the dry run

# What a dry run compiles with when the caller passes no options, by platform. XLA:CPU's backend
# optimisation level only drives LLVM, which runs after every HLO pass and the buffer assignment that
# the memory analysis reads: a dry run never runs the code, so it skips that work (the zoo's tiny train
# steps compile in 0.5-0.7x the time, to the same memory, collectives and FLOPs: tests/test_dryrun.py,
# benchmarks/dry_run_speed.py).
SKIP_LLVM: Mapping[str, Any] = {"xla_backend_optimization_level": 0}
DEFAULT_COMPILER_OPTIONS: Mapping[str, Mapping[str, Any]] = {"cpu": SKIP_LLVM}


def dry_run(step: Callable[..., Any] | TrainStep, plan, mesh: Any, example_args: Sequence[Any] = (), *,
            in_shardings: Any = None, out_shardings: Any = None, donate_argnums: Sequence[int] | None = None,
            optimizer: Any = None, progress: bool = False, keep_hlo: bool = False,
            compiler_options: Mapping[str, Any] | None = None) -> DryRun:
    """Compile ``step`` on the mesh with sharded abstract arguments; run nothing.

    Args:
        step: the training step, or a :class:`TrainStep` (which carries its
            arguments and shardings).
        plan: the plan the parameters follow.
        mesh: a ``jax.sharding.Mesh`` (or a shape to build one) matching the plan.
        example_args: the step's arguments, a tuple of arrays or ``ShapeDtypeStruct`` trees
            (none for a :class:`TrainStep`, which carries its own). A tree matching the plan gets the plan's shardings; an optimizer state
            (with ``optimizer=``) gets specs derived from the parameters';
            leaves carrying a ``.sharding`` keep it; anything else is treated as
            batch (dim 0 split over the data/fsdp axes; checked before compiling).
        in_shardings, out_shardings: override what ``jax.jit`` gets.
        donate_argnums: donated arguments (TrainStep default: variables and opt state).
        optimizer: the optax optimizer, to shard its state argument.
        progress: show progress on stderr while compiling.
        keep_hlo: keep the compiled HLO text on the result.
        compiler_options: XLA options for this compile (as ``jax.jit``'s). By
            default a CPU dry run compiles with
            ``{"xla_backend_optimization_level": 0}``: that skips LLVM's
            optimisations of code the dry run never runs, and nothing it reads
            (the HLO, the memory analysis, collectives and FLOPs) comes after
            them, so it reports the same numbers in 0.5-0.7x the
            time. Pass ``{}`` for XLA's default compile (e.g. to time it). Other
            platforms get XLA's defaults.

    Returns:
        A :class:`DryRun`.

    Raises:
        SpecError: the batch does not divide over the batch axes.
        OptionError: ``example_args`` not a tuple, or given with a :class:`TrainStep`.
        CompileError: lowering or compiling failed; lists leaves whose sharding
            does not fit and XLA's message.

    >>> import optax, tpflax
    >>> from tpflax import zoo
    >>> m = zoo.get("mlp")
    >>> p = tpflax.plan(m.abstract_variables(), {"model": 1})
    >>> mesh = tpflax.make_mesh({"model": 1})
    >>> dr = dry_run(tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), 4), p, mesh)
    >>> dr.memory["argument"] > 0
    True
    """
    import jax

    from tpflax._src.apply.bind import check_mesh
    from tpflax._src.mesh import make_mesh
    from tpflax._src.planner.decision import require_plan

    require_plan(plan, "dry_run(step, plan, mesh)")  # before the mesh: dry_run(step, mesh, plan) read the plan as one
    if not isinstance(mesh, jax.sharding.Mesh):
        mesh = make_mesh(mesh)
    check_mesh(plan, mesh)
    _check_example_args(step, example_args)
    if isinstance(step, TrainStep):
        fn, args = step.fn, tuple(step.args)
        # a step made on an AbstractMesh (a pod's shape, no devices) compiles on this mesh of that shape: its
        # shardings named the abstract mesh, and jax refused to lower them ("Passing lowering_platforms ... is
        # required when only AbstractMesh exists")
        in_sh = _on_mesh(step.in_shardings, mesh) if in_shardings is None else in_shardings
        out_sh = _on_mesh(step.out_shardings, mesh) if out_shardings is None else out_shardings
        donate = tuple(step.donate_argnums if donate_argnums is None else donate_argnums)
    else:
        fn = step
        args, derived = _shard_args(plan, mesh, tuple(example_args), optimizer)
        in_sh = derived if in_shardings is None else in_shardings
        out_sh = out_shardings
        donate = tuple(donate_argnums or ())
    sharded = tuple(with_shardings(jax.tree_util.tree_map(abstract, a), s)
                     for a, s in zip(args, in_sh, strict=True))
    jit_kwargs: dict[str, Any] = {"in_shardings": in_sh, "donate_argnums": donate}
    if out_sh is not None:
        jit_kwargs["out_shardings"] = out_sh
    platform = mesh.devices.flat[0].platform
    if compiler_options is None:
        compiler_options = DEFAULT_COMPILER_OPTIONS.get(platform, {})
    bar = Progress(f"dry run on mesh {plan.mesh}", progress)
    t0 = time.perf_counter()
    try:
        bar.step("lowering")
        lowered = jax.jit(fn, **jit_kwargs).lower(*sharded)
        bar.step("compiling with XLA")
        compiled = lowered.compile(dict(compiler_options) if compiler_options else None)
    except Exception as e:  # noqa: BLE001 - reported as one CompileError naming the leaves
        oom = tpu_out_of_memory(e)
        bar.done("does not fit" if oom else "failed")
        if oom is None:
            raise compile_error(plan, sharded, e) from e
        return _refused(plan, mesh, oom, time.perf_counter() - t0, compiler_options)
    seconds = time.perf_counter() - t0
    bar.done("compiled")
    warnings: list[str] = []
    text = compiled.as_text() or ""
    memory = read_memory(compiled, platform, warnings, text)
    flops = read_flops(compiled, warnings, text)
    if not text:
        warnings.append("XLA returned no HLO text; collectives unknown")
    collectives = tuple(parse_collectives(text, mesh, num_devices=mesh.devices.size))
    return DryRun(memory=memory, collectives=collectives, flops=flops, compile_seconds=seconds,
                  mesh=plan.mesh, warnings=tuple(warnings), platform=platform,
                  hlo_text=text if keep_hlo else "", fit=fit_verdict(memory, mesh.devices.flat),
                  compiler_options=tuple(sorted(compiler_options.items())))


def _on_mesh(shardings: Any, mesh: Any) -> Any:
    """``shardings`` with each ``NamedSharding`` over an ``AbstractMesh`` laid on ``mesh`` instead (the same specs;
    the plan checked the shapes agree); any other sharding as it is."""
    import jax
    from jax.sharding import NamedSharding

    def one(s: Any) -> Any:
        if isinstance(s, NamedSharding) and isinstance(s.mesh, jax.sharding.AbstractMesh):
            return NamedSharding(mesh, s.spec)
        return s

    return jax.tree_util.tree_map(one, shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def _check_example_args(step: Any, example_args: Any) -> None:
    """OptionError for ``example_args`` that are not the step's arguments: given with a :class:`TrainStep`
    they were ignored (the step compiled with its own, a batch of another size without a word); a dict (the
    variables alone) was read as its keys, "the batch has leaves that are not arrays: leaf of type str"."""
    from tpflax._src.errors import OptionError

    if isinstance(step, TrainStep):
        if example_args is not None and len(example_args):  # None: no arguments, as () is
            raise OptionError("a TrainStep carries its own arguments: dry_run(step, plan, mesh) compiles it with them; "
                              "drop example_args (for another batch, make the step with it: "
                              "make_train_step(..., batch=N or sample=...))")
        return
    if not isinstance(example_args, (tuple, list)):
        raise OptionError(f"example_args is the step's positional arguments in a tuple, e.g. (variables, opt_state, "
                          f"batch), not a {type(example_args).__name__}; for a step of one argument pass (tree,)")


def _shard_args(plan, mesh, args: tuple[Any, ...], optimizer: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    import jax
    from jax.sharding import NamedSharding

    shardings = []
    params_tree = None
    for a in args:
        try:
            specs = plan.specs_for(a)
        except Exception:  # noqa: BLE001 - not the planned tree; try the other roles
            specs = None
        if specs is not None:
            params_tree = a
            shardings.append(named_shardings(mesh, specs))
            continue
        leaves = jax.tree_util.tree_leaves(a)
        if leaves and all(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
            shardings.append(jax.tree_util.tree_map(lambda x: x.sharding, a))
            continue
        if optimizer is not None and params_tree is not None and (ospecs := _opt_specs(plan, optimizer, params_tree, a)):
            shardings.append(named_shardings(mesh, ospecs))
            continue
        shardings.append(batch_shardings(plan, mesh, a))
    return args, tuple(shardings)


def _opt_specs(plan, optimizer: Any, params_tree: Any, a: Any) -> Any:
    """The specs of ``a`` as the optimizer state of ``params_tree``'s trained leaves, or None when it is not
    one. Built over what the train step differentiates (:func:`split_params`: ``variables["params"]``), or,
    as users often write ``tx.init(variables)`` for a params-only linen tree, over the whole tree."""
    import jax

    params, _ = split_params(plan, params_tree)
    for over in (params, params_tree) if params is not params_tree else (params,):
        state, ospecs = opt_state_specs(plan, optimizer, jax.tree_util.tree_map(abstract, over))
        # an nnx model's state made with tx.init(nnx.state(model, nnx.Param)) holds Variables; a boxed
        # linen tree's state may be boxed (tx.init(variables["params"])) or bare (of the plan alone)
        want = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(unboxed(a))
        if jax.tree_util.tree_structure(unboxed(state)) in want or jax.tree_util.tree_structure(state) == want[0]:
            return ospecs
    return None


def _refused(plan, mesh, oom: tuple[int, int], seconds: float, options: Mapping[str, Any]) -> DryRun:
    """XLA:TPU refused the program for lack of HBM: its total is the peak, and the verdict is "no"."""
    from tpflax._src.specs import fmt_bytes

    need, available = oom
    memory: dict[str, int | None] = dict.fromkeys(MEMORY_KEYS)
    memory["peak"], memory["reserved"] = need, 0  # reserved: 0 on TPU when nothing is set apart
    note = (f"XLA:TPU refused to compile: the program needs {fmt_bytes(need)} per device and the compiler "
            f"has {fmt_bytes(available)} of HBM; no memory breakdown, collectives or FLOPs exist")
    return DryRun(memory=memory, collectives=(), flops=None, compile_seconds=seconds, mesh=plan.mesh,
                  warnings=(note,), platform="tpu", fit=fit_verdict(memory, mesh.devices.flat),
                  compiler_options=tuple(sorted(options.items())))
