"""The planner's records: Pair, Decision and Plan, and the plan's JSON form.

JSON format 3 adds each decision's priced alternatives (the candidate layouts
the chooser compared). Format 2 writes every fact a decision carries (role, layers dim, unit,
group, trainable, fsdp). Format 1 (tpflax 0.1: strategies such as
``"column+fsdp"``, none of the newer fields) still loads: the combined strategy
is split into ``strategy`` and ``fsdp``, and the missing facts are rebuilt
from the paths and pairs.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
from jax.sharding import PartitionSpec

from tpflax._src import export
from tpflax._src.errors import OptionError, PlanFormatError, PlanMismatchError, UnknownPathError
from tpflax._src.facts.classify import layer_group, unit_of
from tpflax._src.facts.tree import Leaf, itemsize, walk
from tpflax._src.layout import Interleave
from tpflax._src.mesh import MeshShape, mesh_shape
from tpflax._src.planner.skeleton import rebuild, skeleton
from tpflax._src.specs import (
    bytes_per_device,
    entries,
    entry_axes,
    spec_from_json,
    spec_problems,
    spec_to_json,
    to_pspec,
)
from tpflax._src.vocab import KINDS, ROLES, SOURCES, STRATEGIES, Kind, Role, Source, Strategy

FORMAT = "tpflax.plan"
FORMAT_VERSION = 3


@dataclass(frozen=True)
class Alternative:
    """One candidate layout the chooser priced for a leaf's decision group.

    Attributes:
        name: the candidate (``"vocab split"``, ``"replicate"``, ``"fsdp"``...).
        group: the decision group's kind (pair, embedding, head, kv, fsdp).
        spec: this leaf's spec under the candidate.
        bytes_per_device: the group's parameters, gradients and optimizer moments per device.
        comm_bytes: collective bytes one device sends per step for the group.
        flops: the group's matmul flops per device per step.
        step_time: seconds per step for the group on the priced hardware.
        chosen: True for the candidate the plan took.
        collectives: the collectives in words.
    """

    name: str
    group: str
    spec: PartitionSpec
    bytes_per_device: int
    comm_bytes: float
    flops: float
    step_time: float
    chosen: bool = False
    collectives: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "group": self.group, "spec": spec_to_json(entries(self.spec)),
                "bytes_per_device": int(self.bytes_per_device), "comm_bytes": float(self.comm_bytes),
                "flops": float(self.flops), "step_time": float(self.step_time), "chosen": self.chosen,
                "collectives": list(self.collectives)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Alternative:
        return cls(name=str(d["name"]), group=str(d["group"]), spec=to_pspec(spec_from_json(d["spec"])),
                   bytes_per_device=int(d["bytes_per_device"]), comm_bytes=float(d["comm_bytes"]),
                   flops=float(d["flops"]), step_time=float(d["step_time"]), chosen=bool(d["chosen"]),
                   collectives=tuple(str(x) for x in d.get("collectives", ())))


@dataclass(frozen=True)
class Pair:
    """A column->row (or channel->input-channel) pair found in one block."""

    id: int
    kind: str
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    size: int
    sharded: bool
    note: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "columns": list(self.columns),
                "rows": list(self.rows), "size": self.size, "sharded": self.sharded, "note": self.note}

    @classmethod
    def from_json(cls, d: dict) -> Pair:
        return cls(id=int(d["id"]), kind=str(d["kind"]), columns=tuple(d["columns"]),
                   rows=tuple(d["rows"]), size=int(d["size"]), sharded=bool(d["sharded"]),
                   note=str(d.get("note", "")))


@dataclass(frozen=True)
class Decision:
    """Why one leaf gets its spec.

    Attributes:
        spec: the PartitionSpec (one entry per dim).
        strategy: the primary strategy: column, row, heads, channel, vocab, expert,
            fsdp, replicate; ``rule``/``annotation`` for specs forced by a PartitionSpec.
        reason: the evidence, in words.
        shape, dtype: the leaf's.
        bytes: total bytes of the leaf.
        bytes_per_device: bytes on the fullest device.
        kind: layer kind (:data:`tpflax._src.vocab.Kind`); ``head`` for output heads.
        source: rule, annotation, trace (dataflow, with ``model=``), heuristic.
        pair: id of the column/row pair the leaf belongs to, if any.
        role: the leaf's side of that pair (``"column"`` or ``"row"``), if any.
        layers_dim: index of the stacked-layers dim (``nn.scan``), never sharded; None if none.
        unit: path of the layer the leaf belongs to (``.../mlp/up`` for ``.../mlp/up/kernel``).
        group: the repeated-layer pattern the leaf belongs to (layer indices replaced
            by ``*``: ``params/layers_*/mlp/up/kernel``); leaves of one group are alike.
        trainable: True for parameters the optimizer updates.
        fsdp: True when the fsdp fallback also split a dim over the fsdp axes.
        alternatives: every candidate layout the chooser priced for the leaf's
            decision groups, with its cost (empty when a rule decided alone).
        layout: the stored order of a fused dim kept head-aligned
            (:class:`tpflax._src.layout.Interleave`), or None for the model's order.
    """

    spec: PartitionSpec
    strategy: Strategy
    reason: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    bytes_per_device: int
    kind: Kind | str = ""
    source: Source = "heuristic"
    pair: int | None = None
    role: Role | None = None
    layers_dim: int | None = None
    unit: str = ""
    group: str = ""
    trainable: bool = True
    fsdp: bool = False
    alternatives: tuple[Alternative, ...] = ()
    layout: Interleave | None = None

    @property
    def label(self) -> str:
        """The strategy for display: ``"column+fsdp"`` when fsdp also splits the leaf.

        >>> Decision(PartitionSpec("fsdp", "model"), "column", "", (8, 8), "float32", 256, 64, fsdp=True).label
        'column+fsdp'
        """
        return f"{self.strategy}+fsdp" if self.fsdp and self.strategy != "fsdp" else self.strategy

    def to_json(self, path: str) -> dict:
        return {"path": path, "spec": spec_to_json(entries(self.spec)), "strategy": self.strategy,
                "fsdp": self.fsdp, "reason": self.reason, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.bytes, "bytes_per_device": self.bytes_per_device, "kind": self.kind,
                "source": self.source, "pair": self.pair, "role": self.role,
                "layers_dim": self.layers_dim, "unit": self.unit, "group": self.group,
                "trainable": self.trainable, "alternatives": [a.to_json() for a in self.alternatives],
                **({"layout": self.layout.to_json()} if self.layout is not None else {})}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Decision:
        """Read one decision of format 3 or 2, or of format 1 (combined strategies, fewer fields)."""
        strategy, _, extra = str(d["strategy"]).partition("+")
        path = str(d.get("path", ""))
        kind = str(d.get("kind", ""))
        return cls(spec=to_pspec(spec_from_json(d["spec"])), strategy=strategy,
                   reason=str(d["reason"]), shape=tuple(int(x) for x in d["shape"]),
                   dtype=str(d["dtype"]), bytes=int(d["bytes"]),
                   bytes_per_device=int(d["bytes_per_device"]), kind=kind,
                   source=str(d.get("source", "heuristic")), pair=_int_or_none(d.get("pair")),
                   role=d.get("role"), layers_dim=_int_or_none(d.get("layers_dim")),
                   unit=str(d.get("unit") or unit_of(path)), group=str(d.get("group") or layer_group(path)),
                   trainable=bool(d.get("trainable", kind not in ("int", "state"))),
                   fsdp=bool(d.get("fsdp", strategy == "fsdp" or extra == "fsdp")),
                   alternatives=tuple(Alternative.from_json(a) for a in d.get("alternatives", ())),
                   layout=Interleave.from_json(d["layout"]) if d.get("layout") else None)


def _int_or_none(x: Any) -> int | None:
    return None if x is None else int(x)


class Decisions(dict):
    """``{path: Decision}``: a dict whose missing path raises :class:`UnknownPathError` naming the
    closest known paths (``.get`` and ``in`` behave as a dict's). A path under its root (``up/kernel`` for
    ``params/up/kernel``, as the report's table prints it under the common root) names that leaf when no other
    root holds it.

    >>> Decisions({"mlp/up/kernel": 1})["mlp/up/kernal"]
    Traceback (most recent call last):
    tpflax._src.errors.UnknownPathError: 'mlp/up/kernal' is not a leaf of this plan; did you mean 'mlp/up/kernel'?
    >>> d = Decisions({"params/up/kernel": 1, "params/norm/scale": 2, "batch_stats/norm/scale": 3})
    >>> d["up/kernel"]
    1
    >>> d["norm/scale"]
    Traceback (most recent call last):
    tpflax._src.errors.UnknownPathError: 'norm/scale' is not a leaf of this plan and names more than one leaf under its first path component: 'params/norm/scale' or 'batch_stats/norm/scale'; give the full path
    >>> Decisions({"Dense_0/kernel": 1, "Dense_1/kernel": 2})["kernal"]
    Traceback (most recent call last):
    tpflax._src.errors.UnknownPathError: 'kernal' is not a leaf of this plan; did you mean 'Dense_0/kernel' or 'Dense_1/kernel'?
    """

    def named(self, path: Any) -> list[str]:
        """The leaves ``path`` names: itself if it is one, else every leaf whose path under its root is ``path``."""
        if path in self:
            return [path]
        if not isinstance(path, str):
            return []
        return [p for p in self if "/" in p and p.split("/", 1)[1] == path]

    def __missing__(self, path: Any) -> Any:
        found = self.named(path)
        if len(found) == 1:
            return self[found[0]]
        if found:
            raise UnknownPathError(f"{path!r} is not a leaf of this plan and names more than one leaf under its "
                                   f"first path component: {' or '.join(map(repr, found[:4]))}; give the full path")
        names: dict[str, list[str]] = {p: [p] for p in self}  # {a path, or one under its root: the leaves' paths}
        for p in self:  # a mistyped path under its root ("up/kernal") is close to the leaves' paths under it
            if "/" in p:
                names.setdefault(p.split("/", 1)[1], []).append(p)
        close = dict.fromkeys(q for m in difflib.get_close_matches(str(path), list(names), n=3, cutoff=0.6)
                              for q in names[m])
        hint = (f"did you mean {' or '.join(map(repr, close))}?" if close else
                f"its {len(self)} paths look like {next(iter(self), '')!r} (see plan.decisions)")
        raise UnknownPathError(f"{path!r} is not a leaf of this plan; {hint}")


@dataclass(frozen=True)
class Plan:
    """A sharding plan.

    Attributes:
        mesh: the mesh shape and axis roles planned for.
        specs: PartitionSpec tree shaped like the planned tree (boxes unwrapped);
            ``from_json`` restores its dicts (int keys included), lists, tuples,
            FrozenDicts, ``nnx.State`` and empty subtrees (see
            :mod:`tpflax._src.planner.skeleton`), other containers as nested
            dicts keyed by path components.
        decisions: ``{path: Decision}`` in tree order (a dict; a missing path raises
            :class:`tpflax.UnknownPathError`, a ``KeyError``, naming the closest paths).
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

    def __post_init__(self) -> None:
        if type(self.decisions) is not Decisions:
            object.__setattr__(self, "decisions", Decisions(self.decisions))

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
        """The leaf's PartitionSpec: ``path`` as in ``plan.decisions``, or under its root as the report prints it
        (``up/kernel`` for ``params/up/kernel``) when no other root holds it; :class:`tpflax.UnknownPathError`
        (a ``KeyError``) for a path not in the plan, naming the closest ones, or under several roots."""
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
        tree = skeleton(self.specs, {p: d.spec for p, d in self.decisions.items()})
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
            **({"tree": tree} if tree is not None else {}),
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> Plan:
        """Rebuild a plan written by :meth:`to_json` (format 1, 2 or 3): its text, or the dict ``json.load``
        makes of it; ``specs`` takes the planned tree's containers back where the JSON holds them (its ``tree``),
        else it is a nested dict."""
        data = _parse_document(text)
        try:
            mesh = mesh_shape([tuple(p) for p in data["mesh"]], axis_roles=data.get("axis_roles"))
            decisions = _read_decisions(data["decisions"])
            pairs = tuple(Pair.from_json(p) for p in data.get("pairs", []))
            warnings = tuple(str(w) for w in data.get("warnings", []))
            disagreements = tuple(str(w) for w in data.get("disagreements", []))
            options = dict(data.get("options", {}))
        except PlanFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanFormatError(f"plan JSON is malformed ({type(e).__name__}: {e}); re-create it with "
                                  "Plan.to_json()") from e
        if data["version"] == 1:  # format 1 has no roles: the pairs name each side
            decisions = _roles_from_pairs(decisions, pairs)
        problems = [x for path, d in decisions.items() for x in _decision_problems(path, d, mesh)]
        if problems:
            raise PlanFormatError("plan JSON holds decisions that are invalid for its own mesh (hand-edited?); "
                                  "re-plan, or fix these entries", problems)
        specs = rebuild(data["tree"], {p: d.spec for p, d in decisions.items()}) if "tree" in data else None
        return cls(mesh=mesh, specs=_nested(decisions) if specs is None else specs, decisions=decisions,
                   pairs=pairs, warnings=warnings, disagreements=disagreements, options=options)

    def to_rules(self) -> list[tuple[str, PartitionSpec]]:
        """Ordered ``(regex, PartitionSpec)`` rules that reproduce this plan: see :func:`tpflax._src.export.to_rules`."""
        return export.to_rules(self)

    def to_logical_axis_rules(self) -> export.LogicalAxes:
        """Logical axis names per dim and ``(logical, mesh)`` rules: see :func:`tpflax._src.export.to_logical_axis_rules`."""
        return export.to_logical_axis_rules(self)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _set_specs(self: Plan, tree: Any) -> None:
    """Keep the specs tree as its structure and leaves: :attr:`Plan.specs` hands out a new tree each time."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_spec)
    object.__setattr__(self, "_specs", (treedef, tuple(leaves)))


def _get_specs(self: Plan) -> Any:
    """The specs tree, in new containers: the caller's edits (``plan.specs["params"]["w"] = P()``, a
    ``del``) changed the plan's own tree before, so :func:`tpflax.shardings` laid out what ``shard`` and the
    estimate did not (they read ``decisions``)."""
    treedef, leaves = self._specs
    return jax.tree_util.tree_unflatten(treedef, leaves)


# after @dataclass has made ``specs`` a field (a property there would be read as its default): the generated
# __init__, replace(), repr and == go through it
Plan.specs = property(_get_specs, _set_specs, doc=Plan.__doc__ and "PartitionSpec tree shaped like the planned tree.")


def require_plan(plan: Any, call: str, fix: str = "make one with tpflax.plan(tree, mesh)") -> None:
    """OptionError unless ``plan`` is a :class:`Plan`: ``call``'s arguments given in another order (the mesh
    where the plan goes) fail deep inside it otherwise, with a bare ``AttributeError``.

    >>> require_plan({"model": 2}, "unshard(tree, plan)")
    Traceback (most recent call last):
    tpflax._src.errors.OptionError: unshard(tree, plan): plan is a dict, not a tpflax.Plan; make one with tpflax.plan(tree, mesh) (the order is unshard(tree, plan))
    """
    if not isinstance(plan, Plan):
        raise OptionError(f"{call}: plan is a {type(plan).__name__}, not a tpflax.Plan; {fix} (the order is {call})")


def _nested(decisions: Mapping[str, Decision]) -> dict:
    """The specs as nested dicts keyed by path components (a plan JSON without its tree); flat, keyed by the
    whole paths, when one path is a prefix of another (keys holding '/': ``"a"`` beside ``"a/b"``), which
    nested dicts cannot hold both of.

    >>> from jax.sharding import PartitionSpec as P
    >>> d = Decision(P(), "replicate", "", (2,), "float32", bytes=8, bytes_per_device=8)
    >>> _nested({"x/w": d, "y": d}), _nested({"a": d, "a/b": d})
    ({'x': {'w': P()}, 'y': P()}, {'a': P(), 'a/b': P()})
    """
    specs: dict = {}
    for path, d in decisions.items():
        node = specs
        *parents, name = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break  # a leaf where a subtree goes
        if not isinstance(node, dict) or name in node:  # (or a subtree where a leaf goes)
            return {p: x.spec for p, x in decisions.items()}
        node[name] = d.spec
    return specs


def _parse_document(text: Any) -> dict:
    """The plan document of ``text``: JSON text (str or bytes), or the object ``json.load`` made of it."""
    if isinstance(text, os.PathLike) or (isinstance(text, str) and text.strip()[:1] not in ("{", "[", "")
                                         and len(text) < 4096 and os.path.isfile(text)):
        # a file's path read as JSON text: "Expecting value: line 1 column 1 (char 0)"
        raise PlanFormatError(f"Plan.from_json takes the JSON text, not a file path ({os.fspath(text)!r}); "
                              "read the file first: Plan.from_json(pathlib.Path(path).read_text())")
    if isinstance(text, Mapping):  # json.load's result: the document itself
        data = dict(text)
    else:
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
    return data


def _read_decisions(raw: Any) -> dict[str, Decision]:
    if not isinstance(raw, list) or not raw:
        raise PlanFormatError("plan JSON 'decisions' must be a non-empty list of per-leaf objects; "
                              "re-create it with Plan.to_json()")
    paths = [d.get("path") if isinstance(d, dict) else None for d in raw]
    bad = [f"decisions[{i}]: path {p!r} is not a string" for i, p in enumerate(paths) if not isinstance(p, str)]
    bad += [f"{p}: listed {paths.count(p)} times; keep one entry per leaf"
            for p in dict.fromkeys(paths) if isinstance(p, str) and paths.count(p) > 1]
    if bad:
        raise PlanFormatError("plan JSON has malformed decisions", bad)
    return {d["path"]: Decision.from_json(d) for d in raw}


def _roles_from_pairs(decisions: dict[str, Decision], pairs: Sequence[Pair]) -> dict[str, Decision]:
    roles = {p: "column" for pr in pairs for p in pr.columns}
    roles.update({p: "row" for pr in pairs for p in pr.rows})
    return {path: replace(d, role=roles.get(path)) if d.pair is not None and d.role is None else d
            for path, d in decisions.items()}


def _decision_problems(path: str, d: Decision, mesh: MeshShape) -> list[str]:
    """A decision read from JSON whose vocabulary, shape, dtype or byte counts are not self-consistent."""
    words = [(name, value, allowed) for name, value, allowed in (
        ("strategy", d.strategy, STRATEGIES), ("kind", d.kind, ("", *KINDS)), ("source", d.source, SOURCES),
        ("role", d.role, (None, *ROLES))) if value not in allowed]
    if words:
        return [f"{path}: {name} {value!r} is not one of {', '.join(map(repr, allowed))}"
                for name, value, allowed in words]
    if any(n < 0 for n in d.shape):
        return [f"{path}: shape {d.shape} has a negative dim; shapes are non-negative ints"]
    try:
        item = itemsize(d.dtype)
    except TypeError:
        return [f"{path}: dtype {d.dtype!r} is not a dtype jax knows; use e.g. 'float32' or 'bfloat16'"]
    bad_spec = spec_problems(path, d.shape, entries(d.spec), mesh)
    if bad_spec:
        return bad_spec
    want = math.ceil(math.prod(d.shape) * item)
    if d.bytes != want:
        return [f"{path}: bytes {d.bytes} but shape {d.shape} of {d.dtype} holds {want}; re-plan"]
    per = bytes_per_device(d.shape, item, entries(d.spec, len(d.shape)), mesh)
    if d.bytes_per_device != per:
        return [f"{path}: bytes_per_device {d.bytes_per_device} but spec {d.spec} on mesh {mesh} gives "
                f"{per}; re-plan"]
    return _layout_problems(path, d, mesh)


def _layout_problems(path: str, d: Decision, mesh: MeshShape) -> list[str]:
    """A head-aligned layout must span its dim of the leaf, over as many ranks as the spec splits it."""
    lay = d.layout
    if lay is None:
        return []
    if lay.dim >= len(d.shape) or d.shape[lay.dim] != lay.size:
        return [f"{path}: layout over dim {lay.dim} holds {lay.size} but the leaf's shape is {d.shape}; re-plan"]
    ranks = math.prod(mesh.sizes[a] for a in entry_axes(entries(d.spec, len(d.shape))[lay.dim]))
    if ranks != lay.ranks:
        return [f"{path}: layout over {lay.ranks} ranks but spec {d.spec} splits dim {lay.dim} over {ranks} "
                f"on mesh {mesh}; re-plan"]
    return []


def check_tree_matches(plan: Plan, leaves: Sequence[Leaf], *, checkpoint: str = "") -> None:
    """Raise PlanMismatchError listing every difference between a tree and the plan.

    ``checkpoint``: the leaves are the saved checkpoint's at that path, restored onto the plan: the
    problems say what the checkpoint holds (a model changed since the save), not to re-plan.
    """
    what = f"the checkpoint {checkpoint}" if checkpoint else "the tree"
    problems = []
    seen = set()
    for leaf in leaves:
        seen.add(leaf.path)
        d = plan.decisions.get(leaf.path)
        if d is None:
            problems.append(f"{leaf.path}: in {'the checkpoint' if checkpoint else 'the tree'} but not in the plan "
                            f"(shape {leaf.shape}); "
                            + ("the planned model has no such leaf" if checkpoint else "re-plan"))
        elif tuple(d.shape) != tuple(leaf.shape):
            problems.append(f"{leaf.path}: the checkpoint holds shape {leaf.shape} but the plan has "
                            f"{tuple(d.shape)}; the leaf changed since the save" if checkpoint else
                            f"{leaf.path}: shape {leaf.shape} but the plan has {tuple(d.shape)}; re-plan")
        elif d.dtype != leaf.dtype:
            problems.append(f"{leaf.path}: the checkpoint holds dtype {leaf.dtype} but the plan has "
                            f"{d.dtype}; plan the saved dtype" if checkpoint else
                            f"{leaf.path}: dtype {leaf.dtype} but the plan has {d.dtype}; re-plan "
                            "or cast the tree back")
    for path in plan.decisions:
        if path not in seen:
            problems.append(f"{path}: in the plan but not in the checkpoint (a leaf added since the save?)"
                            if checkpoint else
                            f"{path}: in the plan but missing from the tree; re-plan or pass the full tree")
    if problems:
        raise PlanMismatchError(f"{what} does not match the plan", problems)
