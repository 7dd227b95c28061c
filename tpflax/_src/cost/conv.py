"""A conv net's feature maps as XLA:TPU keeps them for the backward pass (a term of :mod:`tpflax._src.cost.peak`).

Which layout the compiler gives the maps decides what it keeps: below :data:`FOLD_BELOW` images per device it
cuts the width into 8 chunks folded into the batch and keeps each overlapping conv's input per kernel column
(:func:`conv_maps`); from there on, and with a tensor axis, it keeps whole maps batch first
(:func:`tensor_conv_maps`), the images or the channels in the 128 lanes, whichever pads less
(:func:`map_bytes`). Evidence: ``benchmarks/tpu_aot_notes.md`` (the ResNet-18 sections and "Thirteenth round").
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from tpflax._src.cost.activations import acts_for, layer_key, top_level
from tpflax._src.cost.gathered import onchip_bytes
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.scope import body, tensor_degree
from tpflax._src.cost.workload import Workload
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.specs import entry_axes
from tpflax._src.tpu import LANES, lane_pad, sublane_pad

# XLA:TPU lays out a conv's maps batch first from 8 images per device on; below, it cuts the width into 8 chunks
# (``W // 8 + 1`` columns with the halo) folded into the batch (``[H, images x 8, W // 8 + 1, C]``) and keeps
# each overlapping conv's input per kernel column (:func:`conv_maps`). Measured on 3x3 conv stacks compiled for
# v5e (56x56x64 maps: 1-7 images fold, 8, 16, 32 do not; 112, 56 and 14 pixels wide alike; bf16 and f32)
FOLD_BELOW = 8
CONV_WORKING = 4  # maps of a conv net's first stage in flight in its backward pass (conv_working)


def conv_maps(lv: Leaves, w: Workload, mesh: MeshShape, shards: int,
              stem: tuple[int, int, int]) -> tuple[int, int]:
    """``(kept, counted)``: a conv net's feature maps as XLA:TPU keeps them for the backward pass, on a
    device, and as the generic count of saved activations holds them (every layer's output). ``stem``: the
    :func:`remat_stem` of the same step (the caller's, which :func:`stem_phase` reads too).

    From the TPU buffer assignment of the ResNet-18 step (``bf16`` maps ``[rows, batch, width slice,
    channels, taps]``), what a conv net keeps is not its layers' outputs but what their backward
    passes read: each norm's input (the conv output it normalises) and each overlapping conv's
    input (kernel wider than its stride, a 3x3 conv) once per kernel column, ``kw`` copies shifted
    by one tap, from which the weight gradient is a matmul; and a max-pool's input (the select-and-
    scatter of its backward pass reads it). Channels are stored in 128 lanes (a 64-channel stage
    takes twice its bytes). A conv on the input images of fewer than 128 channels (a 7x7 stem)
    keeps the images lane-padded (``bf16[224, 32, 32, 3, 7]``, 49 MiB for 4 images). A conv's
    input is kept in bfloat16 even in a float32 model (the conv multiplies in bfloat16 at default
    precision: the float32 ResNet-18 step keeps ``bf16[56, 32, 8, 64, 3]`` taps next to ``f32``
    norm inputs). A block's output, a norm's output and a ReLU's are the next conv's input, kept there;
    a 1x1 or patchify conv (kernel == stride, ViT's patch embedding) reads an input another conv
    keeps, or the images: it keeps nothing of its own. Under remat the stem keeps what it keeps without remat
    and each remat'd block its input (:func:`remat_stem`), as :func:`map_bytes` lays out whole maps (32 images:
    64 channels padded to 128 lanes; 128: the images in them).
    That is the layout below :data:`FOLD_BELOW` images per device: the compiler cuts each map's
    width into 8 chunks of ``W // 8 + 1`` columns (the halo) folded into the batch (``[H, images x 8,
    W // 8 + 1, C]``, no collective: a per-device layout). Not modelled: that halo column, and where
    the kept maps sit: a bf16 step keeps 36-39 MiB of them in the on-chip memory ``S(1)`` at its HBM
    peak, a float32 step none (its gradients fill it). From :data:`FOLD_BELOW` images per device on,
    and with a tensor axis, the compiler keeps whole maps batch first with no tap-expanded inputs
    (:func:`tensor_conv_maps`, plus :func:`conv_working`).
    ``(0, 0)`` off TPU or without traced conv layers.

    >>> import jax, optax, tpflax
    >>> from tpflax import zoo
    >>> m = zoo.get("resnet18")
    >>> p = tpflax.plan(m.abstract_variables(), {"data": 2})  # the batch over every device
    >>> batch = jax.eval_shape(lambda: m.make_batch(0, 8))
    >>> e = tpflax.estimate(p, optax.sgd(0.1), batch, model=m)
    >>> e.breakdown.activations > e.per_device.activations  # conv inputs x 3 taps, 64 channels in 128 lanes
    True
    >>> cpu = tpflax.estimate(p, optax.sgd(0.1), batch, model=m, backend="cpu")  # the generic count off TPU
    >>> cpu.breakdown.activations + cpu.breakdown.logits == cpu.per_device.activations  # f32 head: the logits
    True
    """
    # one representative leaf per layer, with the count of alike layers it stands for
    convs = {d.unit: (d, lv.count[p]) for p, d in lv.decisions.items() if d.kind == "conv" and len(body(d)) == 4}
    norms = {d.unit: lv.count[p] for p, d in lv.decisions.items() if d.kind == "norm"}
    channels = {body(d)[-1] for d, _ in convs.values()}
    if w.backend != "tpu" or not w.activations or not channels:
        return 0, 0
    item = w.act_item / shards
    blocks = top_level(w.activations)
    counted = sum(math.prod(a.output) * item for path, calls in w.activations.items() for a in calls
                  if len(a.output) == 4 and a.output[-1] in channels and not (w.remat and path not in blocks))
    if (shards < mesh.size or _batch_first(w, shards)) and not w.remat:  # whole maps, batch first
        if not any(_overlaps(d, a) for d, _ in convs.values() for a in acts_for(w.activations, d.unit)):
            return 0, 0  # patchify convs only (a ViT): the generic count, as measured on no tensor-axis dump
        return tensor_conv_maps(lv, w, mesh, shards, channels), _split_count(lv, w, mesh, shards, channels)
    if w.remat and stem[0]:  # the stem as without remat, and each remat'd block's input, as whole maps (remat_stem)
        return stem[0] + sum(map_bytes(x, item) for x, item in _block_inputs(lv, w, shards)), int(counted)
    if w.remat:  # no conv on maps in a block (a ViT's patchify stem): the top-level outputs, as whole maps
        kept = sum(map_bytes((a.output[0] // shards, *a.output[1:]), w.act_item) for path, calls in
                   w.activations.items() for a in calls if len(a.output) == 4 and a.output[-1] in channels
                   and path in blocks)
        return int(kept), int(counted)
    kept = 0.0
    images = w.batch.first_shape
    operand = min(w.act_item, 2) / shards  # conv inputs in bfloat16, as the conv multiplies
    for d, n in convs.values():
        for a in acts_for(w.activations, d.unit):
            if not _overlaps(d, a):
                continue  # 1x1 or patchify: kernel no wider than its stride
            x = tuple(a.inputs[0])
            taps = 1 if x == images else body(d)[1]  # the images: lane-padded once (measured), maps: kw copies
            kept += math.prod(x[:-1]) * lane_pad(x[-1]) * taps * operand * n
    for unit, n in norms.items():
        for a in acts_for(w.activations, unit):
            x = tuple(a.inputs[0])
            if len(x) == 4 and x[-1] in channels:
                kept += math.prod(x[:-1]) * lane_pad(x[-1]) * item * n
    kept += sum(math.prod(y[:-1]) * lane_pad(y[-1]) * item for y in _pooled(w.activations, channels))
    return int(kept), int(counted)


def remat_stem(lv: Leaves, w: Workload, mesh: MeshShape, shards: int) -> tuple[int, int, int]:
    """``(kept, pooled, first)``: XLA:TPU, a conv net whose blocks are remat'd: what its stem (the traced
    layers outside the remat'd blocks) keeps on a device, the gradient of its max-pool's input, and that of the
    first block's input, as :func:`map_bytes` lays them out; ``(0, 0, 0)`` without a conv on maps.

    The stem is not remat'd: it keeps what it keeps without remat (:func:`tensor_conv_maps`: its norm's and
    max-pool's inputs, the images batch in lanes below 128 images per device: from there on the step reads the
    argument in place, as the ResNet-18 fsdp=2,model=4 remat dumps do, bf16 and f32); each block keeps its input
    (:func:`conv_maps`; a projection block's in bfloat16, :func:`_block_inputs`). Read off the
    ResNet-18 remat=on v5e dumps (``benchmarks/tpu_aot_notes.md``, "nineteenth round"): bf16 fsdp=8 holds at
    its peak the stem conv's output and the pool's input (2 x 98 MiB), the images (49) and the block inputs
    ``bf16[32,56,56,64]``; its stem's backward (``Peak.stem``) holds the stem's maps, the pool input's gradient
    ``select-and-scatter`` (``pooled``, 196 MiB in f32) and the first block's input gradient (``first``).
    """
    channels = {body(d)[-1] for p, d in lv.decisions.items() if d.kind == "conv" and len(body(d)) == 4}
    if w.backend != "tpu" or not channels or not overlapping_convs(lv, w):
        return 0, 0, 0
    inputs = _block_inputs(lv, w, shards)
    if not inputs:
        return 0, 0, 0
    tops = top_level(w.activations)
    top = {p: v for p, v in w.activations.items() if p in tops}
    # the images as without remat below 128 images per device; from there on the argument is read in place (the
    # f32 fsdp=2,model=4 dump makes its bf16[128,224,224,3] inside the conv's fusions, keeps none)
    kept = tensor_conv_maps(lv, replace(w, activations=top), mesh, shards, channels, images_below=LANES)
    pooled = sum(map_bytes((y[0] // shards, *y[1:]), w.act_item) for y in _pooled(top, channels))
    return kept, pooled, map_bytes(inputs[0][0], w.act_item)  # the gradient: in the step's dtype


def stem_phase(w: Workload, stem: tuple[int, int, int]) -> dict[str, int]:
    """``Peak.stem`` and ``Peak.stem_grad``: XLA:TPU, a conv net whose blocks are remat'd
    (:func:`remat_stem`). The stem's backward holds its kept maps, the first block's input
    gradient and the max-pool input's gradient, which the on-chip memory takes when it fits (the v5e's 112 MiB:
    bf16 fsdp=8's 98 MiB ``select-and-scatter`` is in ``S(1)``, f32's 196 MiB in HBM); one in HBM is placed above
    the saved set (``stem_grad``). ``stem``: :func:`remat_stem`'s ``(kept, pooled, first)``."""
    if not w.remat:
        return {}
    kept, pooled, first = stem
    onchip = onchip_bytes(w.target) or 0
    hbm = pooled if pooled > onchip else 0
    return {"stem": kept + first + hbm, "stem_grad": hbm} if kept else {}


def _block_inputs(lv: Leaves, w: Workload, shards: int) -> list[tuple[tuple[int, ...], int]]:
    """``[(4-D input on a device, bytes per element kept)]`` of the traced layers that hold others (the remat'd
    blocks), in trace order. A block whose input only its convs read (no identity shortcut: its output is another
    shape, and every call in it that takes the input is a conv, ResNet's projection blocks) keeps it in bfloat16 in
    a float32 step, as its convs multiply it (:func:`conv_maps`), since the recompute and their weight gradients
    read nothing else of it; a block that adds its input to its output keeps it in the step's dtype. The v5e
    dumps: ResNet-18 f32 fsdp=2,model=4 remat keeps ``block_2``'s input ``bf16[128,56,56,64]``
    (``add_maximum_fusion``) and ``block_4``'s ``bf16[128,28,28,128]`` (``copy-start.5``) next to the identity
    blocks' ``f32[128,56,56,64]`` (``copy-start``, ``add_maximum_fusion.1``) and ``f32[128,28,28,128]``; f32
    fsdp=8 ``block_2``'s ``bf16[32,56,56,64]`` (``benchmarks/tpu_aot_notes.md``, twentieth round)."""
    convs = set(_layers(lv, "conv"))
    out = []
    for p in remat_blocks(w):
        for a in w.activations[p]:
            if not (a.inputs and len(a.inputs[0]) == 4):
                continue
            x = tuple(a.inputs[0])
            readers = [q for q, calls in w.activations.items() if q.startswith(p + "/")
                       and any(c.inputs and tuple(c.inputs[0]) == x for c in calls)]
            conv_only = tuple(a.output) != x and readers and all(q in convs for q in readers)
            out.append(((x[0] // shards, *x[1:]), min(w.act_item, 2) if conv_only else w.act_item))
    return out


def remat_blocks(w: Workload) -> list[str]:
    """The top-level traced layers that hold other traced layers (a remat'd step's blocks), in trace order."""
    top = top_level(w.activations)
    # every path's "/" prefixes, in one pass (pairwise, an 80-layer model's pricing spent 40 ms a mesh here)
    holders = {q[:i] for q in w.activations for i, ch in enumerate(q) if ch == "/"}
    return [p for p in w.activations if p in top and p in holders]


def _batch_first(w: Workload, shards: int) -> bool:
    """Whether XLA:TPU keeps a conv net's maps whole, batch first, without a tensor axis: from
    :data:`FOLD_BELOW` images per device on (below, it folds width chunks into the batch)."""
    return w.batch.size / shards >= FOLD_BELOW


def conv_working(lv: Leaves, w: Workload, mesh: MeshShape, shards: int) -> int:
    """A conv net's maps in flight in the backward pass of its first stage, where XLA:TPU's HBM peaks
    (``Peak.conv_work``), when it keeps whole maps batch first without a tensor axis: :data:`CONV_WORKING`
    maps the size of the largest input of a conv wider than its stride (not the images), as
    :func:`map_bytes` lays it out. The ResNet-18 fsdp=8 bf16 step at 32 images per device holds eight
    ``bf16[32,56,56,64]`` maps at its peak, four of them norm inputs kept from the forward pass
    (``benchmarks/tpu_aot_notes.md``, twelfth round). Zero otherwise (width-folded maps: the on-chip
    memory holds that working set; with a tensor axis the dumps hold a fraction of a map more)."""
    if w.backend != "tpu" or w.remat or shards < mesh.size or not _batch_first(w, shards):
        return 0
    images = w.batch.first_shape
    largest = 0
    for d in lv.decisions.values():
        if d.kind == "conv" and len(body(d)) == 4:
            for a in acts_for(w.activations, d.unit):
                x = tuple(a.inputs[0])
                if _overlaps(d, a) and x != images:
                    largest = max(largest, map_bytes((x[0] // shards, *x[1:]), w.act_item))
    return CONV_WORKING * largest


def tensor_conv_maps(lv: Leaves, w: Workload, mesh: MeshShape, shards: int, channels: set[int],
                     images_below: int = 0) -> int:
    """A conv net's feature maps as XLA:TPU keeps them on a device when a tensor axis splits its convs, or from
    :data:`FOLD_BELOW` images per device on without one (the ResNet-18 fsdp=8 dump at 32 images per device
    keeps these buffers, 397 MiB against 396.7 by this rule, ``tpu_aot_notes.md``, twelfth round).

    Read off the TPU buffer assignments of ResNet-18 fsdp=2,model=4, bf16 and f32 (``XLA_FLAGS=
    --xla_dump_to``, HBM values live at the peak from ``*-live-range.txt``): the compiler does not
    partition the maps over image width nor expand them per kernel column as it does without a
    tensor axis (:func:`conv_maps`); it keeps whole maps for the images of the device (``batch /
    shards``) with the channels a column-split conv leaves on it, laid out by :func:`map_bytes`
    (16 images: the channels in 128 lanes, ``bf16[16,56,56,16]`` takes 12.25 MiB, as
    ``[16,56,56,64]``; 128 images: the images in the lanes, unpadded): each norm's input (the stem's
    ``f32[16,112,112,64]``, 98 MiB), the max-pool's input (the stem's ReLU output, 98 MiB), and the
    input images in bfloat16 with the batch in lanes and the channels in 4 sublanes
    (``bf16[16,224,224,3]{0,3,2,1:T(4,128)}``, 49 MiB, in both steps). A conv's input is
    recomputed, not kept, unless the map holds the images in its lanes (the f32 dump at 128 images
    per device keeps every block's input, the residual sum ``f32[128,56,56,64]{0,3,2,1}``, for the
    column-split conv that reads it whole). f32: these buffers sum to 391 MiB, the HBM live
    set at the backward start is 395 MiB and its peak 411 MiB (the first block's backward working
    set on top); bf16: 220 MiB against 168 MiB in HBM, as up to 89 MiB of the stage-1 maps sit in
    the on-chip memory space ``S(1)`` there (not modelled: an upper bound for small steps). ``images_below``:
    count the images only when a device's are fewer (:func:`images_bytes`; :func:`remat_stem` passes 128).
    """
    # a norm normalises the previous traced layer's output: its channels on a device
    splits, prev = {}, 1
    for path in w.activations:
        splits[path], prev = prev, _column_split(lv, mesh, path)
    kept = 0.0
    # every norm layer on its own (alike norms differ in the split of the conv before them: a block's first norm
    # follows a column-split conv, its second a row-split one, whose output is whole); scale and bias: one unit
    for unit in _layers(lv, "norm"):
        for a in w.activations.get(unit, ()):
            x = tuple(a.inputs[0])
            if len(x) == 4 and x[-1] in channels:
                kept += map_bytes((x[0] // shards, *x[1:3], math.ceil(x[-1] / splits[unit])), w.act_item)
    # a conv that reads whole maps (its input channels not split) keeps its input when the map holds the images
    # in its lanes (the f32 fsdp=2,model=4 dump at 128 images per device: each block's input, the residual sum,
    # f32[128,56,56,64]{0,3,2,1}; at 16 images per device, channels in lanes, it is recomputed)
    for unit, r in _layers(lv, "conv").items():
        d = lv.decisions[r]
        if len(body(d)) == 4 and tensor_degree(mesh, lv.specs[r][-2]) == 1:
            for a in w.activations.get(unit, ()):
                x = (a.inputs[0][0] // shards, *a.inputs[0][1:]) if a.inputs else ()
                if _overlaps(d, a) and x[-1] in channels and _images_in_lanes(x, w.act_item):
                    kept += map_bytes(x, w.act_item)
    kept += images_bytes(w.activations, shards, skip=channels, below=images_below)
    kept += sum(map_bytes((y[0] // shards, *y[1:]), w.act_item) for y in _pooled(w.activations, channels))
    return int(kept)


def images_bytes(activations: Any, shards: int, skip: Any = (), below: int = 0) -> int:
    """A conv on the input images (fewer than 8 channels, none in ``skip``) keeps them in bfloat16 with the batch
    in the 128 lanes and the channels in 4 sublanes (``bf16[32,224,224,3]{0,3,2,1:T(4,128)}``, 49 MiB), on a
    device: each such call's input (:func:`tensor_conv_maps`; under remat,
    :func:`tpflax._src.cost.remat.images_relayout`). ``below``: only when a device's images are fewer.

    >>> from tpflax._src.cost.records import Act
    >>> calls = {"patch": [Act(((256, 224, 224, 3),), (256, 14, 14, 768), "float32", 1)]}
    >>> images_bytes(calls, 8) == 224 * 224 * 4 * 128 * 2, images_bytes(calls, 2, below=128)
    (True, 0)
    """
    total = 0
    for calls in activations.values():
        for a in calls:
            x = tuple(a.inputs[0]) if a.inputs else ()
            if len(x) == 4 and len(a.output) == 4 and x[-1] < 8 and x[-1] not in skip and \
                    not (below and x[0] // shards >= below):
                total += math.prod(x[1:3]) * -(-x[-1] // 4) * 4 * lane_pad(x[0] // shards) * 2
    return total


def map_bytes(shape: tuple[int, ...], item: int) -> int:
    """Bytes of a whole feature map ``(images, rows, columns, channels)`` on a device as XLA:TPU lays it
    out: the images or the channels in the 128 lanes, whichever pads less (the channels on a tie), the other
    in the sublanes (tiled like :func:`tpflax._src.tpu.device_layout`'s sublane dim). Compiled 3x3 conv stacks
    (v5e): ``f32[16,56,56,16]`` is laid out ``{3,0,2,1}`` (channels in lanes), ``f32[128,56,56,16]``
    ``{0,3,2,1}`` (images in lanes); the images of ResNet-18 ``bf16[32,224,224,3]{0,3,2,1:T(4,128)}``.

    >>> map_bytes((32, 56, 56, 64), 2) == 32 * 56 * 56 * 128 * 2  # 64 channels in 128 lanes
    True
    >>> map_bytes((128, 56, 56, 16), 4) == 128 * 56 * 56 * 16 * 4  # the images in lanes: no padding
    True
    >>> map_bytes((32, 224, 224, 3), 2) == 128 * 224 * 224 * 4 * 2  # 3 channels in 4 sublanes
    True
    """
    n, c = shape[0], shape[-1]
    return math.prod(shape[1:-1]) * min(lane_pad(c) * sublane_pad(n, item), lane_pad(n) * sublane_pad(c, item)) * item


def _layers(lv: Leaves, kind: str) -> dict[str, str]:
    """``{traced layer path: representative leaf}`` of every layer of ``kind``, each leaf of a class of alike
    ones (:attr:`Leaves.rep_of`)."""
    reps = lv.rep_of or {r: r for r in lv.decisions}
    return {layer_key(lv.decisions[r].unit) if p == r else layer_key(p.rsplit("/", 1)[0]): r
            for p, r in reps.items() if lv.decisions[r].kind == kind}


def _images_in_lanes(shape: tuple[int, ...], item: int) -> bool:
    """Whether :func:`map_bytes` lays a map out with the images in the lanes (they pad less than the channels)."""
    return lane_pad(shape[0]) * sublane_pad(shape[-1], item) < lane_pad(shape[-1]) * sublane_pad(shape[0], item)


def _column_split(lv: Leaves, mesh: MeshShape, path: str) -> int:
    """How many ways a traced layer's output features are split (as the saved activations count them)."""
    roles = dict(mesh.roles)
    split = [e for e in lv.column_units.get(path, ()) if any(roles[a] in (TENSOR, EXPERT) for a in entry_axes(e))]
    return math.prod(mesh.sizes[a] for a in entry_axes(split[-1])) if split else 1


def _split_count(lv: Leaves, w: Workload, mesh: MeshShape, shards: int, channels: set[int]) -> int:
    """The generic count of a conv net's maps on a device (layer outputs, column-split ones divided)."""
    return int(sum(math.prod(a.output) * w.act_item / shards / _column_split(lv, mesh, path)
                   for path, calls in w.activations.items() for a in calls
                   if len(a.output) == 4 and a.output[-1] in channels))


def _pooled(activations: Any, channels: set[int]) -> list[tuple[int, ...]]:
    """Feature maps a pooling step between two traced layers reads (a max-pool's backward reads its input):
    a layer's output whose next layer (in trace order) takes the same channels at a smaller size."""
    out, prev = [], None
    for calls in activations.values():
        for a in calls:
            x = tuple(a.inputs[0]) if a.inputs else ()
            if prev and len(x) == 4 and x[-1] == prev[-1] in channels and x[0] == prev[0] and x[1] < prev[1]:
                out.append(prev)
            prev = a.output if len(a.output) == 4 else None
    return out


def overlapping_convs(lv: Leaves, w: Workload) -> bool:
    """Whether the traced model has a 2-D conv whose kernel is wider than its stride (a conv net's 3x3
    or 7x7, not a patchify front end).
    """
    return any(_overlaps(d, a) for p, d in lv.decisions.items() if d.kind == "conv" and len(body(d)) == 4
               for a in acts_for(w.activations, d.unit))


def _overlaps(d: Any, a: Any) -> bool:
    """Whether a traced 2-D conv call's kernel is wider than its stride (a 3x3 or 7x7 conv, not 1x1 or patchify)."""
    x, y = tuple(a.inputs[0]) if a.inputs else (), a.output
    return len(x) == 4 and len(y) == 4 and body(d)[1] > max(x[2] // max(y[2], 1), 1)

