"""Bytes per device for one training step: parameters, gradients, optimizer state, activations, batch."""

from __future__ import annotations

import math

from tpflax._src.cost.activations import activation_bytes
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.records import Memory
from tpflax._src.cost.scope import grad_bytes, leaf_itemsize
from tpflax._src.cost.workload import Workload
from tpflax._src.facts.tree import itemsize
from tpflax._src.mesh import MeshShape


def memory(lv: Leaves, mesh: MeshShape, w: Workload, shards: int, notes: list[str]) -> tuple[Memory, Memory]:
    """``(on the fullest device, on one device holding everything)`` for a plan's leaves on ``mesh``.

    Every leaf is counted with ceil division (padding shows); the optimizer state
    takes the entries of the parameter dims it follows (:mod:`.optstate`, merged
    in ``lv.opt``).
    """
    params = params_full = state = state_full = grads = grads_full = 0
    for path, d in lv.decisions.items():
        item, k = leaf_itemsize(d), lv.count[path]
        dev, full = shard_bytes(tuple(d.shape), item, lv.specs[path], mesh) * k, d.bytes * k
        if not d.trainable:
            state, state_full = state + dev, state_full + full
            continue
        params, params_full = params + dev, params_full + full
        grads, grads_full = grads + grad_bytes(dev, item, w.g_item), grads_full + grad_bytes(full, item, w.g_item)
    opt = opt_full = 0
    if w.opt is not None:
        opt = sum(shard_bytes(shape, item, e, mesh) * n for shape, item, e, n in lv.opt)
        opt_full = w.opt.full_bytes
    b = w.batch
    inputs = sum(math.prod(s) * itemsize(d) for _, s, d in b.leaves)
    inputs_dev = sum(math.prod(s) // (shards if s and s[0] % shards == 0 else 1) * itemsize(d)
                     for _, s, d in b.leaves)
    acts_dev, acts_full = activation_bytes(lv.column_units, w.saved, b, w.config, mesh, shards, w.remat,
                                           w.act_item, notes, lv.stacks, lv.adapters)
    return (Memory(params, grads, opt, acts_dev, state, inputs_dev),
            Memory(params_full, grads_full, opt_full, acts_full, state_full, inputs))
