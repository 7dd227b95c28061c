"""What a remat'd step holds on XLA:TPU beyond its blocks' saved inputs and one layer's recompute.

Under remat the saved activations are the top-level calls' outputs (:mod:`tpflax._src.cost.activations`),
and on TPU the loss and the last layer's backward are two phases (``Peak.loss_apart``). Named
corrections to what those phases hold, read off the v5e buffer dumps (``benchmarks/tpu_aot_notes.md``,
nineteenth round):

* :func:`tail_bytes`: the last block's output and a final norm's are saved for the loss phase (the final
  norm's backward reads its input; the head reads its output) and dead by the last block's backward;
* :func:`images_relayout`: a patchify front end's input images are relaid out once, the batch in the lanes,
  and kept for the whole step;
* :func:`score_stack`: a 16-bit step's head-split float32 scores leave a region its buffers in flight cannot
  fill;
* :func:`scan_loop`: a scanned stack's backward loop carries its layers' gradients whole from its first
  iteration, and the compiled temp counts the loop's carried buffers as free space (twentieth round);
* :func:`scan_logits`: with its head's vocabulary whole on a device, the float32 logits live through that loop
  (twenty-first round).
"""

from __future__ import annotations

from tpflax._src.cost.activations import activation_bytes, top_level
from tpflax._src.cost.conv import images_bytes, overlapping_convs, remat_blocks
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.scope import grad_bytes, leaf_itemsize
from tpflax._src.cost.workload import Workload
from tpflax._src.mesh import MeshShape
from tpflax._src.tpu import LANES


def tail_bytes(lv: Leaves, w: Workload, mesh: MeshShape, shards: int) -> int:
    """XLA:TPU under remat: the saved outputs the loss phase holds and the last layer's backward does not, on a
    device (``Peak.tail``, in the activation dtype as :func:`tpflax._src.cost.activations.activation_bytes` counts
    them): the last block's output and the outputs of the top-level calls after it that keep its shape (the
    residual stream: a final norm's). Their backward passes (the final norm's, the head's) run before the last
    block's, so by then only the blocks' inputs are saved. A block is a top-level call holding traced calls.
    0 for a conv net, whose saved set is its stem's maps and its blocks' inputs (:func:`tpflax._src.cost.conv.conv_maps`).

    Named in four v5e remat dumps at the last layer's backward (``benchmarks/tpu_aot_notes.md``, nineteenth
    round): ViT-B/16 f32 fsdp=2,model=4 holds two ``f32[128,197,768]`` saved maps (``copy-start{0}``, steps
    227-1860, and ``copy-start.1{0}``, 412-1247: the two blocks' inputs), its bf16 twin two ``bf16[128,197,768]``
    (``copy-start{0}``, ``copy-start.1{0}``), Llama-2-7B f32 fsdp=2,model=4 two ``f32[4,4096,4096]``
    (``layers_0`` and ``layers_1/attention_norm``'s inputs), bf16 fsdp=8 two ``bf16[1,4096,4096]``, where the
    saved count holds four stream maps (the embedding's or patch output, both blocks' outputs, the final norm's).
    The head's output (a 16-bit step's logits in its dtype) is not a stream map and stays: it is dead there
    too (the GPT-2 bf16 remat dump frees it before the last layer's backward), but counting it out takes the
    Llama-2-7B bf16 fsdp=8 and data=2,fsdp=4 remat rows to -12.6 / -12.0%: with the layer's recomputed MLP
    it stands for the heap's slack there (the last MLP backward's 344 MiB hole, eighteenth round).
    """
    if not w.remat or overlapping_convs(lv, w):
        return 0  # a conv net's saved set is its stem's maps and its blocks' inputs already (conv.conv_maps)
    blocks = remat_blocks(w)
    if not (blocks and w.activations[blocks[-1]]):
        return 0
    tops = top_level(w.activations)
    order = [p for p in w.activations if p in tops]
    stream = w.activations[blocks[-1]][-1].output
    # each path's last call: the last block's output (a scanned stack's trace may hold more than one call), a final
    # norm's
    tail = {p: w.activations[p][-1:] for p in order[order.index(blocks[-1]):]
            if w.activations[p] and w.activations[p][-1].output == stream}
    return activation_bytes(lv.column_units, tail, w.batch, w.config, mesh, shards, True, w.act_item, [],
                            adapters=lv.adapters)[0]


def images_relayout(lv: Leaves, w: Workload, shards: int) -> int:
    """XLA:TPU under remat, a model whose convs are patchify (kernel no wider than its stride, ViT's patch
    embedding): its input images relaid out in bfloat16 with the batch in the lanes, kept for the whole step
    when a device's images do not fill the 128 lanes, on a device (the patch conv's weight gradient reads them).

    ViT-B/16 remat v5e dumps at 32 images per device (``benchmarks/tpu_aot_notes.md``, nineteenth round): bf16
    fsdp=8 ``copy-start{0}`` ``bf16[32,224,224,3]`` (49 MiB, steps 257-1409 of 1922), f32 fsdp=8 ``copy-start.1{0}``
    (288-1872 of 2362), f32 data=2,fsdp=4 ``copy-start.1{0}`` (319-1749 of 2435), each live at the HBM peak; at
    128 images per device (fsdp=2,model=4, bf16 and f32) none: the argument is laid out batch-minor and read in
    place. A conv net (overlapping convs) keeps them too, counted with its stem's kept maps
    (:func:`tpflax._src.cost.conv.conv_maps`): not counted twice. Without
    remat the ViT dumps hold them as well; counted there it takes three in-band rows out (+12..+14%; their
    saved set counts a stream map per layer the compiler does not keep): not applied.
    """
    if not w.remat or w.backend != "tpu" or overlapping_convs(lv, w):
        return 0
    return images_bytes(w.activations, shards, below=LANES)


def score_stack(elems: int, held: int, item: int, hosted: int) -> int:
    """``Peak.score_stack``: XLA:TPU under remat, a step whose attention makes its scores in a wider dtype
    than it holds, with the heads split over a tensor axis (``item`` > ``held``, :func:`tpflax._src.cost.peak.split_probs_item`).

    The last layer's recompute then holds two ``item``-wide score buffers, the scores ``A`` and the
    probabilities ``P`` made from them; ``A`` is freed as ``P`` forms, and the layer's other recomputed
    activations (``hosted``) and the backward's small values made after it are placed in ``A``'s region. Its
    attention backward's two ``held``-wide buffers in flight would fill ``A``'s region exactly, but the values
    placed there first leave room for one: the other goes above ``P``, so the heap holds ``A``'s region beside
    both, and the part of it the buffers cannot use, ``A`` less one buffer, is slack, which the compiled temp
    counts once more (``temp = heap + (heap - live peak)``). The Llama-2-7B bf16 fsdp=2,model=4 remat v5e dump
    (benchmarks/tpu_aot_notes.md, eighteenth round): ``A`` ``fusion.576{0}`` ``f32[4,8,4096,4096]`` at 558 MiB,
    ``P`` ``fusion.577{1}`` at 2606; the recomputed MLP (``fusion.67{1}``, ``.599``, ``.606``) and the MLP's
    weight gradients at 590-1104; the buffers in flight ``fusion.31{1}`` at 1104 and ``fusion.29`` at 4654;
    heap 5681, live peak 4715, slack 966 (``A`` less one buffer, less 58 MiB of small values), temp 6648.
    The recomputed activations placed in ``A``'s region are in ``Peak.recompute`` already: not twice. How many
    buffers fit is where the small values landed: in the MoE bf16 fsdp=2,model=4 remat dump none does (its expert
    weight gradients split ``A``'s region), about 1 GiB more than this counts (that row: -5.7%). A step
    holding float32 scores makes ``P`` in ``A``'s buffer (the float32 dump holds one ``f32[4,8,4096,4096]`` in
    the recompute): nothing stacks. Without remat every layer's ``A`` and ``P`` stack with the saved
    activations between them, a pattern that is not linear in the layers (the notes' eighteenth round): not
    modelled.

    >>> score_stack(100, 2, 4, 30), score_stack(100, 2, 4, 500), score_stack(100, 4, 4, 30)
    (370, 0, 0)
    """
    if item <= held:
        return 0
    scores = elems * item  # A, freed as P forms
    return max(2 * (scores - elems * held) - min(hosted, scores), 0)


def scan_loop(lv: Leaves, w: Workload, mesh: MeshShape, shards: int) -> tuple[int, int]:
    """XLA:TPU under remat, a scanned layer stack (``nn.scan``): ``(its layers' gradients, its saved block inputs)``
    on a device (``Peak.scan_grads``, ``Peak.scan_stack``); zeros without a scanned remat'd block.

    The backward pass is a while loop whose carried tuple holds the stacked gradient of every scanned leaf, whole
    from the first iteration (updated one layer's slice per iteration), and the saved per-layer inputs stack: the
    last layer's backward (the loop's first iteration) holds every layer's gradients, where an unrolled step holds
    none yet. And the compiled temp does not count the loop's carried buffers (its ``(phi)`` values and the in-place
    ``dynamic-update-slice`` into them) as live: ``temp = 2 heap - L'`` with ``L'`` the largest live set without
    them and without the async collectives' values, to 0.4 MiB in four scanned v5e dumps (Llama-2-7B bf16, 2 and 4
    layers fsdp=8, 2 layers fsdp=2,model=4 on v5e:2x4; 32 layers float32 fsdp=32,model=8 on v5e-256) and the
    unrolled ones (``benchmarks/tpu_aot_notes.md``, twentieth round). So the temp holds the carried buffers once
    more, up to what the loop's peak holds beside the stack (``Peak.start``): at 2 and 4 layers the whole
    carried set (``while.50{2}``, the ``bf16[n,1,4096,4096]`` inputs, and ``wide.param.0{3..10}``, the seven
    kernels' gradient stacks), on the pod, whose 2 GiB stack outweighs the rest, what the loop's peak holds
    beside it (``L'`` is then the stack's own allocation before the forward loop).
    """
    if not (w.remat and w.backend == "tpu"):
        return 0, 0
    blocks = [b for b in remat_blocks(w) if lv.stacks.get(b, 1) > 1]
    if not blocks:
        return 0, 0
    grads = 0
    for path, d in lv.decisions.items():
        if d.trainable and d.layers_dim is not None:
            item = leaf_itemsize(d)
            grads += grad_bytes(shard_bytes(tuple(d.shape), item, lv.specs[path], mesh) * lv.count[path], item, w.g_item)
    stack = activation_bytes(lv.column_units, {b: w.saved[b] for b in blocks if b in w.saved}, w.batch, w.config,
                             mesh, shards, True, w.act_item, [], lv.stacks, lv.adapters)[0]
    return grads, stack


def scan_logits(logits: int, vocab_split: int, scanned: bool) -> int:
    """``Peak.scan_logits``: XLA:TPU under remat, a scanned stack (``scanned``: :func:`scan_loop` found one) whose
    head's vocabulary is not split over a tensor axis (``vocab_split`` 1): the float32 ``logits`` on a device, live
    through the backward loop.

    The loss's value (the labels' logits gathered, ``take_along_axis``, less the log-sum-exp, averaged) is a fusion
    of its own that no gradient reads, and XLA:TPU schedules it after the backward while loop: the logits it reads
    live from the loss to there. With the vocabulary split, the log-sum-exp takes an all-reduce over the tensor
    axis and the fusion that finishes it makes both the loss's value and the log-sum-exp the head's backward reads
    (one multi-output fusion), so the gather runs before the loop and the logits die at the loss. Unrolled (no
    loop) the value is placed at the loss. Read off v5e:2x4 dumps (``benchmarks/tpu_aot_notes.md``, twenty-first
    round): a 512-wide 2-layer scanned Llama, 1024 tokens, bf16: fsdp=8 holds ``convert_bitcast_fusion.6{0}``
    ``f32[1,1024,32000]`` past ``while.49`` (the gather ``gather_fusion.1`` after it), with the all-reduce combiner
    off, the scheduler's memory limit at 1% or its memory-pressure tracking off alike; fsdp=2,model=4 (combiner on
    or off) gathers before the loop (``fusion.259``: the loss and ``f32[4,1024]`` log-sum-exp); unrolled fsdp=8 at
    the loss. At Llama-2-7B width: ``f32[1,4096,32000]`` through ``while.49`` at bf16 and f32 fsdp=8 on v5e:2x4
    (twentieth round) and ``f32[4096,32000]`` (``fusion.319{1}``) on a v5e-256 fsdp=256.

    >>> scan_logits(500, 1, True), scan_logits(500, 4, True), scan_logits(500, 1, False)
    (500, 0, 0)
    """
    return logits if scanned and vocab_split == 1 else 0
