"""Existing sharding rules in, a tpflax Plan out, so their costs can be compared.

Training code already shards with EasyLM/scalax-style ``(regex,
PartitionSpec)`` lists or with MaxText-style logical axis rules over a
``LogicallyPartitioned`` tree. :func:`from_rules` turns either into a
:class:`~tpflax.Plan` whose decisions all have source ``"rule"``: the
estimate, the dry run, the report and :func:`tpflax.diff` then work on it as on
any plan. It lives apart from :mod:`tpflax._src.export` because it runs the
planner, which itself delegates ``Plan.to_rules`` to the export module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from jax.sharding import PartitionSpec

from tpflax._src.errors import OptionError, RuleError
from tpflax._src.facts.tree import walk
from tpflax._src.mesh import DEFAULT_ROLE_NAMES, MeshShape, mesh_shape
from tpflax._src.planner.plan import Plan, plan
from tpflax._src.planner.rules import parse_rules
from tpflax._src.vocab import RULE_STRATEGIES


def _looks_like_mesh(x: Any) -> bool:
    """A mesh as tpflax reads one: a jax mesh, a ``"data=2,model=4"`` string, ``{"model": 4}``."""
    import jax

    if isinstance(x, (jax.sharding.Mesh, jax.sharding.AbstractMesh, MeshShape)):
        return True
    if isinstance(x, str):
        return "=" in x or ":" in x
    return (isinstance(x, Mapping) and bool(x)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in x.values()))


def _check_order(rules: Any, mesh: Any) -> None:
    """OptionError for ``from_rules(tree, mesh, rules)``: the rules were read as a mesh ("axis 'mlp/up' has size
    P(None, 'model')")."""
    if _looks_like_mesh(rules) and not _looks_like_mesh(mesh):
        raise OptionError("the rules and the mesh are swapped; pass them as from_rules(tree, rules, mesh)")


def from_rules(tree: Any, rules: Any, mesh: Any, *, logical: bool | None = None,
               axis_roles: Mapping[str, str] | None = None) -> Plan:
    """Import existing rules into a Plan.

    Args:
        tree: the variables (arrays, ``jax.ShapeDtypeStruct``, flax-boxed).
        rules: ``(regex, PartitionSpec)`` pairs (EasyLM/scalax style: ``re.search``
            on ``/``-joined paths, first match wins), or ``(logical name, mesh
            axes)`` pairs (MaxText style) for a tree boxed in
            ``nn.LogicallyPartitioned``. A mapping is read as its items.
        mesh: ``{"data": 2, "model": 4}``, ``"data=2,model=4"`` or a jax mesh.
        logical: True for logical rules, False for regex rules; None decides: logical
            when the tree carries logical annotations, no target is a PartitionSpec, and a
            rule names one of the tree's logical axes or none targets a strategy no mesh
            axis could be called (``"column"``).
        axis_roles: roles for mesh axes with unrecognised names.

    Returns:
        A :class:`~tpflax.Plan`; leaves no rule covers are replicated and named in a warning.

    Raises:
        RuleError, SpecError: a rule is malformed or gives a leaf an impossible spec.

    >>> import jax, tpflax
    >>> from jax.sharding import PartitionSpec as P
    >>> tree = {"wte": {"embedding": jax.ShapeDtypeStruct((512, 64), "float32")},
    ...         "mlp": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}
    >>> p = tpflax.from_rules(tree, [("wte/embedding", P("model", None)), (".*", P())], {"model": 4})
    >>> p.spec("wte/embedding"), p.spec("mlp/kernel"), p.decisions["mlp/kernel"].source
    (P('model', None), P(None, None), 'rule')
    """
    _check_order(rules, mesh)
    ms = mesh_shape(mesh, axis_roles)
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules or ())
    leaves, _ = walk(tree)
    if logical is None:
        named = {n for x in leaves if x.names for n in x.names if isinstance(n, str)}
        pairs_ok = [r for r in pairs if isinstance(r, (tuple, list)) and len(r) == 2]
        logical = (any(x.logical for x in leaves) and not any(isinstance(r[1], PartitionSpec) for r in pairs_ok)
                   and (any(r[0] in named for r in pairs_ok) or not any(_strategy_only(r[1], ms) for r in pairs_ok)))
    if logical:
        uncovered = [x.path for x in leaves if x.names is None]
        p = plan(tree, ms, rules=_replicate(uncovered), logical_rules=pairs, axis_roles=axis_roles)
        options = {**p.options, "rules": [], "logical_rules": [[n, _json_axes(a)] for n, a in pairs]}
    else:
        parsed = parse_rules(pairs, ms)
        uncovered = [x.path for x in leaves if not any(r.pattern.search(x.path) for r in parsed)]
        p = plan(tree, ms, rules=[*pairs, *_replicate(uncovered)], use_annotations=False, axis_roles=axis_roles)
        options = {**p.options, "rules": p.options["rules"][:len(pairs)]}
    left = set(uncovered)
    decisions = {path: _imported(d, path in left) for path, d in p.decisions.items()}
    warnings = list(p.warnings)
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else "")
        what = "carry no logical annotation" if logical else "match no rule"
        warnings.append(f"{len(uncovered)} leaves {what} and are replicated: {shown}; add a rule "
                        "(e.g. ('.*', PartitionSpec()) last) to say so explicitly")
    return replace(p, decisions=decisions, warnings=tuple(warnings), options={**options, "imported": True})


def _strategy_only(target: Any, ms: Any) -> bool:
    """A strategy name no mesh axis could be (``"column"``; not ``"fsdp"`` or ``"expert"``, which MaxText's
    logical rules name whether the mesh has them or not)."""
    return (isinstance(target, str) and target in RULE_STRATEGIES and target not in ms.sizes
            and target.lower() not in DEFAULT_ROLE_NAMES)


def _replicate(paths: Sequence[str]) -> list[tuple[str, str]]:
    """One rule replicating exactly ``paths`` (none when there are none)."""
    if not paths:
        return []
    return [("^(?:" + "|".join(re.escape(p) for p in paths) + ")$", "replicate")]


def _json_axes(axes: Any) -> Any:
    if axes is None or isinstance(axes, str):
        return axes
    if isinstance(axes, (tuple, list)):
        return list(axes)
    raise RuleError(f"logical rule target {axes!r} is not a mesh axis name, a tuple of them or None")


def _imported(d: Any, uncovered: bool) -> Any:
    if uncovered:
        return replace(d, strategy="replicate", source="rule", reason="no imported rule covers it: replicated")
    if d.source == "annotation":  # a logical rule decided it through the tree's annotation
        return replace(d, strategy="rule", source="rule", reason=f"imported {d.reason}")
    return replace(d, reason=d.reason.replace("forced by rule", "imported rule"))
