"""XLA:TPU's all-to-alls of one table's lookups scattered together (BART's and T5's shared table).

A table looked up by ``k >= 2`` gathers (an encoder's and a decoder's ids) whose gradient also has a
dense part (the tied logits' weight gradient) gets, on XLA:TPU, its lookups' scatter-adds folded into
one scatter onto the dense part: the ids and the updates of the ``k`` lookups are concatenated along
the batch, and the batch-split concatenation is resharded to the batch split of the concatenated
array with all-to-alls over the batch axes, in two rounds (each lookup's, then the concatenation's),
for the ids (int32) and for the updates. Measured (libtpu 0.0.42.1, v5e:2x4; a linen probe: one
``nn.Embed`` looked up ``k`` times and ``attend``-ed, benchmarks/tpu_aot_notes.md, "Twentieth round:
two lookups of one table"): per device, ``2 (n-1)/n * r * (w * itemsize + 4)`` bytes, with ``n``
the batch axes' devices, ``r`` the lookups' rows on one device (all ``k``), ``w`` the table's feature
width on one device (its tensor split), for any split of the table (fsdp, model, vocab, replicated);

* only while the lookups' rows together (global) are fewer than the table's rows (the probe's
  ``V = 2048`` at 2048 rows: two scatters, 2056: one; 4096 rows at ``V = 4096`` / 4104 likewise);
* not for an untied table (two scatter-adds into zeros are reduced apart), not for one lookup;
* at two and more examples per device; at one, the concatenation is resharded by collective-permutes
  instead (not modelled);
* not on XLA:CPU, which scatters each lookup apart (no all-to-all);
* not for a table every read of which is cast to a narrower dtype (BART's and T5's shared table in mixed
  precision): each lookup's bfloat16 scatter-add is reduced apart, like the logits' part (measured,
  transformers' BART and T5 with ``dtype=bfloat16``, v5e:2x4 data=2,model=4: three ``bf16[V,64]``
  all-reduces per step, no all-to-all).
"""

from __future__ import annotations

import math
from typing import Any

from tpflax._src.cost.activations import acts_for
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import Scope, body, drop_layers, is_tied, leaf_itemsize
from tpflax._src.facts.tree import narrower
from tpflax._src.mesh import TENSOR
from tpflax._src.specs import entry_axes

IDS_ITEM = 4  # the concatenated ids: int32


def scattered_as_one(s: Scope, path: str, d: Any) -> bool:
    """Whether XLA:TPU adds the scatter-adds of ``path``'s lookups before it reduces them (see the module
    docstring): on TPU, unless every read casts the table to a narrower dtype (:attr:`Scope.cast_to`)."""
    return s.backend == "tpu" and not narrower((s.cast_to or {}).get(path, ""), leaf_itemsize(d))


def lookup_concat_items(s: Scope) -> list[CommItem]:
    """The all-to-alls that reshard a tied table's concatenated lookups (see the module docstring)."""
    if s.backend != "tpu" or s.shards <= 1 or s.batch.size < 2 * s.shards:
        return []
    items: list[CommItem] = []
    for path, looks in (s.lookups or {}).items():
        d = s.lv.decisions.get(path)
        if d is None or looks < 2 or not d.trainable or d.layers_dim is not None or not is_tied(path, d, s) \
                or not scattered_as_one(s, path, d):
            continue
        acts = acts_for(s.activations, d.unit)[:looks]
        if len(acts) == looks:  # each lookup's rows (global) and its output's element size
            rows = sum(math.prod(a.output[:-1]) for a in acts)
            item = acts[0].itemsize
        else:
            rows, item = looks * s.rows_local * s.shards, leaf_itemsize(d)
        shape = body(d)
        if rows >= shape[0]:  # as many rows as the table or more: the scatters stay apart
            continue
        feature = drop_layers(d, s.lv.specs[path])[-1]
        split = math.prod(s.mesh.sizes[a] for a in entry_axes(feature) if dict(s.mesh.roles).get(a) == TENSOR)
        local = rows / s.shards
        n = s.shards
        why = (f"{looks} lookups of a tied table scattered as one: their concatenated %s resharded over the "
               "batch axes (XLA:TPU, two rounds of all-to-alls)")
        items += [CommItem("all-to-all", s.batch_axes, local * shape[-1] / split * item, n, 2, path, why % "updates"),
                  CommItem("all-to-all", s.batch_axes, local * IDS_ITEM, n, 2, path, why % "ids")]
    return items
