"""Communication per training step, modelled per collective from the plan's decisions.

Each source of collectives has its own function: gradients (fsdp and data
parallelism), column -> row pairs, embeddings and output heads (and tensor-split
layers without a partner), experts. They read only the decisions (spec, shape,
kind, pair, role, layers dim, unit, trainable) and the mesh axis roles, through
a :class:`Scope` that holds what one (plan, mesh) shares.

Rematerialisation does not re-issue collectives in what XLA compiles: the
recomputed forward reuses the gathered weights / reduced activations (measured
on the zoo's nn.remat-inside-nn.scan Llama), so forward counts are 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tpflax._src.cost.activations import acts_for, token_rows
from tpflax._src.cost.batch import Batch, config_value, itemsize
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.records import Act, CommItem
from tpflax._src.mesh import EXPERT, FSDP, TENSOR, MeshShape
from tpflax._src.specs import Entry, used_axes


def is_output_head(d: Any) -> bool:
    """True for an output head (logits over the vocabulary or the classes).

    TODO(lead): once the planner marks output heads with ``kind == "head"``,
    this is that test alone and the name match below goes.
    """
    from tpflax._src.facts.classify import HEAD

    return d.kind == "head" or (d.kind == "dense" and bool(HEAD.match(d.unit.rsplit("/", 1)[-1])))


def leaf_itemsize(d: Any) -> int:
    """Bytes per element of a decision's leaf, from the bytes the planner counted."""
    n = math.prod(d.shape)
    return d.bytes // n if n else itemsize(d.dtype)


def layers(d: Any) -> int:
    """How many stacked layers (``nn.scan``) the leaf holds: its collectives repeat that often."""
    return math.prod(d.shape[:d.layers_dim + 1]) if d.layers_dim is not None else 1


def body(d: Any) -> tuple[int, ...]:
    """The leaf's shape without its stacked-layers dim."""
    return tuple(d.shape[d.layers_dim + 1:]) if d.layers_dim is not None else tuple(d.shape)


@dataclass(frozen=True)
class Scope:
    """What every collective of one (plan, mesh) shares."""

    mesh: MeshShape
    specs: Mapping[str, tuple[Entry, ...]]
    batch: Batch
    batch_axes: tuple[str, ...]
    shards: int
    act_item: int
    g_item: int | None
    backend: str
    dispatch: str
    activations: Mapping[str, Sequence[Act]]
    config: Any

    @functools.cached_property
    def rows_local(self) -> float:
        return token_rows(self.batch, self.config) / self.shards

    def axes(self, path: str, role: str) -> tuple[str, ...]:
        """Mesh axes of ``role`` (size > 1) that split the leaf at ``path``."""
        return _axes_of(self.specs[path], self.mesh, role)

    def size(self, axes: Sequence[str]) -> int:
        return math.prod(self.mesh.sizes[a] for a in axes)

    def nbytes(self, shape: Sequence[int]) -> float:
        """Bytes of a traced activation on one device: batch-major shapes split over the batch axes."""
        local = 1 / self.shards if shape and shape[0] == self.batch.size else 1.0
        return math.prod(shape) * self.act_item * local

    def leaf_bytes(self, path: str, d: Any) -> int:
        return shard_bytes(tuple(d.shape), leaf_itemsize(d), self.specs[path], self.mesh)


@functools.lru_cache(maxsize=1 << 14)
def _axes_of(spec: tuple[Entry, ...], mesh: MeshShape, role: str) -> tuple[str, ...]:
    roles, used = dict(mesh.roles), used_axes(spec)
    return tuple(a for a in mesh.names if a in used and roles[a] == role and mesh.sizes[a] > 1)


def comm_items(decisions: Mapping[str, Any], scope: Scope, notes: list[str]) -> list[CommItem]:
    """Every modelled collective of one training step."""
    items = gradient_items(decisions, scope)
    pair_list, in_pair = pairs(decisions)
    items += pair_items(decisions, pair_list, scope, notes)
    items += layer_items(decisions, in_pair, scope, notes)
    items += expert_items(decisions, scope)
    return items


# ---------------------------------------------------------------------------
# gradients: fsdp gather / reduce-scatter, data-parallel all-reduce

def gradient_items(decisions: Mapping[str, Any], s: Scope) -> list[CommItem]:
    """fsdp all-gathers and gradient reductions of every trainable leaf."""
    # A scanned recurrence's weights get a partial gradient at every time step; XLA
    # reduces it inside the backward loop, once per step of the sequence.
    recurrent = {d.unit for d in decisions.values() if d.kind == "recurrent"}
    x_shape = s.batch.leaves[0][1]
    steps = int(config_value(s.config, "seq_len", 0) or (x_shape[1] if len(x_shape) >= 2 else 1))
    items: list[CommItem] = []
    for path, d in decisions.items():
        if not d.trainable:
            continue
        reps = steps if d.unit in recurrent else 1
        for kind, axes, size, n, count, why in _gradient_templates(
                s.specs[path], s.mesh, s.batch_axes, s.leaf_bytes(path, d), leaf_itemsize(d), s.g_item,
                s.backend, reps):
            items.append(CommItem(kind, axes, size, n, count, path, why))
    return items


@functools.lru_cache(maxsize=1 << 14)
def _gradient_templates(spec, mesh: MeshShape, batch_axes, nbytes: int, item: int, g_item, backend: str,
                        reps: int) -> tuple:
    """The gradient collectives of one leaf, without its path (repeated layers share them)."""
    why_rep = f" at each of {reps} time steps (inside the scanned recurrence)" if reps > 1 else ""
    f_axes = _axes_of(spec, mesh, FSDP)
    free = tuple(a for a in batch_axes if a not in used_axes(spec))
    gbytes = nbytes if g_item is None else nbytes // item * g_item
    nf = math.prod(mesh.sizes[a] for a in f_axes)
    out = []
    if f_axes:
        out.append(("all-gather", f_axes, nbytes * nf, nf, 1,
                    "fsdp: gather the parameter for compute (the backward reuses it)"))
        if backend == "cpu":
            group = tuple(a for a in mesh.names if a in f_axes or a in free)
            return tuple(out) + (("all-reduce", group, gbytes * nf, math.prod(mesh.sizes[a] for a in group), reps,
                                  "fsdp gradient: XLA:CPU all-reduces the whole gradient, then slices" + why_rep),)
        out.append(("reduce-scatter", f_axes, gbytes * nf, nf, reps,
                    "fsdp gradient: reduce-scatter to the owning shard" + why_rep))
    if free:
        out.append(("all-reduce", free, gbytes, math.prod(mesh.sizes[a] for a in free), reps,
                    "data parallel: sum the gradient over the batch axes" + why_rep))
    return tuple(out)


# ---------------------------------------------------------------------------
# column -> row pairs

def pairs(decisions: Mapping[str, Any]) -> tuple[dict[int, tuple[list[str], list[str]]], set[str]]:
    """``{pair id: (columns, rows)}`` from the decisions' pair and role, and every member path."""
    out: dict[int, tuple[list[str], list[str]]] = {}
    for path, d in decisions.items():
        if d.pair is not None and d.role in ("column", "row"):
            cols, rows = out.setdefault(d.pair, ([], []))
            (cols if d.role == "column" else rows).append(path)
    return dict(sorted(out.items())), {p for cols, rows in out.values() for p in cols + rows}


def pair_items(decisions: Mapping[str, Any], pair_list, s: Scope, notes: list[str]) -> list[CommItem]:
    """A split pair sums the row side's partial outputs forward and the column side's input gradients back."""
    items: list[CommItem] = []
    for pid, (cols, rows) in pair_list.items():
        axes = tuple(dict.fromkeys(a for p in cols + rows for a in s.axes(p, TENSOR)))
        if not axes:
            continue
        n = s.size(axes)
        stack = max(layers(decisions[p]) for p in cols + rows)
        for r in rows:
            if s.axes(r, TENSOR):
                items.append(CommItem("all-reduce", axes, _pair_act(decisions[r], "out", s), n, stack,
                                      f"pair {pid}", f"row {r}: sum partial outputs (forward)"))
        # XLA reduces the column inputs' gradients one by one (q, k and v are three all-reduces)
        for c in cols:
            if s.axes(c, TENSOR):
                items.append(CommItem("all-reduce", axes, _pair_act(decisions[c], "in", s), n, stack,
                                      f"pair {pid}", f"column {c}: sum partial input gradients (backward)"))
            else:  # GQA key/value with fewer heads than the tensor degree: its output gradient is gathered
                items.append(CommItem("all-gather", axes, _pair_act(decisions[c], "out", s), n, stack,
                                      f"pair {pid}", f"replicated column {c} in a split pair: gather its "
                                      "output gradient (backward)"))
        _heads_note(decisions, pid, cols, s, notes)
    return items


def _heads_note(decisions, pid: int, cols: list[str], s: Scope, notes: list[str]) -> None:
    # attention split finer than its heads: the score contraction crosses devices and
    # XLA reshards attention in ways this model does not predict; say so
    n_heads = config_value(s.config, "n_heads")
    if not n_heads or not any(decisions[c].kind == "attention" for c in cols):
        return
    degree = max((s.size(s.axes(c, TENSOR)) for c in cols), default=1)
    if degree > 1 and n_heads % degree:
        notes.append(f"attention pair {pid}: {n_heads} heads do not divide the tensor degree {degree}, so "
                     "head_dim is split and XLA adds resharding collectives that are not modelled; use a "
                     "tensor degree that divides the heads")


def _pair_act(d: Any, side: str, s: Scope) -> float:
    acts = acts_for(s.activations, d.unit)
    if acts:
        return s.nbytes(acts[0].output if side == "out" else acts[0].inputs[0])
    b = body(d)
    if d.kind == "expert" and len(b) == 3:
        width = b[1] if side == "in" else b[-1]
    else:
        width = b[0] if side == "in" else b[-1]
    return s.rows_local * width * s.act_item


# ---------------------------------------------------------------------------
# embeddings, output heads and tensor-split layers without a partner

def layer_items(decisions: Mapping[str, Any], in_pair: set[str], s: Scope, notes: list[str]) -> list[CommItem]:
    """Collectives of tensor-split leaves outside pairs."""
    has_head = any(is_output_head(d) for d in decisions.values())
    any_attend = any(k.endswith(":attend") for k in s.activations)
    items: list[CommItem] = []
    for path, d in decisions.items():
        axes = s.axes(path, TENSOR)
        if path in in_pair or not d.trainable or not axes or d.kind == "bias":
            continue
        if d.kind == "embedding":
            items += embedding_items(path, d, axes, s, tied_guess=not has_head and not any_attend, notes=notes)
        elif d.kind in ("dense", "head") and s.specs[path][-1] is not None:
            items += _column_items(path, d, axes, s)
        elif d.kind in ("dense", "conv") and any(e is not None for e in body_spec(d, s.specs[path])):
            notes.append(f"{path}: {d.strategy} split without a partner is not modelled")
    return items


def body_spec(d: Any, spec: tuple[Entry, ...]) -> tuple[Entry, ...]:
    return spec[d.layers_dim + 1:] if d.layers_dim is not None else spec


def embedding_items(path: str, d: Any, axes: tuple[str, ...], s: Scope, *, tied_guess: bool,
                    notes: list[str]) -> list[CommItem]:
    """A vocab-split lookup sums its rows; a feature-split one gathers them; a tied output adds the head's."""
    n, b, spec = s.size(axes), body(d), s.specs[path]
    acts = acts_for(s.activations, d.unit)
    size = s.nbytes(acts[0].output) if acts else s.rows_local * b[-1] * s.act_item
    split_vocab = body_spec(d, spec)[0] is not None
    items = [CommItem("all-reduce", axes, size, n, 1, path, "vocab-split embedding: sum the looked-up rows "
                      "(forward)") if split_vocab else
             CommItem("all-gather", axes, size, n, 1, path, "embedding split on its features: gather them (forward)")]
    attend = acts_for(s.activations, d.unit + ":attend")
    if not (split_vocab and (attend or (tied_guess and config_value(s.config, "vocab") == b[0]))):
        return items
    a = attend[0] if attend else None
    in_size = s.nbytes(a.inputs[0]) if a else s.rows_local * b[-1] * s.act_item
    items += _head_items(axes, n, in_size, (a.output if a else None), s, path, "tied output embedding")
    free = tuple(x for x in s.batch_axes if x not in used_axes(spec))
    if free:  # the lookup's and the output's gradients are reduced separately
        items.append(CommItem("all-reduce", free, s.leaf_bytes(path, d), s.size(free), 1, path,
                              "tied embedding: its second gradient (output use) is summed separately over "
                              "the batch axes"))
    if not attend:
        notes.append(f"{path}: assumed tied to the output (no head layer found)")
    return items


def _column_items(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> list[CommItem]:
    n, b = s.size(axes), body(d)
    acts = acts_for(s.activations, d.unit)
    a = acts[0] if acts else None
    in_size = s.nbytes(a.inputs[0]) if a else s.rows_local * b[0] * s.act_item
    if is_output_head(d):
        return _head_items(axes, n, in_size, (a.output if a else None), s, path, "vocab-split output head")
    out_size = s.nbytes(a.output) if a else s.rows_local * b[-1] * s.act_item
    return [CommItem("all-gather", axes, out_size, n, layers(d), path,
                     "column layer without a row partner: gather its split output (forward)"),
            CommItem("all-reduce", axes, in_size, n, layers(d), path,
                     "column layer without a row partner: sum input gradients (backward)")]


def _head_items(axes, n: int, in_size: float, out_shape, s: Scope, path: str, what: str) -> list[CommItem]:
    if out_shape:
        local = 1 / s.shards if out_shape[0] == s.batch.size else 1.0
        rows = math.prod(out_shape[:-1]) * local
    else:
        rows = s.rows_local
    # softmax cross-entropy over a split vocabulary: max, sum of exp and the label's
    # logit are reduced across the split (float32 per row), then the input gradient
    return [CommItem("all-reduce", axes, rows * 4, n, 3, path,
                     f"{what}: max, sum and label logit of the split softmax (forward)"),
            CommItem("all-reduce", axes, in_size, n, 1, path, f"{what}: sum input gradients (backward)")]


# ---------------------------------------------------------------------------
# experts

def expert_items(decisions: Mapping[str, Any], s: Scope) -> list[CommItem]:
    """Routed tokens move to their experts and back (all-to-all), or every expert sees them (dense)."""
    e_axes = s.mesh.axes_with(EXPERT)
    if not e_axes:
        return []
    blocks: dict[str, list[str]] = {}  # expert leaves by the block holding them
    for path, d in decisions.items():
        if d.kind == "expert" and s.axes(path, EXPERT):
            blocks.setdefault(d.unit.rsplit("/", 1)[0], []).append(path)
    n = s.size(e_axes)
    top_k = config_value(s.config, "top_k", 1) or 1
    items = []
    for block, paths in blocks.items():
        d0 = decisions[paths[0]]
        d_model, stack = body(d0)[1], layers(d0)
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
