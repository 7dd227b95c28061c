"""A plan written out in the two rule languages training code already speaks.

:func:`to_rules` gives EasyLM/scalax-style ``(regex, PartitionSpec)`` rules;
:func:`to_logical_axis_rules` gives MaxText/T5X-style logical axis names per
parameter dim plus the ``(logical name, mesh axes)`` rules that flax's
``nn.logical_axis_rules`` / ``nn.logical_to_mesh_sharding`` read. Both reproduce
the plan exactly on the tree it was made for (the tests re-apply them to every
zoo model). This module reads only a plan's decisions, so the planner's
``Plan.to_rules`` can delegate here without an import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jax.sharding import PartitionSpec

from tpflax._src.mesh import EXPERT, FSDP, TENSOR, MeshShape
from tpflax._src.specs import Entry, entries, entry_axes, to_pspec

# The rule that replicates whatever no earlier rule claims (EasyLM ends its lists alike).
CATCH_ALL = ".*"


def _exact(path: str) -> str:
    return f"^{re.escape(path)}$"


def group_regex(group: str, members: Sequence[str] = (), paths: Sequence[str] = ()) -> str:
    """The regex of a repeated-layer pattern: each ``*`` layer index becomes ``\\d+``.

    Given ``members`` (some of the group's ``paths``), an index position whose
    members use fewer indices than the whole group lists them instead.

    >>> group_regex("params/h_*/mlp/c_fc/kernel")
    '^params/h_\\\\d+/mlp/c_fc/kernel$'
    >>> group_regex("b_*/bn*/bias", ["b_2/bn1/bias", "b_3/bn1/bias"], ["b_1/bn1/bias", "b_2/bn1/bias", "b_3/bn1/bias"])
    '^b_(?:2|3)/bn\\\\d+/bias$'
    """
    parts = []
    for i, p in enumerate(group.split("/")):
        if not p.endswith("*"):
            parts.append(re.escape(p))
            continue
        mine, every = ({x.split("/")[i][len(p) - 1:] for x in xs} for xs in (members, paths))
        index = r"\d+" if mine == every else "(?:" + "|".join(sorted(mine, key=int)) + ")"
        parts.append(re.escape(p[:-1]) + index)
    return "^" + "/".join(parts) + "$"


def _spec(d: Any) -> tuple[Entry, ...]:
    return entries(d.spec, len(d.shape))


def to_rules(plan: Any) -> list[tuple[str, PartitionSpec]]:
    """Ordered ``(regex, PartitionSpec)`` rules that reproduce ``plan`` on its tree.

    One rule per repeated-layer pattern (``^params/h_\\d+/mlp/c_fc/kernel$``), not
    one per layer; a layer that differs from its pattern gets an exact rule
    ahead of it; replicated patterns fall to one final ``(".*", P())``. Rules
    are matched with ``re.search``, first match wins (tpflax's, EasyLM's and
    scalax's convention), so ``tpflax.plan(tree, mesh, rules=rules)`` gives
    back the same specs.

    >>> import jax, tpflax
    >>> tree = {f"layers_{i}": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...                         "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}
    ...         for i in range(4)}
    >>> p = tpflax.plan(tree, {"model": 4})
    >>> rules = p.to_rules()
    >>> rules[0]
    ('^layers_\\\\d+/down/kernel$', P('model', None))
    >>> len(rules), tpflax.plan(tree, {"model": 4}, rules=rules).specs == p.specs
    (2, True)
    """
    groups: dict[str, list[str]] = {}
    for path, d in plan.decisions.items():
        groups.setdefault(d.group or path, []).append(path)
    rules: list[tuple[str, tuple[Entry, ...]]] = []
    rest = False
    for group, paths in groups.items():
        by_spec: dict[tuple[Entry, ...], list[str]] = {}
        for p in paths:
            by_spec.setdefault(_spec(plan.decisions[p]), []).append(p)
        common = max(by_spec, key=lambda k: len(by_spec[k]))
        # Layers that differ from the group (narrower blocks fsdp cannot split) go first.
        rules += [(group_regex(group, members, paths) if len(members) > 1 else _exact(members[0]), spec)
                  for spec, members in by_spec.items() if spec != common]
        if any(common):
            rules.append((group_regex(group) if len(paths) > 1 else _exact(paths[0]), common))
        else:
            rest = True
    if rest:
        rules.append((CATCH_ALL, ()))
    rules = _pin_strays(plan, rules)
    return [(rx, to_pspec(spec)) for rx, spec in rules]


def _pin_strays(plan: Any, rules: list[tuple[str, tuple[Entry, ...]]]) -> list[tuple[str, tuple[Entry, ...]]]:
    """Exact rules in front for any leaf the compact rules would get wrong.

    A path component that itself ends in ``*`` or digits can make a pattern
    reach further than its group; checking every leaf keeps the export exact.
    """
    compiled = [(re.compile(rx), spec) for rx, spec in rules]
    strays = []
    for path, d in plan.decisions.items():
        hit = next((spec for rx, spec in compiled if rx.search(path)), None)
        if hit is None or entries(hit, len(d.shape)) != _spec(d):
            strays.append((_exact(path), _spec(d)))
    return strays + rules


@dataclass(frozen=True)
class LogicalAxes:
    """A plan as flax logical axis annotations.

    Unpacks as ``names, rules = plan.to_logical_axis_rules()``.

    Attributes:
        names: ``{path: (logical name or None, ...)}``, one name per dim; None
            for a dim no mesh axis splits.
        rules: ``((logical name, mesh axes), ...)`` for ``nn.logical_axis_rules``.
    """

    names: Mapping[str, tuple[str | None, ...]]
    rules: tuple[tuple[str, Entry], ...]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.names, self.rules))


def _logical_name(d: Any, entry: Entry, mesh: MeshShape) -> str:
    """A MaxText-style name for a split dim, so the rules read like the default vocabulary."""
    if entry == mesh.group(FSDP)[0]:
        return "embed"
    if entry == mesh.group(EXPERT)[0]:
        return "exp"
    if entry == mesh.group(TENSOR)[0]:
        return {"embedding": "vocab", "head": "vocab", "attention": "heads", "conv": "channels"}.get(
            str(d.kind), "mlp")
    return "_".join(entry_axes(entry))


def to_logical_axis_rules(plan: Any) -> LogicalAxes:
    """Logical axis names per parameter dim, and the rules that map them to the plan's mesh axes.

    Names follow the MaxText vocabulary where the mesh roles allow (``embed``
    on fsdp axes, ``mlp``/``heads``/``vocab`` on the tensor axis, ``exp`` on the
    expert axis); each name maps to exactly one mesh entry, so
    ``nn.logical_to_mesh_axes(names[path], rules)`` gives the plan's spec back.

    >>> import jax, tpflax
    >>> from flax import linen as nn
    >>> tree = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...         "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}
    >>> p = tpflax.plan(tree, {"model": 4})
    >>> names, rules = p.to_logical_axis_rules()
    >>> names["up/kernel"], rules
    ((None, 'mlp'), (('mlp', 'model'),))
    >>> nn.logical_to_mesh_axes(names["down/kernel"], rules) == p.spec("down/kernel")
    True
    """
    mapping: dict[str, Entry] = {}
    names: dict[str, tuple[str | None, ...]] = {}
    for path, d in plan.decisions.items():
        dims: list[str | None] = []
        for entry in _spec(d):
            if entry is None:
                dims.append(None)
                continue
            name = _logical_name(d, entry, plan.mesh)
            while mapping.get(name, entry) != entry:  # the name is taken by other axes: qualify it
                name = f"{name}_{'_'.join(entry_axes(entry))}"
            mapping[name] = entry
            dims.append(name)
        names[path] = tuple(dims)
    return LogicalAxes(names=names, rules=tuple(mapping.items()))
