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

Under remat the same reading says which split rows' sums the recompute runs again (:class:`Recompute`), one rule
for the estimate and the chooser. It reads layer paths, kinds and calls, never a plan (:class:`Leaves` only in
the estimate's adapters), and imports no planner module: the planner may import it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpflax._src.cost.activations import layer_key
from tpflax._src.facts.classify import layer_group
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.specs import entry_axes

if TYPE_CHECKING:  # the cost model's Leaves import the planner; this module is priced by it too
    from tpflax._src.cost.leaves import Leaves

_INDEXED = re.compile(r"^\D*?_?\d+$")
ROW_KINDS = ("attention", "dense", "expert")  # matmul layers whose row member feeds a residual add


def residual_outputs(lv: Leaves, activations: Any) -> list[str]:
    """Traced paths whose output feeds only a residual add: :func:`residual_layers` of ``lv``'s pairs' rows.

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
    return residual_layers(row_layers(lv), norm_layers(lv), lv.stacks, activations)


def row_layers(lv: Leaves) -> dict[str, str]:
    """``{layer path: kind}`` of the rows of ``lv``'s column -> row pairs."""
    return {layer_key(d.unit): d.kind for d in lv.decisions.values()
            if d.role == "row" and d.pair is not None and d.kind in ROW_KINDS}


def norm_layers(lv: Leaves) -> frozenset[str]:
    """The layer paths of ``lv``'s norms, every alike one too (``ln1`` stands for ``ln2`` in ``lv.decisions``)."""
    return frozenset(layer_key(leaf.rsplit("/", 1)[0]) for leaf in {*lv.rep_of, *lv.decisions}
                     if getattr(lv.decision_of(leaf), "kind", None) == "norm")


def residual_layers(rows: Mapping[str, str], norms: Collection[str], stacks: Mapping[str, int],
                    activations: Mapping[str, Sequence[Any]]) -> list[str]:
    """Traced paths whose output feeds only a residual add: each row projection of a column -> row
    pair (``rows``: ``{layer path: kind}``) inside a repeated block that holds a norm (``norms``: layer paths;
    a pre- or post-norm residual block; a plain stack of dense layers feeds the row output to the next layer,
    which reads it), and its parent when the parent returns that output (same shape, traced right after it; a
    repeated block, ``layers_3``, adds its residual and is not such a parent). A scanned stack is a repeated block
    too (``layers``, :func:`repeated_block` of ``stacks``): the trace maps its body's contractions to the stacked
    leaves.
    """
    traced = {alike_path(p) for p in activations}
    normed = {repeated_block(n, stacks) for n in norms} - {None}
    alike_rows = set()
    for key, kind in rows.items():
        if alike_path(key) not in traced:  # a parameter of the traced module itself (an expert layer's ``wo``)
            key = key.rsplit("/", 1)[0]
        if kind in ROW_KINDS and repeated_block(key, stacks) in normed:
            alike_rows.add(alike_path(key))
    keys = list(activations)
    out = []
    for i, path in enumerate(keys):
        if alike_path(path) not in alike_rows:
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


@dataclass(frozen=True)
class Recompute:
    """Which split rows' sums a rematerialised step's recompute runs again, read off the trace's layer calls: one
    rule for the estimate (:func:`tpflax._src.cost.comm.comm_items`) and the chooser
    (:func:`tpflax._src.planner.builders.row_sum`), each giving what it knows.

    XLA recomputes a remat'd block's forward in the backward, as far as the backward needs it. It sums a split
    row's partial outputs again where the recompute needs their sum: an attention output projection's (the MLP's
    recomputed input reads it), an expert row's (the router weights its outputs, a product whose backward reads
    them), and, with the layer calls traced, any row but a residual output (:func:`residual_layers`) whose add no
    norm of its own block call reads after it, in the trace's call order (a sequential pre-norm block's attention
    output is read by the MLP's norm, a post-norm block's every row by the next norm; a parallel block's rows,
    PaLM's or GPT-J's, and a block's last row feed only the block output, which the next block saves).

    Measured (XLA:CPU data=2,model=4, tests/test_remat_comm.py): under ``nn.remat`` a pre-norm block with flat
    q/k/v/o Dense compiles one ``rematted_computation`` all-reduce of o's output per layer, none of the MLP's;
    a post-norm block one of each row's; a PaLM parallel block none.

    Attributes:
        activations: the layer calls as :func:`tpflax._src.cost.activations.trace_activations` returns them, in
            call order (empty for a plain function: only attention and expert rows are summed again).
        norms: the layer paths of the model's norms.
        stacks: the scanned stacks' layer paths (:func:`stack_lengths`).
        again: the model has a row besides attention output projections (an MLP's): an attention-only stack's
            outputs feed only the blocks' adds.
    """

    activations: Mapping[str, Sequence[Any]]
    norms: frozenset[str]
    stacks: Mapping[str, int]
    again: bool = True

    def unread(self, rows: Mapping[str, str]) -> frozenset[str]:
        """The :func:`residual_layers` of ``rows`` (alike paths) no norm of their own block call reads after
        them: the rows whose sum the recompute does not need."""
        out = residual_layers(rows, self.norms, self.stacks, self.activations)
        if not out:
            return frozenset()
        normed = {alike_path(n) for n in self.norms}

        def instance(path: str) -> tuple[str | None, str]:
            block = repeated_block(path, self.stacks)
            return block, "/".join(path.split("/")[:len(block.split("/"))]) if block else ""

        # each block call's last norm, in call order: one pass (a norm per pair of row and norm made an 80-layer
        # model's suggest_mesh spend a third of its pricing here)
        where, last = {}, {}
        for i, p in enumerate(self.activations):
            where[p] = i
            if alike_path(p) in normed:
                last[instance(p)] = i
        later = {alike_path(p) for p in out
                 if (at := instance(p))[0] is not None and last.get(at, -1) > where[p]}
        return frozenset(alike_path(p) for p in out) - later

    def summed_again(self, key: str, kind: str, batched: bool, unread: frozenset[str]) -> bool:
        """Whether the recompute sums the row at layer path ``key`` again (``batched``: its contraction batches over
        experts; ``unread``: :meth:`unread` of the rows, or of this one)."""
        return self.again and (kind == "attention" or batched or bool(self.activations)
                               and not {alike_path(key), alike_path(key.rsplit("/", 1)[0])} & unread)


    def whole_kv_again(self, kv_replicated: bool) -> tuple[bool, bool]:
        """How the recompute re-runs a GQA laid out with its key/value kernels whole and its query split
        (:func:`tpflax._src.cost.headcut.whole_kv`): ``(the query's output gathered to whole head groups again,
        each key/value's input gradient summed over the head groups instead of its output gradient gathered)``;
        ``kv_replicated``: the key/value kernels are whole on every device (no fsdp split).

        Measured (XLA:CPU, ``nn.remat`` pre-norm blocks, 12 query heads of 4 over ``jax.nn.dot_product_attention``,
        width 48, 16 tokens): the recompute's ``rematted_computation`` gathers the query's output again per layer
        with 6 key/value heads on data=2,model=4 and on fsdp=2,model=4 and with 3 on data=2,model=4. With 6 heads
        on data=2,model=4 the backward sums k's and v's input gradients over the 2 groups (one all-reduce of
        ``f32[8,16,48]`` x 2 per layer) and gathers no output gradient; on fsdp=2,model=4 (the kernels gathered
        over fsdp) it gathers them as without remat."""
        return True, kv_replicated


def scope_recompute(s: Any) -> Recompute | None:
    """The estimate's :class:`Recompute` of a :class:`tpflax._src.cost.scope.Scope`: its layer calls, norms and stacks,
    and whether a pair's row is not an attention layer; None unless the step is rematerialised."""
    if not s.remat:
        return None
    lv = s.lv
    return Recompute(s.activations, norm_layers(lv), lv.stacks,
                     any(lv.decisions[r].kind != "attention" for pc in lv.pairs for r in pc.rows))


def stack_lengths(units: Iterable[tuple[str, int | None]]) -> dict[str, int]:
    """``{traced layer path: layers}`` for layers inside a scanned stack, from each leaf's ``(unit, layers)``
    (its stacked dim's size, None without one): every leaf below such a path has one, of that size.

    A linen trace records a scanned body's calls once (or twice), not once per layer.

    >>> stack_lengths([("params/layers/up", 6), ("params/head", None)])
    {'layers': 6, 'layers/up': 6}
    """
    seen: dict[str, set] = {}
    for unit, n in units:
        parts = layer_key(unit).split("/")
        for i in range(1, len(parts) + 1):
            seen.setdefault("/".join(parts[:i]), set()).add(n)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1 and None not in v}


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
