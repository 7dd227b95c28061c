"""The plan: a PartitionSpec for every leaf, with the reason for it.

``plan(tree, mesh)`` walks the tree, classifies the leaves and decides each
spec. The first source that speaks wins, and it becomes the reason:

    user rules -> model annotations -> tree heuristics (pairing, heads,
    channel, vocab, expert) -> FSDP fallback -> replicate

Planning is pure: it needs a mesh *shape*, never devices, and never allocates
the tree's arrays.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
from jax.sharding import PartitionSpec

from tpflax._src.planner import heuristics
from tpflax._src.facts.classify import Facts, classify
from tpflax._src.errors import OptionError, PlanFormatError, PlanMismatchError, RuleError, SpecError
from tpflax._src.planner.heuristics import Options, Pair, Proposal
from tpflax._src.mesh import DATA, EXPERT, FSDP, TENSOR, MeshShape, mesh_shape
from tpflax._src.specs import (
    Entry,
    bytes_per_device,
    describe,
    entries,
    fmt_bytes,
    spec_from_json,
    spec_problems,
    spec_to_json,
    to_pspec,
    used_axes,
)
from tpflax._src.facts.tree import Leaf, walk
from tpflax._src.vocab import Role

FORMAT = "tpflax.plan"
FORMAT_VERSION = 1
STRATEGIES = ("column", "row", "heads", "channel", "vocab", "expert", "fsdp", "replicate")


@dataclass(frozen=True)
class Decision:
    """Why one leaf gets its spec.

    Attributes:
        spec: the PartitionSpec (one entry per dim).
        strategy: column, row, heads, channel, vocab, expert, fsdp, replicate, or
            ``<tensor strategy>+fsdp``; ``rule``/``annotation`` for forced specs.
        reason: the evidence, in words.
        shape, dtype: the leaf's.
        bytes: total bytes of the leaf.
        bytes_per_device: bytes on the fullest device.
        kind: layer kind from classification.
        source: rule, annotation, trace (dataflow, with ``model=``), heuristic.
        pair: id of the column/row pair the leaf belongs to, if any.
        role: the leaf's side of that pair (``"column"`` or ``"row"``), if any.
        layers_dim: index of the stacked-layers dim (``nn.scan``), never sharded; None if none.
        unit: path of the layer the leaf belongs to (``.../mlp/up`` for ``.../mlp/up/kernel``).
        group: the repeated-layer pattern the leaf belongs to (layer indices replaced
            by ``*``: ``params/layers_*/mlp/up/kernel``); leaves of one group are alike.
        trainable: True for parameters the optimizer updates.
    """

    spec: PartitionSpec
    strategy: str
    reason: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    bytes_per_device: int
    kind: str = ""
    source: str = "heuristic"
    pair: int | None = None
    role: Role | None = None
    layers_dim: int | None = None
    unit: str = ""
    group: str = ""
    trainable: bool = True

    def to_json(self, path: str) -> dict:
        return {"path": path, "spec": spec_to_json(entries(self.spec)), "strategy": self.strategy,
                "reason": self.reason, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.bytes, "bytes_per_device": self.bytes_per_device, "kind": self.kind,
                "source": self.source, "pair": self.pair, "role": self.role,
                "layers_dim": self.layers_dim, "unit": self.unit, "group": self.group,
                "trainable": self.trainable}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Decision:
        return cls(spec=to_pspec(spec_from_json(d["spec"])), strategy=str(d["strategy"]),
                   reason=str(d["reason"]), shape=tuple(int(x) for x in d["shape"]),
                   dtype=str(d["dtype"]), bytes=int(d["bytes"]),
                   bytes_per_device=int(d["bytes_per_device"]), kind=str(d.get("kind", "")),
                   source=str(d.get("source", "heuristic")),
                   pair=None if d.get("pair") is None else int(d["pair"]),
                   role=d.get("role"),
                   layers_dim=None if d.get("layers_dim") is None else int(d["layers_dim"]),
                   unit=str(d.get("unit", "")), group=str(d.get("group", "")),
                   trainable=bool(d.get("trainable", True)))


@dataclass(frozen=True)
class Plan:
    """A sharding plan.

    Attributes:
        mesh: the mesh shape and axis roles planned for.
        specs: PartitionSpec tree shaped like the planned tree (boxes unwrapped);
            after ``from_json``, a nested dict keyed by path components.
        decisions: ``{path: Decision}`` in tree order.
        pairs: column->row pairs found.
        warnings: replicated large leaves, unmatched rules, ignored annotations.
        options: the knobs used.
        disagreements: with ``model=``, leaves where the traced plan and the tree
            heuristics differ (the trace wins).
    """

    mesh: MeshShape
    specs: Any
    decisions: Mapping[str, Decision]
    pairs: tuple[Pair, ...] = ()
    warnings: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    disagreements: tuple[str, ...] = ()

    @property
    def mesh_shape(self) -> dict[str, int]:
        return self.mesh.sizes

    @property
    def total_bytes(self) -> int:
        return sum(d.bytes for d in self.decisions.values())

    @property
    def bytes_per_device(self) -> int:
        """Parameter bytes on the fullest device."""
        return sum(d.bytes_per_device for d in self.decisions.values())

    @property
    def savings(self) -> float:
        """Percent of parameter bytes each device saves against holding everything."""
        total = self.total_bytes
        return 100.0 * (1 - self.bytes_per_device / total) if total else 0.0

    def spec(self, path: str) -> PartitionSpec:
        return self.decisions[path].spec

    def specs_for(self, tree: Any) -> Any:
        """The plan's specs laid out on ``tree`` (matched by path).

        Raises:
            PlanMismatchError: paths missing or extra, or shapes/dtypes changed.
        """
        leaves, treedef = walk(tree)
        check_tree_matches(self, leaves)
        return jax.tree_util.tree_unflatten(treedef, [self.decisions[x.path].spec for x in leaves])

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps({
            "format": FORMAT, "version": FORMAT_VERSION,
            "mesh": [[n, s] for n, s in self.mesh.axes],
            "axis_roles": dict(self.mesh.roles),
            "options": dict(self.options),
            "totals": {"bytes": self.total_bytes, "bytes_per_device": self.bytes_per_device,
                       "savings_percent": round(self.savings, 3)},
            "decisions": [d.to_json(p) for p, d in self.decisions.items()],
            "pairs": [p.to_json() for p in self.pairs],
            "warnings": list(self.warnings),
            "disagreements": list(self.disagreements),
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Rebuild a plan written by :meth:`to_json`; ``specs`` becomes a nested dict."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise PlanFormatError(f"plan JSON does not parse: {e}; pass the text of Plan.to_json()") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanFormatError(f"not a tpflax plan: expected an object with format={FORMAT!r}")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise PlanFormatError(
                f"plan format version {version!r} is not supported by this tpflax (reads versions 1.."
                f"{FORMAT_VERSION}); upgrade tpflax or re-plan with this version")
        try:
            mesh = mesh_shape([tuple(p) for p in data["mesh"]], axis_roles=data.get("axis_roles"))
            raw = data["decisions"]
            if not isinstance(raw, list) or not raw:
                raise PlanFormatError("plan JSON 'decisions' must be a non-empty list of per-leaf objects; "
                                      "re-create it with Plan.to_json()")
            paths = [d.get("path") if isinstance(d, dict) else None for d in raw]
            bad = [f"decisions[{i}]: path {p!r} is not a string" for i, p in enumerate(paths)
                   if not isinstance(p, str)]
            bad += [f"{p}: listed {paths.count(p)} times; keep one entry per leaf"
                    for p in dict.fromkeys(paths) if isinstance(p, str) and paths.count(p) > 1]
            if bad:
                raise PlanFormatError("plan JSON has malformed decisions", bad)
            decisions = {d["path"]: Decision.from_json(d) for d in raw}
            pairs = tuple(Pair.from_json(p) for p in data.get("pairs", []))
            warnings = tuple(str(w) for w in data.get("warnings", []))
            disagreements = tuple(str(w) for w in data.get("disagreements", []))
            options = dict(data.get("options", {}))
        except PlanFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFormatError(f"plan JSON is malformed ({type(e).__name__}: {e}); re-create it with "
                                  "Plan.to_json()") from e
        problems = []
        for path, d in decisions.items():
            problems += _decision_problems(path, d, mesh)
        if problems:
            raise PlanFormatError("plan JSON holds decisions that are invalid for its own mesh (hand-edited?); "
                                  "re-plan, or fix these entries", problems)
        specs: dict = {}
        for path, d in decisions.items():
            node = specs
            parts = path.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = d.spec
        return cls(mesh=mesh, specs=specs, decisions=decisions, pairs=pairs, warnings=warnings,
                   disagreements=disagreements,
                   options=options)


def _decision_problems(path: str, d: Decision, mesh: MeshShape) -> list[str]:
    """A decision read from JSON whose shape, dtype or byte counts are not self-consistent."""
    import numpy as np

    if any(n < 0 for n in d.shape):
        return [f"{path}: shape {d.shape} has a negative dim; shapes are non-negative ints"]
    if d.dtype.startswith("key<"):  # typed PRNG keys: no numpy dtype to check the byte counts against
        return spec_problems(path, d.shape, entries(d.spec), mesh)
    try:
        item = np.dtype(jax.numpy.dtype(d.dtype)).itemsize
    except TypeError:
        return [f"{path}: dtype {d.dtype!r} is not a dtype jax knows; use e.g. 'float32' or 'bfloat16'"]
    bad_spec = spec_problems(path, d.shape, entries(d.spec), mesh)
    if bad_spec:
        return bad_spec
    want = math.prod(d.shape) * item
    if d.bytes != want:
        return [f"{path}: bytes {d.bytes} but shape {d.shape} of {d.dtype} holds {want}; re-plan"]
    per = bytes_per_device(d.shape, item, entries(d.spec, len(d.shape)), mesh)
    if d.bytes_per_device != per:
        return [f"{path}: bytes_per_device {d.bytes_per_device} but spec {d.spec} on mesh {mesh} gives "
                f"{per}; re-plan"]
    return []


def _check_options(**values: Any) -> None:
    """Byte and channel thresholds must be non-negative numbers."""
    problems = [f"{k}={v!r} must be a non-negative number, e.g. {k}=262144" for k, v in values.items()
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0]
    if problems:
        raise OptionError("invalid planner options", problems)


def check_tree_matches(plan: Plan, leaves: Sequence[Leaf]) -> None:
    """Raise PlanMismatchError listing every difference between a tree and the plan."""
    problems = []
    seen = set()
    for leaf in leaves:
        seen.add(leaf.path)
        d = plan.decisions.get(leaf.path)
        if d is None:
            problems.append(f"{leaf.path}: in the tree but not in the plan (shape {leaf.shape}); re-plan")
        elif tuple(d.shape) != tuple(leaf.shape):
            problems.append(f"{leaf.path}: shape {leaf.shape} but the plan has {tuple(d.shape)}; re-plan")
        elif d.dtype != leaf.dtype:
            problems.append(f"{leaf.path}: dtype {leaf.dtype} but the plan has {d.dtype}; re-plan "
                            "or cast the tree back")
    for path in plan.decisions:
        if path not in seen:
            problems.append(f"{path}: in the plan but missing from the tree; re-plan or pass the full tree")
    if problems:
        raise PlanMismatchError("the tree does not match the plan", problems)


# ---------------------------------------------------------------------------
# rules

Rule = tuple[str, Any]


@dataclass(frozen=True)
class _Rule:
    index: int
    pattern: re.Pattern
    spec: tuple[Entry, ...] | None
    strategy: str | None

    def describe(self) -> str:
        target = self.strategy if self.strategy else str(to_pspec(self.spec or ()))
        return f"rule {self.index} ({self.pattern.pattern!r} -> {target})"


def _parse_rules(rules: Any, mesh: MeshShape) -> list[_Rule]:
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    out, problems = [], []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            problems.append(f"rule {i}: {rule!r} is not a (regex, PartitionSpec or strategy) pair")
            continue
        pattern, target = rule
        try:
            rx = re.compile(pattern)
        except re.error as e:
            problems.append(f"rule {i}: regex {pattern!r} does not compile: {e}")
            continue
        if isinstance(target, str):
            if target not in STRATEGIES:
                problems.append(f"rule {i} ({pattern!r}): strategy {target!r} is unknown; use one of "
                                f"{', '.join(STRATEGIES)} or a PartitionSpec")
                continue
            out.append(_Rule(i, rx, None, target))
            continue
        if target is not None and not isinstance(target, (PartitionSpec, tuple, list)):
            problems.append(f"rule {i} ({pattern!r}): target {target!r} is neither a PartitionSpec nor a "
                            "strategy name")
            continue
        spec = entries(target)
        unknown = [a for a in used_axes(spec) if a not in mesh.sizes]
        if unknown:
            problems.append(f"rule {i} ({pattern!r}): spec {to_pspec(spec)} names mesh axis "
                            f"{', '.join(map(repr, unknown))}, but the mesh is {mesh}; use one of "
                            f"{', '.join(mesh.sizes)} (or a strategy: {', '.join(STRATEGIES)})")
            continue
        out.append(_Rule(i, rx, spec, None))
    if problems:
        raise RuleError("invalid sharding rules", problems)
    return out


def _forced_strategy(f: Facts, strategy: str, mesh: MeshShape) -> tuple[tuple[Entry, ...] | None, str]:
    """Spec for a strategy forced by a user rule, or (None, why not)."""
    t_entry, t_size = mesh.group(TENSOR)
    f_entry, f_size = mesh.group(FSDP)
    e_entry, e_size = mesh.group(EXPERT)
    body, k = f.body, f.stacked
    if strategy == "replicate":
        return (None,) * len(f.leaf.shape), ""

    def at(dim: int, entry: Entry, size: int, label: str):
        if entry is None:
            return None, f"the mesh has no {label} axis"
        if not body or dim >= len(body) or dim < -len(body):
            return None, f"rank {len(body)} has no dim for {strategy}"
        d = dim % len(body)
        if body[d] % size:
            return None, f"dim {d} ({body[d]}) is not divisible by {describe(entry, mesh)}"
        spec = [None] * len(f.leaf.shape)
        spec[k + d] = entry
        return tuple(spec), ""

    if strategy in ("column", "channel"):
        return at(1 if f.kind in ("attention",) and len(body) == 3 else -1, t_entry, t_size, "tensor")
    if strategy == "row":
        return at(-2 if f.kind == "conv" else 0, t_entry, t_size, "tensor")
    if strategy == "heads":
        if len(body) != 3:
            return None, "heads needs a 3-D (d, heads, head_dim) or (heads, head_dim, d) kernel"
        return at(0 if ROW_LIKE.match(f.unit_name) else 1, t_entry, t_size, "tensor")
    if strategy == "vocab":
        spec, why = at(0, t_entry, t_size, "tensor")
        return (spec, why) if spec else at(-1, t_entry, t_size, "tensor")
    if strategy == "expert":
        return at(0, e_entry, e_size, "expert")
    if strategy == "fsdp":
        if f_entry is None:
            return None, "the mesh has no fsdp axis"
        free = [d for d in range(len(body)) if body[d] % f_size == 0]
        if not free:
            return None, f"no dim of {body} is divisible by fsdp={f_size}"
        return at(max(free, key=lambda d: body[d]), f_entry, f_size, "fsdp")
    return None, f"unknown strategy {strategy}"


ROW_LIKE = re.compile(r"^(o|out|o_proj|out_proj|c_proj|proj|wo)$", re.I)


# ---------------------------------------------------------------------------
# annotations

def default_logical_rules(mesh: MeshShape) -> list[tuple[str, Any]]:
    """Logical-axis rules derived from the mesh roles (the MaxText/T5X vocabulary)."""
    t = mesh.group(TENSOR)[0]
    f = mesh.group(FSDP)[0]
    e = mesh.group(EXPERT)[0]
    d = mesh.group(DATA)[0]
    return [("batch", d), ("embed", f), ("mlp", t), ("heads", t), ("q_heads", t), ("kv_heads", t),
            ("vocab", t), ("joined_kv", t), ("exp", e), ("expert", e), ("kv", None), ("head_dim", None),
            ("norm", None), ("layers", None), ("length", None), ("seq", None)]


def _annotation(f: Facts, mesh: MeshShape, logical_rules) -> tuple[tuple[Entry, ...], str, list[str]]:
    """Spec from flax metadata; drops axes the mesh lacks or that do not divide (with warnings)."""
    leaf = f.leaf
    warnings = []
    spec: list[Entry] = []
    used: set[str] = set()
    for dim, name in enumerate(leaf.names or ()):
        if leaf.logical:
            candidates = [axes for lname, axes in logical_rules if lname == name] if name is not None else []
        else:
            candidates = [name]
        chosen = None
        for axes in candidates:
            e = entries((axes,))[0]
            ax = [a for a in (e if isinstance(e, tuple) else (e,)) if a is not None]
            if not ax:
                break
            if any(a not in mesh.sizes for a in ax):
                if not leaf.logical:
                    warnings.append(f"{leaf.path}: annotation names mesh axis {name!r} the mesh {mesh} lacks; "
                                    f"dim {dim} left unsharded")
                continue
            if used & set(ax):
                continue
            size = 1
            for a in ax:
                size *= mesh.sizes[a]
            if leaf.shape[dim] % size:
                warnings.append(f"{leaf.path}: annotated dim {dim} ({leaf.shape[dim]}) is not divisible by "
                                f"{'*'.join(ax)}={size}; left unsharded")
                continue
            chosen = e
            used |= set(ax)
            break
        spec.append(chosen)
    kind = "logical" if leaf.logical else "mesh-axis"
    reason = f"{kind} annotation {tuple(leaf.names or ())} -> {to_pspec(spec)}"
    return tuple(spec), reason, warnings


# ---------------------------------------------------------------------------
# the planner


def plan(tree: Any, mesh: Any, *, rules: Any = None, logical_rules: Sequence[tuple[str, Any]] | None = None,
         axis_roles: Mapping[str, str] | None = None, fsdp_min_bytes: int = 1 << 18,
         min_channels: int = 64, tensor_min_bytes: int = 0, stacked: str | None = None,
         use_annotations: bool = True, model: Any = None, sample: Any = None) -> Plan:
    """Plan a PartitionSpec for every leaf of ``tree``.

    Args:
        tree: params, a full variable dict, a FrozenDict, a tree of
            ``jax.ShapeDtypeStruct``, a tree boxed in flax metadata, or NNX state.
        mesh: ``{"data": 2, "model": 4}``, ``"data=2,model=4"``, a jax ``Mesh`` or
            ``AbstractMesh``.
        rules: ordered ``(regex, PartitionSpec | strategy name)`` pairs matched
            with ``re.search`` against paths; the first match wins and beats
            every heuristic.
        logical_rules: ``(logical name, mesh axes)`` pairs for flax logical
            annotations; defaults to :func:`default_logical_rules`.
        axis_roles: roles for mesh axes with unrecognised names.
        fsdp_min_bytes: leaves this large or larger also shard over fsdp axes.
        min_channels: conv chains narrower than this stay replicated.
        tensor_min_bytes: column/row pairs whose kernels are all smaller stay replicated.
        stacked: regex forcing leaves to be treated as ``nn.scan`` stacks.
        use_annotations: honour flax partitioning metadata.
        model: a linen ``nn.Module``, an ``nnx.Module`` or a ``tpflax.zoo`` model
            whose forward pass is traced (abstractly) to decide column/row pairs,
            heads, experts, conv chains, embeddings and output heads from the
            dataflow rather than from names; see :mod:`tpflax.trace`.
        sample: example inputs for ``model`` (``jax.ShapeDtypeStruct`` suffice).

    Returns:
        A :class:`Plan`.

    Raises:
        MeshError, RuleError, SpecError, TreeError, TraceError: see their docs.

    >>> import jax
    >>> p = plan({"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...                   "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}},
    ...           "norm": {"scale": jax.ShapeDtypeStruct((64,), "float32")}}, {"model": 4})
    >>> p.decisions["mlp/up/kernel"].spec, p.decisions["mlp/down/kernel"].spec
    (P(None, 'model'), P('model', None))
    """
    ms = mesh_shape(mesh, axis_roles)
    _check_options(fsdp_min_bytes=fsdp_min_bytes, min_channels=min_channels, tensor_min_bytes=tensor_min_bytes)
    parsed = _parse_rules(rules, ms)
    if stacked is not None:
        try:
            re.compile(stacked)
        except (re.error, TypeError) as e:
            raise RuleError(f"stacked={stacked!r} is not a regex ({e}); pass e.g. stacked=r'layers'") from None
    if logical_rules is not None:
        bad = [f"logical_rules[{i}] = {r!r} is not a (logical name, mesh axes) pair"
               for i, r in enumerate(logical_rules) if not (isinstance(r, (tuple, list)) and len(r) == 2)]
        if bad:
            raise RuleError("invalid logical_rules; write e.g. [('mlp', 'model'), ('embed', None)]", bad)
    leaves, treedef = walk(tree)
    facts = classify(leaves, stacked)
    opts = Options(fsdp_min_bytes=int(fsdp_min_bytes), min_channels=int(min_channels),
                   tensor_min_bytes=int(tensor_min_bytes), stacked=stacked)
    lrules = list(logical_rules) if logical_rules is not None else default_logical_rules(ms)

    forced: dict[str, Proposal] = {}
    sources: dict[str, str] = {}
    warnings: list[str] = []
    problems: list[str] = []
    matched: dict[int, list[str]] = {r.index: [] for r in parsed}
    for f in facts:
        for r in parsed:
            if r.pattern.search(f.path):
                matched[r.index].append(f.path)
        winner = next((r for r in parsed if r.pattern.search(f.path)), None)
        if winner is not None:
            if winner.spec is not None:
                spec = entries(winner.spec, len(f.leaf.shape)) if len(winner.spec) <= len(f.leaf.shape) \
                    else winner.spec
                errs = spec_problems(f.path, f.leaf.shape, spec, ms)
                if errs:
                    problems += [e + f" [from {winner.describe()}]" for e in errs]
                    continue
                forced[f.path] = Proposal(spec, "rule", f"forced by {winner.describe()}")
            else:
                spec, why = _forced_strategy(f, winner.strategy, ms)
                if spec is None:
                    problems.append(f"{f.path}: {winner.describe()} cannot apply to shape {f.leaf.shape} on "
                                    f"mesh {ms}: {why}; use another strategy or a PartitionSpec")
                    continue
                forced[f.path] = Proposal(spec, winner.strategy, f"forced by {winner.describe()}")
            sources[f.path] = "rule"
        elif use_annotations and f.leaf.names is not None:
            spec, reason, warns = _annotation(f, ms, lrules)
            warnings += warns
            forced[f.path] = Proposal(spec, "annotation", reason)
            sources[f.path] = "annotation"
    if problems:
        raise SpecError("sharding rules produce invalid specs", problems)
    claimed: set[str] = set()
    for r in parsed:
        if not matched[r.index]:
            warnings.append(f"{r.describe()} matches no leaf; check the regex against Plan.decisions paths")
        elif all(p in claimed for p in matched[r.index]):
            warnings.append(f"{r.describe()} never wins: every leaf it matches is taken by an earlier rule")
        claimed.update(matched[r.index])

    traced: dict[str, Proposal] = {}
    tpairs: list[Pair] = []
    disagreements: list[str] = []
    if model is not None:  # dataflow first; the tree heuristics handle what it does not explain
        from tpflax._src.planner import dataflow_rules
        from tpflax._src.trace.dataflow import dataflow

        flow = dataflow(model, sample, tree)
        traced, tpairs = dataflow_rules.propose(facts, ms, opts, flow, skip=forced)
        disagreements = dataflow_rules.disagreements(traced, heuristics.propose(facts, ms, opts, skip=forced)[0])
        sources.update({path: "trace" for path in traced})
    doubts: list[str] = []
    proposals, pairs = heuristics.propose([f for f in facts if f.path not in traced], ms, opts,
                                          skip=forced, first_pair=len(tpairs) + 1, doubts=doubts)
    warnings += doubts
    pairs = tpairs + pairs
    proposals.update(traced)
    proposals.update(forced)

    decisions: dict[str, Decision] = {}
    specs = []
    roles = {p: "column" for pr in pairs for p in pr.columns}
    roles.update({p: "row" for pr in pairs for p in pr.rows})
    for f in facts:
        p = proposals[f.path]
        spec = entries(p.spec, len(f.leaf.shape))
        # The planner must never emit an invalid spec: this guards the heuristics.
        errs = spec_problems(f.path, f.leaf.shape, spec, ms)
        if errs:  # pragma: no cover - a heuristics bug; fail loudly rather than emit it
            raise AssertionError("tpflax produced an invalid spec:\n" + "\n".join(errs))
        pspec = to_pspec(spec)
        decisions[f.path] = Decision(
            spec=pspec, strategy=p.strategy, reason=p.reason, shape=f.leaf.shape, dtype=f.leaf.dtype,
            bytes=f.leaf.nbytes, bytes_per_device=bytes_per_device(f.leaf.shape, f.leaf.itemsize, spec, ms),
            kind=f.kind, source=sources.get(f.path, "heuristic"), pair=p.pair,
            role=roles.get(f.path) if p.pair is not None else None,
            layers_dim=0 if f.stacked else None, unit=f.unit, group=layer_group(f.path),
            trainable=f.leaf.collection in ("", "params") and f.leaf.numeric in ("float", "complex"))
        specs.append(pspec)
    warnings += _replication_warnings(decisions, ms)
    options = {"fsdp_min_bytes": opts.fsdp_min_bytes, "min_channels": opts.min_channels,
               "tensor_min_bytes": opts.tensor_min_bytes, "stacked": stacked,
               "rules": [[r.pattern.pattern, r.strategy or spec_to_json(r.spec or ())] for r in parsed]}
    return Plan(mesh=ms, specs=jax.tree_util.tree_unflatten(treedef, specs), decisions=decisions,
                pairs=tuple(pairs), warnings=tuple(warnings), options=options,
                disagreements=tuple(disagreements))


_INDEXED = re.compile(r"^(\D*?)(_?)(\d+)$")


def layer_group(path: str) -> str:
    """``params/layers_3/mlp/up/kernel`` -> ``params/layers_*/mlp/up/kernel``: the repeated-layer pattern.

    >>> layer_group("params/h/11/attn/c_attn/kernel")
    'params/h/*/attn/c_attn/kernel'
    """
    return "/".join(_INDEXED.sub(lambda m: m.group(1) + m.group(2) + "*", part) for part in path.split("/"))


def _replication_warnings(decisions: Mapping[str, Decision], mesh: MeshShape) -> list[str]:
    if mesh.group(TENSOR)[1] * mesh.group(FSDP)[1] * mesh.group(EXPERT)[1] == 1:
        return []
    total = sum(d.bytes for d in decisions.values())
    limit = max(1 << 20, total // 100)
    out = []
    for path, d in decisions.items():
        if d.bytes >= limit and d.bytes_per_device == d.bytes:
            out.append(f"{path} {d.shape} ({fmt_bytes(d.bytes)}, {100 * d.bytes / total:.1f}% of the model) "
                       f"is replicated on every device: {d.reason}")
    return out
