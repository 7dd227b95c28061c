"""Where tpflax's plans differ from the hand Megatron layout, leaf by leaf (planning only, no compile).

Used by ``third_party.py --diff`` to add a section to the results: for each
architecture and mesh, the leaves (layer indices folded to ``*``) whose tree-only
or ``model=`` spec differs from the hand layout's, with tpflax's strategy and reason.
These are the leaf kinds behind the ratios.
"""

from __future__ import annotations

import re
from typing import Any


def _norm(spec: Any) -> tuple:
    """A spec without trailing Nones, so ``P(None,)`` equals ``P()``."""
    t = list(tuple(spec))
    while t and t[-1] is None:
        t.pop()
    return tuple(t)


def _fmt(spec: Any) -> str:
    t = _norm(spec)
    return "P(" + ", ".join("None" if e is None else repr(e) for e in t) + ")"


def diff_plans(plan: Any, ref: Any) -> list[str]:
    """Leaves of ``plan`` whose spec differs from ``ref``'s, layer indices folded to ``*``.

    >>> import jax, tpflax
    >>> t = {"a": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")}}
    >>> p = tpflax.plan(t, {"model": 4}, rules=[("kernel", "replicate")])
    >>> diff_plans(p, tpflax.plan(t, {"model": 4}, rules=[("kernel", jax.sharding.PartitionSpec(None, "model"))]))
    ["a/kernel: P() (replicate: forced by rule 0 ('kernel' -> replicate)) vs hand P(None, 'model')"]
    """
    seen: dict[str, str] = {}
    for path, d in plan.decisions.items():
        r = ref.decisions.get(path)
        if r is None or _norm(d.spec) == _norm(r.spec):
            continue
        key = re.sub(r"/\d+/", "/*/", path)
        reason = d.reason.replace("|", "/").removeprefix(f"{d.strategy}: ")
        reason = reason if len(reason) <= 90 else reason[:87] + "..."
        seen.setdefault(key, f"{key}: {_fmt(d.spec)} ({d.strategy}: {reason}) vs hand {_fmt(r.spec)}")
    return list(seen.values())


def diff_section(archs, meshes, make_plans, mesh_label) -> list[str]:
    """Markdown lines: per architecture and mesh, the tree-only and model= leaves off the hand layout."""
    import jax

    out = ["## Where tpflax's plans differ from the hand layout", "",
           "Leaves (layer indices folded to `*`) whose spec differs from the hand Megatron layout, "
           "with tpflax's strategy and reason. Planning only; the ratios above are what it costs.", ""]
    for arch in archs:
        try:
            built = arch.build()
        except Exception as e:  # noqa: BLE001 - said in the table already
            out += [f"### {arch.name}: build failed ({type(e).__name__})", ""]
            continue
        params = jax.eval_shape(lambda b=built: b.params)
        for mesh in meshes:
            plans = make_plans(arch, built, params, mesh)
            ref = plans["megatron"]
            out += [f"### {arch.name}, {mesh_label(mesh)}", ""]
            for name in ("tree", "model"):
                p = plans[name]
                if isinstance(p, Exception) or isinstance(ref, Exception):
                    out += [f"- **{name}**: planning failed: {type(p).__name__}: {str(p)[:200]}"]
                    continue
                d = diff_plans(p, ref)
                out += [f"- **{name}**: " + ("same as the hand layout" if not d else f"{len(d)} leaf kinds differ")]
                out += [f"  - `{x}`" for x in d]
            out.append("")
    return out
