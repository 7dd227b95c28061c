"""Expert parallelism: routed tokens move to their experts and back, or every expert sees them."""

from __future__ import annotations

from tpflax._src.cost.batch import config_value
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import Scope, body, layers
from tpflax._src.facts.classify import layer_group
from tpflax._src.mesh import EXPERT


def expert_items(s: Scope) -> list[CommItem]:
    """Routed tokens move to their experts and back (all-to-all), or every expert sees them (dense).

    >>> import tpflax
    >>> from tpflax import zoo
    >>> m = zoo.get("moe")
    >>> e = tpflax.estimate(tpflax.plan(m.abstract_variables(), {"expert": 8}), None, "16x16", model=m)
    >>> sorted({i.kind for i in e.items if i.why.startswith("expert parallel")})
    ['all-to-all']
    """
    e_axes = s.mesh.axes_with(EXPERT)
    if not e_axes:
        return []
    blocks: dict[str, list[str]] = {}  # expert leaves by the block holding them
    for path, d in s.lv.decisions.items():
        if d.kind == "expert" and s.axes(path, EXPERT):
            blocks.setdefault(d.unit.rsplit("/", 1)[0], []).append(path)
    n = s.size(e_axes)
    top_k = config_value(s.config, "top_k", 1) or 1
    items = []
    for block, paths in blocks.items():
        d0 = s.lv.decisions[paths[0]]
        d_model, stack = body(d0)[1], layers(d0) * s.lv.count[paths[0]]
        if s.lv.count[paths[0]] > 1:
            block = layer_group(block)
        if s.dispatch == "all-to-all":
            size = s.rows_local * top_k * d_model * s.act_item
            items.append(CommItem("all-to-all", e_axes, size, n, 2 * stack, block,
                                  "expert parallel: dispatch and return routed tokens (forward)"))
            items.append(CommItem("all-to-all", e_axes, size, n, 2 * stack, block,
                                  "expert parallel: the same, for gradients (backward)"))
        else:
            items.append(CommItem("all-reduce", e_axes, s.rows_local * d_model * s.act_item, n, 2 * stack, block,
                                  "dense expert dispatch: sum expert outputs (forward) and input gradients "
                                  "(backward)"))
    return items
