"""Gradient collectives of one training step: the fsdp gathers and reductions and the data-parallel
all-reduce of every trainable leaf, as XLA:CPU, XLA:TPU and GPU compilers emit them."""

from __future__ import annotations

import functools
import math
from typing import Any

from tpflax._src.cost.batch import config_value
from tpflax._src.cost.explicit import cpu_wire
from tpflax._src.cost.lookups import lookup_concat_items, scattered_as_one
from tpflax._src.cost.price import tpu_gather_item, tpu_reduce_scatters
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import (
    Scope,
    axes_of,
    body,
    drop_layers,
    grad_bytes,
    is_tied,
    leaf_itemsize,
    tensor_degree,
)
from tpflax._src.cost.straddle import straddle_gather, straddled_split
from tpflax._src.cost.stream import split_updates
from tpflax._src.facts.tree import narrower
from tpflax._src.mesh import DATA, FSDP, TENSOR, MeshShape
from tpflax._src.specs import entries, entry_axes, local_shape, used_axes
from tpflax._src.tpu import (
    WHOLE_SLICE_GATHER_AR,
    conv_kernel_gathered_as_stored,
    device_layout,
    scattered_rows,
    scatters,
)

# the largest leaf (bytes as stored) XLA:TPU gathers as an all-reduce on such a slice (_gathered_as_all_reduce)
GATHER_AR_BYTES = 16 << 20
# XLA:TPU reduce-scatters a vocab-split table's fsdp gradient if its tensor shard is at most this many
# bytes or its rows a multiple of VOCAB_SHARD_ROWS, else it all-reduces it whole (vocab_shard_all_reduced)
VOCAB_SHARD_BYTES, VOCAB_SHARD_ROWS = 17 << 20, 64


def gradient_items(s: Scope) -> list[CommItem]:
    """fsdp all-gathers of every parameter, and gradient reductions of every trainable one (with XLA:TPU's
    all-to-alls of a tied table's lookups scattered as one: :mod:`tpflax._src.cost.lookups`)."""
    x_shape = s.batch.first_shape
    steps = int(config_value(s.config, "seq_len", 0) or (x_shape[1] if len(x_shape) >= 2 else 1))
    items: list[CommItem] = []
    # a leaf whose update a tensor split splits (a split conditioning vector, a split embedder's output read by
    # whole modulation kernels) has its gradient summed split (measured, XLA:CPU; XLA:TPU for kernels, which it
    # updates split: flaxdiff's SimpleMMDiT with its embedders split, v5e:2x4, the four (64, 384) modulation
    # gradients summed over data as quarters, their 12 update gathers as on CPU)
    split = {p: n for p, n in split_updates(s).items()
             if s.backend == "cpu" or (s.backend == "tpu" and len(body(s.lv.decisions[p])) >= 2)}
    expanded = expanded_bytes(s) if s.backend == "cpu" else {}
    for path, d in s.lv.decisions.items():
        if d.kind in ("int", "state"):
            continue
        # a frozen parameter (plan(trainable=): a LoRA base kernel) has no gradient, but an fsdp split is
        # still gathered for the forward and backward compute
        frozen = not d.trainable
        (reps, whole), k, label = loop_reps(s, path, d, steps), s.lv.count[path], s.lv.label[path]
        # measured: XLA reduces the partial gradient of each whole use apart (a tied table's lookup
        # and logits, a layer called twice), then adds them
        parts = s.parts.get(path, 1) if s.parts is not None else (2 if is_tied(path, d, s) else 1)
        parts += s.combined.get(path, 0)  # its elementwise uses' gradients (Traced.combined), reduced apart
        if scattered_as_one(s, path, d):  # XLA:TPU adds a table's lookups' scatter-adds first: one part for all
            parts -= max((s.lookups or {}).get(path, 1) - 1, 0)
        if path in expanded:  # the expanded kernels' gradients, summed where their matmuls make them, hold every
            parts = 1         # use's part
        cast = _cast_item(s, path, d)
        g_item = s.g_item if s.g_item is not None else cast
        some = _cast_item(s, path, d, some=True) if g_item is None else None
        item = gather_item(d, s.backend, s.lv.specs[path], s.mesh, cast=cast is not None)
        looked = looked_bytes(d, s.lv.specs[path], s.mesh, s.positional[path], g_item) if (
            s.backend == "tpu" and path in s.positional) else None
        for kind, axes, size, n, count, why in _gradient_templates(
                s.lv.specs[path], s.mesh, _reduce_axes(path, s), s.leaf_bytes(path, d), leaf_itemsize(d), g_item,
                s.backend, reps, item, len(body(d)), s.one_ring(_fsdp_devices(s.lv.specs[path], s.mesh)),
                s.row_axes, tuple(d.shape),
                whole or (s.backend == "tpu" and vocab_shard_all_reduced(d, s.lv.specs[path], s.mesh)),
                d.layers_dim, looked, s.g_item is None and cast is not None and len(body(d)) == 2,
                expanded.get(path)):
            if kind != "all-gather" and frozen:
                continue
            if kind != "all-gather" and (path in s.buffered or path in s.unbatched):
                # an expert kernel reading a batch-free buffer gets the same gradient on every device of the
                # batch axes: XLA sums the buffers instead (cost.experts.buffer_items) and slices an fsdp shard;
                # so does a kernel reading only an input the step keeps replicated (batch=N: a positional table)
                continue
            if kind == "all-gather" and s.remat and (d.layers_dim is not None or d.group != path):
                # a layer's leaf is gathered inside its remat'd call (scan_fsdp.zero3): again in the backward
                where = "one layer at a time in the scan" if d.layers_dim is not None else "inside the remat'd layer"
                count, why = 2 * count, f"{why.split(' (')[0]} {where}, again in the remat'd backward"
            if kind == "all-gather" and _gathered_as_all_reduce(s, d, size // item * leaf_itemsize(d), n):
                # of the whole zero-padded leaf: a float32 kernel as bfloat16 even where its shard has one row
                size = size // item * gather_item(d, s.backend)
                kind, why = "all-reduce", (f"{why.split(' (')[0]}: XLA:TPU gathers a leaf over a whole slice of "
                                           f"{WHOLE_SLICE_GATHER_AR}+ devices as an all-reduce of the zero-padded shard")
            if kind == "all-reduce" and path in split:
                size, why = size // split[path], (f"{why}; split by a tensor-split dim it meets "
                                                             "(traced), summed on its shard")
            if kind in ("all-reduce", "reduce-scatter") and (eng := straddled_split(s, path)) is not None:
                # XLA:TPU too sums the part and slices the block: no reduce-scatter (measured, v5e:2x4
                # fsdp=2,model=4, 6 experts: f32[384, 64] all-reduced over fsdp for each kernel)
                if kind == "reduce-scatter":
                    kind, why = "all-reduce", "fsdp gradient: all-reduced, then sliced to the owning shard"
                size, why = size * eng[1] // eng[2], (f"{why}; its blocks straddle experts: summed as the "
                                                      f"{eng[2]} part(s) of whole experts they are gathered into")
            if kind == "all-reduce" and path in s.sliced:
                # read only through static slices (UViT's pos[:, :n]): the gradient is the window's, padded with
                # zeros, and XLA sums the window before the pad (measured, XLA:CPU: f32[1,16,64] of a (1, 4096, 64)
                # table)
                size = math.ceil(size * s.sliced[path])
                why = f"{why}; only the {s.sliced[path]:.3g} of it its static slices read"
            items.append(CommItem(kind, axes, size, n, count * k, label, why))
            if parts > 1 and kind != "all-gather":  # the other uses' gradients: all-reduced whole (XLA:TPU)
                other, note = size, ""
                # read only through casts, each use's gradient is a bfloat16 value of its own, reduce-scattered
                # beside the first (measured, XLA:TPU: the tied tables of transformers' GPT-2 on fsdp=8 and BART
                # on fsdp=2,model=4 in mixed precision); a float32 table's dense part is all-reduced whole
                alike = kind == "reduce-scatter" and cast is not None and s.g_item is None
                if some is not None:
                    # one use reads a narrower copy (GPT-Neo's float32 table looked up as it is, its bfloat16
                    # logits): that use's gradient is reduced in the copy's dtype (measured, XLA:TPU)
                    other, note = size // leaf_itemsize(d) * some, ", the other read's in the dtype it is cast to"
                items.append(CommItem("all-reduce" if kind == "reduce-scatter" and not alike else kind, axes, other, n,
                                      count * k * (parts - 1), label,
                                      f"used whole {parts} times (a tied table's lookup and logits, a shared "
                                      "layer, a weight also scaled per example): each use's gradient is reduced "
                                      f"separately{note}"))
        if (gather := straddle_gather(s, path, d, k * reps, label, item)) is not None:
            items.append(gather)
    return items + lookup_concat_items(s)


def _cast_item(s: Any, path: str, d: Any, some: bool = False) -> int | None:
    """On XLA:TPU, bytes per element of the narrower dtype every matmul and lookup reads ``path`` cast to
    (:attr:`Scope.cast_to`: a bfloat16 model's float32 kernels and tables); else None. Its gradient comes out of
    them in that dtype and is reduced before the cast back, unless ``grad_dtype=`` says otherwise; the leaf is
    gathered in it too. Measured, XLA:TPU v5e:2x4 data=2,model=4, the zoo Llama computing in bfloat16 over
    float32 parameters: every kernel's and the table's gradient all-reduced as bfloat16, half the float32 bytes
    (``tests/test_tpu.py``); XLA:CPU sums 16-bit gradients in float32 anyway.

    ``some``: of the narrower dtype some reads cast it to while the others read it as it is (:attr:`Scope.cast_some`),
    each read's gradient reduced in its own dtype (measured, transformers' GPT-Neo in mixed precision: its float32
    table's gradient all-reduced once as float32, the lookup's, and once as bfloat16, the tied logits')."""
    if s.backend != "tpu":
        return None
    return narrower(((s.cast_some if some else s.cast_to) or {}).get(path, ""), leaf_itemsize(d)) or None


def expanded_bytes(s: Scope) -> dict[str, int]:
    """``{path: bytes}``: the gradient bytes of the kernels a parameter's matmuls read that an op made of it alone
    (:attr:`Scope.expanded`; every use of it reads one), where they are more than its own gradient's. On XLA:CPU
    (XLA:TPU not measured). The matmul's weight gradient sums over
    the batch, so XLA all-reduces it there, before the op's transpose (a scatter-add, a product with constants)
    brings it back to the parameter's size.

    Measured (XLA:CPU, data=2,model=4 and fsdp=2,model=4): NetKet's GCNN (``benchmarks/probe_netket.py``), its
    ``DenseSymm`` kernel ``(16, 1, 64)`` looked up at its 128 symmetries' constant site permutations,
    ``f32[16,128,1,64]`` all-reduced; its equivariant kernel ``(16, 16, 128)`` contracted with the symmetry
    group's irreps (float64), ``f64[31,16,2,16,2]`` and ``f64[4,16,1,16,1]``; ``tests/test_expanded_kernels.py``."""
    out: dict[str, int] = {}
    tensor = set(s.mesh.axes_with(TENSOR))
    kernels = _quantized(s) if s.expanded else {}
    for path, arrays in s.expanded.items():
        d = s.lv.decisions.get(path)
        kernel = kernels.get(path)
        if d is None or not d.trainable or (kernel is None and tensor & set(used_axes(s.lv.specs[path]))):
            continue  # a tensor-split leaf's kernel is split with it (not measured)
        n_leaf, item_leaf = math.prod(d.shape), cpu_wire(leaf_itemsize(d), "cpu")
        if kernel is not None:
            # a dequantization scale (x @ (int8 kernel * scale)): the dequantized kernel is split as the int8 one
            # is, and XLA sums its gradient over the batch (kernel-sized, on the kernel's tensor shard) before the
            # product with the int8 codes brings it to the scale's size (measured, XLA:CPU data=2,model=4: two
            # int8 MLP blocks, 262,144 B of the 264,196 B data all-reduce, priced 4,096 B as the scales')
            ks = entries(s.lv.specs[kernel], len(s.lv.decisions[kernel].shape))
            shards = math.prod(s.mesh.sizes[a] for e in ks for a in entry_axes(e) if a in tensor)
            n_own = n_leaf // max(1, math.prod(s.mesh.sizes[a] for a in used_axes(s.lv.specs[path]) if a in tensor))
            size = sum(n * cpu_wire(item, "cpu") for _, n, item in arrays) // shards
            if size > n_own * item_leaf:
                out[path] = size
            continue
        # only kernels with more elements than the leaf, or in a wider dtype (the irreps' float64): not a cast copy,
        # a view or a scanned stack's slice, whose gradient the leaf's own sum moves
        reads = [(n, cpu_wire(item, "cpu")) for _, n, item in arrays]
        size = sum(n * item for n, item in reads if n > n_leaf or item > item_leaf)
        if size > n_leaf * item_leaf:
            out[path] = size
    return out


def _quantized(s: Scope) -> dict[str, str]:
    """``{scale path: int kernel path}`` of the quantized kernels among the priced leaves
    (:func:`tpflax._src.facts.classify.quantized_scales`)."""
    from tpflax._src.facts.classify import quantized_scales
    from tpflax._src.facts.tree import Leaf

    ints = ("int8", "uint8", "int4", "uint4", "int16", "int32")
    leaves = [Leaf(p, tuple(d.shape), str(d.dtype), 1, numeric="int" if str(d.dtype) in ints else "float")
              for p, d in s.lv.decisions.items()]
    return {sp: kp for sp, kp in quantized_scales(leaves).items() if kp in s.lv.decisions}


def looked_bytes(d: Any, spec, mesh: MeshShape, positional: tuple[int, tuple[int, ...]], g_item: int | None) -> int:
    """The gradient bytes of a batch-free positional lookup's rows on a device (:attr:`Scope.positional`:
    ``(rows looked up, the table's dims not indexed)``): the rows times the table's width, divided by the
    tensor (or expert) axes that split it (an fsdp split is gathered before the lookup).

    Measured (v5e:2x4, tpu_aot_notes.md, twenty-first round): a ``(640, 768)`` position table looked up at
    ``arange(512)[None, :]``: ``f32[1,512,768]`` all-reduced over fsdp=8, split or whole; a T5-style
    ``(32, 8)`` bias table looked up at ``(256, 256)`` buckets, heads split over model=4: ``f32[256,256,2]``.

    >>> from types import SimpleNamespace
    >>> from tpflax._src.mesh import mesh_shape
    >>> d = SimpleNamespace(shape=(32, 8), layers_dim=None, dtype="float32")
    >>> looked_bytes(d, ("fsdp", "model"), mesh_shape({"fsdp": 2, "model": 4}), (256 * 256, (1,)), None)
    524288
    """
    rows, kept = positional
    spec = entries(spec, len(d.shape))
    width = math.prod(-(-d.shape[k] // tensor_degree(mesh, spec[k])) for k in kept)
    return rows * width * (g_item or leaf_itemsize(d))


def loop_reps(s: Scope, path: str, d: Any, steps: int) -> tuple[int, bool]:
    """How often the backward reduces a leaf's gradient, and whether XLA:TPU all-reduces it whole.

    A leaf a loop body uses unchanged at every step (a scanned recurrence's cell kernels, a table
    looked up by the ids the scan slices: :attr:`tpflax._src.cost.traced.Traced.loops`; untraced,
    every leaf of a recurrent unit, at the config's ``seq_len``; traced, only the leaves the trace
    finds in a loop body, whatever their names: Griffin's ``recurrent_block/linear_x`` runs outside
    its RG-LRU's time scan) gets a partial gradient at every step of the backward loop. Measured
    (fsdp=8 and data=2,fsdp=4, zoo LSTM/GRU and an embedding looked up inside
    ``nn.scan``/``lax.scan``; tests/test_loop_grads.py):

    * XLA:CPU reduces each such leaf's partial gradient inside the loop, at every step;
    * XLA:TPU (libtpu 0.0.42.1, v5e:2x4) adds them up in the loop and reduces the sum once after
      it, except a table looked up inside the body at one example per device: its per-step
      gradient (a one-row scatter-add) is all-reduced whole at every step. At two examples per
      device and more it is reduced once after the loop too.
    """
    traced = (s.loops or {}).get(path)
    if s.backend == "tpu":
        if traced and traced[1] and s.batch.size <= s.shards:
            return traced[0], True
        return 1, False
    if traced:
        return traced[0], False
    if s.loops is not None:  # traced: a leaf no loop body uses (Griffin's recurrent_block/linear_x) runs once
        return 1, False
    return (steps if d.unit in s.lv.recurrent else 1), False


def vocab_shard_all_reduced(d: Any, spec, mesh: MeshShape) -> bool:
    """Whether XLA:TPU all-reduces a vocab-split table's fsdp gradient whole (each use's, if tied):
    an embedding whose rows a tensor axis splits into shards of more than :data:`VOCAB_SHARD_BYTES`
    (the shard's gradient before the fsdp reduction) whose rows are not a multiple of
    :data:`VOCAB_SHARD_ROWS`. Measured on fsdp=2,model=4, v5e:2x4 (libtpu 0.0.42.1), tied
    ``(V, 768)`` float32 tables split ``P('model', 'fsdp')`` (an untied one of 6152-row shards too):
    shards of 6152, 8032 (T5-base) and 12568 rows (OPT-125m), 18.0 to 36.8 MiB, had the lookup's and
    the logits' gradients all-reduced whole over fsdp; of 200 to 5600 rows (up to 16.4 MiB; 5000 and
    5600 are not multiples of 64) and of 6144, 6208 (64 x 97) and 8192 rows one was reduce-scattered.
    The causes of both bounds are not known; other meshes and dtypes are not measured.

    >>> from tpflax._src.mesh import mesh_shape
    >>> from types import SimpleNamespace as NS
    >>> t5 = NS(kind="embedding", shape=(32128, 768), layers_dim=None, dtype="float32", bytes=32128 * 768 * 4)
    >>> mesh = mesh_shape({"fsdp": 2, "model": 4})
    >>> vocab_shard_all_reduced(t5, ("model", "fsdp"), mesh), vocab_shard_all_reduced(t5, (None, "fsdp"), mesh)
    (True, False)
    >>> llama = NS(kind="embedding", shape=(32000, 4096), layers_dim=None, dtype="bfloat16", bytes=32000 * 4096 * 2)
    >>> vocab_shard_all_reduced(llama, ("model", "fsdp"), mesh)
    False
    """
    if d.kind != "embedding":
        return False
    roles = dict(mesh.roles)
    tensor = math.prod(mesh.sizes[a] for a in entry_axes(drop_layers(d, spec)[0]) if roles[a] == TENSOR)
    rows = body(d)[0] // tensor
    return tensor > 1 and rows % VOCAB_SHARD_ROWS != 0 and \
        rows * math.prod(body(d)[1:]) * leaf_itemsize(d) > VOCAB_SHARD_BYTES


def _gathered_as_all_reduce(s: Scope, d: Any, stored: int, n: int) -> bool:
    """Whether XLA:TPU gathers this leaf as an all-reduce (twice a gather's ring bytes): ``s.gathers_reduce``
    (:func:`tpflax._src.tpu.gathers_reduce`), a gather over every device of the mesh, and one gather (a
    scanned leaf's layer) of a leaf of at most :data:`GATHER_AR_BYTES` as stored (before a float32 kernel's
    bfloat16 convert). Measured on fsdp-only zoo Llamas on v5e:8x8 (one layer, width 1024, d_ff 4096 to
    12288, and width 4096): float32 leaves of 16 MiB and a bfloat16 MLP kernel of 16 MiB all-reduced,
    float32 MLP kernels of 24 MiB and up gathered (benchmarks/tpu_aot_notes.md)."""
    if not s.gathers_reduce or n != math.prod(s.mesh.sizes.values()):
        return False
    layers = d.shape[d.layers_dim] if d.layers_dim is not None else 1
    return stored // layers <= GATHER_AR_BYTES


def _reduce_axes(path: str, s: Scope) -> tuple[str, ...]:
    """The batch axes; on XLA:CPU, a grouped convolution's (batch gathered: cost.grouped) every axis not
    splitting it (XLA:TPU splits its batch: the batch axes)."""
    if path not in (s.grouped or {}) or s.backend == "tpu":
        return s.batch_axes
    used = used_axes(s.lv.specs[path])
    return tuple(a for a in s.mesh.names if a in s.batch_axes or (a not in used and s.mesh.sizes[a] > 1))


def _fsdp_devices(spec, mesh: MeshShape) -> int:
    """The devices a leaf's fsdp gradient is reduced over: those of the axes that split it and gather it."""
    return math.prod(mesh.sizes[a] for a in _split_axes(spec, mesh))


def _split_axes(spec, mesh: MeshShape) -> tuple[str, ...]:
    """Axes that split a parameter and are gathered for compute: fsdp axes, and batch (data) axes."""
    return tuple(a for a in mesh.names if a in axes_of(spec, mesh, FSDP) + axes_of(spec, mesh, DATA))


_MATMUL_KINDS = ("dense", "attention", "expert", "head", "conv")


def gather_item(d: Any, backend: str, spec: tuple | None = None, mesh: MeshShape | None = None,
                cast: bool = False) -> int:
    """Bytes per element an fsdp all-gather of the leaf moves (see :func:`tpu_gather_item`); with its
    ``spec`` on ``mesh``, from the rows of one layer's shard too (:func:`gather_rows`; for a convolution
    kernel, whether its gather's layout is a bitcast of the convolution's: :func:`_conv_kernel_as_stored`).
    ``cast``: the model reads it cast to a narrower dtype (:func:`_cast_item`), which XLA:TPU converts to before
    gathering, as a matmul operand's (a bfloat16 GPT-2's float32 table, measured on v5e:2x4 fsdp=8:
    ``bf16[1001,64]``)."""
    item = leaf_itemsize(d)
    if backend != "tpu":  # XLA:CPU gathers a 16-bit leaf as float32 (Tunix's bfloat16 Gemma 3, fsdp=2,tp=4)
        return cpu_wire(item, backend)
    if d.kind == "conv" and spec is not None and mesh is not None and _conv_kernel_as_stored(d, spec, mesh, cast):
        return item
    # a convolution kernel with a window takes the convolution's own layouts (ResNet-18 on v5e:2x4: the gathered
    # dim minor as often as major), which the estimate does not model: as bfloat16
    laid = spec is not None and mesh is not None and d.kind != "conv"
    rows = gather_rows(body(d), drop_layers(d, spec), mesh) if laid else None
    return tpu_gather_item(item, d.kind in _MATMUL_KINDS or cast, rows)


def _conv_kernel_as_stored(d: Any, spec: tuple, mesh: MeshShape, cast: bool) -> bool:
    """A float32 1x1 convolution kernel (its window dims all 1), split over fsdp on one of its feature dims, that
    XLA:TPU gathers as float32 (:func:`tpflax._src.tpu.conv_kernel_gathered_as_stored`); ``cast``: the model
    reads it cast to bfloat16."""
    whole, spec = body(d), drop_layers(d, spec)
    if len(whole) < 3 or any(n != 1 for n in whole[:-2]) or leaf_itemsize(d) != 4:
        return False
    shard, split = _tpu_shard(whole, spec, mesh, _split_axes(spec, mesh), None)
    if len(split) != 1 or split[0] < len(whole) - 2:
        return False
    devices = _fsdp_devices(spec, mesh)
    gathered = [n * devices if i == split[0] else n for i, n in enumerate(shard)]
    t_in, t_out = (gathered[i] < whole[i] for i in (-2, -1))  # split over a tensor axis
    return conv_kernel_gathered_as_stored(gathered[-2], gathered[-1], split[0] == len(whole) - 1, devices, cast,
                                          t_out if t_in != t_out else None)


def gather_rows(shape: tuple[int, ...], spec: tuple, mesh: MeshShape) -> int | None:
    """The second-minor dim of a leaf's shard as XLA:TPU gathers it: the gathered dim's shard moved
    major (``f32[64,1,16]`` for a ``(64, 2, 16)`` kernel split 32 and 2 ways on its first two dims;
    ``f32[128,1,64]`` for a ``(64, 128)`` one split 128 ways on its last), then the second-last dim.
    None when no dim is gathered.

    >>> from tpflax._src.mesh import mesh_shape
    >>> mesh = mesh_shape({"fsdp": 64, "model": 2})
    >>> gather_rows((64, 128), ("fsdp", "model"), mesh), gather_rows((64, 4, 16), ("fsdp", "model", None), mesh)
    (1, 2)
    """
    gathered = set(_split_axes(spec, mesh))
    dims = [i for i, e in enumerate(spec) if gathered & set(entry_axes(e))]
    if not dims:
        return None
    local = local_shape(shape, spec, mesh)
    laid = (local[dims[0]],) + local[:dims[0]] + local[dims[0] + 1:]
    return laid[-2] if len(laid) >= 2 else 1


@functools.lru_cache(maxsize=1 << 14)
def _gradient_templates(spec, mesh: MeshShape, batch_axes, nbytes: int, item: int, g_item, backend: str,
                        reps: int, gather_item: int | None = None, body_rank: int | None = None,
                        ring: bool = True, rows: tuple[str, ...] = (), shape: tuple[int, ...] | None = None,
                        whole: bool = False, layers: int | None = None, looked: int | None = None,
                        cast: bool = False, expanded: int | None = None) -> tuple:
    """The gradient collectives of one leaf, without its path (repeated layers share them).

    ``ring``: XLA:TPU reduces over the leaf's fsdp devices on one ring (:func:`tpflax._src.tpu.one_ring`).
    ``rows``: batch axes that are a ``shard_map``'s row split (:func:`tpflax._src.cost.explicit.row_split_mesh`).
    XLA sums a gradient's partial sums over them at its matmul, apart from the data-parallel or fsdp
    sum (measured on XLA:CPU: two all-reduces of the whole gradient when they do not split the leaf;
    when they do, the second sum moves its shard and the two cost what one ring over both does).
    ``shape``: the leaf's stored shape; on TPU a gradient whose shard is not whole tiles of its
    layout is all-reduced whole (:func:`_tpu_whole_tiles`). ``whole``: XLA:TPU all-reduces it whole,
    whatever its tiles (a table looked up inside a loop body at one example per device: :func:`loop_reps`;
    a vocab-split table's shard: :func:`vocab_shard_all_reduced`). ``layers``: the stacked-layers dim of
    ``shape``, which the tiles leave out (the backward scan reduces one layer at a time). ``looked``: on
    TPU, a batch-free positional lookup's rows' gradient bytes (:func:`looked_bytes`): XLA:TPU sums them
    over the batch axes, all-reduced, in place of the table's gradient, split over fsdp or not. ``cast``: ``g_item``
    is the narrower dtype the model casts a 2-D leaf to, whose gradient XLA:TPU lays out in the leaf's own tiles
    (measured, v5e:2x4 fsdp=8: transformers' BERT and GPT-2 in mixed precision reduce-scatter their float32
    tables' ``bf16[1022, 8]`` and ``bf16[1001, 8]`` gradient shards, 8 sublanes of a float32 tile, where a
    bfloat16 leaf's shard of 8 sublanes is all-reduced whole). A cast 3-D kernel's gradient is laid out in 16-row
    16-bit tiles whatever its dims, and never padded (:func:`tpflax._src.tpu.whole_tiles`): the zoo Llama's
    ``(4, 16, 64)`` output projection and ``(64, 4, 16)`` and ``(64, 2, 16)`` q, k and v kernels are all-reduced
    whole on fsdp=8, a ``(128, 2, 16)`` kernel's 16-row shards reduce-scattered (measured, v5e:2x4).
    ``expanded``: on CPU, the bytes of the larger kernels its matmuls read (:func:`expanded_bytes`), summed in place
    of its own gradient."""
    why_rep = f" at each of {reps} steps of the backward loop (used inside a scan body)" if reps > 1 else ""
    f_axes = _split_axes(spec, mesh)  # a parameter split over a data axis is gathered like fsdp
    free = tuple(a for a in batch_axes if a not in used_axes(spec))
    gbytes = grad_bytes(nbytes, item, g_item)
    nf = math.prod(mesh.sizes[a] for a in f_axes)
    out = []
    apart = tuple(a for a in free if a in rows)  # a row split that does not split the leaf: summed first
    if apart and len(apart) < len(free) + len(f_axes):
        out.append(("all-reduce", apart, gbytes * nf, math.prod(mesh.sizes[a] for a in apart), reps,
                    "rows split by in_specs: sum the partial gradient over the row axes first" + why_rep))
        free = tuple(a for a in free if a not in rows)
    group = tuple(a for a in mesh.names if a in f_axes or a in free)  # the axes a whole gradient is summed over

    def summed(size: int, why: str) -> tuple:  # one all-reduce of a whole gradient over ``group``
        return ("all-reduce", group, size, math.prod(mesh.sizes[a] for a in group), reps, why + why_rep)

    if f_axes:
        out.append(("all-gather", f_axes, nbytes // item * (gather_item or item) * nf, nf, 1,
                    "fsdp: gather the parameter for compute (the backward reuses it)"))
    if expanded is not None:
        return tuple(out) + ((summed(expanded, "read as a larger kernel an op made of it (a lookup at constant "
                                               "indices, a product with constants): XLA sums that kernel's "
                                               "gradient where its matmul makes it, before the op's transpose"),)
                             if group else ())
    if backend == "tpu" and looked is not None:
        return tuple(out) + ((summed(looked, "looked up at batch-free positions: XLA:TPU sums the looked-up rows' "
                                             "gradient over the batch, whatever the table's split"),) if group else ())
    if f_axes:
        if backend == "cpu":
            return tuple(out) + (summed(gbytes * nf, "fsdp gradient: XLA:CPU all-reduces the whole gradient, "
                                                     "then slices"),)
        rank = len(spec) if body_rank is None else body_rank
        if backend == "tpu" and (whole or not (tpu_reduce_scatters(rank, free, ring)
                                                    and _tpu_whole_tiles(shape, spec, mesh, f_axes, item,
                                                                         None if cast else g_item, layers))):
            # XLA:TPU's reduction of an fsdp gradient it cannot reduce-scatter (read off the TPU HLO of zoo
            # train steps, libtpu 0.0.42.1, v5e:2x4). tpflax's step pins each gradient to its stored shards
            # (tpflax._src.scan_fsdp.pin), and XLA:TPU then reduce-scatters a leaf of two or more dims when no
            # other batch axis sums it and it reduces over its fsdp devices on one ring (fsdp=8 on v5e:2x4, not
            # on v5p:2x2x2, whose all-reduces are 3-D: tpflax._src.tpu.one_ring; a tensor axis beside them does
            # not matter: fsdp=2,model=4). With a free batch axis (one tuple all-reduce over data+fsdp) and for
            # 1-D leaves (norm scales) it all-reduces the whole gradient and slices it: twice a reduce-scatter's
            # bytes.
            return tuple(out) + (summed(gbytes * nf, "fsdp gradient: XLA:TPU all-reduces the whole gradient over "
                                                     "the fsdp and batch axes, then slices its shard"),)
        pad = _tpu_padding(shape, spec, mesh, f_axes, item, None if cast else g_item, layers) if backend == "tpu" else None
        if pad is None:
            out.append(("reduce-scatter", f_axes, gbytes * nf, nf, reps,
                        "fsdp gradient: reduce-scatter to the owning shard" + why_rep))
        else:  # XLA:TPU pads the shard's rows to whole tiles, then moves each device's rows into place
            rows, padded = pad
            out.append(("reduce-scatter", f_axes, gbytes * nf * padded // rows, nf, reps,
                        f"fsdp gradient: reduce-scatter to the owning shard, its {rows} rows padded to {padded} "
                        "(XLA:TPU)" + why_rep))
            out.append(("collective-permute", f_axes, gbytes * (nf - 1) * (padded - rows) // rows, nf, reps,
                        f"fsdp gradient: move the {padded - rows} rows each padded shard is off by, per device "
                        "before it (XLA:TPU)" + why_rep))
    if free:
        out.append(("all-reduce", free, gbytes, math.prod(mesh.sizes[a] for a in free), reps,
                    "data parallel: sum the gradient over the batch axes" + why_rep))
    return tuple(out)


def _tpu_shard(shape: tuple[int, ...], spec, mesh: MeshShape, f_axes: tuple[str, ...],
               layers: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A leaf's per-device shard (one layer's, for a scanned stack) and its dims split over ``f_axes``."""
    spec = entries(spec, len(shape))
    if layers is not None:
        shape, spec = shape[:layers] + shape[layers + 1:], spec[:layers] + spec[layers + 1:]
    split = tuple(i for i, e in enumerate(spec) if set(entry_axes(e)) & set(f_axes))
    return local_shape(shape, spec, mesh), split


def _tpu_padding(shape: tuple[int, ...] | None, spec, mesh: MeshShape, f_axes: tuple[str, ...], item: int,
                 g_item: int | None, layers: int | None = None) -> tuple[int, int] | None:
    """``(rows, padded)`` of a reduce-scattered fsdp gradient whose sublane shard XLA:TPU pads
    (:func:`tpflax._src.tpu.scattered_rows`), or None: it moves the padded shards, and
    collective-permutes the ``n - 1`` devices' rows into place (measured, v5e:2x4 fsdp=8: a
    ``(4000, 256)`` table's 500-row shards reduce-scattered as 504 rows and a 28-row permute)."""
    if shape is None:
        return None
    shard, split = _tpu_shard(shape, spec, mesh, f_axes, layers)
    padded = scattered_rows(shard, split, item, g_item)
    return None if padded is None else (shard[device_layout(shard, item)[1]], padded)


def _tpu_whole_tiles(shape: tuple[int, ...] | None, spec, mesh: MeshShape, f_axes: tuple[str, ...],
                     item: int, g_item: int | None, layers: int | None = None) -> bool:
    """Whether XLA:TPU reduce-scatters the leaf's fsdp gradient by its shard's shape: whole tiles along
    its split dims in the layout XLA:TPU gives the parameter, which its gradient takes, more than one
    row of tiles, and no leading dim of 1 (:func:`tpflax._src.tpu.scatters`); no shape: assumed so.
    A scanned stack's (``layers``: its stacked dim) by one layer's shard: the backward scan reduces each
    layer's gradient in its step (v5e:2x4, fsdp=8: a ``(2, 64, 64)`` stack's ``[8, 64]`` layer shards,
    one tile, all-reduced whole at each step)."""
    if shape is None:
        return True
    shard, split = _tpu_shard(shape, spec, mesh, f_axes, layers)
    return scatters(shard, split, item, g_item, devices=math.prod(mesh.sizes[a] for a in f_axes))
