"""Communication per training step, modelled per collective from the plan's decisions.

Each source of collectives has its own function: gradients (fsdp and data
parallelism), column -> row pairs, embeddings and output heads (and tensor-split
layers without a partner); experts (:mod:`tpflax._src.cost.experts`) and the
reshards of fused kernels (:mod:`tpflax._src.cost.reshard`) have their own
modules. They read only the decisions (spec, shape, kind, pair, role, layers
dim, unit, trainable), the mesh axis roles and the traced rows, through a
:class:`Scope` that holds what one (plan, mesh) shares. Alike leaves of
repeated layers are priced once (:mod:`tpflax._src.cost.leaves`): an item's
``count`` includes how many there are, and its ``source`` names their group.

Rematerialisation does not re-issue tensor collectives in what XLA:CPU compiles: the
recomputed forward reuses the reduced activations (measured on the zoo's
nn.remat-inside-nn.scan Llama), so forward counts are 1; XLA:TPU sums a block's
attention output again to recompute its MLP input (see :func:`_pair_items`). A scanned stack's fsdp
weights are the exception: the step gathers them one layer at a time inside the
scan body, so a remat'd body gathers each layer again in the backward loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tpflax._src.cost.activations import acts_for, token_rows
from tpflax._src.cost.batch import Batch, config_value
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.price import stream_gathers, tpu_gather_item, tpu_reduce_scatters
from tpflax._src.cost.records import Act, CommItem
from tpflax._src.cost.stream import update_gathers
from tpflax._src.facts.tree import itemsize
from tpflax._src.mesh import DATA, FSDP, TENSOR, MeshShape
from tpflax._src.specs import Entry, entry_axes, used_axes


def leaf_itemsize(d: Any) -> int:
    """Bytes per element of a decision's leaf, from the bytes the planner counted.

    >>> import jax, tpflax
    >>> keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 4))
    >>> leaf_itemsize(tpflax.plan({"rng": keys}, {"data": 1}).decisions["rng"])  # a PRNG key: 2 x uint32
    8
    """
    n = math.prod(d.shape)
    return d.bytes // n if n else itemsize(d.dtype)


def layers(d: Any) -> int:
    """How many stacked layers (``nn.scan``) the leaf holds: its collectives repeat that often.

    >>> import jax, tpflax
    >>> w = jax.ShapeDtypeStruct((4, 64, 256), "float32")
    >>> layers(tpflax.plan({"layers": {"up": {"kernel": w}}}, {"data": 1}, stacked="layers").decisions["layers/up/kernel"])
    4
    """
    return d.shape[d.layers_dim] if d.layers_dim is not None else 1


def body(d: Any) -> tuple[int, ...]:
    """The leaf's shape without its stacked-layers dim.

    >>> import jax, tpflax
    >>> w = jax.ShapeDtypeStruct((4, 64, 256), "float32")
    >>> p = tpflax.plan({"layers": {"up": {"kernel": w}}}, {"data": 1}, stacked="layers")
    >>> body(p.decisions["layers/up/kernel"])
    (64, 256)
    """
    return _body_spec(d, tuple(d.shape))


@dataclass(frozen=True)
class Scope:
    """What every collective of one (plan, mesh) shares."""

    mesh: MeshShape
    lv: Leaves
    batch: Batch
    batch_axes: tuple[str, ...]
    shards: int
    act_item: int
    g_item: int | None
    backend: str
    dispatch: str
    activations: Mapping[str, Sequence[Act]]
    config: Any
    tied: frozenset[str] | None = None  # traced tied tables (None: not traced)
    remat: bool = False
    parts: Mapping[str, int] | None = None  # traced gradient parts (see cost.workload.traced_uses)
    rows: Mapping[str, float] | None = None  # traced rows per example a parameter's contraction reads
    fused: Mapping[str, tuple[int, int]] | None = None  # traced fused kernels: (param dim, pieces)
    shared: frozenset[str] | None = None  # traced kernels whose input a residual also reads (trace.sharing)
    lookups: Mapping[str, int] | None = None  # traced tables looked up by several gathers (cost.workload.Traced)
    grouped: Mapping[str, float] | None = None  # traced grouped convolutions (cost.workload.Traced)
    joined: Mapping[str, tuple[float, ...]] | None = None  # a projection's joined other uses' rows (Traced)

    def rows_of(self, path: str) -> float:
        """Activation rows on one device that the leaf at ``path`` reads: as traced, else the batch's tokens."""
        per_example = (self.rows or {}).get(path)
        return per_example * self.batch.size / self.shards if per_example else self.rows_local

    @functools.cached_property
    def rows_local(self) -> float:
        return token_rows(self.batch, self.config) / self.shards

    @functools.cached_property
    def tied_guess(self) -> bool:
        """No output head and no ``attend`` call: a table of the config's vocabulary computes the logits."""
        return (not any(d.kind == "head" for d in self.lv.decisions.values())
                and not any(k.endswith(":attend") for k in self.activations))

    def axes(self, path: str, role: str) -> tuple[str, ...]:
        """Mesh axes of ``role`` (size > 1) that split the leaf at ``path``."""
        return _axes_of(self.lv.specs[path], self.mesh, role)

    def size(self, axes: Sequence[str]) -> int:
        return math.prod(self.mesh.sizes[a] for a in axes)

    def nbytes(self, shape: Sequence[int]) -> float:
        """Bytes of a traced activation on one device: batch-major shapes split over the batch axes."""
        local = 1 / self.shards if shape and shape[0] == self.batch.size else 1.0
        return math.prod(shape) * self.act_item * local

    def leaf_bytes(self, path: str, d: Any) -> int:
        return shard_bytes(tuple(d.shape), leaf_itemsize(d), self.lv.specs[path], self.mesh)


@functools.lru_cache(maxsize=1 << 14)
def _axes_of(spec: tuple[Entry, ...], mesh: MeshShape, role: str) -> tuple[str, ...]:
    roles, used = dict(mesh.roles), used_axes(spec)
    return tuple(a for a in mesh.names if a in used and roles[a] == role and mesh.sizes[a] > 1)


def comm_items(scope: Scope, notes: list[str]) -> list[CommItem]:
    """The gradient, pair and layer collectives of one training step (see :func:`tpflax._src.cost.estimate.price_leaves`)."""
    return _gradient_items(scope) + _pair_items(scope, notes) + _layer_items(scope, notes)


# ---------------------------------------------------------------------------
# gradients: fsdp gather / reduce-scatter, data-parallel all-reduce

def _gradient_items(s: Scope) -> list[CommItem]:
    """fsdp all-gathers and gradient reductions of every trainable leaf."""
    # A scanned recurrence's weights get a partial gradient at every time step; XLA
    # reduces it inside the backward loop, once per step of the sequence.
    x_shape = s.batch.leaves[0][1]
    steps = int(config_value(s.config, "seq_len", 0) or (x_shape[1] if len(x_shape) >= 2 else 1))
    items: list[CommItem] = []
    for path, d in s.lv.decisions.items():
        if not d.trainable:
            continue
        reps, k, label = steps if d.unit in s.lv.recurrent else 1, s.lv.count[path], s.lv.label[path]
        # measured: XLA reduces the partial gradient of each whole use apart (a tied table's lookup
        # and logits, a layer called twice), then adds them
        parts = s.parts.get(path, 1) if s.parts is not None else (2 if is_tied(path, d, s) else 1)
        if s.backend == "tpu":  # XLA:TPU adds a table's lookups' scatter-adds first: one part for all
            parts -= max((s.lookups or {}).get(path, 1) - 1, 0)
        for kind, axes, size, n, count, why in _gradient_templates(
                s.lv.specs[path], s.mesh, _reduce_axes(path, s), s.leaf_bytes(path, d), leaf_itemsize(d), s.g_item,
                s.backend, reps, gather_item(d, s.backend), len(body(d))):
            if kind == "all-gather" and s.remat and (d.layers_dim is not None or d.group != path):
                # a layer's leaf is gathered inside its remat'd call (scan_fsdp.zero3): again in the backward
                where = "one layer at a time in the scan" if d.layers_dim is not None else "inside the remat'd layer"
                count, why = 2 * count, f"{why.split(' (')[0]} {where}, again in the remat'd backward"
            items.append(CommItem(kind, axes, size, n, count * k, label, why))
            if parts > 1 and kind != "all-gather":  # the other uses' gradients: all-reduced whole (XLA:TPU)
                items.append(CommItem("all-reduce" if kind == "reduce-scatter" else kind, axes, size, n,
                                      count * k * (parts - 1), label,
                                      f"used whole {parts} times (a tied table's lookup and logits, a shared "
                                      "layer): each use's gradient is reduced separately"))
    return items


def _reduce_axes(path: str, s: Scope) -> tuple[str, ...]:
    """The batch axes; a grouped convolution's (batch gathered: cost.grouped) every axis not splitting it."""
    if path not in (s.grouped or {}):
        return s.batch_axes
    used = used_axes(s.lv.specs[path])
    return tuple(a for a in s.mesh.names if a in s.batch_axes or (a not in used and s.mesh.sizes[a] > 1))


def is_tied(path: str, d: Any, s: Scope) -> bool:
    """The token table also computes the logits (an ``attend`` call, the trace, or no head to be found)."""
    if s.tied is not None:  # the trace saw the table both looked up and contracted
        return path in s.tied
    if d.kind != "embedding":
        return False
    if acts_for(s.activations, d.unit + ":attend"):
        return True
    return s.tied_guess and config_value(s.config, "vocab") == body(d)[0]


def _split_axes(spec, mesh: MeshShape) -> tuple[str, ...]:
    """Axes that split a parameter and are gathered for compute: fsdp axes, and batch (data) axes."""
    return tuple(a for a in mesh.names if a in _axes_of(spec, mesh, FSDP) + _axes_of(spec, mesh, DATA))


_MATMUL_KINDS = ("dense", "attention", "expert", "head", "conv")


def gather_item(d: Any, backend: str) -> int:
    """Bytes per element an fsdp all-gather of the leaf moves (see :func:`tpu_gather_item`)."""
    item = leaf_itemsize(d)
    return tpu_gather_item(item, d.kind in _MATMUL_KINDS) if backend == "tpu" else item


@functools.lru_cache(maxsize=1 << 14)
def _gradient_templates(spec, mesh: MeshShape, batch_axes, nbytes: int, item: int, g_item, backend: str,
                        reps: int, gather_item: int | None = None, body_rank: int | None = None) -> tuple:
    """The gradient collectives of one leaf, without its path (repeated layers share them)."""
    why_rep = f" at each of {reps} time steps (inside the scanned recurrence)" if reps > 1 else ""
    f_axes = _split_axes(spec, mesh)  # a parameter split over a data axis is gathered like fsdp
    free = tuple(a for a in batch_axes if a not in used_axes(spec))
    gbytes = nbytes if g_item is None else nbytes // item * g_item
    nf = math.prod(mesh.sizes[a] for a in f_axes)
    out = []
    if f_axes:
        out.append(("all-gather", f_axes, nbytes // item * (gather_item or item) * nf, nf, 1,
                    "fsdp: gather the parameter for compute (the backward reuses it)"))
        if backend == "cpu":
            group = tuple(a for a in mesh.names if a in f_axes or a in free)
            return tuple(out) + (("all-reduce", group, gbytes * nf, math.prod(mesh.sizes[a] for a in group), reps,
                                  "fsdp gradient: XLA:CPU all-reduces the whole gradient, then slices" + why_rep),)
        live = {a for a in mesh.names if mesh.sizes[a] > 1}
        rank = len(spec) if body_rank is None else body_rank
        if backend == "tpu" and not tpu_reduce_scatters(rank, live, f_axes):
            return tuple(out) + (_tpu_fsdp_gradient(mesh, f_axes, free, gbytes * nf, reps, why_rep),)
        out.append(("reduce-scatter", f_axes, gbytes * nf, nf, reps,
                    "fsdp gradient: reduce-scatter to the owning shard" + why_rep))
    if free:
        out.append(("all-reduce", free, gbytes, math.prod(mesh.sizes[a] for a in free), reps,
                    "data parallel: sum the gradient over the batch axes" + why_rep))
    return tuple(out)


def _tpu_fsdp_gradient(mesh: MeshShape, f_axes: tuple[str, ...], free: tuple[str, ...], size: int, reps: int,
                       why_rep: str) -> tuple:
    """XLA:TPU's reduction of an fsdp gradient it cannot reduce-scatter: one all-reduce, then a slice.

    Read off the TPU HLO of zoo train steps (libtpu 0.0.42.1, v5e:2x4). tpflax's step pins each
    gradient to its stored shards (:func:`tpflax._src.scan_fsdp.pin`), and XLA:TPU then
    reduce-scatters a leaf of two or more dims when the fsdp axes it is split over are the whole
    mesh (fsdp=8). With any other axis in the mesh (a free batch axis: one tuple all-reduce over
    ``data+fsdp``; a tensor axis: fsdp=2,model=4) and for 1-D leaves (norm scales) it all-reduces
    the whole gradient and slices it: twice a reduce-scatter's bytes.
    """
    group = tuple(a for a in mesh.names if a in f_axes or a in free)
    return ("all-reduce", group, size, math.prod(mesh.sizes[a] for a in group), reps,
            "fsdp gradient: XLA:TPU all-reduces the whole gradient over the fsdp and batch axes, then "
            "slices its shard" + why_rep)


# ---------------------------------------------------------------------------
# column -> row pairs

def _pair_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """A split pair sums the row side's partial outputs forward and the column side's input gradients back."""
    items: list[CommItem] = []
    dec, label = s.lv.decisions, s.lv.label
    # XLA:TPU recomputes a remat'd block's attention output, whose summed value the MLP's
    # recomputed input needs, so that row all-reduce runs again in the backward (measured: Llama
    # fsdp=2,model=4 remat on, v5e:2x4); the MLP's own sum is the block output, saved
    again = s.remat and s.backend == "tpu" and any(dec[r].kind != "attention" for pc in s.lv.pairs for r in pc.rows)
    for pc in s.lv.pairs:
        cols, rows = list(pc.columns), list(pc.rows)
        axes = tuple(dict.fromkeys(a for p in cols + rows for a in s.axes(p, TENSOR)))
        if not axes:
            continue
        n = s.size(axes)
        # a layer called several times (shared weights, ALBERT) sums its partial outputs at each call;
        # a projection's joined uses (one call, several inputs) are not calls
        joined = s.joined or {}
        calls = max((s.parts or {}).get(p, 1) - len(joined.get(p, ())) for p in cols + rows)
        count = max(layers(dec[p]) for p in cols + rows) * pc.count * calls
        source = f"pair {pc.id}" + (f" and {pc.count - 1} alike" if pc.count > 1 else "")
        for r in rows:
            redo = again and dec[r].kind == "attention"
            if s.axes(r, TENSOR):
                items.append(CommItem("all-reduce", axes, _pair_act(r, dec[r], "out", s), n, count * (1 + redo),
                                      source, f"row {label[r]}: sum partial outputs (forward"
                                              f"{', again in the remat recompute' if redo else ''})"))
        # XLA:CPU reduces the column inputs' gradients one by one (q, k and v are three
        # all-reduces); XLA:TPU adds them first and reduces their shared input's gradient once,
        # except where a residual also reads that input (post-norm: BERT, BART): the partial
        # gradients are then added to the residual's one by one, and it reduces each (trace.sharing)
        split_cols = [c for c in cols if s.axes(c, TENSOR)]
        alone = [c for c in split_cols if s.backend != "tpu" or c in (s.shared or ())]
        summed = [c for c in split_cols if c not in alone]
        for c in alone + summed[:1]:
            what = f"columns {', '.join(label[x] for x in summed)}" if c in summed else f"column {label[c]}"
            items.append(CommItem("all-reduce", axes, _pair_act(c, dec[c], "in", s), n, count, source,
                                  f"{what}: sum partial input gradients (backward)"))
        items += [CommItem("all-reduce", axes, _pair_act(j, dec[j], "in", s) * r, n, count, source, f"column "
                           f"{label[j]}, its joined other input: sum partial input gradients (backward)")
                  for j in split_cols for r in joined.get(j, ())]  # each other input's gradient, apart
        for c in cols:
            if not s.axes(c, TENSOR):  # GQA key/value with fewer heads than the tensor degree: gather its output gradient
                items.append(CommItem("all-gather", axes, _pair_act(c, dec[c], "out", s), n, count, source,
                                      f"replicated column {label[c]} in a split pair: gather its output "
                                      "gradient (backward)"))
        _heads_note(dec, pc.id, cols, s, notes)
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


def _pair_act(path: str, d: Any, side: str, s: Scope) -> float:
    acts = acts_for(s.activations, d.unit)
    if acts:
        return s.nbytes(acts[0].output if side == "out" else acts[0].inputs[0])
    b = body(d)
    t_axes = set(s.axes(path, TENSOR))
    split = [i for i, e in enumerate(_body_spec(d, s.lv.specs[path])) if t_axes & set(entry_axes(e))]
    if d.kind == "expert" and len(b) == 3:
        width = b[1] if side == "in" else b[-1]
    elif len(b) == 2 and len(split) == 1 and d.role in ("column", "row"):
        # the split dim is a column's output and a row's input, however the kernel is stored
        # ((out, in) Conv1D kernels too): the other dim is the activation's width
        width = b[1 - split[0]] if (side == "in") == (d.role == "column") else b[split[0]]
    else:
        width = b[0] if side == "in" else b[-1]
    return s.rows_of(path) * width * s.act_item


# ---------------------------------------------------------------------------
# embeddings, output heads and tensor-split layers without a partner

def _layer_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """Collectives of tensor-split leaves outside pairs."""
    lv = s.lv
    items: list[CommItem] = []
    for path, d in lv.decisions.items():
        axes = s.axes(path, TENSOR)
        if path in lv.in_pair or not d.trainable or not axes or d.kind == "bias":
            continue
        if d.kind == "embedding" or (d.strategy == "vocab" and len(body(d)) == 2):  # a table the trace found
            new = _embedding_items(path, d, axes, s, notes=notes)
        elif d.kind in ("dense", "head") and lv.specs[path][-1] is not None:
            new = _column_items(path, d, axes, s)
        else:
            if d.kind in ("dense", "conv") and any(e is not None for e in _body_spec(d, lv.specs[path])):
                notes.append(f"{lv.label[path]}: {d.strategy} split without a partner is not modelled")
            continue
        k = lv.count[path]
        items += [CommItem(i.kind, i.axes, i.size, i.group_size, i.count * k, lv.label[path], i.why) for i in new]
    return items


def _body_spec(d: Any, spec: tuple[Entry, ...]) -> tuple[Entry, ...]:
    k = d.layers_dim
    return tuple(spec[:k]) + tuple(spec[k + 1:]) if k is not None else spec


def _embedding_items(path: str, d: Any, axes: tuple[str, ...], s: Scope, *, notes: list[str]) -> list[CommItem]:
    """A vocab-split lookup sums its rows; a feature-split one gathers them; a tied output adds the head's."""
    n, b, spec = s.size(axes), body(d), s.lv.specs[path]
    acts = acts_for(s.activations, d.unit)
    size = s.nbytes(acts[0].output) if acts else s.rows_local * b[-1] * s.act_item
    # the rows split over the tensor axes (an fsdp split of the rows is the fsdp gather's, not a vocab split)
    split_vocab = bool(set(entry_axes(_body_spec(d, spec)[0])) & set(axes))
    looks = (s.lookups or {}).get(path, 1)  # a table the encoder and the decoder both look up (T5)
    lv = s.lv  # a feature-split lookup keeps the residual stream split: gathered behind each norm too
    stream = 0 if split_vocab else stream_gathers(
        ((p, x.kind, body(x), lv.count[p] * layers(x)) for p, x in lv.decisions.items()), b[-1]) - 1
    items = [CommItem("all-reduce", axes, size, n, looks, path, "vocab-split embedding: sum the looked-up rows "
                      "(forward)") if split_vocab else
             CommItem("all-gather", axes, size, n, looks + stream, path, "embedding split on its features: gather "
                      "them (forward) and the feature-split residual stream behind each norm")]
    if not split_vocab:
        items += update_gathers(s, axes, [p for p, x in lv.decisions.items() if p != path and b[-1] in body(x)])
    attend = acts_for(s.activations, d.unit + ":attend")
    if not is_tied(path, d, s):
        return items
    if not split_vocab:  # the logits contract the split features: every device holds partial logits
        rows = math.prod(attend[0].output[:-1]) * (1 / s.shards if attend[0].output[0] == s.batch.size else 1) \
            if attend else s.rows_of(path)
        return items + [
            CommItem("all-reduce", axes, rows * b[0] * s.act_item, n, 1, path,
                     "tied embedding split on its features: sum the partial logits (forward)"),
            CommItem("all-gather", axes, size, n, 1, path,
                     "tied embedding split on its features: gather the logits' input gradient (backward)")]
    a = attend[0] if attend else None
    in_size = s.nbytes(a.inputs[0]) if a else s.rows_of(path) * b[-1] * s.act_item
    items += _head_items(axes, n, in_size, (a.output if a else None), s, path, "tied output embedding")
    if not attend and s.tied is None:
        notes.append(f"{path}: assumed tied to the output (no head layer found)")
    return items


def _column_items(path: str, d: Any, axes: tuple[str, ...], s: Scope) -> list[CommItem]:
    n, b = s.size(axes), body(d)
    acts = acts_for(s.activations, d.unit)
    a = acts[0] if acts else None
    in_size = s.nbytes(a.inputs[0]) if a else s.rows_of(path) * b[0] * s.act_item
    if d.kind == "head":  # the planner marks output heads
        return _head_items(axes, n, in_size, (a.output if a else None), s, path, "vocab-split output head")
    out_size = s.nbytes(a.output) if a else s.rows_of(path) * b[-1] * s.act_item
    return [CommItem("all-gather", axes, out_size, n, layers(d), path,
                     "column layer without a row partner: gather its split output (forward)"),
            CommItem("all-reduce", axes, in_size, n, layers(d), path,
                     "column layer without a row partner: sum input gradients (backward)")]


def _head_items(axes, n: int, in_size: float, out_shape, s: Scope, path: str, what: str) -> list[CommItem]:
    if out_shape:
        local = 1 / s.shards if out_shape[0] == s.batch.size else 1.0
        rows = math.prod(out_shape[:-1]) * local
    else:
        rows = s.rows_of(path)
    # softmax cross-entropy over a split vocabulary: max, sum of exp and the label's
    # logit are reduced across the split (float32 per row), then the input gradient
    return [CommItem("all-reduce", axes, rows * 4, n, 3, path,
                     f"{what}: max, sum and label logit of the split softmax (forward)"),
            CommItem("all-reduce", axes, in_size, n, 1, path, f"{what}: sum input gradients (backward)")]
