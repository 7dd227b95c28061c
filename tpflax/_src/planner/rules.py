"""The first two rule sets: the user's rules, then the model's annotations.

A user rule is ``(regex, PartitionSpec | strategy name)``, matched with
``re.search`` against leaf paths; the first match wins and beats everything
else. Flax partitioning metadata (mesh-axis or logical names) comes next.
Both produce :class:`~tpflax._src.planner.builders.Proposal` s that the later
rule sets never overwrite.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jax.sharding import PartitionSpec

from tpflax._src.errors import RuleError, SpecError
from tpflax._src.facts.classify import Facts
from tpflax._src.mesh import DATA, DEFAULT_ROLE_NAMES, EXPERT, FSDP, TENSOR, MeshShape, mesh_shape
from tpflax._src.planner.builders import Proposal
from tpflax._src.specs import Entry, describe, entries, spec_problems, to_pspec, used_axes
from tpflax._src.vocab import RULE_STRATEGIES, Source

ROW_LIKE = re.compile(r"^(o|out|o_proj|out_proj|output_proj|c_proj|proj|wo)$", re.I)


@dataclass(frozen=True)
class UserRule:
    """One parsed user rule: a spec, or a strategy to build for each matching leaf."""

    index: int
    pattern: re.Pattern
    spec: tuple[Entry, ...] | None
    strategy: str | None

    def describe(self) -> str:
        target = self.strategy if self.strategy else str(to_pspec(self.spec or ()))
        return f"rule {self.index} ({self.pattern.pattern!r} -> {target})"


def parse_rules(rules: Any, mesh: MeshShape) -> list[UserRule]:
    """Check and compile ``rules`` (a list of pairs or a mapping); collect every problem, then raise.

    Raises:
        RuleError: a rule is not a pair, its regex does not compile, its strategy is
            unknown, or its spec names an axis the mesh lacks.

    >>> from tpflax._src.mesh import mesh_shape
    >>> [r.describe() for r in parse_rules([("mlp", "column")], mesh_shape({"model": 2}))]
    ["rule 0 ('mlp' -> column)"]
    """
    if rules is None:
        return []
    if isinstance(rules, (str, bytes)) or not isinstance(rules, (Mapping, Iterable)):
        # a str was iterated: one "is not a pair" problem per character
        raise RuleError(f"rules={rules!r} is not a list of (regex, target) pairs or a mapping; write e.g. "
                        "rules=[('mlp/up', 'column'), ('norm', 'replicate')]")
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    out, problems = [], []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], (str, re.Pattern))):
            problems.append(f"rule {i}: {rule!r} is not a (regex, PartitionSpec or strategy) pair")
            continue
        try:
            rx = re.compile(rule[0])  # a compiled pattern comes back as it is
        except re.error as e:
            problems.append(f"rule {i}: regex {rule[0]!r} does not compile: {e}")
            continue
        parsed, problem = _parse_target(i, rx, rule[1], mesh)
        if problem:
            problems.append(problem)
        else:
            out.append(parsed)
    if problems:
        raise RuleError("invalid sharding rules", problems)
    return out


def _parse_target(i: int, rx: re.Pattern, target: Any, mesh: MeshShape) -> tuple[UserRule | None, str]:
    where = f"rule {i} ({rx.pattern!r})"
    if isinstance(target, str):
        if target not in RULE_STRATEGIES:
            # a bare axis name ("model") reads as a strategy: say it is an axis and how a spec names one
            axis = (f" ({target!r} is a mesh axis: a spec names one per dim, e.g. P(None, {target!r}) or "
                    f"(None, {target!r}))" if target in mesh.names else "")
            return None, (f"{where}: strategy {target!r} is unknown; use one of {', '.join(RULE_STRATEGIES)} "
                          f"or a PartitionSpec{axis}")
        return UserRule(i, rx, None, target), ""
    if target is not None and not isinstance(target, (PartitionSpec, tuple, list)):
        return None, f"{where}: target {target!r} is neither a PartitionSpec nor a strategy name"
    bad = [e for e in (target or ()) if not (e is None or isinstance(e, str) or (
        isinstance(e, (tuple, list)) and all(isinstance(a, str) for a in e)))]
    if bad:  # PartitionSpec.UNCONSTRAINED was a bare TypeError ("'UnconstrainedSingleton' object is not iterable")
        return None, (f"{where}: spec entry {bad[0]!r} is not a mesh axis name, a tuple of them or None; a plan "
                      "holds whole layouts (P.UNCONSTRAINED leaves the layout to XLA: use None to keep the dim whole)")
    spec = entries(target)
    unknown = [a for a in used_axes(spec) if a not in mesh.sizes]
    if unknown:
        return None, (f"{where}: spec {to_pspec(spec)} names mesh axis {', '.join(map(repr, unknown))}, but "
                      f"the mesh is {mesh}; use one of {', '.join(mesh.sizes)} (or a strategy: "
                      f"{', '.join(RULE_STRATEGIES)})")
    return UserRule(i, rx, spec, None), ""


def forced_strategy(f: Facts, strategy: str, mesh: MeshShape) -> tuple[tuple[Entry, ...] | None, str]:
    """Spec for a strategy forced by a user rule, or (None, why not)."""
    t_entry, t_size = mesh.group(TENSOR)
    body = f.body
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
        spec[f.leaf_dim(d)] = entry
        return tuple(spec), ""

    if strategy in ("column", "channel"):
        return at(1 if f.kind == "attention" and len(body) == 3 else -1, t_entry, t_size, "tensor")
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
        return at(0, *mesh.group(EXPERT), "expert")
    # fsdp: the largest divisible dim
    f_entry, f_size = mesh.group(FSDP)
    if f_entry is None:
        return None, "the mesh has no fsdp axis"
    free = [d for d in range(len(body)) if body[d] % f_size == 0]
    if not free:
        return None, f"no dim of {body} is divisible by fsdp={f_size}"
    return at(max(free, key=lambda d: body[d]), f_entry, f_size, "fsdp")


def default_logical_rules(mesh: Any) -> list[tuple[str, Any]]:
    """Logical-axis rules derived from the mesh roles (the MaxText/T5X vocabulary).

    Every name MaxText's ``base.yml`` gives a parameter dim is here, mapped by its mesh axis's
    role: its key/value kernels' ``kv_head_dim``, a fused ``wi``'s ``num_activations``, its MoE
    kernels' ``embed_no_exp`` (0.2: ``embed_moe``, ``mlp_moe``), its embedding's ``embed_vocab`` and
    MLA's low-rank ``q_lora``/``kv_lora`` (fsdp, like ``embed``) among them, so a MaxText model's default plan warns of no unknown name; so is every parameter name
    of T5X's ``standard_logical_axis_rules`` (its relative position table's ``relpos_buckets``).

    >>> from tpflax._src.mesh import mesh_shape
    >>> rules = dict(default_logical_rules(mesh_shape({"data": 2, "model": 4})))
    >>> rules["mlp"], rules["kv_head_dim"]
    ('model', None)
    >>> dict(default_logical_rules({"fsdp": 2, "tensor": 4}))["embed"]  # any mesh: a dict, a jax Mesh too
    'fsdp'
    """
    mesh = mesh_shape(mesh)
    t = mesh.group(TENSOR)[0]
    f = mesh.group(FSDP)[0]
    e = mesh.group(EXPERT)[0]
    d = mesh.group(DATA)[0]
    return [("batch", d), ("embed", f), ("mlp", t), ("heads", t), ("q_heads", t), ("kv_heads", t),
            ("vocab", t), ("joined_kv", t), ("exp", e), ("expert", e), ("kv", None), ("head_dim", None),
            ("kv_head_dim", None), ("layers", None), ("length", None), ("seq", None),
            # MaxText splits its norm scales over the tensor axis, as it constrains the residual stream's
            # embed dim between layers (its ``activation_embed``): its layout, read by default
            ("norm", t),
            # MaxText's other parameter names: fused MLP, MoE, MLA and DeepSeek's two layer stacks; since 0.2
            # its embedding's and output head's model dim, its MoE kernels', linear attention's heads
            ("num_activations", None), ("mlp_no_fsdp", t), ("embed_no_exp", f), ("exp_with_fsdp", f),
            ("q_lora", f), ("kv_lora", f), ("q_lora_up_proj", None), ("kv_lora_up_proj", None),
            ("dense_layers", None), ("moe_layers", None), ("local_layers", None),
            ("embed_vocab", f), ("embed_moe", f), ("mlp_moe", t), ("gdn_head", t), ("engram_dim", t),
            ("mhc", None), ("circular_repeats", None),
            # T5X's (t5x/partitioning.py standard_logical_axis_rules), unsharded as it maps them
            ("relpos_buckets", None), ("abspos_buckets", None), ("mlp_activations", None), ("stack", None)]


def annotation(f: Facts, mesh: MeshShape, logical_rules) -> tuple[tuple[Entry, ...], str, list[str]]:
    """Spec from flax metadata; drops axes the mesh lacks or that do not divide (with warnings)."""
    leaf = f.leaf
    warnings: list[str] = []
    names = tuple(leaf.names or ())
    spec: list[Entry] = [None] * len(names)
    renamed: dict[Any, Any] = {}
    known = {lname for lname, _ in logical_rules}
    # (priority, dim, axes, logical): mesh-axis names first, then the logical rules in their order, as flax
    # resolves them (a rule takes its dim if the dim is still free and none of its axes is taken yet: MaxText's
    # ``mlp_moe`` rule, listed before ``embed_moe``'s, takes ``fsdp_transpose`` and ``tensor`` first).
    tries: list[tuple[int, int, Any, bool]] = []
    for dim, name in enumerate(names):
        # Names the mesh has are mesh axes; others are logical (NNX sharding metadata
        # holds either kind), looked up in the logical rules.
        if leaf.logical or _logical_name(name, mesh, known):
            if name is not None:
                tries += [(i, dim, axes, True) for i, (lname, axes) in enumerate(logical_rules) if lname == name]
        else:
            tries.append((-1, dim, same_role_axes(name, mesh), False))
            if tries[-1][2] != name:
                renamed[name] = tries[-1][2]
    used: set[str] = set()
    done: set[int] = set()
    absent: dict[int, list[str]] = {}  # dim: the mesh axes its logical rules named that the mesh lacks
    blocked: set[int] = set()
    for _, dim, axes, logical in sorted(tries, key=lambda t: t[:2]):
        if dim in done:
            continue
        e = entries((axes,))[0]
        ax = [a for a in (e if isinstance(e, tuple) else (e,)) if a is not None]
        if not ax:
            done.add(dim)  # mapped to no axis: whole
            continue
        if any(a not in mesh.sizes for a in ax):
            if not logical:
                warnings.append(f"{leaf.path}: annotation names {names[dim]!r}, neither an axis of the mesh "
                                f"{mesh} nor a name the logical rules map; dim {dim} left unsharded (add a rule "
                                f"for it to logical_rules=, or name a mesh axis)")
            else:
                absent.setdefault(dim, []).extend(a for a in ax if a not in mesh.sizes)
            continue
        if used & set(ax):
            blocked.add(dim)  # another dim took the axis: not for want of it
            continue
        size = 1
        for a in ax:
            size *= mesh.sizes[a]
        if leaf.shape[dim] % size:
            warnings.append(f"{leaf.path}: annotated dim {dim} ({leaf.shape[dim]}) is not divisible by "
                            f"{'*'.join(ax)}={size}; left unsharded")
            continue
        used |= set(ax)
        done.add(dim)
        # Axes of size 1 split nothing: dropped, as MaxText's ``remove_size_one_mesh_axis`` drops them
        # (its rules name a dozen axes per dim, most of size 1 on any one mesh).
        real = tuple(a for a in ax if mesh.sizes[a] > 1)
        spec[dim] = None if not real else real[0] if len(real) == 1 else real
    for dim, missing in absent.items():  # a later rule for the name may have taken the dim: MaxText's rule lists
        if dim not in done and dim not in blocked:
            warnings.append(f"{leaf.path}: the logical rules map {names[dim]!r} only to mesh axes the mesh {mesh} "
                            f"lacks ({', '.join(map(repr, dict.fromkeys(missing)))}); dim {dim} left unsharded")
    kind = "logical" if leaf.logical or any(_logical_name(n, mesh, known) for n in leaf.names or ()) \
        else "mesh-axis"
    reason = f"{kind} annotation {tuple(leaf.names or ())} -> {to_pspec(spec)}"
    if renamed:
        reason += " (" + ", ".join(f"{a!r} read as the mesh's {b!r}, the same role" for a, b in renamed.items()) + ")"
    return tuple(spec), reason, warnings


def same_role_axes(name: Any, mesh: MeshShape) -> Any:
    """The mesh axes an annotation's axis name stands for.

    A library annotates for its own mesh (tunix writes ``'tp'``, MaxText
    ``'tensor'``): a name the mesh lacks but that is a known spelling of a role
    the mesh has (``'tp'``, ``'model'``, ``'mp'`` for tensor; ``'dp'`` for data)
    means that role's axes, so the annotation survives a renamed mesh. Any other
    name is returned as is (and dropped with a warning later).

    >>> from tpflax._src.mesh import mesh_shape
    >>> same_role_axes("tp", mesh_shape({"fsdp": 2, "tensor": 4})), same_role_axes("x", mesh_shape({"tensor": 4}))
    ('tensor', 'x')
    """
    if isinstance(name, tuple):  # several axes on one dim: read each
        parts = [same_role_axes(n, mesh) for n in name]
        return tuple(a for p in parts for a in (p if isinstance(p, tuple) else (p,)))
    if not isinstance(name, str) or name in mesh.sizes:
        return name
    role = DEFAULT_ROLE_NAMES.get(name.lower())
    entry = mesh.group(role)[0] if role else None
    return name if entry is None else entry


def _logical_name(name: Any, mesh: MeshShape, known: set[str]) -> bool:
    """A name the mesh lacks but the logical rules know (``"embed"``, ``"mlp"``)."""
    return isinstance(name, str) and name not in mesh.sizes and name in known


@dataclass
class Forced:
    """What the user rules and annotations decided: never overwritten by later rule sets."""

    proposals: dict[str, Proposal] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def force(facts: Sequence[Facts], rules: Sequence[UserRule], mesh: MeshShape, use_annotations: bool,
          logical_rules: Sequence[tuple[str, Any]]) -> Forced:
    """Apply the user rules, then the annotations, to every leaf.

    Raises:
        SpecError: a rule's spec or strategy cannot apply to a leaf it matches (all listed).
    """
    out = Forced()
    problems: list[str] = []
    matched: dict[int, list[str]] = {r.index: [] for r in rules}
    for f in facts:
        hits = [r for r in rules if r.pattern.search(f.path)]
        for r in hits:
            matched[r.index].append(f.path)
        layers_dim = f.layers_dim
        if hits:
            proposal, errs = _from_rule(f, hits[0], mesh)
            problems += errs
            if proposal is not None:
                out.proposals[f.path] = Proposal(*proposal, layers_dim=layers_dim)
                out.sources[f.path] = "rule"
        elif use_annotations and f.leaf.names is not None:
            spec, reason, warns = annotation(f, mesh, logical_rules)
            out.warnings += warns
            out.proposals[f.path] = Proposal(spec, "annotation", reason, layers_dim=layers_dim)
            out.sources[f.path] = "annotation"
    if problems:
        raise SpecError("sharding rules produce invalid specs", problems)
    out.warnings += _unused_rule_warnings(rules, matched, [f.path for f in facts])
    return out


def _from_rule(f: Facts, rule: UserRule, mesh: MeshShape) -> tuple[tuple | None, list[str]]:
    """``((spec, strategy, reason, pair, role, fsdp), [])`` or ``(None, problems)``."""
    why = f"forced by {rule.describe()}"
    if rule.spec is not None:
        spec = entries(rule.spec, len(f.leaf.shape)) if len(rule.spec) <= len(f.leaf.shape) else rule.spec
        errs = spec_problems(f.path, f.leaf.shape, spec, mesh)
        if errs:
            return None, [e + f" [from {rule.describe()}]" for e in errs]
        return (spec, "rule", why, None, None, False), []
    spec, problem = forced_strategy(f, rule.strategy, mesh)
    if spec is None:
        return None, [f"{f.path}: {rule.describe()} cannot apply to shape {f.leaf.shape} on mesh {mesh}: "
                      f"{problem}; use another strategy or a PartitionSpec"]
    return (spec, rule.strategy, why, None, None, rule.strategy == "fsdp"), []


def _unused_rule_warnings(rules: Sequence[UserRule], matched: Mapping[int, list[str]],
                          paths: Sequence[str] = ()) -> list[str]:
    """``paths``: the leaves' paths. A rule written against a path ``jax.tree_util`` gives on a tree of
    flax boxes (``params/dense/kernel/value``: the box's ``value``) matches none of them: say so."""
    out: list[str] = []
    claimed: set[str] = set()
    for r in rules:
        if not matched[r.index]:
            box = next((p for p in paths if r.pattern.search(f"{p}/value")), None)
            hint = (f" (it matches {box}/value: a flax-boxed leaf's path ends at the box, {box})"
                    if box is not None else "")
            out.append(f"{r.describe()} matches no leaf{hint}; check the regex against Plan.decisions paths")
        elif all(p in claimed for p in matched[r.index]):
            out.append(f"{r.describe()} never wins: every leaf it matches is taken by an earlier rule")
        claimed.update(matched[r.index])
    return out
