"""The weights an fsdp step gathers, as the peak holds them (:mod:`tpflax._src.cost.peak`).

Per device, a layer's weights split over the fsdp axes are gathered whole (over those
axes) before the layer runs. The peak holds two layers' worth while a layer computes
(:func:`gathered_bytes`) and, on XLA:TPU without remat, every other layer's gathered
weights too, kept from its forward pass for its backward pass (:func:`kept_gathered_bytes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tpflax._src.cost.activations import layer_key
from tpflax._src.cost.gradients import gather_item
from tpflax._src.cost.leaves import Leaves, stack_of
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.scope import body, leaf_itemsize
from tpflax._src.cost.scope import layers as stacked_layers
from tpflax._src.mesh import FSDP, MeshShape
from tpflax._src.specs import entry_axes

GATHERED_LAYERS = 2  # fsdp: the layer computing and the next one being gathered

_INDEXED = re.compile(r"^(.*?_)\d+$")


def block_of(path: str) -> str:
    """The repeated block a leaf belongs to (``params/layers_3``, or a list's item: HF's
    ``model/layers/0``, an nnx ``blocks/0``), else its own path.

    >>> block_of("params/layers_3/mlp/up/kernel"), block_of("params/lm_head/kernel")
    ('params/layers_3', 'params/lm_head/kernel')
    >>> block_of("model/layers/0/mlp/gate_proj/kernel")
    'model/layers/0'
    """
    parts = path.split("/")
    for i, p in enumerate(parts[:-1]):
        if _INDEXED.match(p) or (i and p.isdigit()):
            return "/".join(parts[:i + 1])
    return path


def _gathered_leaves(lv: Leaves, mesh: MeshShape, backend: str) -> Iterator[tuple[str, Any, int, int]]:
    """``(path, decision, one layer's slice gathered, its whole gradient)`` for each representative leaf
    split over an fsdp axis larger than one; a scanned stack's leaf gives one layer's slice."""
    roles = dict(mesh.roles)
    fsdp = {a for a in mesh.names if roles[a] == FSDP and mesh.sizes[a] > 1}
    for path, d in lv.decisions.items():
        spec = lv.specs[path]
        if not fsdp or not any(a in fsdp for e in spec for a in entry_axes(e)):
            continue
        kept = tuple(_drop(e, fsdp) for e in spec)
        k = d.layers_dim
        shape, kept = (body(d), kept[:k] + kept[k + 1:]) if k is not None else (tuple(d.shape), kept)
        yield path, d, shard_bytes(shape, gather_item(d, backend), kept, mesh), shard_bytes(
            shape, leaf_itemsize(d), kept, mesh)


def gathered_bytes(lv: Leaves, mesh: MeshShape, backend: str = "cpu") -> tuple[int, int]:
    """``(largest block, two blocks)``: one layer's weights gathered over the fsdp axes, and that
    next to another layer's (the forward) or next to a layer's whole gradient before its
    reduce-scatter (the backward).

    A scanned stack gathers one layer's slice (the leaf without its layers dim); one layer of the
    stack is a block, as ``layers_3`` is one of an unrolled model.
    Zero when the mesh has no fsdp axis larger than one. On TPU a float32 matmul kernel is
    gathered as bfloat16 (:func:`tpflax._src.cost.gradients.gather_item`) while its whole gradient
    stays float32: the MoE float32 dumps (fsdp=8 on v5p, fsdp=2,model=4 on v5e) hold
    ``bf16[8, 4096, 14336]`` gathered expert kernels and, at the peak, one
    ``f32[8, 4096, 14336]`` gradient before its reduce-scatter.

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> w = jax.ShapeDtypeStruct((1024, 1024), "float32")  # 4 MiB per layer
    >>> p = tpflax.plan({f"layers_{i}": {"w": w} for i in range(3)}, {"fsdp": 4})
    >>> gathered_bytes(merge(p.decisions, {}), p.mesh)  # one layer whole, and two
    (4194304, 8388608)
    """
    blocks: dict[str, int] = {}  # gathered
    grads: dict[str, int] = {}  # the same block's whole gradient, in the stored dtype
    repeats: dict[str, int] = {}  # merged leaves stand for this many alike layers
    for path, d, gathered, grad in _gathered_leaves(lv, mesh, backend):
        # a scanned stack's leaves: one layer of the stack is its block, as layers_i is an unrolled one's
        key = block_of(path) if d.layers_dim is None else _stack_of(lv, d)
        count = lv.stacks.get(key) or lv.count[path]
        blocks[key] = blocks.get(key, 0) + gathered
        grads[key] = grads.get(key, 0) + grad
        repeats[key] = min(repeats.get(key, count), count)
    top = sorted(((blocks[k], grads[k]) for k in blocks for _ in range(min(repeats[k], GATHERED_LAYERS))),
                 reverse=True)
    if not top:  # no fsdp axis, or one that splits no leaf (a scalar tree, say): nothing is gathered
        return 0, 0
    return top[0][0], top[0][0] + sum(g for _, g in top[1:GATHERED_LAYERS])


def expert_kernel_bytes(lv: Leaves, mesh: MeshShape, backend: str) -> tuple[int, int]:
    """``(the largest expert kernel gathered over the fsdp axes, the largest whole expert gradient)`` on a
    device: what an expert layer's backward holds of its weights at once (``Peak.expert_phase``). The
    three MoE float32 remat dumps (v5e fsdp=8 and fsdp=2,model=4, v5p data=2,fsdp=4) hold one gathered
    kernel (``wi``; ``wo``'s is freed first) and ``wi``'s whole gradient, ``wo``'s formed after it is freed
    (``benchmarks/tpu_aot_notes.md``, 2026-12-02 MoE remat). Zeros without fsdp-split expert kernels.

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> p = tpflax.plan({"moe": {"wi": jax.ShapeDtypeStruct((8, 1024, 2048), "float32")}}, {"fsdp": 8})
    >>> [b // 2**20 for b in expert_kernel_bytes(merge(p.decisions, {}), p.mesh, "tpu")]  # bf16 gather, f32 grad
    [32, 64]
    """
    sizes = [(g, w) for _, d, g, w in _gathered_leaves(lv, mesh, backend) if d.kind == "expert"]
    return max([0] + [g for g, _ in sizes]), max([0] + [w for _, w in sizes])


def head_bytes(lv: Leaves, mesh: MeshShape, head: str) -> tuple[int, int]:
    """``(the head's kernel gathered over the fsdp axes, its whole gradient there)`` on XLA:TPU, for the remat
    loss phase (``Peak.head``); zeros when no fsdp axis splits it (its shard is an argument already).

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> p = tpflax.plan({"wte": jax.ShapeDtypeStruct((8192, 1024), "float32")}, {"fsdp": 8})
    >>> [b // 2**20 for b in head_bytes(merge(p.decisions, {}), p.mesh, "wte")]  # 8192 x 1024 float32, whole
    [32, 32]
    """
    for path, _, gathered, grad in _gathered_leaves(lv, mesh, "tpu"):
        if path == head:
            return gathered, grad
    return 0, 0


def kept_gathered_bytes(lv: Leaves, mesh: MeshShape, backend: str = "tpu") -> int:
    """The gathered weights of the alike layers of a stack beyond :data:`GATHERED_LAYERS` (``Peak.gathered_kept``):
    ``(n - 2) x`` one layer's gathered weights for each stack of ``n`` alike layers.

    A layer is a repeated block (:func:`block_of`: ``layers_3``, HF's ``layers/3``) or one layer of a
    scanned stack (its layers dim); blocks are alike when their leaves are, one for one (merged into the
    same representatives, ``Leaves.rep_of``). Leaves outside layers (embedding, head) are not counted:
    XLA:TPU gathers the head again for its backward pass. Layers alike in twos or alone (a conv net's
    stages: ResNet-18's pairs of blocks, its stem) add nothing: ``gathered`` holds two layers, and the
    ResNet-18 TPU rows are calibrated without this term.

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> w = jax.ShapeDtypeStruct((1024, 1024), "float32")  # 4 MiB per layer, 1 MiB per shard
    >>> p = tpflax.plan({f"layers_{i}": {"w": w} for i in range(5)}, {"fsdp": 4})
    >>> kept_gathered_bytes(merge(p.decisions, {}), p.mesh, "cpu") // 2**20  # 3 more layers, whole
    12
    """
    gathered = {path: (d, b) for path, d, b, _ in _gathered_leaves(lv, mesh, backend)}
    return sum(max(n - GATHERED_LAYERS, 0) * b for n, b in _alike_layers(lv, gathered))


def _alike_layers(lv: Leaves, gathered: dict[str, tuple[Any, int]]) -> list[tuple[int, int]]:
    """``(layers, one layer's gathered bytes)`` per set of alike layers (blocks or scanned stacks whose
    leaves merge into the same representatives), over the representatives in ``gathered``; leaves outside
    layers are left out."""
    per_layer: dict[str, int] = {}  # one layer's gathered weights, by block or stack
    reps: dict[str, list[str]] = {}  # the representatives of its leaves
    layers: dict[str, int] = {}  # how many layers it holds
    for path, rep in (lv.rep_of or {p: p for p in lv.decisions}).items():
        if rep not in gathered:
            continue
        d, b = gathered[rep]
        key = block_of(path) if d.layers_dim is None else _stack_of(lv, d)
        if key == path:
            continue  # not in a layer
        per_layer[key] = per_layer.get(key, 0) + b
        reps.setdefault(key, []).append(rep)
        layers[key] = stacked_layers(d)
    alike: dict[tuple[str, ...], list[str]] = {}
    for key, rs in reps.items():
        alike.setdefault(tuple(sorted(rs)), []).append(key)
    return [(sum(layers[k] for k in keys), per_layer[keys[0]]) for keys in alike.values()]


def onchip_bytes(target: Any) -> int | None:
    """The on-chip memory of ``target``'s generation if its all-gathers are async (:data:`ASYNC_GATHER_ONCHIP`)."""
    gen = str(target or "").split(":")[0]
    return ASYNC_GATHER_ONCHIP.get(gen if gen.startswith("tpu-") else f"tpu-{gen}")


def _stack_of(lv: Leaves, d: Any) -> str:
    """The scanned stack a stacked leaf is in: the outermost traced path of its unit with a layer count."""
    return stack_of(layer_key(d.unit), lv.stacks) or layer_key(d.unit)


def _drop(entry: Any, axes: set[str]) -> Any:
    kept = tuple(a for a in entry_axes(entry) if a not in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


# XLA:TPU's on-chip memory (``S(1)``, the buffer dumps' "vmem" memory space: 112 MiB on a v5e) on the
# generations whose fsdp all-gathers compile as async collectives (``async-collective-done``: v5e). v5p
# (2x2x2: the MoE and Llama steps) and v6e (2x4: the Llama step) compile them as synchronous ``all-gather``s
# (libtpu 0.0.42.1, benchmarks/tpu_aot_notes.md): none is held twice there. Other generations: unmeasured.
ASYNC_GATHER_ONCHIP = {"tpu-v5e": 112 * 2**20}


def async_gathered_bytes(lv: Leaves, mesh: MeshShape, target: Any, remat: bool = False) -> int:
    """The layers' gathered kernels XLA:TPU's compiled temp counts twice (``Peak.gathered_async``): on a
    generation with async all-gathers (:data:`ASYNC_GATHER_ONCHIP`), every layer's gathered leaf larger
    than the on-chip memory, less the largest one (the last layer's backward reads and frees it first).

    Every TPU buffer dump read since the ninth round without XLA's own rematerialization follows one law, to
    2 MiB: ``temp = heap + (heap - L')``, ``L'`` the largest live set without the async collectives' values
    (benchmarks/tpu_aot_notes.md, ninth, tenth and seventeenth rounds). So a
    gathered kernel the all-gather's value still holds in HBM at the peak counts twice. Without remat each
    layer's is kept from its forward to its backward pass (``gathered`` and ``gathered_kept``); one that
    fits on chip, memory-space assignment may gather into ``S(1)`` and evict to HBM as a ``copy-start``
    value (counted once), one that does not cannot move and stays the all-gather's value. The MoE 7B dumps
    (``bf16[8, 4096, 14336]`` expert kernels, 896 MiB gathered over fsdp) hold all four at the backward
    start; the last layer's ``wo`` is freed as its gradient forms, and the largest live set without async
    values is there, with three (temp - heap 3274 / 2711 MiB on fsdp=8 / data=2,fsdp=4: three kernels,
    2688, and the heap's slack). Leaves outside layers (head, embedding) are not counted: the head is
    gathered again for its own backward pass, freed before the layers' peak. Kernels that fit on chip
    are not counted: whether the compiler moves them is its choice (the medium MoE's 64 MiB ``wi`` stays,
    its ``wo`` moves; tenth round), an under-count there. A step with little compute to hide a gather
    behind gathers some synchronously (counted once): an over-count there (a 2-layer toy at 256 tokens per
    device: +33%; seventeenth round).

    ``remat``: no layer keeps its gathered kernels from its forward to its backward pass; the last layer's
    recompute gathers them again, as async all-gathers too, and holds the ones too large for the chip across
    the peak, less the one its backward frees first: one layer's kernels, less the largest (the MoE 7B bf16
    fsdp=8 remat dump: the recompute's ``wi`` gather ``async-collective-done.14``, 896 MiB, live through the
    expert backward's peak, ``wo``'s freed before it; temp - heap = heap - L' = 978 MiB; eighteenth round).

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> w = jax.ShapeDtypeStruct((8192, 8192), "bfloat16")  # 128 MiB per layer gathered, 16 MiB per shard
    >>> p = tpflax.plan({f"layers_{i}": {"w": w} for i in range(3)}, {"fsdp": 8})
    >>> lv = merge(p.decisions, {})
    >>> [async_gathered_bytes(lv, p.mesh, t) // 2**20 for t in ("tpu-v5e:2x4", "tpu-v5p", None)]
    [256, 0, 0]
    >>> async_gathered_bytes(lv, p.mesh, "tpu-v5e:2x4", remat=True)  # one layer's single kernel, freed first
    0
    """
    onchip = onchip_bytes(target)
    if onchip is None:
        return 0
    gathered = {path: (d, b) for path, d, b, _ in _gathered_leaves(lv, mesh, "tpu")}
    sizes, layer = [], {}
    for path, rep in (lv.rep_of or {p: p for p in lv.decisions}).items():
        if rep in gathered and gathered[rep][1] > onchip:
            d, b = gathered[rep]
            if d.layers_dim is not None or block_of(path) != path:  # in a layer
                sizes += [b] * stacked_layers(d)
                key = block_of(path) if d.layers_dim is None else _stack_of(lv, d)  # a stacked leaf: one slice
                layer.setdefault(key, []).append(b)
    if remat:  # the last layer's recompute: one layer's kernels
        sizes = max(layer.values(), key=sum, default=[])
    return sum(sizes) - max(sizes) if sizes else 0


def async_overflow_bytes(lv: Leaves, mesh: MeshShape, target: Any) -> int:
    """The gathered kernels that fit the on-chip memory one by one but not as a layer (``Peak.gathered_overflow``):
    on a generation with async all-gathers (:data:`ASYNC_GATHER_ONCHIP`), for each stack of ``n`` alike layers,
    ``(n - 1) x`` the bytes by which one layer's gathered kernels that fit on chip exceed the on-chip memory.

    The complement of :func:`async_gathered_bytes` (kernels larger than the on-chip memory, which cannot move).
    Each layer's gathered kernels are kept from its forward to its backward pass (``gathered``,
    ``gathered_kept``). One that fits on chip may be gathered into ``S(1)`` and evicted to HBM as a ``copy-start``
    value, or gathered synchronously, and the compiled temp counts it once; one left as the
    ``async-collective-done`` value counts twice (the law in :func:`async_gathered_bytes`). Which ones stay is
    the memory-space assignment's choice, made as ``S(1)`` has room (a kernel gathered while it is full stays);
    what the v5e dumps of Llama-2-7B (386 MiB of bfloat16 kernels per layer
    over fsdp) hold at the peak, in the last layer's attention backward: layer 0's ``gate_proj``, ``down_proj``
    and one 32 MiB attention kernel (float32 fsdp=8: 204 MiB), the same and a second one (float32 data=2,fsdp=4:
    236), ``gate_proj`` and two (bfloat16 fsdp=8: 150), and one or two of the last layer's attention kernels
    (32, 32, 64): 236, 268 and 214 MiB where this counts 386 - 112 = 274; at 3 layers (bf16 fsdp=8) 396 where it
    counts 548, 150-182 MiB a layer: an over-count growing with depth, inside the heap slack the compiled temp
    also counts twice and nothing models (benchmarks/tpu_aot_notes.md, seventeenth round, the Llama float32 rows). Layers whose kernels fit on chip together (GPT-2; the tenth
    round's medium Llama, 96.5 MiB, whose bfloat16 steps keep none async): nothing (its float32 steps keep
    ``down_proj``, 21.5 MiB a layer: an under-count there). The last layer's are not counted.

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> w = jax.ShapeDtypeStruct((4096, 4096), "bfloat16")  # 32 MiB per kernel gathered, 5 per layer
    >>> p = tpflax.plan({f"layers_{i}": {f"w{j}": w for j in range(5)} for i in range(3)}, {"fsdp": 8})
    >>> lv = merge(p.decisions, {})
    >>> [async_overflow_bytes(lv, p.mesh, t) // 2**20 for t in ("tpu-v5e:2x4", "tpu-v5p", None)]  # 2 x (160 - 112)
    [96, 0, 0]
    """
    onchip = onchip_bytes(target)
    if onchip is None:
        return 0
    fit = {path: (d, b) for path, d, b, _ in _gathered_leaves(lv, mesh, "tpu") if b <= onchip}
    return sum(max(n - 1, 0) * max(b - onchip, 0) for n, b in _alike_layers(lv, fit))
