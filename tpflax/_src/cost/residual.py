"""Traced layer outputs a transformer's backward pass never reads: what feeds only a residual add.

The generic count of saved activations (:func:`tpflax._src.cost.activations.activation_bytes`) keeps
every traced layer's output. A row projection's output (``o_proj``, ``down_proj``, an expert layer's
combine: the second matmul of a column -> row pair) feeds only the residual add, whose backward reads
nothing, and the module that returns it (``attn``, ``mlp``) returns the same buffer: counted twice,
kept never. Read off the TPU buffer assignments of Llama-2-7B (``XLA_FLAGS=--xla_dump_to``, the HBM
values live at the peak in ``*-live-range.txt`` and ``*-buffer-assignment.txt``): the float32
fsdp=2,model=4 step keeps, per layer, its two norms' inputs (``f32[4, 4096, 4096]``, the residual
stream: the embedding's all-reduce and the ``ffn_norm``/``attention_norm`` fusions), the gate and up
outputs (``f32[4, 4096, 2752]``) and q, k, v and the attention output in bfloat16; no
``[4, 4096, 4096]`` buffer from ``o_proj`` or ``down_proj`` lives past its residual add. The bf16
fsdp=8 and fsdp=2,model=4 steps keep the same set.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

from tpflax._src.cost.activations import layer_key
from tpflax._src.cost.leaves import Leaves
from tpflax._src.facts.classify import layer_group
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.specs import entry_axes

_INDEXED = re.compile(r"^\D*?_?\d+$")
ROW_KINDS = ("attention", "dense", "expert")  # matmul layers whose row member feeds a residual add


def residual_outputs(lv: Leaves, activations: Any) -> list[str]:
    """Traced paths whose output feeds only a residual add: each row projection of a column -> row
    pair inside a repeated block that holds a norm (a pre- or post-norm residual block; a plain stack
    of dense layers feeds the row output to the next layer, which reads it), and its parent when the
    parent returns that output (same shape, traced right after it; a repeated block, ``layers_3``,
    adds its residual and is not such a parent). A scanned stack is a repeated block too (``layers``,
    :func:`repeated_block`): the trace maps its body's contractions to the stacked leaves.

    >>> import jax, tpflax
    >>> from tpflax import zoo
    >>> from tpflax._src.cost.activations import trace_activations
    >>> from tpflax._src.cost.leaves import merge
    >>> m = zoo.get("llama")
    >>> acts = trace_activations(m, 2)
    >>> p = tpflax.plan(m.abstract_variables(), {"fsdp": 2})
    >>> residual_outputs(merge(p.decisions, acts), acts)[:4]
    ['layers_0/attn/o_proj', 'layers_0/attn', 'layers_0/mlp/down_proj', 'layers_0/mlp']
    """
    traced = {alike_path(p) for p in activations}
    stacks = lv.stacks
    normed = {repeated_block(layer_key(d.unit), stacks) for d in lv.decisions.values() if d.kind == "norm"} - {None}
    rows = set()
    for d in lv.decisions.values():
        key = layer_key(d.unit)
        if alike_path(key) not in traced:  # a parameter of the traced module itself (an expert layer's ``wo``)
            key = key.rsplit("/", 1)[0]
        if d.role == "row" and d.pair is not None and d.kind in ROW_KINDS and repeated_block(key, stacks) in normed:
            rows.add(alike_path(key))
    keys = list(activations)
    out = []
    for i, path in enumerate(keys):
        if alike_path(path) not in rows:
            continue
        out.append(path)
        parent = path.rsplit("/", 1)[0]
        nxt = keys[i + 1] if i + 1 < len(keys) else None
        last = parent.rsplit("/", 1)[-1]
        if (nxt == parent != path and layer_group(last) == last and parent != repeated_block(path, stacks)
                and [a.output for a in activations[parent]] == [a.output for a in activations[path]]):
            out.append(parent)
    return out


@functools.lru_cache(maxsize=1 << 14)
def alike_path(path: str) -> str:
    """A traced path with its repeated block's index as a wildcard (``layers_*/mlp/fc1``: only the block's).
    Cached: the estimate asks for each layer's path once per leaf it prices."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _INDEXED.match(part):
            return "/".join(parts[:i] + [layer_group(part)] + parts[i + 1:])
    return path


def normed_later(lv: Leaves, activations: Any, out: list[str] | None = None) -> set[str]:
    """The :func:`residual_outputs` (alike paths) a norm of their own block reads after them: the residual add
    they feed is normalised later in the same call (a sequential pre-norm block's attention output, read by the
    MLP's norm; a post-norm block's every row), so a rematerialised block's recompute, which needs that norm's
    input for its backward, sums them again. A parallel block's rows (PaLM, GPT-J: one norm before both) and a
    block's last row are normalised by nothing after them in the block. Read off the trace's call order (the
    order of ``activations``), not names.

    Measured (XLA:CPU data=2,model=4, tests/test_remat_comm.py): under ``nn.remat`` a pre-norm block with flat
    q/k/v/o Dense compiles one ``rematted_computation`` all-reduce of o's output per layer, none of the MLP's;
    a PaLM parallel block compiles none. ``out``: :func:`residual_outputs`, if the caller has them.
    """
    out = residual_outputs(lv, activations) if out is None else out
    if not out:
        return set()
    stacks = lv.stacks
    keys = list(activations)
    where = {p: i for i, p in enumerate(keys)}
    # every norm's leaves (alike leaves share one representative decision: ``ln1`` stands for ``ln2``)
    normed = {alike_path(layer_key(leaf.rsplit("/", 1)[0])) for leaf in {*lv.rep_of, *lv.decisions}
              if getattr(lv.decision_of(leaf), "kind", None) == "norm"}
    norms = [p for p in keys if alike_path(p) in normed]

    def instance(path: str) -> tuple[str | None, str]:
        block = repeated_block(path, stacks)
        return block, "/".join(path.split("/")[:len(block.split("/"))]) if block else ""

    later = set()
    for path in out:
        home = instance(path)
        if home[0] is not None and any(where[n] > where[path] and instance(n) == home for n in norms):
            later.add(alike_path(path))
    return later


def repeated_block(path: str, stacks: Mapping[str, int] | None = None) -> str | None:
    """The repeated block a traced path sits in: an indexed one, index as a wildcard (``layers_*``), else
    the scanned stack holding it (``stacks``, :attr:`Leaves.stacks`: the outermost traced path whose
    leaves all carry the layers dim, ``layers`` for ``layers/mlp/down_proj``); None outside one.

    >>> repeated_block("layers_3/mlp/down"), repeated_block("layers/mlp/down", {"layers": 4, "layers/mlp": 4})
    ('layers_*', 'layers')
    >>> repeated_block("mlp/down", {"layers": 4}) is None, repeated_block("blocks/norm1", {"blocks": 4})
    (True, 'blocks')
    """
    parts = path.split("/")
    for i, part in enumerate(parts):
        # the outermost wins: a scanned stack's numbered members (``blocks/norm1``, ``blocks/norm2``) are not
        # repeated blocks of their own
        if "/".join(parts[:i + 1]) in (stacks or ()):
            return "/".join(parts[:i + 1])
        if _INDEXED.match(part):
            return "/".join(parts[:i] + [layer_group(part)])
    return None


def residual_bytes(lv: Leaves, activations: Any, mesh: MeshShape, shards: int, act_item: int) -> int:
    """Bytes on a device the generic count gives the outputs of :func:`residual_outputs`: every call of
    each in ``activations`` (pass them as they run, :func:`tpflax._src.cost.activations.layer_runs`: a
    scanned stack's once per layer)."""
    roles = dict(mesh.roles)
    total = 0.0
    for path in residual_outputs(lv, activations):
        calls = activations[path]
        split = [e for e in lv.column_units.get(path, ()) if any(roles[a] in (TENSOR, EXPERT) for a in entry_axes(e))]
        degree = math.prod(mesh.sizes[a] for a in entry_axes(split[-1])) if split else 1
        total += math.prod(calls[0].output) * act_item / shards / degree * len(calls)
    return int(total)
