"""Suggest the mesh: which (data, fsdp, tensor[, expert]) shape to use, and whether it fits.

``suggest_mesh(model_or_tree, devices, device_memory, hardware=...)`` enumerates
every factorisation of the device count over the mesh's axis roles, plans and
estimates each one (:func:`tpflax.plan`, :func:`tpflax.estimate`), drops the
shapes that cannot be planned validly, that waste an axis or that do not fit
in memory (keeping the reason), and ranks the rest by estimated communication
time per step under a per-axis bandwidth model (:mod:`tpflax.hardware`).

Speed. A 70B tree has 723 leaves and 2048 devices have 78 factorisations;
planning and estimating each from scratch takes ~25 s. The numbers used for
ranking are computed from the same planner and the same estimate, sharing what
does not change between candidates:

* the tree is walked and classified once;
* the planner's heuristics depend on the mesh only through which leaf dims each
  axis size divides (and whether the axis exists), so candidates with the same
  divisibility signature share one pattern of specs (and the data axis, which
  the heuristics never use, does not enter the signature at all); with user
  rules, annotations or ``trace=True`` the real :func:`tpflax.plan` runs once
  per signature, whose key then covers every axis and product of axes;
* repeated identical blocks (``layers_0 .. layers_79``) are estimated once and
  weighted by their count: :func:`tpflax.estimate` runs on a plan holding one
  block of each kind, which is checked to classify, shard and pair exactly like
  the full one (else the full plan is used);
* bytes per device of every leaf and of the optimizer state are computed for
  all leaves at once with numpy (integer arithmetic, exact).

Each ranked :class:`Candidate` still has a real Plan and a real Estimate behind
it: ``candidate.plan`` runs :func:`tpflax.plan` and ``candidate.estimate`` runs
:func:`tpflax.estimate` with the same inputs, on first access. The ranking
numbers equal theirs (memory exactly; communication up to float summation
order), which ``tests/test_suggest.py`` checks for every candidate of several
models.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tpflax._src.errors import NoFitError, SuggestError, TpflaxError
from tpflax._src.hardware import Hardware, get_hardware
from tpflax._src.mesh import DATA, EXPERT, FSDP, TENSOR, MeshShape, mesh_shape

# Mesh axis order: data outermost (its traffic is one gradient reduction per step,
# the cheapest to send over the slow network), the tensor axis innermost so its
# groups are neighbouring devices on one host.
AXES = (("data", DATA), ("fsdp", FSDP), ("expert", EXPERT), ("model", TENSOR))
EMULABLE = 64  # --verify compiles on CPU-emulated meshes up to this many devices


# ---------------------------------------------------------------------------
# records

@dataclass(frozen=True, eq=False)
class Candidate:
    """One mesh shape, planned and estimated.

    Attributes:
        mesh: the shape (axes ``data, fsdp[, expert], model``; size-1 axes included).
        memory: :class:`tpflax.estimate.Memory` on the fullest device (None when the
            shape was rejected before estimating).
        comm: ``{kind: {axis label: bytes per step}}`` as in :class:`tpflax.Estimate`.
        comm_time: estimated seconds per step spent in collectives (no overlap).
        time_by_axis: seconds per axis label.
        links: ``{axis label: link name}`` (ICI, DCN, NVLink, ...).
        fits: per-device memory within the device's.
        tensor_local: every tensor-parallel group lies within one host.
        rank: 1-based rank among the ranked shapes; 0 when rejected.
        why: one line on its rank (against #1 for the runners-up).
        rejected: why the shape was filtered out ("" when ranked).
        device_memory: bytes per device it was judged against.
    """

    mesh: MeshShape
    memory: Any = None
    comm: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    comm_time: float = 0.0
    time_by_axis: Mapping[str, float] = field(default_factory=dict)
    links: Mapping[str, str] = field(default_factory=dict)
    fits: bool = False
    tensor_local: bool = True
    rank: int = 0
    why: str = ""
    rejected: str = ""
    device_memory: int = 0
    _ctx: Any = field(default=None, repr=False)

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.sizes)

    @property
    def per_device(self) -> int:
        """Bytes on the fullest device (0 when not estimated)."""
        return self.memory.total if self.memory is not None else 0

    @property
    def headroom(self) -> int:
        """Device memory left over (negative: short by that much)."""
        return self.device_memory - self.per_device

    @property
    def comm_total(self) -> float:
        return sum(v for by_axis in self.comm.values() for v in by_axis.values())

    def degree(self, role: str) -> int:
        return math.prod(s for (n, s), (_, r) in zip(self.mesh.axes, self.mesh.roles, strict=True) if r == role)

    @functools.cached_property
    def plan(self):
        """The real :func:`tpflax.plan` for this shape (computed on first access)."""
        if self._ctx is None:
            raise SuggestError("this candidate has no model attached")
        return _full_plan(self._ctx, self.mesh)

    @functools.cached_property
    def estimate(self):
        """The real :func:`tpflax.estimate` for this shape (computed on first access)."""
        from tpflax._src.cost.estimate import estimate

        c = self._ctx
        return estimate(self.plan, c.optimizer, c.batch, config=c.config, activations=c.activations,
                        **c.est_kwargs)

    def to_dict(self) -> dict:
        return {"mesh": self.mesh_shape, "rank": self.rank, "fits": self.fits,
                "per_device": self.per_device, "headroom": self.headroom,
                "memory": self.memory.to_dict() if self.memory is not None else None,
                "comm_bytes_per_step": {k: dict(v) for k, v in self.comm.items()},
                "comm_total": self.comm_total, "comm_seconds": self.comm_time,
                "comm_seconds_by_axis": dict(self.time_by_axis), "links": dict(self.links),
                "tensor_within_host": self.tensor_local, "why": self.why, "rejected": self.rejected}


@dataclass(frozen=True)
class Degree:
    """Tensor-parallel degrees one model size allows.

    Attributes:
        name: ``heads``, ``kv heads``, ``vocab``, ``hidden``, ``mlp`` or ``experts``.
        size: the size.
        allowed: degrees that split it evenly (its divisors up to the device count).
        blocked: tensor degrees this mesh could use (divisors of the device count
            within a host) that the size does not divide.
        pad_to: the size padded to a multiple of every blocked degree (None: nothing blocked).
    """

    name: str
    size: int
    allowed: tuple[int, ...]
    blocked: tuple[int, ...] = ()
    pad_to: int | None = None

    def line(self) -> str:
        text = f"{self.name} {self.size} allow {{{', '.join(map(str, self.allowed))}}}"
        if self.blocked:
            text += (f"; blocks model={', '.join(map(str, self.blocked))}: pad to {self.pad_to} "
                     f"(+{self.pad_to - self.size}) to allow them")
        return text


@dataclass(frozen=True)
class Verification:
    """XLA's verdict on one candidate (``--verify``): compiled on a CPU-emulated mesh.

    Attributes:
        mesh: the shape.
        estimated: the estimate's bytes per device.
        compiled: XLA's bytes per device (arguments + outputs + temporaries - aliased), or None.
        fits_estimate, fits_compiled: each side's verdict against the device memory.
        agree: the verdicts agree.
        seconds: compile time.
        note: what XLA did not report, or why it was skipped.
    """

    mesh: MeshShape
    estimated: int
    compiled: int | None
    fits_estimate: bool
    fits_compiled: bool | None
    agree: bool | None
    seconds: float = 0.0
    note: str = ""

    def line(self) -> str:
        from tpflax._src.specs import fmt_bytes as fmt

        if self.compiled is None:
            return f"  {str(self.mesh):<32} not verified: {self.note}"
        verdict = "agrees" if self.agree else "DISAGREES"
        return (f"  {str(self.mesh):<32} estimate {fmt(self.estimated):>10}  XLA {fmt(self.compiled):>10}  "
                f"({self.compiled / max(self.estimated, 1):.2f}x)  XLA {verdict} on the fit "
                f"({'fits' if self.fits_compiled else 'does not fit'}; compiled in {self.seconds:.1f}s)")


@dataclass(frozen=True)
class Suggestion:
    """Ranked mesh shapes; indexes like a tuple of :class:`Candidate` (best first).

    Attributes:
        ranked: shapes that fit, best first.
        rejected: shapes filtered out, each with its reason.
        degrees: tensor-parallel degrees the model's sizes allow.
        hardware: the :class:`tpflax.hardware.Hardware` used.
        devices: the device count.
        notes: assumptions and fallbacks.
        settings: optimizer, batch, remat, ... used.
        seconds: time spent ranking.
        verified: :class:`Verification` records, when ``verify`` was asked.
    """

    ranked: tuple[Candidate, ...]
    rejected: tuple[Candidate, ...]
    degrees: tuple[Degree, ...]
    hardware: Hardware
    devices: int
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    verified: tuple[Verification, ...] = ()

    def __getitem__(self, i):
        return self.ranked[i]

    def __len__(self) -> int:
        return len(self.ranked)

    def __iter__(self):
        return iter(self.ranked)

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Every enumerated shape: ranked first, then rejected."""
        return self.ranked + self.rejected

    def to_dict(self) -> dict:
        return {"devices": self.devices, "hardware": self.hardware.__dict__ | {},
                "settings": dict(self.settings), "seconds": self.seconds,
                "ranked": [c.to_dict() for c in self.ranked],
                "rejected": [c.to_dict() for c in self.rejected],
                "degrees": [d.__dict__ | {} for d in self.degrees], "notes": list(self.notes),
                "verified": [{"mesh": v.mesh.sizes, "estimated": v.estimated, "compiled": v.compiled,
                              "fits_estimate": v.fits_estimate, "fits_compiled": v.fits_compiled,
                              "agree": v.agree, "seconds": v.seconds, "note": v.note} for v in self.verified]}

    def report_lines(self, top: int = 5, show_all: bool = False) -> list[str]:
        from tpflax._src.specs import fmt_bytes as fmt

        hw, s = self.hardware, self.settings
        n_enum = len(self.ranked) + len(self.rejected)
        out = [f"{self.devices} x {hw.describe()}",
               f"optimizer {s.get('optimizer')}, batch {s.get('batch')}, remat "
               f"{'on' if s.get('remat') else 'off'}; {len(self.ranked)} of {n_enum} mesh shapes fit "
               f"(ranked by estimated communication time per step; {self.seconds:.2f}s)", ""]
        rows = self.ranked if show_all else self.ranked[:top]
        out.append(f"{'rank':>4}  {'mesh':<30}{'per device':>12}{'headroom':>12}{'comm/step':>12}"
                   f"{'comm time':>12}")
        for c in rows:
            out.append(f"{c.rank:>4}  {str(c.mesh):<30}{fmt(c.per_device):>12}{fmt(c.headroom):>12}"
                       f"{fmt(c.comm_total):>12}{_fmt_time(c.comm_time):>12}")
        if rows:
            out.append("")
            out += [f"  #{c.rank}: {c.why}" for c in rows]
        if len(self.ranked) > len(rows):
            out.append(f"  ... {len(self.ranked) - len(rows)} more ranked shapes (--all)")
        if show_all and self.rejected:
            out += ["", f"rejected ({len(self.rejected)}):"]
            out += [f"  {str(c.mesh):<32} {c.rejected}" for c in self.rejected]
        elif self.rejected:
            kinds: dict[str, int] = {}
            for c in self.rejected:
                kinds[_reason_kind(c.rejected)] = kinds.get(_reason_kind(c.rejected), 0) + 1
            out.append(f"  rejected {len(self.rejected)}: "
                       + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " (--all lists them)")
        if self.degrees:
            out += ["", "tensor-parallel degrees (model axis) the model's sizes allow:"]
            out += [f"  {d.line()}" for d in self.degrees]
        if self.verified:
            out += ["", "verified on CPU-emulated meshes (dry run: compiled, nothing run):"]
            out += [v.line() for v in self.verified]
        out += [f"note: {n}" for n in self.notes]
        return out


def _reason_kind(text: str) -> str:
    for key in ("does not fit", "batch", "shards no parameter", "cannot be planned"):
        if key in text:
            return {"batch": "batch does not split", "shards no parameter": "axis shards nothing"}.get(key, key)
    return "other"


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


# ---------------------------------------------------------------------------
# context shared by every candidate

@dataclass
class _Ctx:
    tree: Any
    model: Any
    config: Any
    optimizer: Any
    batch: Any
    batch_size: int
    activations: dict
    est_kwargs: dict
    plan_kwargs: dict
    heuristic_only: bool
    leaves: list
    facts: list
    opts: Any
    paths: list[str]
    dims: tuple[int, ...]
    shapes: np.ndarray
    itemsize: np.ndarray
    train: np.ndarray
    g_item: int | None
    opt: Any  # _OptLayout or None
    fam: Any  # _Families
    axis_names: tuple[str, ...]
    roles: tuple[str, ...]
    hw: Hardware
    treedef: Any = None
    settings_batch: str = ""
    patterns: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _OptLayout:
    """Optimizer state leaves and the parameter each follows (``opt_state_specs`` semantics)."""

    shapes: np.ndarray  # (S, R) padded with 1
    itemsize: np.ndarray  # (S,)
    param: np.ndarray  # (S,) param leaf index, -1: replicated
    dim_src: np.ndarray  # (S, R) param dim each state dim follows, -1: none


@dataclass(frozen=True)
class _Families:
    """Repeated identical blocks: one representative estimated per family."""

    leaf_inst: tuple[str | None, ...]  # instance prefix of each leaf
    mult: Mapping[str, int]  # representative instance prefix -> count
    dropped: frozenset[str]  # instance prefixes not estimated (covered by a representative)
    corr: tuple[tuple[int, tuple[int, ...]], ...]  # (rep leaf index, its twins in dropped instances)
    rel: tuple[str, ...]  # each leaf's path relative to its instance
    family_of: Mapping[str, str]  # instance prefix -> representative prefix


_NUM = re.compile(r"^(\D*?)_?(\d+)$")


def _instance(path: str, leaf: bool = True) -> tuple[str, str] | None:
    """(block key, instance prefix) of the first numbered path component below the root."""
    parts = path.split("/")
    stop = len(parts) - 1 if leaf else len(parts)
    for i in range(1, stop):
        m = _NUM.match(parts[i])
        if m:
            return "/".join(parts[:i]) + "/" + m.group(1) + "#", "/".join(parts[:i + 1])
    return None


def _families(leaves, facts, activations, est_facts_ok) -> _Families:
    n = len(leaves)
    inst_of: list[str | None] = [None] * n
    rel = [lf.path for lf in leaves]
    by_inst: dict[str, list[int]] = {}
    block: dict[str, str] = {}
    for i, lf in enumerate(leaves):
        hit = _instance(lf.path)
        if hit is None:
            continue
        key, prefix = hit
        inst_of[i] = prefix
        rel[i] = lf.path[len(prefix) + 1:]
        by_inst.setdefault(prefix, []).append(i)
        block[prefix] = key

    def act_sig(prefix: str):
        if not activations:
            return ()
        short = prefix.split("/", 1)[1] if prefix.startswith(("params/", "batch_stats/")) else prefix
        return tuple(sorted((k[len(short):], tuple(a)) for k, a in activations.items()
                            if k == short or k.startswith(short + "/") or k.startswith(short + ":")))

    groups: dict[tuple, list[str]] = {}
    for prefix, idx in by_inst.items():
        f = facts
        sig = tuple((rel[i], leaves[i].shape, leaves[i].dtype, leaves[i].numeric, f[i].kind, f[i].stacked)
                    for i in idx)
        groups.setdefault((block[prefix], sig, act_sig(prefix)), []).append(prefix)
    mult, dropped, family_of = {}, set(), {}
    corr = []
    for members in groups.values():
        if len(members) < 2 or not est_facts_ok:
            continue
        rep = members[0]
        mult[rep] = len(members)
        for m in members:
            family_of[m] = rep
        dropped.update(members[1:])
        for j, ri in enumerate(by_inst[rep]):
            corr.append((ri, tuple(by_inst[m][j] for m in members[1:])))
    return _Families(tuple(inst_of), mult, frozenset(dropped), tuple(corr), tuple(rel), family_of)


def _est_leaves(paths, shapes, dtypes):
    """Leaves as :func:`tpflax.estimate` rebuilds them from a plan's decisions."""
    from tpflax._src.cost.estimate import _itemsize
    from tpflax._src.facts.tree import Leaf

    return [Leaf(p, tuple(s), d, _itemsize(d),
                 collection=p.split("/", 1)[0] if p.startswith(("params/", "batch_stats/")) else "")
            for p, s, d in zip(paths, shapes, dtypes, strict=True)]


def _prepare(tree, model, hw: Hardware, *, optimizer, batch, config, trace_acts, remat, grad_dtype,
             act_dtype, backend, expert_dispatch, optimizer_name, plan_kwargs, devices) -> tuple[_Ctx, list[str]]:
    import jax

    from tpflax._src.facts.classify import classify
    from tpflax._src.cost.estimate import (
        _cfg,
        _dtype_name,
        _itemsize,
        parse_batch,
        trace_activations,
        trainable_paths,
    )
    from tpflax._src.planner.heuristics import Options
    from tpflax._src.facts.tree import walk

    notes: list[str] = []
    if config is None and model is not None:
        config = getattr(model, "config", None)
    # the batch: zoo models get their own batch (token ids + labels), like the CLI and dry run
    if batch is None:
        batch = devices
        notes.append(f"no batch given: assumed a global batch of {devices} (one example per device)")
    if model is not None and hasattr(model, "make_batch"):
        dims = (batch,) if isinstance(batch, int) else tuple(batch) if isinstance(batch, (tuple, list)) else None
        seq = getattr(getattr(model, "config", None), "seq_len", None)
        if dims and all(isinstance(x, int) and not isinstance(x, bool) for x in dims) and (
                len(dims) == 1 or (seq is not None and len(dims) == 2 and dims[1] == seq)):
            if dims[0] < 1:
                raise SuggestError(f"batch {batch!r} must be positive")
            n = dims[0]
            batch = jax.eval_shape(lambda: model.make_batch(0, n))
    if isinstance(batch, int) and not isinstance(batch, bool):
        if batch < 1:
            raise SuggestError(f"batch {batch!r} must be positive")
        seq = _cfg(config, "seq_len")  # a bare count: one example of the config's length
        batch = (batch, int(seq)) if seq else (batch,)
    try:
        b = parse_batch(batch, config, _dtype_name(act_dtype))
    except TpflaxError as e:
        raise SuggestError(f"cannot read the batch: {e}") from e

    leaves, treedef = walk(tree)
    stacked = plan_kwargs.get("stacked")
    facts = classify(leaves, stacked)
    opts = Options(fsdp_min_bytes=int(plan_kwargs.get("fsdp_min_bytes", 1 << 18)),
                   min_channels=int(plan_kwargs.get("min_channels", 64)),
                   tensor_min_bytes=int(plan_kwargs.get("tensor_min_bytes", 0)), stacked=stacked)
    annotated = plan_kwargs.get("use_annotations", True) and any(lf.names is not None for lf in leaves)
    heuristic_only = not plan_kwargs.get("rules") and not annotated and plan_kwargs.get("model") is None

    activations: dict = {}
    if trace_acts:
        if model is None:
            raise SuggestError("trace=True needs a model (a tpflax.zoo model or a linen module)")
        activations = trace_activations(model, b.size)
    elif model is not None:
        notes.append("activations from the transformer formula when the config allows (trace=True / "
                     "--trace for exact layer shapes, traced once for every candidate)")

    paths = [lf.path for lf in leaves]
    rank = max((len(lf.shape) for lf in leaves), default=0) or 1
    shapes = np.ones((len(leaves), rank), dtype=np.int64)
    for i, lf in enumerate(leaves):
        shapes[i, :len(lf.shape)] = lf.shape
    itemsize = np.array([_itemsize(lf.dtype) for lf in leaves], dtype=np.int64)
    d_like = types.SimpleNamespace(decisions={
        lf.path: types.SimpleNamespace(kind=f.kind, dtype=lf.dtype) for lf, f in zip(leaves, facts, strict=True)})
    train_set = set(trainable_paths(d_like))
    train = np.array([p in train_set for p in paths])
    g_item = _itemsize(_dtype_name(grad_dtype)) if grad_dtype is not None else None

    est_facts = classify(_est_leaves(paths, [lf.shape for lf in leaves], [lf.dtype for lf in leaves]), stacked)
    fam = _families(leaves, est_facts, activations, True)
    if fam.dropped:
        kept = [i for i, inst in enumerate(fam.leaf_inst) if inst not in fam.dropped]
        small = classify(_est_leaves([paths[i] for i in kept], [leaves[i].shape for i in kept],
                                     [leaves[i].dtype for i in kept]), stacked)
        same = all((a.kind, a.stacked, a.unit, a.group) == (est_facts[i].kind, est_facts[i].stacked,
                                                             est_facts[i].unit, est_facts[i].group)
                   for a, i in zip(small, kept, strict=True))
        if not same:  # the estimate would classify one block alone differently: estimate everything
            fam = _families(leaves, est_facts, activations, False)

    opt_layout = _opt_layout(treedef, leaves, optimizer) if optimizer is not None else None
    est_kwargs = dict(remat=remat, grad_dtype=grad_dtype, act_dtype=act_dtype, backend=backend,
                      expert_dispatch=expert_dispatch, optimizer_name=optimizer_name)
    has_experts = any(f.kind == "expert" for f in facts)
    names = tuple(n for n, r in AXES if r != EXPERT or has_experts)
    roles = tuple(r for n, r in AXES if r != EXPERT or has_experts)
    dims = tuple(sorted({d for lf in leaves for d in lf.shape}))
    ctx = _Ctx(tree=tree, model=model, config=config, optimizer=optimizer, batch=batch, batch_size=b.size,
               activations=activations, est_kwargs=est_kwargs, plan_kwargs=plan_kwargs,
               heuristic_only=heuristic_only, leaves=leaves, facts=facts, opts=opts, paths=paths, dims=dims,
               shapes=shapes, itemsize=itemsize, train=train, g_item=g_item, opt=opt_layout, fam=fam,
               axis_names=names, roles=roles, hw=hw, treedef=treedef,
               settings_batch="x".join(map(str, b.leaves[0][1])) if b.leaves else str(b.size))
    return ctx, notes


@dataclass(frozen=True)
class _Follow:
    """An optimizer-state leaf follows parameter ``param`` on its dims ``dims`` (-1: replicated)."""

    param: int
    dims: tuple[int, ...] = ()


def _opt_layout(treedef, leaves, optimizer) -> _OptLayout:
    """Which parameter (and which of its dims) each optimizer-state leaf follows.

    Mirrors :func:`tpflax.estimate.opt_state_specs`: a state leaf shaped like its
    parameter takes the parameter's spec, one missing a dim (factored moments)
    keeps the entries of the dims that survive, anything else is replicated.
    """
    import jax
    import optax

    from tpflax._src.cost.estimate import EstimateError, _np_dtype, split_params

    # the planned tree as ShapeDtypeStructs, laid out as tpflax.estimate.abstract_tree does
    sds = [jax.ShapeDtypeStruct(lf.shape, _np_dtype(lf.dtype)) for lf in leaves]
    abstract = jax.tree_util.tree_unflatten(treedef, sds)
    params, _ = split_params(None, abstract)
    try:
        state = jax.eval_shape(optimizer.init, params)
    except Exception as e:  # noqa: BLE001 - any optax failure is the user's optimizer/params mismatch
        raise EstimateError(f"optimizer.init failed on the planned parameters: {type(e).__name__}: {e}; "
                            "pass an optax.GradientTransformation built for this parameter tree") from e
    # parameter leaf indices in plan order (params come first when a 'params' collection exists)
    index = {lf.path: i for i, lf in enumerate(leaves)}
    p_paths = [lf.path for lf in leaves if lf.path.startswith("params/")] if isinstance(abstract, Mapping) \
        and "params" in abstract else [lf.path for lf in leaves]
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    ids = jax.tree_util.tree_unflatten(p_def, [index[p] for p in p_paths]) if len(p_paths) == len(p_leaves) \
        else None

    def follow(leaf, param, i):
        shape, pshape = tuple(getattr(leaf, "shape", ())), tuple(param.shape)
        if shape == pshape:
            return _Follow(i, tuple(range(len(pshape))))
        for drop in range(len(pshape)):
            if shape == pshape[:drop] + pshape[drop + 1:]:
                return _Follow(i, tuple(d for d in range(len(pshape)) if d != drop))
        return _Follow(-1)

    s_leaves = jax.tree_util.tree_leaves(state)
    mapped = None
    if ids is not None:
        try:
            m = optax.tree_map_params(optimizer, follow, state, params, ids,
                                      transform_non_params=lambda _: _Follow(-1))
            mapped = jax.tree_util.tree_leaves(m)
        except Exception:  # noqa: BLE001 - exotic states: every leaf replicated, as the estimate does
            mapped = None
    if mapped is None or len(mapped) != len(s_leaves):
        mapped = [_Follow(-1)] * len(s_leaves)
    rank = max([len(x.shape) for x in s_leaves] + [1])
    shapes = np.ones((len(s_leaves), rank), dtype=np.int64)
    dim_src = np.full((len(s_leaves), rank), -1, dtype=np.int64)
    param = np.full(len(s_leaves), -1, dtype=np.int64)
    for j, (x, fol) in enumerate(zip(s_leaves, mapped, strict=True)):
        shapes[j, :len(x.shape)] = x.shape
        if fol.param >= 0:
            param[j] = fol.param
            dim_src[j, :len(fol.dims)] = fol.dims
    itemsize = np.array([int(x.dtype.itemsize) for x in s_leaves], dtype=np.int64)
    return _OptLayout(shapes, itemsize, param, dim_src)


# ---------------------------------------------------------------------------
# plans per divisibility signature

@dataclass(frozen=True)
class _Pattern:
    specs: tuple[tuple[Any, ...], ...]  # entries per leaf
    mask: np.ndarray  # (L, R, A): dim r of leaf l is split by mesh axis a
    pairs: tuple
    templates: Mapping[int, Any]  # leaf index -> Decision (bytes_per_device filled per candidate)
    kept: tuple[int, ...]  # leaves estimated
    kept_pairs: tuple
    pair_mult: Mapping[int, int]
    compressed: bool
    error: str = ""


def _signature(ctx: _Ctx, sizes: Mapping[str, int]) -> tuple:
    def divides(x: int):
        return (x > 1, frozenset(s for s in ctx.dims if s % x == 0))

    named = dict(zip(ctx.roles, (sizes[n] for n in ctx.axis_names), strict=True))
    if ctx.heuristic_only:
        # the tree heuristics read only the tensor, fsdp and expert group sizes
        return tuple(divides(named.get(r, 1)) for r in (TENSOR, FSDP, EXPERT))
    # rules and annotations may name any axis, alone or combined on one dim
    sig = []
    names = ctx.axis_names
    for k in range(1, len(names) + 1):
        for sub in itertools.combinations(names, k):
            sig.append(divides(math.prod(sizes[a] for a in sub)))
    return tuple(sig)


def _full_plan(ctx: _Ctx, ms: MeshShape):
    from tpflax._src.planner.plan import plan

    kw = dict(ctx.plan_kwargs)
    return plan(ctx.tree, ms, **kw)


def _pattern(ctx: _Ctx, ms: MeshShape) -> _Pattern:
    from tpflax._src.planner.plan import Decision
    from tpflax._src.specs import entries, entry_axes, to_pspec

    if ctx.heuristic_only:
        from tpflax._src.planner import heuristics

        props, pairs = heuristics.propose(ctx.facts, ms, ctx.opts)
        specs = tuple(entries(props[lf.path].spec, len(lf.shape)) for lf in ctx.leaves)
        meta = [(props[lf.path].strategy, props[lf.path].reason, props[lf.path].pair, "heuristic")
                for lf in ctx.leaves]
    else:
        try:
            p = _full_plan(ctx, ms)
        except TpflaxError as e:
            return _Pattern((), np.zeros((0, 0, 0), bool), (), {}, (), (), {}, False,
                            error=str(e).splitlines()[0] + (f" ({len(e.problems)} problem(s))" if e.problems
                                                           else ""))
        specs = tuple(entries(p.decisions[path].spec, len(p.decisions[path].shape)) for path in ctx.paths)
        pairs = list(p.pairs)
        meta = [(p.decisions[x].strategy, p.decisions[x].reason, p.decisions[x].pair, p.decisions[x].source)
                for x in ctx.paths]
    names = ctx.axis_names
    L, R = ctx.shapes.shape
    mask = np.zeros((L, R, len(names)), dtype=bool)
    col = {n: k for k, n in enumerate(names)}
    for i, spec in enumerate(specs):
        for r, e in enumerate(spec):
            for a in entry_axes(e):
                mask[i, r, col[a]] = True

    kept, kept_pairs, pair_mult, compressed = _compress(ctx, specs, pairs)
    templates = {}
    for i in kept:
        lf, f = ctx.leaves[i], ctx.facts[i]
        strategy, reason, pair, source = meta[i]
        templates[i] = Decision(spec=to_pspec(specs[i]), strategy=strategy, reason=reason, shape=lf.shape,
                                dtype=lf.dtype, bytes=lf.nbytes, bytes_per_device=0, kind=f.kind, source=source,
                                pair=pair)
    return _Pattern(specs, mask, tuple(pairs), templates, tuple(kept), tuple(kept_pairs), pair_mult, compressed)


def _compress(ctx: _Ctx, specs, pairs):
    """Leaves and pairs to estimate, and each kept pair's multiplicity.

    Repeated blocks collapse to their representative only when every twin has the
    same specs and the same pairs (relative to its block) as the representative.
    """
    fam = ctx.fam
    everything = (tuple(range(len(ctx.leaves))), tuple(pairs), {p.id: 1 for p in pairs}, False)
    if not fam.dropped:
        return everything
    for ri, twins in fam.corr:
        if any(specs[t] != specs[ri] for t in twins):
            return everything
    index = {p: i for i, p in enumerate(ctx.paths)}

    def inst_of_pair(pair) -> set:
        return {fam.leaf_inst[index[m]] for m in tuple(pair.columns) + tuple(pair.rows) if m in index}

    by_inst: dict[str, list] = {}
    for pair in pairs:
        insts = inst_of_pair(pair)
        touched = {fam.family_of.get(i) for i in insts if i is not None} - {None}
        if touched and len(insts) > 1:  # a pair across blocks: blocks are not independent
            return everything
        if touched:
            inst = next(iter(insts))
            rel = lambda x: fam.rel[index[x]] if x in index else x  # noqa: E731
            key = (pair.kind, tuple(map(rel, pair.columns)), tuple(map(rel, pair.rows)), pair.size, pair.sharded)
            by_inst.setdefault(inst, []).append(key)
    for inst, rep in fam.family_of.items():
        if sorted(by_inst.get(inst, [])) != sorted(by_inst.get(rep, [])):
            return everything
    kept = tuple(i for i, inst in enumerate(fam.leaf_inst) if inst not in fam.dropped)
    kept_pairs, pair_mult = [], {}
    for pair in pairs:
        insts = inst_of_pair(pair)
        inst = next(iter(insts)) if len(insts) == 1 else None
        if inst in fam.dropped:
            continue
        kept_pairs.append(pair)
        pair_mult[pair.id] = fam.mult.get(inst, 1)
    return kept, tuple(kept_pairs), pair_mult, True


# ---------------------------------------------------------------------------
# scoring one candidate

def _bytes(shapes: np.ndarray, itemsize: np.ndarray, mask: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Bytes on the fullest device per leaf: ceil-divided dims, as ``specs.bytes_per_device``."""
    div = np.where(mask, sizes[None, None, :], 1).prod(axis=2)
    return (-(-shapes // div)).prod(axis=1) * itemsize


def _score(ctx: _Ctx, pat: _Pattern, ms: MeshShape):
    from tpflax._src.cost.estimate import Memory, _activation_bytes, _dtype_name, _itemsize, estimate, parse_batch
    from tpflax._src.planner.plan import Plan

    sizes = np.array([ms.sizes[n] for n in ctx.axis_names], dtype=np.int64)
    bpd = _bytes(ctx.shapes, ctx.itemsize, pat.mask, sizes)
    train = ctx.train
    params = int(bpd[train].sum())
    grads = params if ctx.g_item is None else int((bpd[train] // ctx.itemsize[train] * ctx.g_item).sum())
    state = int(bpd[~train].sum())
    opt = 0
    if ctx.opt is not None:
        o = ctx.opt
        # a state dim follows its parameter's dim (same mesh axes); padding rows/cols never split
        pm = np.concatenate([pat.mask, np.zeros((1,) + pat.mask.shape[1:], bool)])
        pm = np.concatenate([pm, np.zeros((pm.shape[0], 1, pm.shape[2]), bool)], axis=1)
        src = np.where(o.dim_src >= 0, o.dim_src, pm.shape[1] - 1)
        rows = np.where(o.param >= 0, o.param, pm.shape[0] - 1)
        omask = pm[rows[:, None], src]
        opt = int(_bytes(o.shapes, o.itemsize, omask, sizes).sum())
    decisions = {ctx.paths[i]: replace(pat.templates[i], bytes_per_device=int(bpd[i])) for i in pat.kept}
    small = Plan(mesh=ms, specs=None, decisions=decisions, pairs=pat.kept_pairs,
                 options={"stacked": ctx.plan_kwargs.get("stacked")})
    est = estimate(small, None, ctx.batch, config=ctx.config, activations=ctx.activations,
                   **{**ctx.est_kwargs, "optimizer_name": None})
    comm: dict[str, dict[str, float]] = {}
    for it in est.items:
        k = _mult(ctx, pat, it.source) if pat.compressed else 1
        by = comm.setdefault(it.kind, {})
        by[it.axis_label] = by.get(it.axis_label, 0.0) + it.total * k
    acts = est.per_device.activations
    if ctx.activations and pat.compressed:
        # traced activations are summed over every layer call: use the full pattern
        b = parse_batch(ctx.batch, ctx.config, _dtype_name(ctx.est_kwargs.get("act_dtype")))
        full = types.SimpleNamespace(decisions={
            p: types.SimpleNamespace(spec=s, shape=lf.shape) for p, s, lf in zip(ctx.paths, pat.specs, ctx.leaves,
                                                                                  strict=True)})
        shards = est.batch["shards"]
        remat = bool(est.settings.get("remat"))
        facts = {f.path: f for f in ctx.facts}
        acts, _ = _activation_bytes(full, facts, ctx.activations, b, ctx.config, ms, shards, remat,
                                    _itemsize(b.act_dtype), [])
    memory = Memory(params, grads, opt, acts, state, est.per_device.inputs)
    return memory, comm


def _mult(ctx: _Ctx, pat: _Pattern, source: str) -> int:
    fam = ctx.fam
    if source.startswith("pair "):
        try:
            return pat.pair_mult.get(int(source[5:]), 1)
        except ValueError:
            return 1
    hit = _instance(source, leaf=False)
    return fam.mult.get(hit[1], 1) if hit else 1


# ---------------------------------------------------------------------------
# bandwidth model

def _link(ms: MeshShape, axes: Sequence[str], domain: int) -> bool:
    """True when every group of ``axes`` lies within one aligned block of ``domain`` devices."""
    n = ms.size
    if domain >= n:
        return True
    return _within(tuple(s for _, s in ms.axes), tuple(ms.names.index(a) for a in axes), domain)


@functools.lru_cache(maxsize=4096)
def _within(shape: tuple[int, ...], idx: tuple[int, ...], domain: int) -> bool:
    n = math.prod(shape)
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    span = sum((shape[k] - 1) * strides[k] for k in idx)
    coords = np.indices(shape).reshape(len(shape), -1)
    base = np.zeros(n, dtype=np.int64)
    for k in range(len(shape)):
        if k not in idx:
            base += coords[k] * strides[k]
    base = np.unique(base)
    return bool(np.all(base // domain == (base + span) // domain))


def _times(ctx: _Ctx, ms: MeshShape, comm) -> tuple[float, dict[str, float], dict[str, str]]:
    hw = ctx.hw
    by_axis: dict[str, float] = {}
    links: dict[str, str] = {}
    for kind_axes in comm.values():
        for label, v in kind_axes.items():
            axes = [a for a in label.split("+") if a in ms.sizes]
            fast = _link(ms, axes, hw.fast_domain)
            bw = hw.fast_bandwidth if fast else hw.slow_bandwidth
            links[label] = hw.fast_name if fast else hw.slow_name
            by_axis[label] = by_axis.get(label, 0.0) + v / bw
    return sum(by_axis.values()), by_axis, links


# ---------------------------------------------------------------------------
# the suggestion

def _factorisations(n: int, k: int):
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorisations(n // d, k - 1):
                yield (d,) + rest


def suggest_mesh(model_or_tree: Any, devices: int, device_memory: Any = None, hardware: Any = None, *,
                 optimizer: Any = None, batch: Any = None, config: Any = None, trace: bool = False,
                 remat: bool = False, grad_dtype: Any = None, act_dtype: Any = None, backend: str | None = None,
                 expert_dispatch: str = "all-to-all", optimizer_name: str | None = None,
                 ici_bandwidth: Any = None, dcn_bandwidth: Any = None, chips_per_host: int | None = None,
                 fast_domain: int | None = None, reserve: float = 0.0, rules: Any = None,
                 fsdp_min_bytes: int = 1 << 18, min_channels: int = 64, tensor_min_bytes: int = 0,
                 stacked: str | None = None, use_annotations: bool = True, trace_plan: bool = False,
                 verify: int = 0, raise_if_none: bool = True) -> Suggestion:
    """Rank every (data, fsdp, tensor[, expert]) mesh shape for ``devices`` devices.

    Args:
        model_or_tree: a :mod:`tpflax.zoo` model, or a parameter tree (abstract is fine).
        devices: the device count.
        device_memory: bytes per device, or ``"95GiB"`` / ``"16GB"``; defaults to the preset's.
        hardware: a preset (``"tpu-v4"``, ``"tpu-v5e"``, ``"tpu-v5p"``, ``"tpu-v6e"``,
            ``"a100"``, ``"h100"``, ``"h200"``) or a :class:`tpflax.hardware.Hardware`.
        optimizer: an ``optax.GradientTransformation`` (None: no optimizer state).
        batch: the global batch (``(512, 4096)``, ``512`` for a zoo model, a dict of
            shapes, an abstract batch); default: one example per device.
        config: model config or hints (``d_model``, ``seq_len``, ...), for activations.
        trace: trace the model's layer shapes once for exact activation sizes.
        remat, grad_dtype, act_dtype, backend, expert_dispatch, optimizer_name:
            passed to :func:`tpflax.estimate` (backend defaults to the hardware's kind).
        ici_bandwidth, dcn_bandwidth: bytes/s per device (or ``"400Gbps"``), overriding the preset.
        chips_per_host, fast_domain: override the preset's host and ICI/NVLink domain sizes.
        reserve: fraction of device memory to keep free (XLA's scratch, fragmentation).
        rules, fsdp_min_bytes, min_channels, tensor_min_bytes, stacked, use_annotations:
            passed to :func:`tpflax.plan`; ``trace_plan`` plans from the traced dataflow.
        verify: compile this many top candidates on a CPU-emulated mesh of the same shape
            (``devices`` <= 64 and that many jax devices visible) and compare XLA's memory.
        raise_if_none: raise :class:`tpflax.NoFitError` when nothing fits (else return
            an empty ranking with every candidate in ``rejected``).

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
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise SuggestError(f"devices must be a positive integer, got {devices!r}")
    if not 0 <= reserve < 1:
        raise SuggestError(f"reserve {reserve!r} must be a fraction in [0, 1)")
    hw = get_hardware(hardware, device_memory=device_memory, fast_bandwidth=ici_bandwidth,
                      slow_bandwidth=dcn_bandwidth, chips_per_host=chips_per_host, fast_domain=fast_domain)
    mem_limit = int(hw.device_memory * (1 - reserve))
    model = model_or_tree if hasattr(model_or_tree, "abstract_variables") else None
    tree = model.abstract_variables() if model is not None else model_or_tree
    if backend is None:
        backend = "gpu" if hw.kind == "gpu" else "tpu"
    plan_kwargs: dict[str, Any] = {"fsdp_min_bytes": fsdp_min_bytes, "min_channels": min_channels,
                                   "tensor_min_bytes": tensor_min_bytes, "stacked": stacked,
                                   "use_annotations": use_annotations}
    if rules:
        plan_kwargs["rules"] = rules
    if trace_plan:
        if model is None:
            raise SuggestError("trace_plan=True needs a tpflax.zoo model")
        plan_kwargs["model"] = model
    ctx, notes = _prepare(tree, model, hw, optimizer=optimizer, batch=batch, config=config, trace_acts=trace,
                          remat=remat, grad_dtype=grad_dtype, act_dtype=act_dtype, backend=backend,
                          expert_dispatch=expert_dispatch, optimizer_name=optimizer_name,
                          plan_kwargs=plan_kwargs, devices=devices)
    if hardware is None:
        notes.append(hw.source)
    if EXPERT not in ctx.roles:
        notes.append("no expert (MoE) leaves: the mesh has no expert axis")

    ranked, rejected = [], []
    for shape in _factorisations(devices, len(ctx.axis_names)):
        sizes = dict(zip(ctx.axis_names, shape, strict=True))
        ms = mesh_shape(sizes)
        c = _candidate(ctx, ms, mem_limit)
        (ranked if not c.rejected else rejected).append(c)

    local = [c for c in ranked if c.tensor_local]
    if ranked and not local:
        notes.append(f"no shape with the tensor axis inside one host ({hw.chips_per_host} devices) fits: "
                     "tensor parallelism crosses hosts")
    # comm times equal to 4 significant digits are a tie (float summation order differs between shapes
    # whose traffic is the same); the smaller footprint wins it
    order = sorted(ranked, key=lambda c: (not c.tensor_local, float(f"{c.comm_time:.4g}"), c.per_device,
                                          str(c.mesh)))
    order = [replace(c, rank=k + 1) for k, c in enumerate(order)]
    order = [replace(c, why=_why(c, order[0], len(order), hw)) for c in order]
    rejected.sort(key=lambda c: (c.memory is None, c.per_device, str(c.mesh)))
    degrees = _degrees(ctx, devices, hw)
    settings = {"optimizer": optimizer_name or (_opt_name(optimizer) if optimizer is not None else "none"),
                "batch": ctx.settings_batch, "remat": bool(remat or getattr(ctx.config, "remat", False)),
                "device_memory": hw.device_memory, "memory_limit": mem_limit, "backend": backend,
                "activations": "traced" if ctx.activations else "formula"}
    s = Suggestion(tuple(order), tuple(rejected), degrees, hw, devices, tuple(dict.fromkeys(notes)), settings,
                   time.perf_counter() - t0)
    if not order and raise_if_none:
        raise _no_fit(s, ctx, mem_limit)
    if verify:
        s = replace(s, verified=verify_suggestion(s, top=verify))
    return s


def _opt_name(optimizer) -> str:
    from tpflax._src.cost.estimate import _opt_name as name

    return name(optimizer)


def _candidate(ctx: _Ctx, ms: MeshShape, mem_limit: int) -> Candidate:
    from tpflax._src.specs import fmt_bytes as fmt

    base = Candidate(mesh=ms, device_memory=mem_limit, _ctx=ctx)
    shards = math.prod(ms.sizes[n] for n, r in zip(ctx.axis_names, ctx.roles, strict=True) if r in (DATA, FSDP))
    if ctx.batch_size % shards:
        return replace(base, rejected=f"global batch {ctx.batch_size} does not split over data x fsdp = {shards}; "
                                      f"use a batch that is a multiple of {shards}")
    sig = _signature(ctx, ms.sizes)
    pat = ctx.patterns.get(sig)
    if pat is None:
        pat = ctx.patterns[sig] = _pattern(ctx, ms)
    if pat.error:
        return replace(base, rejected=f"cannot be planned: {pat.error}")
    for k, (name, role) in enumerate(zip(ctx.axis_names, ctx.roles, strict=True)):
        if role in (TENSOR, FSDP, EXPERT) and ms.sizes[name] > 1 and not pat.mask[:, :, k].any():
            what = {TENSOR: "no tensor-split dim divides it: the axis would only replicate work",
                    FSDP: "nothing is large enough or divisible: the same as data parallelism",
                    EXPERT: "no expert dim divides it: the axis would only replicate work"}[role]
            return replace(base, rejected=f"{name}={ms.sizes[name]} shards no parameter ({what})")
    memory, comm = _score(ctx, pat, ms)
    t, by_axis, links = _times(ctx, ms, comm)
    t_axes = [n for n, r in zip(ctx.axis_names, ctx.roles, strict=True) if r == TENSOR and ms.sizes[n] > 1]
    local = not t_axes or _link(ms, t_axes, ctx.hw.chips_per_host)
    c = replace(base, memory=memory, comm=comm, comm_time=t, time_by_axis=by_axis, links=links,
                fits=memory.total <= mem_limit, tensor_local=local)
    if not c.fits:
        return replace(c, rejected=f"does not fit: needs {fmt(memory.total)} per device, {fmt(-c.headroom)} over "
                                   f"{fmt(mem_limit)} ({_biggest(memory)})")
    return c


def _biggest(memory) -> str:
    from tpflax._src.specs import fmt_bytes as fmt

    parts = {"params": memory.params, "grads": memory.grads, "optimizer state": memory.opt_state,
             "activations": memory.activations}
    name = max(parts, key=parts.get)
    return f"largest: {name} {fmt(parts[name])}"


def _top_term(c: Candidate) -> tuple[str, str, float]:
    best = ("", "", 0.0)
    for kind, by in c.comm.items():
        for label, v in by.items():
            t = c.time_by_axis.get(label, 0.0) * (v / max(sum(x.get(label, 0.0) for x in c.comm.values()), 1e-30))
            if t > best[2]:
                best = (kind, label, t)
    return best


def _term_times(c: Candidate) -> dict[tuple[str, str], float]:
    out = {}
    for kind, by in c.comm.items():
        for label, v in by.items():
            total = sum(x.get(label, 0.0) for x in c.comm.values())
            out[(kind, label)] = c.time_by_axis.get(label, 0.0) * v / total if total else 0.0
    return out


def _why(c: Candidate, first: Candidate, n: int, hw: Hardware) -> str:
    from tpflax._src.specs import fmt_bytes as fmt

    t_deg = c.degree(TENSOR)
    if c.rank == 1:
        kind, label, t = _top_term(c)
        text = (f"least estimated communication of the {n} shapes that fit: {_fmt_time(c.comm_time)} per step"
                + (f", mostly {kind} over {label} ({_fmt_time(t)}, {c.links.get(label, '')})" if kind else
                   ", no collectives at all")
                + f"; {fmt(c.headroom)} headroom")
        if not c.tensor_local:
            text += (f"; tensor parallelism model={t_deg} crosses hosts ({hw.chips_per_host} per host) because "
                     "no shape keeping it within a host fits")
        return text
    if not c.tensor_local and first.tensor_local:
        return (f"tensor parallelism model={t_deg} crosses hosts ({hw.chips_per_host} devices per host): ranked "
                f"after every shape that keeps it within a host ({_fmt_time(c.comm_time)} per step)")
    if first.comm_time and abs(c.comm_time / first.comm_time - 1) < 0.005:
        more = c.per_device - first.per_device
        return (f"ties #1 on communication ({_fmt_time(c.comm_time)} per step, within 0.5%); ranked lower for "
                + (f"{fmt(more)} more memory per device" if more > 0 else "its mesh order")
                + f"; {fmt(c.headroom)} headroom")
    mine, theirs = _term_times(c), _term_times(first)
    keys = set(mine) | set(theirs)
    diff = max(keys, key=lambda k: mine.get(k, 0.0) - theirs.get(k, 0.0), default=None)
    ratio = c.comm_time / first.comm_time if first.comm_time else float("inf")
    if diff is None or mine.get(diff, 0.0) - theirs.get(diff, 0.0) <= 0:
        if math.isclose(c.comm_time, first.comm_time, rel_tol=1e-9):
            return f"same communication time as #1; {fmt(c.headroom)} headroom vs {fmt(first.headroom)}"
        return f"{ratio:.2f}x the communication time of #1"
    kind, label = diff
    return (f"{ratio:.2f}x the communication time of #1: {kind} over {label} takes "
            f"{_fmt_time(mine.get(diff, 0.0))} vs {_fmt_time(theirs.get(diff, 0.0))}; "
            f"{fmt(c.headroom)} headroom")


def _no_fit(s: Suggestion, ctx: _Ctx, mem_limit: int) -> NoFitError:
    from tpflax._src.specs import fmt_bytes as fmt

    est = [c for c in s.rejected if c.memory is not None]
    if not est:
        reasons = list(dict.fromkeys(c.rejected for c in s.rejected))[:8]
        return NoFitError(f"no mesh shape for {s.devices} devices could be planned and estimated", reasons,
                          suggestion=s)
    best = min(est, key=lambda c: c.per_device)
    m = best.memory
    over = m.total - mem_limit
    helps = []
    states = m.params + m.grads + m.opt_state + m.model_state
    if states > over:
        # sharded states fall with the device count; activations per example do not
        helps.append(f"more devices: about {math.ceil(s.devices * states / (states - over))} or more (params, "
                     f"grads and optimizer state, {fmt(states)} per device, shrink with fsdp over more devices)")
    else:
        helps.append(f"more devices alone will not do: params, grads and optimizer state are only {fmt(states)} "
                     "per device; the rest is activations")
    flexible = m.activations + m.inputs
    if flexible > over:
        b = int(ctx.batch_size * (1 - over / flexible))
        helps.append(f"a smaller global batch: activations and inputs are {fmt(flexible)} per device; about "
                     f"{max(b, 1)} instead of {ctx.batch_size} (rounded to a multiple of data x fsdp) would fit")
    elif m.activations:
        helps.append(f"a smaller global batch: saves up to {fmt(flexible)} (activations and inputs)")
    if m.activations and not s.settings.get("remat"):
        helps.append(f"remat (rematerialise activations; they are {fmt(m.activations)} per device)")
    if m.opt_state:
        helps.append(f"a cheaper optimizer: its state is {fmt(m.opt_state)} per device (adafactor factors the "
                     "moments; sgd keeps none)")
    return NoFitError(
        f"the model fits on no mesh shape of {s.devices} devices with {fmt(mem_limit)} each: the best, "
        f"{best.mesh}, needs {fmt(m.total)} per device ({fmt(over)} over, {100 * over / mem_limit:.0f}%; params "
        f"{fmt(m.params)}, grads {fmt(m.grads)}, optimizer state {fmt(m.opt_state)}, activations "
        f"{fmt(m.activations)}); what would help", helps, suggestion=s)


# ---------------------------------------------------------------------------
# tensor-parallel degrees

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _degrees(ctx: _Ctx, devices: int, hw: Hardware) -> tuple[Degree, ...]:
    from tpflax._src.cost.estimate import _cfg

    cfg = ctx.config
    sizes: list[tuple[str, int]] = []
    for name, key in (("heads", "n_heads"), ("kv heads", "n_kv_heads"), ("vocab", "vocab"),
                      ("hidden", "d_model"), ("mlp", "d_ff"), ("experts", "n_experts")):
        v = _cfg(cfg, key)
        if isinstance(v, int) and v > 0 and not isinstance(v, bool):
            sizes.append((name, v))
    if not sizes:  # a bare tree: read the embedding
        for f in ctx.facts:
            if f.kind == "embedding" and len(f.body) == 2:
                sizes += [("vocab", f.body[0]), ("hidden", f.body[1])]
                break
    usable = [d for d in _divisors(devices) if 1 < d <= max(hw.chips_per_host, 1)]
    out = []
    seen = set()
    for name, v in sizes:
        if (name, v) in seen:
            continue
        seen.add((name, v))
        allowed = tuple(d for d in _divisors(v) if d <= devices)
        blocked = tuple(d for d in usable if v % d)
        pad = None
        if blocked:
            step = math.lcm(*blocked)
            pad = -(-v // step) * step
        out.append(Degree(name, v, allowed, blocked, pad))
    return tuple(out)


# ---------------------------------------------------------------------------
# verification by compiling

def verify_suggestion(s: Suggestion, top: int = 2) -> tuple[Verification, ...]:
    """Compile the top candidates on a CPU-emulated mesh of the same shape (``--verify``).

    Needs a :mod:`tpflax.zoo` model, ``devices <= 64``, and that many jax devices
    (set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts;
    the CLI does it). XLA's bytes are arguments + outputs + temporaries minus
    aliased (donated) buffers, per device.

    >>> import tpflax
    >>> from tpflax import zoo
    >>> s = tpflax.suggest_mesh(zoo.get("mlp"), 128, "1GiB", batch=128)
    >>> verify_suggestion(s, top=1)[0].note
    '128 devices: CPU emulation is limited to 64'
    """
    import jax

    out = []
    cands = list(s.ranked[:max(top, 0)])
    for c in cands:
        ctx = c._ctx
        est = c.per_device
        fits_est = c.fits
        if ctx is None or ctx.model is None or not hasattr(ctx.model, "make_batch"):
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note="needs a tpflax.zoo model to build the training step"))
            continue
        if s.devices > EMULABLE:
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note=f"{s.devices} devices: CPU emulation is limited to {EMULABLE}"))
            continue
        if len(jax.devices()) < s.devices:
            out.append(Verification(c.mesh, est, None, fits_est, None, None,
                                    note=f"only {len(jax.devices())} jax devices; set XLA_FLAGS="
                                         f"--xla_force_host_platform_device_count={s.devices} before jax starts"))
            continue
        import optax

        from tpflax._src.dryrun import dry_run, make_train_step
        from tpflax._src.mesh import make_mesh

        mesh = make_mesh(c.mesh)
        opt = ctx.optimizer if ctx.optimizer is not None else optax.sgd(0.0)
        ts = make_train_step(ctx.model, c.plan, mesh, opt, ctx.batch)
        dr = dry_run(ts, c.plan, mesh)
        m = dr.memory
        if m.get("argument") is None or m.get("temp") is None:
            out.append(Verification(c.mesh, est, None, fits_est, None, None, dr.compile_seconds,
                                    note="XLA reported no memory analysis"))
            continue
        compiled = int(m.get("argument") or 0) + int(m.get("output") or 0) + int(m.get("temp") or 0) \
            - int(m.get("alias") or 0)
        fits_xla = compiled <= c.device_memory
        out.append(Verification(c.mesh, est, compiled, fits_est, fits_xla, fits_xla == fits_est,
                                dr.compile_seconds))
    return tuple(out)
