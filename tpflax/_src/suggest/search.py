"""Suggest the mesh: which (data, fsdp, tensor[, expert]) shape to use, and whether it fits.

``suggest_mesh(model_or_tree, devices, device_memory, hardware=...)`` enumerates
every factorisation of the device count over the mesh's axis roles, plans and
prices each one, drops the shapes that cannot be planned validly, that waste an
axis or that do not fit in memory (keeping the reason), and ranks the rest by
estimated communication time per step under a per-axis bandwidth model
(:mod:`tpflax._src.hardware`).

One cost model. Every candidate is priced by :func:`tpflax._src.cost.estimate.price`,
the code behind :func:`tpflax.estimate`, so a candidate's memory and
communication are ``estimate(candidate.plan, ...)``'s. What does not depend on
the mesh is computed once (:func:`tpflax._src.cost.workload.prepare`: the batch,
the activations, the optimizer state's layout); what does is arithmetic over the
plan's decisions.

Speed. A 70B tree has 723 leaves and 2048 devices have 78 factorisations. The
planner's candidate layouts depend on the mesh only through which leaf dims each
axis size divides (and whether the axis exists): the divisibility signature (the
data axis, which the tree heuristics never use, does not enter it; with user
rules, annotations or a traced plan it covers every axis and product of axes).
Its chooser's picks depend on the sizes too (step time on the hardware: ring
sizes, tokens per device, an axis crossing the fast domain), so a candidate
shares a plan of its signature only when every group that plan's chooser priced
picks alike priced on the candidate's mesh (:func:`tpflax._src.planner.choose.same_picks`:
distinct groups only, a few ms); else it is planned itself. Each candidate
prices its plan on its own mesh: the plan is ``tpflax.plan(tree, mesh, hardware=)``'s.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tpflax._src.cost.activations import traced_layers
from tpflax._src.cost.batch import (
    config_value,
    parse_batch,
    plain_batch,
    resolve_batch,
    size_problem,
)
from tpflax._src.cost.estimate import estimate, plan_generation, price_leaves
from tpflax._src.cost.leaves import merge
from tpflax._src.cost.workload import Workload, fixed_length_problem, prepare
from tpflax._src.errors import SuggestError, TpflaxError
from tpflax._src.hardware import Hardware, get_hardware
from tpflax._src.mesh import (
    DATA,
    EXPERT,
    FSDP,
    TENSOR,
    MeshShape,
    batch_axes,
    batch_label,
    mesh_shape,
    tracing_for,
)
from tpflax._src.planner.plan import walk_once
from tpflax._src.specs import entries, used_axes
from tpflax._src.suggest.rank import (
    biggest,
    comm_times,
    degrees,
    devices_guess,
    link_local,
    no_fit,
    why,
)
from tpflax._src.suggest.records import Candidate, Suggestion
from tpflax._src.suggest.shrink import smaller_batch
from tpflax._src.suggest.verify import verify_suggestion

__all__ = ["AXES", "Context", "Shared", "suggest_mesh"]

# Mesh axis order: data outermost (its traffic is one gradient reduction per step,
# the cheapest to send over the slow network), the tensor axis innermost so its
# groups are neighbouring devices on one host.
AXES = (("data", DATA), ("fsdp", FSDP), ("expert", EXPERT), ("model", TENSOR))
UNIT = {n: 1 for n, _ in AXES}  # the axes at size 1: what any plan of the tree would see
WASTE = {TENSOR: "no tensor-split dim divides it: the axis would only replicate work",
         FSDP: "nothing is large enough or divisible: the same as data parallelism",
         EXPERT: "no expert dim divides it: the axis would only replicate work"}


@dataclass(frozen=True)
class Shared:
    """The plan shared by every mesh of one divisibility signature (or why it cannot be planned)."""

    plan: Any = None
    leaves: Any = None  # the plan's decisions merged for pricing (cost.leaves.Leaves)
    used: frozenset[str] = frozenset()
    error: str = ""
    record: Any = ()  # every distinct group the chooser priced (planner.choose.recording), replayed per mesh


@dataclass(eq=False)
class Context:
    """What every candidate of one suggestion shares."""

    tree: Any
    zoo: Any
    config: Any
    model: Any  # the Model (tpflax._src.model) of a linen/nnx module or function, for verify; else None
    optimizer: Any
    batch: Any
    activations: dict
    est_kwargs: dict
    plan_kwargs: dict
    heuristic_only: bool
    dims: tuple[int, ...]
    axis_names: tuple[str, ...]
    roles: tuple[str, ...]
    hw: Hardware
    workload: Workload
    base: Any
    plans: dict = field(default_factory=dict)
    traced: Any = None  # the Model whose forward the workload read (trace on), else None
    flow: Any = None  # its dataflow, traced once when a plan has forced leaves (planner.plan.traced_facts)

    def plan_for(self, ms: MeshShape):
        """The real :func:`tpflax.plan` for one mesh shape."""
        from tpflax._src.planner.plan import plan

        return plan(self.tree, ms, **self.plan_kwargs)

    def estimate_for(self, p):
        """The real :func:`tpflax.estimate` of a plan, with the suggestion's inputs."""
        return estimate(p, self.optimizer, self.batch, config=self.config, activations=self.activations,
                        model=self.traced, target=self.workload.target, **self.est_kwargs)

    def _traced_facts(self, p):
        """What estimate(model=) reads of a plan's forced leaves (:func:`traced_facts`), the model
        traced once for every candidate."""
        if self.traced is None or not any(d.source in ("rule", "annotation") for d in p.decisions.values()):
            return p
        from tpflax._src.planner.plan import traced_facts
        from tpflax._src.trace.dataflow import dataflow

        if self.flow is None:
            try:
                self.flow = dataflow(self.traced, None, self.tree, UNIT)
            except TpflaxError:
                self.flow = False
        return traced_facts(p, self.traced, flow=self.flow) if self.flow is not False else p

    def shared(self, ms: MeshShape) -> Shared:
        """The plan of ``ms``: one planned before for a mesh of its signature whose chooser picks
        every group alike priced on ``ms`` (:func:`same_picks`), else its own."""
        from tpflax._src.planner.choose import recording, same_picks

        alike = self.plans.setdefault(_signature(self, ms.sizes), [])
        for s in alike:
            if s.error or same_picks(s.record, ms):
                return s
        try:
            with recording() as record:
                p = self.plan_for(ms)
        except TpflaxError as e:
            more = f" ({len(e.problems)} problem(s))" if e.problems else ""
            alike.append(Shared(error=str(e).splitlines()[0] + more))
        else:
            p = self._traced_facts(p)
            used = set().union(*(used_axes(entries(d.spec, len(d.shape))) for d in p.decisions.values()))
            lv = merge(p.decisions, self.workload.activations, self.workload.opt, self.workload.saved,
                       self.workload.frozen_inputs, self.workload.no_grad, self.workload.rows)
            alike.append(Shared(p, lv, frozenset(used), record=record))
        return alike[-1]


def _signature(ctx: Context, sizes) -> tuple:
    """What the planner can see of a mesh: per axis (or product of axes), which leaf dims it divides."""
    def divides(x: int):
        return (x > 1, frozenset(s for s in ctx.dims if s % x == 0))

    named = dict(zip(ctx.roles, (sizes[n] for n in ctx.axis_names), strict=True))
    if ctx.heuristic_only:
        # the tree heuristics read only the tensor, fsdp and expert group sizes
        return tuple(divides(named.get(r, 1)) for r in (TENSOR, FSDP, EXPERT))
    # rules and annotations may name any axis, alone or combined on one dim
    names = ctx.axis_names
    return tuple(divides(math.prod(sizes[a] for a in sub))
                 for k in range(1, len(names) + 1) for sub in itertools.combinations(names, k))


def _factorisations(n: int, k: int):
    """Every ordered ``k``-tuple of positive ints whose product is ``n``."""
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, k - 1):
                yield (d,) + rest


def _model_and_tree(model_or_tree: Any, sample: Any, variables: Any) -> tuple[Any, Any]:
    """``(Model or None, the tree to plan)``."""
    from collections.abc import Mapping

    from tpflax._src.model import Model, as_model, is_linen, is_nnx, is_zoo

    x = model_or_tree
    if not (is_zoo(x) or is_linen(x) or is_nnx(x) or isinstance(x, Model)
            or (callable(x) and not isinstance(x, Mapping))):
        return None, x
    m = as_model(x, sample, variables)
    if m.variables is None:
        raise SuggestError(f"suggest_mesh({m.name}) needs the variable tree of a plain function: pass variables=")
    return m, m.variables


def _batch(batch: Any, m: Any, config: Any, devices: int, notes: list[str]) -> Any:
    batch = plain_batch(batch)  # np.int64(8): a count, not an array leaf
    if batch is None and m is not None and m.zoo is None:
        return m.sample  # the model's own inputs are the batch
    if batch is None:
        batch = devices
        notes.append(f"no batch given: assumed a global batch of {devices} (one example per device)")
    # as estimate refuses them: a size that is no positive int, a length other than a zoo model's own
    why = size_problem(batch) or fixed_length_problem(m, batch)
    if why is not None:
        raise SuggestError(f"cannot read the batch: {why}")
    try:
        batch = resolve_batch(batch, m.zoo if m is not None else None)
    except TpflaxError as e:
        raise SuggestError(f"cannot read the batch: {e}") from e
    if isinstance(batch, int) and not isinstance(batch, bool):
        if batch < 1:
            raise SuggestError(f"batch {batch!r} must be positive")
        seq = config_value(config, "seq_len")  # a bare count: one example of the config's length
        batch = (batch, int(seq)) if seq else (batch,)
    return batch


def _context(model_or_tree: Any, hw: Hardware, devices: int, *, sample, variables, optimizer, batch, config,
             trace, plan_kwargs, est_kwargs) -> tuple[Context, list[str]]:
    from tpflax._src.planner.plan import plan

    notes: list[str] = []
    m, tree = _model_and_tree(model_or_tree, sample, variables)
    if config is None and m is not None:
        config = m.config
    if plan_kwargs.pop("trace_plan"):
        if m is None:
            raise SuggestError("trace_plan=True needs a model (a tpflax.zoo model, a linen or nnx Module)")
        plan_kwargs.update(model=m)
    given = batch is not None or (m is not None and m.zoo is None)
    batch = _batch(batch, m, config, devices, notes)
    try:
        b = parse_batch(batch, config, est_kwargs.get("act_dtype"))
    except TpflaxError as e:
        raise SuggestError(f"cannot read the batch: {e}") from e
    if given:  # the chooser prices its layouts at the tokens the shapes are ranked for
        plan_kwargs["batch"] = batch
    activations: dict = {}
    if trace and m is None:
        raise SuggestError("trace=True needs a model (a tpflax.zoo model, a linen or nnx module)")
    if trace is None:  # as tpflax.estimate(model=...) does: a model's layers are traced, once for every shape
        trace = m is not None and m.framework != "callable"
    if trace:
        traced = m.with_batch(b.size) if isinstance(b.size, int) else m
        activations, share = traced_layers(traced)
        if share >= 0.5:  # the model's own nn.remat / jax.checkpoint, as estimate(model=) reads it
            est_kwargs["remat"] = True
    elif m is not None:
        notes.append("activations from the transformer formula when the config allows (trace=False / "
                     "--no-trace; the default traces the model's layer shapes once for every candidate)")
    base = plan(tree, UNIT, **plan_kwargs)  # leaf kinds and shapes; any plan would do
    has_experts = any(d.kind == "expert" for d in base.decisions.values())
    axes = tuple((n, r) for n, r in AXES if r != EXPERT or has_experts)
    annotated = any(d.source == "annotation" for d in base.decisions.values())
    # traced: the model too, for what estimate(model=) reads off its forward (attention scores, tied tables)
    workload = prepare(base, optimizer, batch, config=config, activations=activations,
                       model=m if trace else None, **est_kwargs)
    ctx = Context(tree=tree, zoo=m.zoo if m is not None else None, config=config,
                  model=m if m is not None and m.zoo is None else None, optimizer=optimizer,
                  batch=batch, activations=activations, est_kwargs=est_kwargs, plan_kwargs=plan_kwargs,
                  heuristic_only=not plan_kwargs.get("rules") and not annotated and "model" not in plan_kwargs,
                  dims=tuple(sorted({s for d in base.decisions.values() for s in d.shape})),
                  axis_names=tuple(n for n, _ in axes), roles=tuple(r for _, r in axes), hw=hw,
                  workload=workload, base=base, traced=m if trace else None)
    if not has_experts:
        notes.append("no expert (MoE) leaves: the mesh has no expert axis")
    return ctx, notes


def _candidate(ctx: Context, ms: MeshShape, mem_limit: int) -> Candidate:
    """Plan (shared by signature), price with the estimate's code, and judge one mesh shape."""
    from tpflax._src.specs import fmt_bytes as fmt

    base = Candidate(mesh=ms, device_memory=mem_limit, context=ctx)
    shards = math.prod(ms.sizes[n] for n in batch_axes(ms))
    size = ctx.workload.batch.size
    if size % shards:
        return replace(base, rejected=f"global batch {size} does not split over {batch_label(ms)} = {shards}; "
                                      f"use a batch that is a multiple of {shards}")
    shared = ctx.shared(ms)
    if shared.error:
        return replace(base, rejected=f"cannot be planned: {shared.error}")
    for name, role in zip(ctx.axis_names, ctx.roles, strict=True):
        if role in WASTE and ms.sizes[name] > 1 and name not in shared.used:
            return replace(base, rejected=f"{name}={ms.sizes[name]} shards no parameter ({WASTE[role]})")
    est = price_leaves(shared.leaves, ms, ctx.workload)
    memory = est.per_device
    t, by_axis, links = comm_times(ctx.hw, ms, est.comm)
    t_axes = [n for n, r in zip(ctx.axis_names, ctx.roles, strict=True) if r == TENSOR and ms.sizes[n] > 1]
    local = not t_axes or link_local(ms, t_axes, ctx.hw.chips_per_host)
    c = replace(base, memory=memory, peak=est.peak, comm=est.comm, comm_time=t, time_by_axis=by_axis, links=links,
                fits=est.peak <= mem_limit, tensor_local=local)
    if not c.fits:
        return replace(c, rejected=f"does not fit: needs {fmt(est.peak)} per device at its peak, {fmt(-c.headroom)} "
                                   f"over {fmt(mem_limit)} ({biggest(memory)})")
    return c


def more_devices(ctx: Context, guess: int, devices: int, mem_limit: int) -> tuple[Candidate | None, tuple[int, ...]]:
    """``(the best-ranked shape that fits on the fewest devices tried, the counts tried)``.

    Tries the powers of two above ``devices`` in turn (device counts a slice comes in), each shape planned
    and priced as the ranking does, so the first count some shape fits on is the smallest power of two that
    fits. ``guess`` (where the sharded states alone would shrink enough; the activations shrink too at a
    fixed global batch, so often fewer fit) bounds the search at 4x the power of two at or above it, and at
    most 12 counts are tried.
    """
    first = 1 << devices.bit_length()
    last = 4 * max(first, 1 << max(guess - 1, 0).bit_length())
    tried: list[int] = []
    n = first
    while n <= last and len(tried) < 12:
        tried.append(n)
        fits = [c for shape in _factorisations(n, len(ctx.axis_names))
                if not (c := _candidate(ctx, mesh_shape(dict(zip(ctx.axis_names, shape, strict=True))),
                                        mem_limit)).rejected]
        if fits:
            return min(fits, key=lambda c: (float(f"{c.comm_time:.4g}"), c.per_device, str(c.mesh))), tuple(tried)
        n *= 2
    return None, tuple(tried)


def _walking_once(fn):
    """``fn`` run inside :func:`tpflax._src.planner.plan.walk_once`: it plans one tree on many meshes."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with walk_once():
            return fn(*args, **kwargs)

    return run


def _slice_hint(devices: str, hardware: Any) -> str:
    """For a TPU slice given as ``devices`` (``"tpu-v5e:4x4"``): the count and preset it stands for; else ''."""
    from tpflax._src.tpu import slice_or_none

    topo = slice_or_none(devices)
    if topo is None:
        return ""
    preset = "" if hardware is not None else f", hardware={topo.generation!r}"
    return f"; for the slice {topo.name} pass devices={topo.devices}{preset}"


@_walking_once
def suggest_mesh(model_or_tree: Any, devices: int, device_memory: Any = None, hardware: Any = None, *,
                 optimizer: Any = None, batch: Any = None, config: Any = None, trace: bool | None = None,
                 remat: bool = False, grad_dtype: Any = None, act_dtype: Any = None, backend: str | None = None,
                 expert_dispatch: str = "dense", optimizer_name: str | None = None,
                 ici_bandwidth: Any = None, dcn_bandwidth: Any = None, chips_per_host: int | None = None,
                 fast_domain: int | None = None, reserve: float = 0.0, rules: Any = None,
                 fsdp_min_bytes: int | None = None, min_channels: int = 64, tensor_min_bytes: int = 0,
                 stacked: str | None = None, use_annotations: bool = True, trace_plan: bool = False,
                 verify: int = 0, raise_if_none: bool = True, sample: Any = None,
                 variables: Any = None, loss: Any = None) -> Suggestion:
    """Rank every (data, fsdp, tensor[, expert]) mesh shape for ``devices`` devices.

    Args:
        model_or_tree: a parameter tree (abstract is fine), or a model: a :mod:`tpflax.zoo`
            model, a linen or nnx Module (with ``sample=``), or ``fn(variables, *sample)``
            (with ``sample=`` and ``variables=``).
        devices: the device count.
        device_memory: bytes per device, or ``"95GiB"`` / ``"16GB"``; defaults to the preset's.
        hardware: a preset (``"tpu-v4"``, ``"tpu-v5e"``, ``"tpu-v5p"``, ``"tpu-v6e"``,
            ``"a100"``, ``"h100"``, ``"h200"``) or a :class:`tpflax.hardware.Hardware`.
        optimizer: an ``optax.GradientTransformation`` (None: no optimizer state). Also given to
            :func:`tpflax.plan` (``optimizer=``): the leaves whose gradient it never reads (an
            ``optax.multi_transform`` label mapped to ``optax.set_to_zero()``) are planned frozen.
        batch: the global batch (``(512, 4096)``, ``512`` for a zoo model, a dict of
            shapes, an abstract batch); default: the model's sample, else one example
            per device.
        config: model config or hints (``d_model``, ``seq_len``, ...), for activations.
        trace: trace the model's layer shapes once for exact activation sizes, as
            :func:`tpflax.estimate` does for a model (default: for a zoo, linen or nnx
            model; False: the transformer formula from the config, faster for very
            deep unscanned models).
        remat, grad_dtype, act_dtype, backend, expert_dispatch, optimizer_name:
            passed to :func:`tpflax.estimate` (backend defaults to the hardware's kind).
        ici_bandwidth, dcn_bandwidth: bytes/s per device (or ``"400Gbps"``), overriding the preset.
        chips_per_host, fast_domain: override the preset's host and ICI/NVLink domain sizes.
        reserve: fraction of device memory to keep free (XLA's scratch, fragmentation).
        rules, fsdp_min_bytes, min_channels, tensor_min_bytes, stacked, use_annotations:
            passed to :func:`tpflax.plan`, with the suggestion's hardware (the preset and any
            override of its bandwidths or domain sizes: the chooser prices its layouts on what the
            shapes are ranked for); ``trace_plan`` plans from the traced dataflow.
            ``fsdp_min_bytes`` None (the default, as :func:`tpflax.plan`'s): the chooser decides
            each leaf's fsdp split by cost; a number: leaves at least that large split. So
            ``s[0].plan`` is ``tpflax.plan(tree, s[0].mesh_shape, hardware=s.hardware, batch=batch,
            optimizer=optimizer)`` (or
            ``hardware=`` the preset's name, when nothing was overridden): priced at the batch the
            shapes are ranked for (the model's sample when no batch is given; without either,
            :func:`tpflax.plan`'s default tokens).
        verify: compile this many top candidates on a CPU-emulated mesh of the same shape
            (``devices`` <= 64 and that many jax devices visible) and compare XLA's memory.
        raise_if_none: raise :class:`tpflax.NoFitError` when nothing fits (else return
            an empty ranking with every candidate in ``rejected``).
        sample: the model's example inputs (the batch when ``batch`` is None, for
            models other than zoo ones).
        variables: the variable tree of a plain function model.
        loss: the ``loss(output, *sample)`` the model trains with (as
            :func:`tpflax.make_train_step` takes it): priced as :func:`tpflax.estimate`
            prices it, and compiled by ``verify`` (a model other than a zoo model).

    Returns:
        A :class:`Suggestion`: ``ranked[0].mesh_shape``, ``.plan``, ``.estimate``, ``.why``.

    Raises:
        SuggestError: devices <= 0, unparsable memory, unknown hardware.
        NoFitError: nothing fits; says how far the best shape was and what would help.

    >>> import optax, tpflax
    >>> from tpflax import zoo
    >>> s = tpflax.suggest_mesh(zoo.get("mlp"), 8, "64MiB", optimizer=optax.adam(1e-3), batch=32)
    >>> s[0].mesh_shape["data"] * s[0].mesh_shape["fsdp"] * s[0].mesh_shape["model"]
    8
    """
    t0 = time.perf_counter()
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool) and type(devices).__name__ != "bool_":
        devices = int(devices)  # np.int64(8), from np.prod of a slice's shape
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise SuggestError(f"devices must be a positive integer, got {devices!r}"
                           + (_slice_hint(devices, hardware) if isinstance(devices, str) else ""))
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or not 0 <= reserve < 1:
        raise SuggestError(f"reserve {reserve!r} must be a number in [0, 1): the fraction of device memory kept free")
    hw = get_hardware(hardware, device_memory=device_memory, fast_bandwidth=ici_bandwidth,
                      slow_bandwidth=dcn_bandwidth, chips_per_host=chips_per_host, fast_domain=fast_domain)
    mem_limit = int(hw.device_memory * (1 - reserve))
    plan_kwargs: dict[str, Any] = {"fsdp_min_bytes": fsdp_min_bytes, "min_channels": min_channels, "hardware": hw,
                                   "tensor_min_bytes": tensor_min_bytes, "stacked": stacked,
                                   "use_annotations": use_annotations, "trace_plan": trace_plan}
    if rules:
        plan_kwargs["rules"] = rules
    if optimizer is not None:  # the leaves it never updates are frozen in every candidate's plan, as plan(optimizer=)
        plan_kwargs["optimizer"] = optimizer
    est_kwargs = dict(remat=remat, grad_dtype=grad_dtype, act_dtype=act_dtype,
                      backend=backend or ("gpu" if hw.kind == "gpu" else "tpu"), expert_dispatch=expert_dispatch,
                      optimizer_name=optimizer_name, loss=loss)
    # the model's one trace runs under the candidates' axis names, each of size 1, as the base plan is made
    with tracing_for(UNIT):
        ctx, notes = _context(model_or_tree, hw, devices, sample=sample, variables=variables, optimizer=optimizer,
                              batch=batch, config=config, trace=trace, plan_kwargs=plan_kwargs,
                              est_kwargs=est_kwargs)
    if est_kwargs["backend"] == "tpu":  # the preset's slice of each count: its ring decides fsdp gradients
        ctx = replace(ctx, workload=replace(ctx.workload, target=plan_generation(hw.name)))
    if hardware is None:
        notes.append(hw.source)
    ranked, rejected = [], []
    for shape in _factorisations(devices, len(ctx.axis_names)):
        c = _candidate(ctx, mesh_shape(dict(zip(ctx.axis_names, shape, strict=True))), mem_limit)
        (ranked if not c.rejected else rejected).append(c)
    if ranked and not any(c.tensor_local for c in ranked):
        notes.append(f"no shape with the tensor axis inside one host ({hw.chips_per_host} devices) fits: "
                     "tensor parallelism crosses hosts")
    # comm times equal to 4 significant digits are a tie (float summation order differs between shapes
    # whose traffic is the same); the smaller footprint wins it
    order = sorted(ranked, key=lambda c: (not c.tensor_local, float(f"{c.comm_time:.4g}"), c.per_device,
                                          str(c.mesh)))
    order = [replace(c, rank=k + 1) for k, c in enumerate(order)]
    order = [replace(c, why=why(c, order[0], len(order), hw)) for c in order]
    rejected.sort(key=lambda c: (c.memory is None, c.per_device, str(c.mesh)))
    w = ctx.workload
    settings = {**{k: w.settings[k] for k in ("optimizer", "remat", "backend", "activations")},
                "batch": w.batch.label(), "device_memory": hw.device_memory, "memory_limit": mem_limit,
                "plans": sum(map(len, ctx.plans.values()))}
    s = Suggestion(tuple(order), tuple(rejected), degrees(ctx.config, ctx.base.decisions, devices, hw), hw,
                   devices, tuple(dict.fromkeys(notes)), settings, time.perf_counter() - t0)
    if not order and raise_if_none:
        retry = [c.mesh for c in rejected if c.rejected.startswith(("does not fit", "global batch"))]
        priced = [c for c in rejected if c.memory is not None]
        # more devices shrink the sharded states and, at a fixed global batch, the activations too: the
        # states' proportion bounds the search, which starts at the next power of two
        guess = devices_guess(min(priced, key=lambda c: c.per_device), devices, mem_limit) if priced else None
        raise no_fit(s, w.batch.size, mem_limit, smaller_batch(ctx, retry, mem_limit, lambda e: e.peak),
                     more_devices(ctx, guess or devices + 1, devices, mem_limit) if priced else None)
    if verify:
        s = replace(s, verified=verify_suggestion(s, top=verify))
    return s
