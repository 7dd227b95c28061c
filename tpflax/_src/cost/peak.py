"""The estimate's per-device peak for one training step, from how XLA schedules it.

A compiled train step (forward, backward, optimizer update, with the
parameters and optimizer state donated) holds, per device:

* for the whole step: its arguments (params, optimizer state, model state,
  batch), updated in place through donation;
* growing through the forward pass and freed by the backward pass as it goes:
  the saved activations, including each attention layer's probabilities
  (``batch x heads x seq x seq`` in the activation dtype) unless the layer is
  rematerialised (a conv net on TPU keeps what its layers' backward passes read
  instead of their outputs: each conv's input once per kernel column, each
  norm's and max-pool's input; :func:`conv_maps`), and without a residual block's row projection
  outputs, which feed only the residual add (:mod:`tpflax._src.cost.residual`), and, in a 16-bit step on
  TPU, with each attention layer's context and its q, k, v padded to the lanes (:func:`attention_operands`);
* growing through the backward pass: the gradients (sharded like the params);
* one layer at a time: the working set of the layer in flight: its weights
  gathered over the fsdp axes (two layers: XLA gathers the next while one
  computes), its attention scores and their gradient, an expert layer's hidden
  gradient, and under remat its recomputed activations; on TPU one backward
  phase at a time (the MoE dumps' peak, in the last layer's expert backward,
  holds no score buffer in flight): the larger of the attention's and the
  expert's transients (``Peak.phased``);
* on TPU without remat, kept from their forward to their backward pass: the
  other layers' gathered weights (:func:`tpflax._src.cost.gathered.kept_gathered_bytes`);
* on TPU with async all-gathers (v5e), counted twice by the compiled temp: the layers' gathered
  kernels too large to move on chip (under remat the last layer's recompute's;
  :func:`tpflax._src.cost.gathered.async_gathered_bytes`), and without remat, of the kernels that fit
  on chip, what one layer's exceed the on-chip memory by, every layer's but the last's
  (:func:`tpflax._src.cost.gathered.async_overflow_bytes`);
* at the loss, still live when the last layer's backward pass starts: the
  float32 logits (their gradient is formed in the same buffer, unless the loss
  reads a slice of them, as tpflax's next-token default loss does: then the
  gradient is held apart, :func:`logits_grad_bytes`); on TPU under remat, a phase of their own, with the
  head's gathered kernel, before the last layer's backward starts (``Peak.loss_apart``, ``Peak.head``), by which
  the last block's and a final norm's saved outputs are dead (``Peak.tail``, :mod:`tpflax._src.cost.remat`);
  on TPU without remat, an output layer whose features are split over fsdp: its gathered kernel beside them
  (``Peak.head``);
* on TPU without remat, where the last layer keeps more after its attention than its attention holds in
  flight (ViT-B/16): the end of the forward pass, in the final norm, is the peak, priced by name in place of
  the backward start (each norm's input kept, not its output, the final norm's float32 maps, no score buffer in
  flight; ``Peak.forward_end``, :mod:`tpflax._src.cost.forward_end`);
* on TPU under remat, a scanned stack's backward loop: every layer's gradient, carried whole from the last
  layer's backward on, and its carried buffers (those gradients, the saved inputs stack) counted once more by
  the compiled temp, up to what the loop's peak holds beside the stack (``Peak.scan_grads``, ``Peak.scan_stack``,
  :func:`tpflax._src.cost.remat.scan_loop`); with the head's vocabulary whole on a device, the float32 logits
  too, read by the loss's value after the loop (``Peak.scan_logits``, :func:`tpflax._src.cost.remat.scan_logits`).

Saved activations and gradients are both linear in the layer count and move in
opposite directions through the backward pass, so the peak is at one end of
it: ``arguments + max(saved activations + kept gathered weights + logits + one layer's working set,
gradients + the last layer's gathered weights)``. Every term is in
:class:`Peak` and the report prints it. The coefficients (how many score-sized
buffers a layer holds, one logits buffer) were read off the TPU compiler's
buffer assignment of a 2-layer Llama-2-7B step and checked across the zoo in
``benchmarks/results/tpu_aot.md``.
"""

from __future__ import annotations

import math

from tpflax._src.cost.activations import (
    activation_bytes,
    acts_for,
    formula_scores_bytes,
    layer_key,
    layer_runs,
    token_rows,
    top_level,
)
from tpflax._src.cost.batch import config_value
from tpflax._src.cost.conv import (
    conv_maps,
    conv_working,
    overlapping_convs,
    remat_blocks,
    remat_stem,
    stem_phase,
)
from tpflax._src.cost.forward_end import forward_end
from tpflax._src.cost.gathered import (
    async_gathered_bytes,
    async_overflow_bytes,
    expert_kernel_bytes,
    gathered_bytes,
    head_bytes,
    kept_gathered_bytes,
)
from tpflax._src.cost.leaves import Leaves
from tpflax._src.cost.records import Memory, Peak
from tpflax._src.cost.remat import images_relayout, scan_logits, scan_loop, score_stack, tail_bytes
from tpflax._src.cost.residual import residual_bytes
from tpflax._src.cost.scope import body, tensor_degree
from tpflax._src.cost.scope import layers as stacked_layers
from tpflax._src.cost.workload import Workload
from tpflax._src.mesh import EXPERT, FSDP, MeshShape
from tpflax._src.specs import entry_axes
from tpflax._src.tpu import LANES, SUBLANES, lane_pad

# batch x heads x seq x seq buffers (activation dtype) per attention layer, measured on the TPU compiler:
SCORES_SAVED = 1  # the probabilities, kept for the backward pass (none under remat)
# in flight while a layer runs: 16-bit scores need the probabilities' gradient and the scores' gradient
# (the float32 softmax between them stays in a fusion); float32 ones are updated in place
SCORES_WORKING = {2: 2, 4: 1}
LOGITS_BUFFERS = 1  # float32 logits at the loss; XLA forms their gradient in the same buffer
# tokens x experts (or top_k) x d_ff buffers per expert layer saved for the backward pass, by backend: XLA:TPU
# keeps one, the up-projection's output (SiLU and gate are recomputed in the backward fusion: six MoE buffer
# dumps, bf16 and f32, fsdp=8, data=2,fsdp=4 and fsdp=2,model=4, hold one per layer plus one gradient at the
# peak, benchmarks/tpu_aot_notes.md); XLA:CPU keeps the pre-activation and the gated hidden; GPU unmeasured.
EXPERT_SAVED = {"tpu": 1, "gpu": 2, "cpu": 2}
EXPERT_WORKING = 1
def _heads_split(lv: Leaves, mesh: MeshShape) -> int:
    """Tensor degree of the attention heads: the largest split of an attention kernel's dims."""
    best = 1
    for path, d in lv.decisions.items():
        if d.kind == "attention":
            best = max([best] + [tensor_degree(mesh, e) for e in lv.specs[path]])
    return best


def score_elements(lv: Leaves, mesh: MeshShape, w: Workload, shards: int,
                   tiled: bool = False) -> tuple[int, float, bool]:
    """``(elements of one attention layer's scores on a device, attention layers, heads split over a
    tensor axis)``; zeros without attention. ``tiled``: as XLA:TPU stores them, the keys in 128 lanes
    and the queries in 8 sublanes (:func:`_tile`).

    A config's ``n_heads``, ``n_layers`` and ``seq_len`` give them (the zoo); without them, the
    traced ``q @ k`` products (:attr:`Workload.scores`): each dim split as far as the plan splits
    the kernel dims it carries (the heads), the batch over its shards. Layers of another size
    (cross-attention over a shorter memory) count as the share of the largest they hold.
    """
    cfg = w.config
    heads, layers, seq = (config_value(cfg, k) for k in ("n_heads", "n_layers", "seq_len"))
    if heads and layers and seq:
        if not any(d.kind == "attention" for d in lv.decisions.values()):
            return 0, 0, False
        per_example = token_rows(w.batch, cfg) // max(w.batch.size, 1)  # the sequence a layer attends over
        split = _heads_split(lv, mesh)
        return (int(w.batch.size / shards * math.ceil(heads / split) * _tile(per_example, per_example, tiled)),
                int(layers), split > 1)
    sizes, split = [], False
    for sc in w.scores:
        local = 1.0
        for n, tags in sc.dims:
            specs = [lv.specs.get(lv.rep(p), ()) for p, _ in tags]
            degree = max([1] + [tensor_degree(mesh, e[d]) for e, (_, d) in zip(specs, tags, strict=True)
                                if d < len(e)])
            split |= degree > 1
            local *= math.ceil(n / degree) / n
        if len(sc.dims) >= 2:
            q, k = sc.dims[-2][0], sc.dims[-1][0]
            local *= _tile(q, k, tiled) / (q * k)
        sizes.append((sc.per_example * w.batch.size / shards * local, sc.count))
    if not sizes:
        return 0, 0, False
    largest = max(e for e, _ in sizes)
    return int(largest), sum(e * c for e, c in sizes) / largest, split


def split_probs_item(w: Workload, held: int) -> int:
    """Bytes per element of the probabilities a layer saves with its heads split over a tensor axis: its
    softmax's (the traced ``exp``, :attr:`tpflax._src.cost.traced.Scores.softmax`), float32 when the trace
    saw none, never less than the step holds (:func:`held_item`). On the v5e dumps at fsdp=2,model=4:
    Llama-2-7B and MoE bf16, whose attention takes the softmax in float32, keep ``f32[4,8,4096,4096]``;
    ViT-B/16 bf16 (flax's ``dot_product_attention``, softmax in the input dtype) keeps
    ``bf16[128,3,197,197]`` (``benchmarks/tpu_aot_notes.md``, seventeenth round).
    """
    seen = [sc.softmax for sc in w.scores if sc.softmax]
    return max(max(seen) if seen else 4, held)


def attention_operands(lv: Leaves, mesh: MeshShape, w: Workload, shards: int) -> int:
    """XLA:TPU, a 16-bit step without remat: what its attention layers keep beyond their traced outputs,
    on a device. The backward matmuls read q, k, v (the projections' outputs) and the context (the
    out-projection's input, not a traced output), and the compiler keeps all four with the sequence in
    the 128 lanes: ViT-B/16's ``bf16[32,197,12,64]`` take 12 MiB each, as ``[32,12,64,256]``, four per
    layer in the v5e dumps of its three bf16 meshes (``benchmarks/tpu_aot_notes.md``, seventeenth round);
    Llama-2-7B's bf16 steps keep the same four (:mod:`tpflax._src.cost.residual`). So: the context
    once per attention layer, and all four padded to the lanes when the attended length is not a
    multiple of 128 (:func:`_pad`). A float32 step keeps them in bfloat16 (its matmuls multiply in
    bfloat16 at default precision): not modelled (its traced q, k, v are counted in float32; see the notes).
    """
    if w.backend != "tpu" or w.remat or held_item(w.act_item, w.backend) != 2:
        return 0
    pad = _pad(_attended(w))
    total = 0.0
    for p, d in lv.decisions.items():
        if d.kind != "attention" or len(body(d)) < 2 or d.role not in ("column", "row"):
            continue
        split = max([1] + [tensor_degree(mesh, e) for e in lv.specs[p]])  # the heads' split
        for a in acts_for(w.activations, d.unit):
            if d.role == "row" and a.inputs:  # the context
                total += math.prod(a.inputs[0]) * pad * lv.count[p] / split
            elif d.role == "column":  # q, k, v: in the saved activations already, unpadded
                total += math.prod(a.output) * (pad - 1) * lv.count[p] / split
    return int(total / shards * w.act_item)


def _attended(w: Workload) -> int:
    """The sequence an attention layer attends over: the config's (tokens per example), else the keys of
    the largest traced ``q @ k`` product; 0 when neither says."""
    if config_value(w.config, "seq_len") and w.batch.size:
        return token_rows(w.batch, w.config) // w.batch.size
    return max([0] + [sc.dims[-1][0] for sc in w.scores if len(sc.dims) >= 2])


def _pad(seq: int) -> float:
    """How much a map with ``seq`` in the 128 lanes grows as XLA:TPU stores it (measured at 197: 256 lanes;
    fewer than a lane row: dense, unmeasured, as for the scores' tiles in :func:`_tile`).

    >>> _pad(197), _pad(4096), _pad(64)
    (1.299492385786802, 1.0, 1.0)
    """
    return lane_pad(seq) / seq if seq >= LANES else 1.0


def logits_bytes(lv: Leaves, mesh: MeshShape, w: Workload, shards: int) -> tuple[int, str, bool, int]:
    """``(the float32 logits on a device, the head's path, whether the traced layer calls hold them, how many ways
    a tensor axis splits the vocabulary)``: rows on this device x the head's local width; ``(0, "", False, 1)``
    without a head.

    The head is the output layer, or an embedding whose ``attend`` makes the logits (tied weights), or
    a table the trace saw looked up and contracted (``x @ table.T`` in a method of its own, Gemma's
    ``Embedder.decode``: no layer call shows those logits, unless a traced call returns them).
    Its rows are those of its traced call (a speech model's decoder tokens, not its first input's
    frames), else the batch's tokens.
    """
    heads = [(d.shape[-1], lv.specs[p][-1], acts_for(w.saved, d.unit), p, True) for p, d in lv.decisions.items()
             if d.kind == "head" and len(d.shape) >= 2]
    heads += [(d.shape[0], lv.specs[p][0], calls, p, True) for p, d in lv.decisions.items()
              if len(d.shape) == 2 and (calls := acts_for(w.saved, d.unit + ":attend"))]
    heads += [(d.shape[0], lv.specs[p][0], [], p, any(a.output[-1:] == (d.shape[0],) for v in w.saved.values()
                                                      for a in v))
              for p, d in lv.decisions.items()
              if p in (w.tied or ()) and len(d.shape) == 2 and not acts_for(w.saved, d.unit + ":attend")]
    if not heads:
        return 0, "", False, 1
    vocab, entry, calls, path, held = heads[-1]
    split = tensor_degree(mesh, entry)
    width = math.ceil(vocab / split)
    if calls and calls[0].output and calls[0].output[-1] == vocab:
        rows = math.prod(calls[0].output[:-1])
    else:
        rows = token_rows(w.batch, w.config) if len(w.batch.first_shape) == 2 else w.batch.size
    return int(rows / shards * width * 4), path, held, split


def logits_grad_bytes(logits: int, head: str, w: Workload) -> int:
    """The logits' gradient held apart from them (``Peak.logits_grad``): with a next-token loss, which
    reads a slice of the logits (the TPU buffer dumps of HF BERT-base and GPT-2 at 8 x 512 tokens,
    data=2,model=4: each peak holds the sliced ``f32[4, 511, vocab]`` logits and their gradient); in
    bfloat16 on TPU (GPT-2: the head's matmuls read it at default precision) unless a bias added to
    the logits reads it too (BERT: float32). A loss over whole logits (a zoo model's, with separate
    labels) forms the gradient in place."""
    if not (logits and w.next_token):
        return 0
    return logits if w.backend != "tpu" or head in w.biased else logits // 2


def expert_hidden_bytes(lv: Leaves, mesh: MeshShape, w: Workload, shards: int) -> tuple[int, int]:
    """``(one expert layer's hidden activations on a device, expert layers)``; zeros without experts.

    The hidden width is the expert up-projection's last dim; with dense dispatch every token
    visits every expert on the device (the tokens gathered over the axes splitting the experts, which
    split the batch), routed (all-to-all) each token visits ``top_k``.
    """
    ups = [(p, d) for p, d in lv.decisions.items() if d.kind == "expert" and len(body(d)) == 3]
    if not ups:
        return 0, 0
    path, d = ups[0]
    spec = lv.specs[path][-3:]
    experts, width = body(d)[0], body(d)[-1]
    tokens = token_rows(w.batch, w.config) / shards
    if w.dispatch == "dense":  # every token visits every expert on the device, gathered over the expert axes
        per_token = math.ceil(experts / tensor_degree(mesh, spec[0]))
        roles = dict(mesh.roles)
        tokens *= math.prod(mesh.sizes[a] for a in entry_axes(spec[0]) if roles[a] == EXPERT)
    else:
        per_token = config_value(w.config, "top_k", 2)
    layers = sum(lv.count[p] for p, x in ups if body(x) == body(d))  # the up-projections, one per layer
    return int(tokens * per_token * math.ceil(width / tensor_degree(mesh, spec[-1])) * w.act_item), layers


def _tile(rows: int, cols: int, tiled: bool) -> int:
    """Elements a ``rows x cols`` score matrix takes: as XLA:TPU stores it (``tiled``: its (8, 128) tiles,
    the keys in lanes; ViT-B/16's ``bf16[32, 12, 197, 197]`` probabilities take 37.5 MiB, as
    ``[32, 12, 200, 256]``, in the v5e buffer dumps of both batches), else ``rows x cols``. Fewer keys
    than a lane row: dense (unmeasured; the compiler may put another dim in the lanes).

    >>> _tile(197, 197, True), _tile(197, 197, False), _tile(4096, 4096, True) == 4096 * 4096, _tile(17, 17, True)
    (51200, 38809, True, 289)
    """
    return -(-rows // SUBLANES) * SUBLANES * lane_pad(cols) if tiled and cols >= LANES else rows * cols


def held_item(act_item: int, backend: str) -> int:
    """Bytes per element of the activations the step holds: XLA:CPU computes 16-bit activations in
    float32 (its float-normalization pass upcasts the elementwise ops and matmuls it has no 16-bit
    kernels for), so a bfloat16 step holds float32 buffers. Measured on the zoo's tiny configs
    (``benchmarks/results/cpu_peak.md``): a ``dtype=bfloat16`` step's compiled XLA:CPU peak is its
    float32 twin's within 4% (mlp, llama, every mesh), the live values at its peak ``f32``.

    >>> held_item(2, "cpu"), held_item(2, "tpu"), held_item(4, "cpu")
    (4, 2, 4)
    """
    return max(act_item, 4) if backend == "cpu" else act_item


def norm_broadcasts(lv: Leaves, w: Workload, shards: int) -> int:
    """XLA:CPU: the buffers each traced norm layer keeps beside its output, on a device.

    XLA:TPU fuses a broadcast into the ops that read it; XLA:CPU materialises it, so the backward pass
    of ``x * rsqrt(var) * scale`` reads its scale and its per-row inverse deviation broadcast to the
    input's shape: two buffers of the norm's input per call, float32 (:func:`held_item`), live from its
    forward to its backward pass. Read off the XLA:CPU buffer assignments of the zoo's mlp (fsdp=8) and
    llama (model=8): each LayerNorm / RMSNorm holds ``wrapped_broadcast`` (scale) and
    ``bitcast_broadcast_fusion`` (statistics) of its input's shape next to its output. A norm that keeps
    running statistics (BatchNorm: model state in its layer) normalises over the batch instead: the cnn
    (fsdp=8) keeps its centered input (``bn/sub``) and not its output, no more buffers than the count of
    layer outputs. Zero off CPU.
    """
    if w.backend != "cpu":
        return 0
    # BatchNorm's running statistics (model state); a frozen norm (plan(trainable=), plan(optimizer=)) is no such
    # layer: the backward still reads its broadcasts for the input gradient the layers before it need (counted
    # as running before: the linen LoRA-Llama's peak under plan(optimizer=) estimated at 0.855x the compiled)
    running = {layer_key(p.rsplit("/", 1)[0]) for p, d in lv.decisions.items() if d.kind == "state"}
    # alike leaves merged into one, and the layers a scanned norm holds (a scan's body may be traced once); of a
    # class, only the norms whose input gradient the step computes (:func:`input_grad_norms`)
    needed = input_grad_norms(lv, w)
    units = {d.unit: (sum(1 for q, r in (lv.rep_of.items() or [(p, p)]) if r == p and q in needed), stacked_layers(d))
             for p, d in lv.decisions.items() if d.kind == "norm" and layer_key(d.unit) not in running}
    blocks = top_level(w.activations)
    total = 0
    for unit, (n, stack) in units.items():
        calls = [a for a in acts_for(w.activations, unit) if a.inputs]
        if calls and not (w.remat and layer_key(unit) not in blocks):
            per = sum(math.prod(a.inputs[0]) for a in calls)
            if stack > 1:  # a linen trace records a scanned body once or twice, whatever the layer count
                per = per * stack // len(calls)
            total += 2 * per * held_item(w.act_item, w.backend) * n // shards
    return total


def input_grad_norms(lv: Leaves, w: Workload) -> frozenset[str]:
    """The norm leaves (all paths, not only representatives) whose input gradient the step computes: a trained
    leaf's layer is called before the norm's (the trace's call order, :attr:`Workload.activations` lists each layer
    when its first call returns), or holds it. The backward stops at the first trained layer, so a norm before
    every one (after a frozen embedding, a frozen base's first norm) keeps no XLA:CPU broadcasts: a linen net of
    three frozen pre-norm blocks, data=8, only its head trained, estimated at 2.46x the compiled peak, 1.40x without
    its blocks' norms. A trained leaf whose layer the trace does not list (a root module's own parameter) counts
    as called first (every norm kept, as before). Per class member, by its first call: a norm called again after
    a trained layer is counted only if its first call follows one.
    """
    paths = lv.rep_of or {p: p for p in lv.decisions}
    norms = [p for p, r in paths.items() if lv.decisions[r].kind == "norm"]
    if all(lv.decisions[r].trainable for r in paths.values()):
        return frozenset(norms)
    order = {k: i for i, k in enumerate(w.activations)}
    trained = {layer_key(p.rsplit("/", 1)[0]) for p, r in paths.items() if "/" in p and lv.decisions[r].trainable}
    if any("/" not in p for p, r in paths.items() if lv.decisions[r].trainable) or not trained <= order.keys():
        return frozenset(norms)
    first = min(order[k] for k in trained) if trained else len(order)
    out = []
    for p in norms:
        key = layer_key(p.rsplit("/", 1)[0])
        if key not in order or order[key] > first or any(key.startswith(t + "/") for t in trained):
            out.append(p)
    return frozenset(out)


def peak(lv: Leaves, mesh: MeshShape, w: Workload, shards: int, dev: Memory) -> Peak:
    """The per-device peak of one training step (see the module docstring) for merged leaves on ``mesh``.

    ``dev`` is the estimate's :class:`Memory` on the fullest device; :func:`tpflax.estimate` calls
    this and keeps the result as ``Estimate.breakdown`` (``Estimate.peak`` is its total).

    >>> import optax, tpflax
    >>> from tpflax import zoo
    >>> m = zoo.get("llama")
    >>> p = tpflax.plan(m.abstract_variables(), {"fsdp": 8}, fsdp_min_bytes=1024)
    >>> e = tpflax.estimate(p, optax.adam(1e-3), 8, model=m)
    >>> e.peak == e.breakdown.total > e.per_device.arguments + e.per_device.activations
    True
    """
    one, two = gathered_bytes(lv, mesh, w.backend)
    elems, n_attn, split_heads = score_elements(lv, mesh, w, shards, tiled=w.backend == "tpu")
    held = held_item(w.act_item, w.backend)
    # in flight in the activation dtype (XLA keeps the softmax's float32 in a fusion); saved in it too, unless
    # the heads are split over a tensor axis: then each layer's probabilities are saved in float32, live from
    # its forward to its backward pass (Llama-2-7B and MoE fsdp=2,model=4 buffer dumps: f32[4,8,4096,4096]
    # per layer, next to two bf16 ones in flight in the Llama step's last attention backward)
    working = elems * held * SCORES_WORKING.get(held, 2)
    scores = elems * (split_probs_item(w, held) if split_heads else held)
    if w.remat and not split_heads and held == 2:
        # remat'd 16-bit attention: the recomputed probabilities' buffer (counted in ``recompute``) takes
        # their gradient in place, so one more is in flight, not two (Llama-2-7B fsdp=8 bf16 remat dump:
        # two bf16[32,4096,4096] at the peak; float32 and head-split probabilities keep theirs apart)
        working -= elems * held
    saved_scores = 0 if w.remat else int(SCORES_SAVED * scores * n_attn)
    recompute = 0
    # on TPU no row projection's output outlives its residual add (module ``residual``, buffer evidence there)
    unread = (residual_bytes(lv, layer_runs(w.activations, lv.stacks), mesh, shards, w.act_item)
              if w.backend == "tpu" else 0)
    if w.remat:
        # the backward pass of one layer recomputes what it would have saved without remat
        full, _ = activation_bytes(lv.column_units, w.saved, w.batch, w.config, mesh, shards, False,
                                   w.act_item, [], lv.stacks, lv.adapters)
        # a config's layer count, else the trace's remat'd calls (a bare module's nn.remat blocks)
        layers = config_value(w.config, "n_layers") or w.remat_layers or 1
        recompute = int(max(full - dev.activations - unread, 0) / layers + SCORES_SAVED * scores)
        if w.backend == "tpu" and overlapping_convs(lv, w) and (blocks := remat_blocks(w)):
            # a conv net's blocks are not alike: at the backward start the last block's recompute is in flight
            # (ResNet-18's 7x7x512 maps); its stem's backward is a phase of its own (Peak.stem). The ResNet-18
            # remat dumps hold no earlier block's recompute at their peak (bf16: on chip; f32: below the stem's
            # phase), where the whole net's at once read +4..+40% (benchmarks/tpu_aot_notes.md, nineteenth round)
            last = {p: v for p, v in w.saved.items() if p.startswith(blocks[-1] + "/")}
            recompute, _ = activation_bytes(lv.column_units, last, w.batch, w.config, mesh, shards, False,
                                            w.act_item, [], lv.stacks, lv.adapters)
    hidden, n_exp = expert_hidden_bytes(lv, mesh, w, shards)
    expert_phase = 0
    if w.remat and n_exp and w.backend == "tpu":
        # the expert backward recomputes the hidden the layer would save without remat, live beside its gradient, one
        # gathered kernel and one whole gradient (three MoE f32 remat dumps, benchmarks/tpu_aot_notes.md, 2026-12-02)
        expert_phase = EXPERT_SAVED[w.backend] * hidden + EXPERT_WORKING * hidden + sum(
            expert_kernel_bytes(lv, mesh, w.backend))
    stem = remat_stem(lv, w, mesh, shards) if w.remat else (0, 0, 0)  # a conv net's, for its saved set and its phase
    kept, counted = conv_maps(lv, w, mesh, shards, stem)
    # from the memory table's activations (every layer's output) to what the step keeps, term by term
    # (Peak.saved_terms: the report shows why the two figures differ)
    terms: list[tuple[str, int]] = [("conv maps as the backward passes read them", kept - counted)]
    terms.append(("row outputs freed at their residual add", 0 if w.remat else -unread))
    if not w.activations:  # the transformer formula counts scores too (5as/ht): they are counted above
        terms.append(("attention scores, a row of their own",
                      -formula_scores_bytes(w.batch, w.config, mesh, shards, w.remat, w.act_item)))
    saved = dev.activations + sum(t for _, t in terms)
    terms.append(("activations held in float32 (XLA:CPU)", saved * held // w.act_item - saved))
    terms.append(("norm statistics and scales broadcast (XLA:CPU)", norm_broadcasts(lv, w, shards)))
    saved = saved * held // w.act_item + terms[-1][1]
    recompute = recompute * held // w.act_item
    terms += [("attention context and q, k, v padded to the lanes", attention_operands(lv, mesh, w, shards)),
              ("input images relaid out", images_relayout(lv, w, shards))]
    saved += terms[-2][1] + terms[-1][1]
    logits, head, in_trace, vocab_split = logits_bytes(lv, mesh, w, shards)
    if w.saved and held == 4 and in_trace:
        # a float32 head's traced output is the float32 logits buffer counted below: not twice (the f32
        # GPT-2 step holds one f32[2, 1024, 50257]; a 16-bit step holds its 16-bit logits and the f32 ones)
        terms.append(("float32 logits, counted at the loss", -min(logits, saved)))
        saved += terms[-1][1]
    # XLA:TPU, remat off: the backward matmul reads the forward's gathered kernel (JAX saves it as the dot's
    # residual) and the compiler keeps every layer's, live at the last layer's backward start. Ten v5e:2x4
    # dumps (benchmarks/tpu_aot_notes.md, "the async all-gathers' share at 2, 4 and 8 layers": medium zoo
    # Llama and MoE, fsdp=8 and data=2,fsdp=4, bf16 and f32) hold one layer's gathered weights more per layer
    # (Llama 96.5 MiB: 185 -> 378 -> 764 MiB at 2 / 4 / 8 layers), and the live peak grows per layer by that
    # much more than the other terms (Llama bf16 316 MiB against 219, MoE 366-370 against 216). ``gathered``
    # covers two layers (as measured at 2 layers): the rest is this term. Remat'd layers gather inside the
    # layer and the recompute gathers again (the 8-layer remat dump keeps none). XLA:CPU and GPU: unmeasured,
    # not counted.
    kept = kept_gathered_bytes(lv, mesh, w.backend) if w.backend == "tpu" and not w.remat else 0
    # XLA:TPU under remat: the loss is a phase of its own, the logits freed before the last layer's backward
    # starts (v5e dumps, benchmarks/tpu_aot_notes.md, eighteenth round). GPT-2 f32 fsdp=8 remat holds at its peak
    # the f32 logits (393 MiB), the tied table gathered for the lookup and held to the head (`all-gather.273`
    # f32[50257,768], 147 MiB, past the on-chip memory) and the head's whole float32 weight gradient (147), formed
    # while the logits hold theirs; the bf16 data=2,fsdp=4 step the table's HBM copy (73.7). A 16-bit step forms
    # the head's gradient after its float32 logits are freed (GPT-2 bf16 fsdp=8 remat: not in the phase).
    apart = w.backend == "tpu" and w.remat
    head_kernel, head_grad = head_bytes(lv, mesh, head) if apart and head else (0, 0)
    if w.backend == "tpu" and not apart and head and _gathers_its_features(lv, mesh, head):
        # XLA:TPU, remat off: an output layer whose features (the dim it contracts) are split over fsdp is gathered
        # just before the head's matmul and held into its backward, live at the loss beside the logits: the HF
        # Llama-2-7B-width fsdp=2,model=4 dump holds its bf16[4096,8000] lm_head at the peak (62.5 MiB, the
        # logits' f32[4,511,8000] beside it; benchmarks/results/third_party_peak.md). A tied table is not counted:
        # its published-width rows read over with it (GPT-2, OPT, Gemma) as often as under (BLOOM). A head at least
        # as large as the largest layer's gathered weights is that block of ``gathered`` already: not twice
        head_kernel = head_bytes(lv, mesh, head)[0]
        head_kernel = head_kernel if head_kernel < one else 0
    tail = tail_bytes(lv, w, mesh, shards) * held // w.act_item if apart else 0
    stack = score_stack(elems, held, split_probs_item(w, held), recompute - SCORES_SAVED * scores) \
        if apart and split_heads else 0
    experts = 0 if w.remat else EXPERT_SAVED[w.backend] * hidden * n_exp
    asynced = async_gathered_bytes(lv, mesh, w.target, w.remat) if w.backend == "tpu" else 0
    overflow = _overflow(lv, mesh, w)
    # XLA:TPU, no remat: the end of the forward pass, by name, where it is larger than the last attention backward
    # (ViT-B/16's six dumps peak in ``ln_f``; module ``forward_end``, benchmarks/tpu_aot_notes.md twentieth round)
    end = forward_end(lv, mesh, w, shards, held, max(working, EXPERT_WORKING * hidden),
                      LOGITS_BUFFERS * logits + logits_grad_bytes(logits, head, w))
    end = 0 if end is None else saved + end + saved_scores + experts + kept + overflow + asynced + two
    scan_grads, scan_stack = scan_loop(lv, w, mesh, shards) if apart else (0, 0)
    return Peak(arguments=dev.arguments, grads=dev.grads, activations=saved, scores=saved_scores,
                gathered=two, attention=working, recompute=recompute, gathered_kept=kept,
                logits=LOGITS_BUFFERS * logits, logits_grad=logits_grad_bytes(logits, head, w), gathered_last=one,
                experts=experts,
                expert_work=EXPERT_WORKING * hidden, conv_work=conv_working(lv, w, mesh, shards),
                gathered_async=asynced, phased=w.backend == "tpu", gathered_overflow=overflow,
                head=head_kernel + (head_grad if held == 4 else 0), score_stack=stack, loss_apart=apart, tail=tail,
                expert_phase=expert_phase, forward_end=end, scan_grads=scan_grads,
                scan_stack=scan_stack * held // w.act_item,
                scan_logits=scan_logits(LOGITS_BUFFERS * logits, vocab_split, bool(scan_grads or scan_stack)),
                saved_terms=tuple((n, t) for n, t in terms if t),
                **stem_phase(w, stem))


def _gathers_its_features(lv: Leaves, mesh: MeshShape, head: str) -> bool:
    """Whether ``head`` is an output layer (not a tied table) whose features, the dims its matmul contracts, are
    split over an fsdp axis: gathered for the logits, not computed vocabulary-parallel over that axis.

    >>> import jax, tpflax
    >>> from tpflax._src.cost.leaves import merge
    >>> tree = {"lm_head": {"kernel": jax.ShapeDtypeStruct((64, 1000), "float32")}}
    >>> lv = lambda rule: merge(tpflax.plan(tree, {"fsdp": 2, "model": 4}, rules=[("lm_head", rule)]).decisions, {})
    >>> mesh = tpflax.plan(tree, {"fsdp": 2, "model": 4}).mesh
    >>> P = jax.sharding.PartitionSpec
    >>> [_gathers_its_features(lv(r), mesh, "lm_head/kernel") for r in (P("fsdp", "model"), P(None, "fsdp"))]
    [True, False]
    """
    d, spec = lv.decisions[head], lv.specs[head]
    if d.kind != "head":
        return False
    roles = dict(mesh.roles)
    fsdp = {a for a in mesh.names if roles[a] == FSDP and mesh.sizes[a] > 1}
    return any(a in fsdp for e in spec[:-1] for a in entry_axes(e))


def _overflow(lv: Leaves, mesh: MeshShape, w: Workload) -> int:
    """``Peak.gathered_overflow``: XLA:TPU without remat (remat'd layers gather inside the recompute)."""
    return async_overflow_bytes(lv, mesh, w.target) if w.backend == "tpu" and not w.remat else 0

