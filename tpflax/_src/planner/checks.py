"""Warnings for plans that are valid but probably not what was meant.

Two mistakes pass every spec check and cost a lot: a logical axis name that
no logical rule knows (flax, and tpflax, leave that dim replicated), and a
mesh axis that splits no leaf (its devices all hold the same copies). Both
become plan warnings, so ``tpflax plan --strict`` exits 1 on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tpflax._src.facts.classify import Facts
from tpflax._src.mesh import DATA, MeshShape
from tpflax._src.specs import entries, used_axes


def plan_checks(facts: Sequence[Facts], decisions: Mapping[str, Any], logical_rules: Sequence[tuple[str, Any]],
                mesh: MeshShape) -> list[str]:
    """Every warning of this module for one plan.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((9, 9), "float32")}, {"model": 2})
    >>> [w.split(":")[0] for w in p.warnings]
    ["mesh axis 'model' (size 2, role tensor) splits no leaf"]
    """
    return [*unknown_logical_names(facts, decisions, logical_rules), *idle_axes(decisions, mesh)]


def unknown_logical_names(facts: Sequence[Facts], decisions: Mapping[str, Any],
                          logical_rules: Sequence[tuple[str, Any]]) -> list[str]:
    """One warning per logical name in the annotations that no logical rule maps."""
    known = {name for name, _ in logical_rules}
    seen: dict[str, list[str]] = {}
    for f in facts:
        if not f.leaf.logical or decisions[f.path].source != "annotation":
            continue
        for dim, name in enumerate(f.leaf.names or ()):
            if name is not None and name not in known:
                seen.setdefault(str(name), []).append(f"{f.path} dim {dim} ({f.leaf.shape[dim]})")
    return [f"logical axis name {name!r} is in no logical rule, so its dims are replicated ({len(where)} dims, "
            f"e.g. {where[0]}); add ({name!r}, <mesh axes>) to logical_rules, or fix the name (known: "
            f"{', '.join(sorted(known)) or 'none'})" for name, where in seen.items()]


def idle_axes(decisions: Mapping[str, Any], mesh: MeshShape) -> list[str]:
    """One warning per non-data mesh axis (size > 1) that no leaf's spec uses.

    Data axes split the batch, not the parameters, so they are left out.
    """
    used: set[str] = set()
    for spec in {id(d.spec): d.spec for d in decisions.values()}.values():  # alike leaves share one spec
        used |= used_axes(entries(spec))
    roles = dict(mesh.roles)
    return [f"mesh axis {name!r} (size {size}, role {roles[name]}) splits no leaf: its {size} devices hold the "
            "same copies; choose a size that divides the layer widths, drop the axis, or give it role data "
            f"(axis_roles={{{name!r}: 'data'}}, --axis-role {name}=data)"
            for name, size in mesh.axes if size > 1 and roles[name] != DATA and name not in used]
