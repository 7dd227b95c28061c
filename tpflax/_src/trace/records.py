"""What the trace finds, as immutable records: :class:`Use`, :class:`Edge`, :class:`Dataflow`.

The planner's dataflow rules (``tpflax._src.planner.dataflow_rules``) read these;
nothing here knows how they were found.

>>> u = Use(id=0, path="params/a/kernel", op="dot", contracted=(0,), kept=(1,))
>>> Edge("params/a/kernel", u.id, 1, "params/b/kernel", 1, 0, limit=32).limit
32
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# {path: ((leaf dim, mesh axes, their sizes), ...)}: how a shard_map's in_specs lay a parameter out in its body
InSpecs = Mapping[str, tuple[tuple[int, tuple[str, ...], tuple[int, ...]], ...]]

@dataclass(frozen=True)
class Use:
    """One contraction or lookup of a parameter in the forward pass.

    Attributes:
        id: index in :attr:`Dataflow.uses`.
        path: the parameter's path (as in ``Plan.decisions``).
        op: ``dot``, ``conv``, ``gather`` (embedding lookup) or ``onehot``
            (one-hot matmul lookup).
        contracted: parameter dims summed over (for lookups: the indexed dims).
        kept: parameter dims that survive into the output.
        batch: parameter dims that are ``dot_general`` batch dims (experts).
        scan_length: trip count when the parameter enters a ``scan``/``while``
            body unchanged at every step (a cell's kernel), else 0.
        rows: for ``dot``/``onehot`` without batch dims, the rows of the activation it
            contracts as traced (the product of the activation's dims that are not
            contracted: the tokens, patches or frames the layer sees); for ``conv``, the
            positions of its output (batch times output window positions: a strided
            front end's are fewer than its input's frames); else 0.
        in_rows: for ``conv``, the positions of its input (batch times input window positions: more than
            ``rows`` for a strided convolution, fewer for a transposed one, StyleGAN2's upsampling), the rows
            of its input gradient; else 0.
        dtype: for ``dot``/``onehot``, its output's dtype as traced (what its tensor-parallel collectives move: a
            bf16 model's activations even when its inputs are ids); for ``gather``, its table's; else "".
        grouped: for a grouped ``conv`` (``feature_group_count > 1``), the elements of its
            input plus its output as traced: XLA's SPMD partitioner does not split a grouped
            convolution's batch, so it gathers both over the batch axes; 0 for a depthwise one
            (one input channel per group), whose batch it splits; else None.
        per_head: for ``dot``, the factor of ``rows`` from its input's dims that a reshape cut out of another
            matmul's output features (attention heads: a weight shared across heads, Performer's random features
            ``bshd,md->bshm`` or a per-head Dense, reads ``b * s * h`` rows for ``b * s`` tokens); else 1.
        grouped_in: for a grouped ``conv``, the elements of its input alone (XLA:TPU gathers only its
            input, over a tensor axis splitting its kernel: :mod:`tpflax._src.cost.grouped`); else None.
        from_input: the activation it contracts is computed from no parameter (the model's
            inputs: mel features, pixels): the backward computes no gradient of it.
        fixed: for ``gather``, its indices are computed from no model input (``arange``
            positions): the same rows whatever the batch, so XLA reduces its gradient over the batch.
        looked: for ``gather``, the shape of its indices less the index vector dim: the rows it
            looks up (``(8, 512)`` for position ids broadcast to the batch, as HF's are; ``(1, 512)``
            for ``arange(512)[None, :]``, broadcast after the lookup).
    """

    id: int
    path: str
    op: str
    contracted: tuple[int, ...]
    kept: tuple[int, ...]
    batch: tuple[int, ...] = ()
    scan_length: int = 0
    rows: int = 0
    dtype: str = ""
    grouped: int | None = None
    from_input: bool = False
    fixed: bool = False
    looked: tuple[int, ...] = ()
    in_rows: int = 0
    grouped_in: int | None = None
    per_head: int = 1

    @property
    def token_rows(self) -> int:
        """:attr:`tokens` less the heads its rows count (:attr:`per_head`): the batch's tokens it reads."""
        return self.tokens // max(self.per_head, 1)

    @property
    def tokens(self) -> int:
        """The rows of a matmul (``dot``/``onehot``), else 0: what the planner's chooser prices
        per token (a convolution's positions are not the model's tokens)."""
        return self.rows if self.op in ("dot", "onehot") else 0


@dataclass(frozen=True)
class Product:
    """A product of two activations with free dims on both sides, other than the one that reads the
    previous such product's output: the ``q @ k`` of an attention layer (``batch x heads x queries x
    keys``), whose probabilities the backward pass keeps (``probs @ v`` reads them).

    Attributes:
        shape: its output's shape as traced.
        count: how many times the program runs it (the trip counts of the scans around it).
        tags: per output dim, the ``(use id, param dim)`` it carries: the heads dim carries
            the q and k kernels' head dims, which say how a plan splits it.
        softmax: bytes per element of the ``exp`` of the scores' shape between this product and the
            one reading its probabilities (the softmax's dtype: float32 where the layer upcasts the
            scores, a Llama's; the input's in flax's ``dot_product_attention``); 0 if none was seen.
    """

    shape: tuple[int, ...]
    count: int = 1
    tags: tuple[tuple[tuple[int, int], ...], ...] = ()
    softmax: int = 0


@dataclass(frozen=True)
class FftRead:
    """One ``jnp.fft`` (``lax.fft``) of an activation or of a weight: what XLA:CPU's SPMD partitioner gathers.

    It does not partition an FFT: every FFT operand split over any mesh axis is all-gathered whole (on the
    batch axes too), the transform run whole on every device and its output sliced back (measured,
    XLA:CPU data=2,model=4, a Hyena LM: each RFFT's and IRFFT's operand gathered over model then data,
    and backward each transpose's, the output's gradient, alike). XLA:TPU partitions them.

    Attributes:
        shape: the operand's shape as traced (the transformed dims last).
        itemsize: the operand's bytes per element.
        out_shape: the output's shape (its gradient is the backward transform's operand).
        out_itemsize: the output's bytes per element.
        tags: per operand dim, the ``(use id, param dim)`` keys it carries (the kernel dims whose split splits
            it); the transformed dims carry none.
        mixed: the transformed dims.
        fed: computed from the model's inputs: its leading dim is the batch's when it has the sample's size.
        live: computed from parameters: the backward transforms its output's gradient.
        count: how many times the program runs it (the trip counts of the scans around it).
    """

    shape: tuple[int, ...]
    itemsize: int
    out_shape: tuple[int, ...]
    out_itemsize: int
    tags: tuple[frozenset[tuple[int, int]], ...] = ()
    mixed: tuple[int, ...] = ()
    fed: bool = False
    live: bool = False
    count: int = 1


@dataclass(frozen=True)
class Crossing:
    """Rows of an input-derived activation gathered (``h[senders]``) or scattered (``segment_sum(m, receivers)``)
    along its leading dim at indices from the inputs: the step splits that dim over the batch axes like a batch,
    so the rows cross devices (a graph's nodes and edges; :func:`tpflax._src.cost.crossing.crossing_items`). Or
    rows written per example at ``(arange(b), idx)`` (Mixture-of-Depths' routed tokens put back), or read per
    example there (BERT's masked positions, ``x[arange(b)[:, None], pos]``), whose batch index XLA reads as data,
    not as a batching dim.

    Attributes:
        kind: ``"gather"``, ``"scatter"``, ``"spread"`` (the per-example write) or ``"pick"`` (the per-example
            read).
        whole: elements of the indexed array (a gather's operand, a scatter's result).
        rows: elements of the moved rows (a gather's output, a scatter's update).
        itemsize: bytes per element.
        key: which array a gather reads (gathers of one operand share its reshard); a scatter's own.
        live: the backward moves the gradient back (a gather's operand, a scatter's update is computed from
            parameters): a gather's gradient is scattered, a scatter's gathered.
        count: how many times the program runs it (the trip counts of the scans around it).
        indices: bytes of a ``"spread"``'s or ``"pick"``'s index array (XLA moves it with the rows); 0
            otherwise.
    """

    kind: str
    whole: int
    rows: int
    itemsize: int
    key: int
    live: bool = False
    count: int = 1
    indices: int = 0


@dataclass(frozen=True)
class Edge:
    """A tagged activation dim produced by one use and summed by another.

    Attributes:
        src, dst: parameter paths of the producing and consuming use.
        src_use, dst_use: their :class:`Use` ids.
        src_dim, dst_dim: parameter dims on both sides.
        limit: gcd of the activation dim sizes along the way; a split of the
            producer's dim over ``n`` devices stays local only when ``n`` divides it.
        via: the ops passed on the way (``("logistic", "mul")`` for SwiGLU).
    """

    src: str
    src_use: int
    src_dim: int
    dst: str
    dst_use: int
    dst_dim: int
    limit: int
    via: tuple[str, ...] = ()


@dataclass(frozen=True)
class Collective:
    """One collective a ``shard_map`` body calls by hand (``all_gather``, ``ppermute``...).

    Attributes:
        kind: as :data:`tpflax.hlo.KINDS` names it.
        axes: the mesh axes of its group.
        size: ``S`` of :func:`tpflax.hlo.ring_bytes`: bytes of the full buffer on one device.
        group: devices per group.
        count: executions per step (the trip counts of the loops around it).
        source: the primitive, and ``(backward)`` for the transpose of one.
        carries: the parameters whose kept dims its operand carries (a row's partial outputs a body sums or
            reduce-scatters by hand).
        item: bytes per element of its buffer (0: unknown), which XLA:CPU widens to float32 from 16 bits.
    """

    kind: str
    axes: tuple[str, ...]
    size: float
    group: int
    count: int
    source: str
    carries: frozenset[str] = frozenset()
    item: int = 0


@dataclass(frozen=True)
class Dataflow:
    """What tracing a model's forward pass found.

    Attributes:
        paths: every parameter path, in tree order.
        uses: contractions and lookups of parameters, in program order.
        edges: producer -> consumer links along summed dims.
        escapes: ``{(use id, param dim): why}`` for kept dims whose activation is
            reduced, sliced or mixed before any parameter contraction sums it.
        outputs: ``(use id, param dim)`` whose activation dim reaches the model output.
        features: of ``outputs``, those on an output's last dim, its features (a head's logits), not its
            tokens (gMLP's ``(seq, seq)`` token-mixing weight keeps the sequence dim through to the logits).
        recurrent: use ids whose output returns to the carry of the scan that
            applies them at every step (recurrent cells).
        biases: ``{path: (use id, {param dim: kept param dim of the use})}`` for
            parameters added straight to a use's output.
        channelwise: ``{path: (use id, {param dim: kept param dim of the use})}`` for depthwise
            convolution kernels (one output channel per input channel: Mamba's conv1d, MobileNet's
            3x3): their output channels are their input's, which that use's kept dim made, so
            the kernel is split like that use's output and the split passes through.
        elementwise: paths combined elementwise with activations (norm scales...).
        combined: ``{path: (leaf dims read, ...)}``, one entry per elementwise combination of the parameter
            with an activation: each its own partial gradient, summed over the batch (StyleGAN2's
            modulated conv weight, scaled per example by its style for the demodulation and also convolved).
        channels: ``{path: {use id: {param dim: kept param dim of the use}}}`` for parameters combined
            elementwise with an activation whose dims a use's output features made (Mamba's ``D`` times the
            conv's output, ``A_log`` times ``dt_proj``'s): per-channel parameters, split like that output.
        scanned: ``{path: leaf dim}`` for parameters sliced by a ``scan`` (``nn.scan`` stacks).
        fused: ``{(use id, param dim): pieces}`` for kept dims whose activation is cut
            into equal pieces (``split``, aligned slices) that go on separately: a
            fused q/k/v (or gate/up) kernel.
        n_eqns: equations visited (sub-jaxprs included).
        remat: the share of the program's contractions (``dot_general`` and convolution
            equations, a scan body's once) inside a rematerialised call (``jax.checkpoint``,
            ``nn.remat``, ``nnx.remat``).
        remat_calls: the outermost rematerialised calls as they run (a scan body's once per iteration):
            the layers a remat'd step recomputes one at a time.
        shared: use ids of contractions whose activation input something other than
            a parameter contraction also reads (a post-norm block's residual add), or that read
            their own dtype cast of an input other contractions read too (a bfloat16 Dense over a
            float32 norm output); see :mod:`tpflax._src.trace.sharing`.
        split_sums: ``(kernel dims, elements, runs)``: a product of two activations summing those kernel
            dims' features (forward: its contracted dims; backward: a side's free dims, summed into the
            other side's gradient) all-reduces that many elements per run when one is split.
        broadcast_sums: the same for an elementwise product one side of which lax broadcasts along kernel dims the
            other carries (Mamba's scan copying B over d_inner): backward, that side's gradient sums them. The
            estimate prices them with :attr:`split_sums`; the planner does not read them yet (its chooser, seeing
            a MoE's ``h * gates[..., None]`` sum the ffn dim, took a stacked experts' split over the tensor axis
            that compiles to 1.026x Megatron's collectives, the experts' own estimate being 0.958 of compiled:
            ``tests/test_moe_tensor_axis.py``).
        split_grads: ``(kernel dims, other kernel dims, elements, runs)``: a product of two activations whose one side
            contracts the first kernel dims' features against the other side's (the second, maybe none): a split
            of the first that does not split the second leaves the other side's gradient (that many elements per
            run) split on those features, gathered to go on (:func:`tpflax._src.cost.estimate.split_grad_gathers`).
        products: the attention scores' ``q @ k`` products (see :class:`Product`), in program
            order; of a ``cond``'s branches, the largest's.
        branches: ``{(use id, param dim): (use ids, ...) per piece}`` for kept dims cut into
            unequal pieces (``jnp.split``) that reach different contractions: a parallel block's
            fused ``[q | k | v | gate | up]``, whose q reaches the attention's output projection and
            whose gate and up reach the MLP's down projection.
        cuts: ``{(use id, param dim): (piece sizes, indices of the pieces read whole)}`` for the
            :attr:`fused` dims cut into unequal pieces; a piece read whole (an MQA key or value, summed
            against the queries) ends its chain while the others reach a contraction.
        concats: ``{(use id, param dim): input sizes}``: a kernel dim that contracts a concatenation of other
            kernels' outputs (a parallel block's ``concat([attn_out, gelu(up)])`` read by one output projection):
            split contiguously, its shards do not follow the inputs' own, and XLA reshards the inputs (the mirror
            of a :attr:`cuts` kernel's, priced by :func:`tpflax._src.cost.reshard.concat_items`).
        concat_again: ``{(use id, param dim): (use id, param dim)}``: a :attr:`concats` kernel dim contracting the same
            concatenation as an earlier one (xLSTM's ``fgate`` beside ``igate``, both reading ``concat([q, k, v])``):
            split alike, XLA reshards the concatenation once for both.
        collectives: the explicit collectives of ``shard_map`` bodies that move data (see
            :class:`Collective`), forward and, for a value computed from parameters, the backward's.
        views: the :attr:`fused` dims whose pieces a reshape cut apart: the output reshaped to
            ``(pieces, heads, head_dim)`` and indexed on the pieces (timm's ``qkv[0], qkv[1], qkv[2]``),
            not split on the flat dim (see :mod:`tpflax._src.cost.reshard`).
        padded: the :attr:`fused` dims cut into equal pieces by static slices (``xz[..., :d], xz[..., d:]``,
            Mamba's in_proj) rather than ``jnp.split``: the backward pads each piece's gradient back into
            the fused dim, which XLA reshards otherwise than a split's concatenate (see
            :mod:`tpflax._src.cost.reshard`).
        spread: ``{(use id, param dim): rows}``: the most rows of an activation that the kept dim's
            output was combined with elementwise (its size times the rows is the combination's size). More
            rows than the use reads is a small activation broadcast over a larger one: DiT's adaLN
            modulation, one row per example, scaling and gating the residual stream of every token.
        alongside: ``((use id, param dim), (use id, param dim))``: kept dims of two uses whose outputs an
            elementwise op combines along one dim, from two operands (a GLU's gate and up; a diffusion ResNet's
            first conv and its time embedding, added; StyleGAN2's conv and the next layer's style, multiplied).
        grown: ``{(use id, param dim): rows}``: the most rows the kept dim's output reached through a
            contraction with a value made of neither parameters nor inputs that has more rows than it reads: an
            interpolation (``jax.image.resize``'s weight matrices), which carries a split along. More rows than
            the use reads is an output upsampled before it is read whole (SegFormer's and FPN's per-stage heads),
            where XLA gathers it.
        resequenced: ``(use id, param dim)`` whose output a reshape merged, as the minor part, into a dim
            whose major part is a row dim (no parameter tag): Hourglass's linear upsampling, ``(b, s/k, k*d)
            -> (b, s, d)``. Split, XLA carries the split into the rows of every layer after it and reshards
            them (all-gathers, all-to-alls and permutes far larger than one gather of the output).
        reduced: ``(use id, param dim)`` whose output a sum, max or min reduced over that dim, row by row (a
            norm's statistics, an RBM's log-cosh sum over its hidden units): split, each shard reduces its part
            and XLA all-reduces one value per row.
        gated: ``((use id, param dim), (use id, param dim))``: kept dims of two uses whose activations are
            multiplied elementwise along that dim (VAN's ``u * attn``, a 1x1 conv's output gating its block's
            input): split on one, the other's gradient comes out split there (:meth:`meets`).
        row_axes: the mesh axes (size > 1) a ``shard_map``'s in_specs cut an activation's rows over (its
            dims that carry no kernel's features: context-parallel attention's sequence over ``model``).
        grad_deps: ``{use id: bit mask}`` of the parameters (bit ``i`` is ``paths[i]``) the activation a
            ``dot``/``conv`` use contracts is computed from; -1 where the walk lost track. The backward
            computes that activation's gradient only if one of them is trained.
        inputs: ``{use id: group}`` for ``dot`` uses: uses reading one activation (or a view of it) share
            a group (:func:`tpflax._src.trace.sharing.read_groups`; a self-attention's q, k and v).
        apart: :attr:`inputs`, a value a model's ``with_sharding_constraint`` makes counted as another
            (MaxText constrains a block's q input and its k/v input apart: XLA gathers each split copy apart).
        dead: parameters the model's outputs do not depend on and no traced use reads (jax's dead-code
            elimination of the traced program): a decoder's cross-attention when it runs without an
            encoder (``FlaxBartForCausalLM``). Their gradients are zeros, for which XLA compiles no
            collective, and no layer computes with them.
        no_grad: float parameters whose tangent reaches no output (:func:`tpflax._src.trace.dataflow.no_grad_params`:
            read only through ``jax.lax.stop_gradient``, a frozen encoder's kernels), dead ones included: live in
            the forward, but their gradient is structurally zero and XLA compiles no gradient collective for them.
        sliced: ``{path: fraction}`` for parameters every read of which is a static ``slice`` (UViT's learned
            position table ``pos[:, :n]``, sized for the largest image): the part of the leaf the slices'
            window covers. Its gradient is zero outside the window, and XLA sums only the window over the
            batch axes (the pad after the all-reduce).
        constraints: ``(use id, param dim, mesh axes)``: a kept dim whose activation a ``with_sharding_constraint``
            lays out over those mesh axes (:mod:`tpflax._src.trace.constraints`), whatever the plan; no axes,
            ``()``, for a dim it replicates.
        split_widths: ``(width, mesh axes)``: an untagged dim of that width of an activation (not a constant)
            that a ``with_sharding_constraint`` lays out over those axes (a tagged one is in :attr:`constraints`).
        expanded: ``{use id: (contraction, elements, item bytes, batch sizes)}``: the array a contraction with
            activations reads as its kernel where that is not the parameter's own value but one an op made of it (a
            cast, a view, a lookup at constant indices, a product with constants, a broadcast); ``contraction``, the
            contraction's place in the walk, tells the uses one contraction makes (of several parameters) from the
            others; ``batch sizes``: the sizes of its ``dot_general`` batch dims no parameter dim makes (the examples,
            for a weight broadcast over them; the irreps of a product with constants batched over them).
        streamed: ``(use id, param dim)``: a tag one operand of an add carries and the other does not (an
            attention's output projection added onto the residual stream; also the stream's own tags there, and
            either of two differently made sums, an LSTM's ``W_x x + W_h h``): past the stream's next norm it
            carries no tag, so a constraint on the stream there records only its width (:attr:`split_widths`),
            which the estimate matches (:func:`tpflax._src.cost.whole._stream_ends`).
        added: ``{(use id, param dim): {(use id, param dim), ...}}``: every tag one operand of an add or a
            subtraction carries and the other does not, :attr:`streamed`'s and also those whose other operand was
            computed from the tagged value (a GLU stem's product, onto which each later block adds its output;
            ``x - mean(x)``), with the tags of the operands it was added to (a ResNet block's last conv: the
            stream's).
        in_specs: ``{path: ((leaf dim, mesh axes, their sizes), ...)}``: how the first ``shard_map`` a parameter
            enters lays its dims out (each dim its in_spec splits, over the axes of size > 1 of that
            shard_map's mesh): its layout inside the body, whatever the plan's.
        direct: ``dot`` uses whose activation is a value a ``with_sharding_constraint`` or a ``shard_map``'s
            out_specs laid out, read as it is (no op between): where the constraint replicates a dim the plan
            splits, XLA gathers such a reader's kernel whole for the backward product; with an op between (a
            relu) it gathers the activation's gradient instead (:func:`tpflax._src.cost.whole.replicated_items`).
        derived: ``dot``, ``conv`` and ``gather`` uses whose kernel or table is not the parameter's own value but one an op
            made of it (a dtype cast, Flax's ``Dense(dtype=bfloat16)``; a reshape, a negation; a scanned stack's
            slice). XLA's sharding propagation lays such a value out as the matmul prefers, where the parameter
            itself keeps the layout it was placed in: a whole kernel read this way that contracts split features
            is sliced to them and its partial outputs summed, however wide
            (:func:`tpflax._src.cost.disagree.kernel_reads`).
        crossings: each gather or scatter of ``crossed``, and each per-example pick or spread (rows read or
            written at ``(arange(b), idx)``, recorded here only) (:class:`Crossing`: what it moves).
        ffts: words for each FFT of an activation computed from the inputs (``"RFFT of float32[4, 64]"``).
        fft_reads: each ``fft`` of an activation or a weight as traced (:class:`FftRead`: its operand's and output's
            shapes, and the tags of the parameter dims it reaches): XLA:CPU gathers every FFT operand whole.
        parted: ``{path: {leaf dim: major size}}``: a stored dim a contraction reads cut into ``(major, minor)`` (DBRX's
            experts stored ``(E * f, d)`` read as ``(E, f, d)``: ``{0: E}``), which a split of the stored dim runs on
            into past the major size where :func:`tpflax._src.trace.reshape.spill` allows (4 experts over 8 ranks).
        batch_reads: ``dot`` uses whose activation has a dim carrying the batch (the sample's leading dim, followed
            through the forward: :func:`tpflax._src.trace.batchflags.batch_dims`), wherever it sits: a Swin window
            partition's ``(batch * windows, tokens, c)`` carries it in its leading dim, which is no batch's size.
            XLA splits such an activation over the batch axes as it splits the batch. Empty for a one-example sample.
            With a batch size given (:func:`tpflax._src.trace.dataflow.dataflow`'s ``batch``), only inputs leading
            with it carry the batch.
        unbatched: with a batch size given, the ``dot`` uses whose activation carried a batch only from inputs of
            another leading dim, which the step keeps replicated (a positional table): they run alike on every
            device of the batch axes. Empty without one.
        norm_fed: ``(use id, param dim, use id, param dim, sums)``: a kept dim a norm reduced over (its ``sums``
            per row: a LayerNorm's mean and mean square 2, an RMSNorm's 1) whose normalised value the second use
            contracts straight on its dim, where the tag ends (an :attr:`escapes` entry, no :attr:`edges` one): a
            pre-norm branch ``h + d(LayerNorm(h))`` reading the stream ``h`` writes.
        stream_ends: per sum over a dim carrying tags added onto an activation lacking them (a norm over a residual
            stream, :attr:`added`), the tags that first end there, and the uses recorded before it (a use recorded
            later, a kernel reading the norm's output): one entry per norm of the stream, in order.
    """

    paths: tuple[str, ...]
    uses: tuple[Use, ...]
    edges: tuple[Edge, ...]
    escapes: Mapping[tuple[int, int], str]
    outputs: frozenset[tuple[int, int]]
    recurrent: frozenset[int]
    biases: Mapping[str, tuple[int, Mapping[int, int]]]
    elementwise: frozenset[str]
    scanned: Mapping[str, int]
    combined: Mapping[str, tuple[frozenset[int], ...]] = field(default_factory=dict)
    n_eqns: int = 0
    fused: Mapping[tuple[int, int], int] = field(default_factory=dict)
    shared: frozenset[int] = frozenset()
    remat: float = 0.0
    remat_calls: int = 0
    products: tuple[Product, ...] = ()
    features: frozenset[tuple[int, int]] = frozenset()
    split_sums: tuple[tuple[frozenset[tuple[int, int]], int, int], ...] = ()
    broadcast_sums: tuple[tuple[frozenset[tuple[int, int]], int, int], ...] = ()
    split_grads: tuple[tuple[frozenset[tuple[int, int]], frozenset[tuple[int, int]], int, int], ...] = ()
    channelwise: Mapping[str, tuple[int, Mapping[int, int]]] = field(default_factory=dict)
    branches: Mapping[tuple[int, int], tuple[frozenset[int], ...]] = field(default_factory=dict)
    cuts: Mapping[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    concats: Mapping[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    concat_again: Mapping[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    views: frozenset[tuple[int, int]] = frozenset()
    padded: frozenset[tuple[int, int]] = frozenset()
    spread: Mapping[tuple[int, int], int] = field(default_factory=dict)
    alongside: frozenset[tuple[tuple[int, int], tuple[int, int]]] = frozenset()
    grown: Mapping[tuple[int, int], int] = field(default_factory=dict)
    resequenced: frozenset[tuple[int, int]] = frozenset()
    gated: frozenset[tuple[tuple[int, int], tuple[int, int]]] = frozenset()
    reduced: frozenset[tuple[int, int]] = frozenset()
    collectives: tuple[Collective, ...] = ()
    row_axes: frozenset[str] = frozenset()
    channels: Mapping[str, Mapping[int, Mapping[int, int]]] = field(default_factory=dict)
    examples: int = 1  # the traced sample's leading dim (its first input's)
    # the traced sample's first input's positions: every element of integer ids, the rows of a float input's
    # last dim (a sequence's tokens, an image's pixels, a video's); 0 without an input
    positions: int = 0
    grad_deps: Mapping[int, int] = field(default_factory=dict)
    inputs: Mapping[int, int] = field(default_factory=dict)
    apart: Mapping[int, int] = field(default_factory=dict)
    dead: frozenset[str] = frozenset()
    sliced: Mapping[str, float] = field(default_factory=dict)
    no_grad: frozenset[str] = frozenset()
    constraints: tuple[tuple[int, int, tuple[str, ...]], ...] = ()
    split_widths: frozenset[tuple[int, tuple[str, ...]]] = frozenset()
    streamed: frozenset[tuple[int, int]] = frozenset()
    added: Mapping[tuple[int, int], frozenset[tuple[int, int]]] = field(default_factory=dict)
    expanded: Mapping[int, tuple[int, int, int, tuple[int, ...]]] = field(default_factory=dict)
    in_specs: InSpecs = field(default_factory=dict)
    direct: frozenset[int] = frozenset()
    derived: frozenset[int] = frozenset()
    crossed: tuple[str, ...] = ()
    crossings: tuple[Crossing, ...] = ()
    ffts: tuple[str, ...] = ()
    fft_reads: tuple[FftRead, ...] = ()
    parted: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    batch_reads: frozenset[int] = frozenset()
    unbatched: frozenset[int] = frozenset()
    # per broadcast sum (in order), the kernel dims its broadcast side carries: whose gradient the sum forms
    broadcast_sides: tuple[frozenset[tuple[int, int]], ...] = ()
    norm_fed: frozenset[tuple[int, int, int, int, int]] = frozenset()
    stream_ends: tuple[tuple[frozenset[tuple[int, int]], int], ...] = ()

    def positional(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """``{table: (rows looked up, its dims not indexed)}`` for tables every use of which is a lookup at
        indices computed from no model input that do not carry the batch (GPT-2's ``wpe`` at
        ``arange(T)[None, :]``, T5's relative-position buckets): the backward sums the looked-up rows'
        gradient over the batch before scattering it into the table, so XLA:TPU all-reduces those rows
        (``rows x`` the table's width) over the batch axes, whatever the table's fsdp split
        (benchmarks/tpu_aot_notes.md, twenty-first round). Ids broadcast to the batch before the lookup
        (HF's ``position_ids``) are a lookup like any other. With a one-example sample the two look alike
        and count as not carrying the batch.
        """
        tables: dict[str, tuple[int, tuple[int, ...]]] = {}
        other: set[str] = set()
        for u in self.uses:
            batched = self.examples > 1 and bool(u.looked) and u.looked[0] == self.examples
            if u.op != "gather" or not u.fixed or batched:
                other.add(u.path)
            else:
                rows, _ = tables.get(u.path, (0, u.kept))
                tables[u.path] = (rows + math.prod(u.looked), u.kept)
        return {p: v for p, v in tables.items() if p not in other}

    def meets(self) -> tuple[tuple[str, int, str, int], ...]:
        """``(path, dim, other path, other dim)``: parameter dims that make or read one activation dim (an edge's
        producer and consumer dims, both ways; a bias, a depthwise kernel or a per-channel parameter and the
        kept dim of the use they meet; two uses whose outputs are multiplied, :attr:`gated`). Split on the
        other's dim, a parameter's gradient comes out split there too (:func:`reached_dims`)."""
        out = set()
        for e in self.edges:
            out |= {(e.dst, e.dst_dim, e.src, e.src_dim), (e.src, e.src_dim, e.dst, e.dst_dim)}
        for (ua, da), (ub, db) in self.gated:
            a, b = self.uses[ua].path, self.uses[ub].path
            out |= {(a, da, b, db), (b, db, a, da)}
        follows = [(p, uid, al) for p, (uid, al) in (*self.biases.items(), *self.channelwise.items())]
        follows += [(p, uid, al) for p, by in self.channels.items() for uid, al in by.items()]
        for p, uid, align in follows:
            out |= {(p, ld, self.uses[uid].path, kd) for ld, kd in align.items()}
        return tuple(sorted(out))

    def growth(self, uid: int, dim: int) -> float:
        """How many times the rows use ``uid`` reads its kept ``dim``'s output reaches, upsampled on the way
        (:attr:`grown`); 1.0 where it does not grow."""
        rows, u = self.grown.get((uid, dim), 0), self.uses[uid]
        return rows / u.rows if u.rows and rows > u.rows else 1.0

    def only_reduced(self, uid: int, dim: int) -> bool:
        """Whether use ``uid``'s kept ``dim`` output is only reduced row by row (:attr:`reduced`): no contraction
        reads it, nothing needs it whole, it is not the model's output. Split, XLA all-reduces one value per
        row instead of gathering it."""
        return ((uid, dim) in self.reduced and (uid, dim) not in self.escapes and (uid, dim) not in self.outputs
                and not any(e.src_use == uid and e.src_dim == dim for e in self.edges))

    def dots(self, batched: bool = False) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """``{path: (contracted dims, kept dims)}``: each parameter's first ``dot`` use without batch dims, the
        matmul a constraint's split meets (:mod:`tpflax._src.cost.disagree`); ``batched``: each one's first
        ``dot`` use with batch dims instead (an expert kernel's, ``BSEH,EHM->BSEM``; its kept dims exclude them)."""
        return {p: (tuple(u.contracted), tuple(u.kept)) for p, u in self._first_dots(batched).items()}

    def _first_dots(self, batched: bool = False) -> dict[str, Use]:
        """Each parameter's first ``dot`` use without batch dims (``batched``: with them), as :meth:`dots` reads."""
        out: dict[str, Use] = {}
        for u in self.uses:
            if u.op == "dot" and (bool(u.batch) if batched else not u.batch and u.rows) and u.path not in out:
                out[u.path] = u
        return out

    def cast_to(self) -> dict[str, str]:
        """``{path: dtype}``: parameters every ``dot``, convolution and lookup of which reads a copy an op made of
        them (:attr:`derived`), all in that one dtype (a ``dot``'s output, a lookup's table): a bfloat16 model's
        float32 kernels and tables. Their gradient comes out of those ops in that dtype, and is cast back after it."""
        return {p: next(iter(ds)) for p, ds in self._read_dtypes().items() if len(ds) == 1 and "" not in ds}

    def cast_some(self) -> dict[str, str]:
        """``{path: dtype}``: parameters some ``dot`` or lookup reads as they are and others through a copy in that
        one dtype (GPT-Neo's float32 table: looked up as it is, its transpose cast to bfloat16 for the logits).
        Each read's gradient comes out in its own dtype."""
        return {p: min(ds - {""}) for p, ds in self._read_dtypes().items() if "" in ds and len(ds) == 2}

    def _read_dtypes(self) -> dict[str, set[str]]:
        """``{path: dtypes}`` its ``dot``, convolution and lookup uses read it in: a copy's (:attr:`derived`), "" as it is."""
        seen: dict[str, set[str]] = {}
        for u in self.uses:
            if u.op in ("dot", "conv", "gather"):
                seen.setdefault(u.path, set()).add(u.dtype if u.id in self.derived and u.dtype else "")
        return seen

    def input_reads(self) -> frozenset[str]:
        """The parameters whose every contraction (``dot`` or ``conv``) reads an activation computed from no parameter
        (:attr:`Use.from_input`: the model's own input, a bare attention block's q/k/v projections or a CNN's stem
        reading the pixels): the step differentiates the parameters only, so no gradient of that input is computed
        and a tensor split of the kernel sums no partial input gradients. One fact for the estimate's
        (:attr:`tpflax._src.cost.traced.Traced.widths`: 0) and the chooser's pricing
        (:attr:`tpflax._src.planner.builders.State.no_input_grad`)."""
        every: dict[str, bool] = {}
        for u in self.uses:  # every use: a kernel shared across calls also reading a hidden activation sums its gradient
            if u.op in ("dot", "conv"):
                every[u.path] = every.get(u.path, True) and u.from_input
        return frozenset(p for p, f in every.items() if f)

    def input_grad_deps(self) -> dict[str, int]:
        """``{path: bit mask}`` of the parameters (bit ``i`` is ``paths[i]``) the activations a kernel's ``dot`` and
        ``conv`` uses contract are computed from (:attr:`grad_deps`, -1 where the walk lost track), the uses reading
        the model's own input left out (:meth:`input_reads`). See :meth:`frozen_reads`."""
        deps: dict[str, int] = {}
        for u in self.uses:
            if u.op in ("dot", "conv") and not u.from_input:
                deps[u.path] = deps.get(u.path, 0) | self.grad_deps.get(u.id, -1)
        return deps

    def frozen_reads(self, trainable: Mapping[str, bool]) -> frozenset[str]:
        """The parameters whose contractions read only activations computed from no trained parameter
        (``trainable``: ``{path: trained}``, a path not listed trained): a frozen LoRA base's first layers, the
        first layer behind a frozen embedding. The step computes no gradient of those activations, so a tensor
        split of the kernel sums no partial input gradients. One fact for the estimate
        (:func:`tpflax._src.cost.traced.frozen_inputs`, widths 0) and the chooser
        (:attr:`tpflax._src.planner.builders.State.no_input_grad`)."""
        return frozen_reads(self.input_grad_deps(), self.paths, trainable)

    def derived_dots(self) -> frozenset[str]:
        """The parameters whose :meth:`dots` use reads the kernel through an op (:attr:`derived`)."""
        return frozenset(p for p, u in self._first_dots().items() if u.id in self.derived)


def score_bias_tags(ids: float, width: int, products: Iterable[tuple[float, Iterable[tuple[int, Any]]]]) -> list[Any]:
    """The tags of the score dims a table's lookups are a bias per head of: ``ids`` looked up, ``width`` columns
    each, make a whole multiple of a score product's elements (one row per query-key pair), and the dim has
    ``width`` entries and carries kernels' dims (the q and k heads). ``products``: ``(elements, ((size, tags),
    ...))`` per score product, in ``ids``' units (per step or per example). Graphormer's spatial encoding, a
    relative bias looked up per example: split on its columns with the heads, nothing moves.

    >>> score_bias_tags(8 * 12 * 12, 4, [(8 * 4 * 12 * 12, ((8, ()), (4, ("q", "k")), (12, ()), (12, ())))])
    [('q', 'k')]
    """
    out = []
    for n, dims in products:
        pairs = ids * width / n if n else 0
        if pairs >= 1 and pairs == int(pairs):
            out += [tags for k, tags in dims if k == width and tags]
    return out


def reached_dims(meets: tuple[tuple[str, int, str, int], ...], start: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """The parameter dims ``start`` reaches along :meth:`Dataflow.meets` (``start`` included): the dims whose
    gradient a split of the start dims splits, each meeting the next on one activation dim.

    >>> sorted(reached_dims((("b", 0, "a", 1), ("a", 1, "b", 0), ("c", 0, "b", 0)), {("a", 1)}))
    [('a', 1), ('b', 0), ('c', 0)]
    """
    after: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for p, d, q, e in meets:
        after.setdefault((q, e), []).append((p, d))
    hot, todo = set(start), list(start)
    while todo:
        for nxt in after.get(todo.pop(), ()):
            if nxt not in hot:
                hot.add(nxt)
                todo.append(nxt)
    return hot


def remap_added(added: Mapping[tuple[int, int], Iterable[tuple[int, int]]], to: Callable[[tuple[int, int]], tuple[int, int] | None]
                ) -> dict[tuple[int, int], frozenset[tuple[int, int]]]:
    """:attr:`Dataflow.added` with every tag mapped by ``to`` (None leaves it out): tags that map to one merge
    their partners, and none is its own partner.

    >>> remap_added({(1, 0): {(2, 0)}, (3, 0): {(1, 0)}}, lambda k: (1, k[1]) if k[0] == 3 else k)
    {(1, 0): frozenset({(2, 0)})}
    """
    out: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    for k, others in added.items():
        if (key := to(k)) is not None:
            out[key].update(o for o in map(to, others) if o is not None)
    return {k: frozenset(v - {k}) for k, v in out.items()}


def frozen_reads(grad_deps: Mapping[str, int], paths: Sequence[str], trainable: Mapping[str, bool]) -> frozenset[str]:
    """The paths of ``grad_deps`` (``{path: bit mask of paths}``, :meth:`Dataflow.input_grad_deps`) whose mask names
    parameters but no trained one (``trainable``: ``{path: trained}``, a path not listed trained).

    >>> sorted(frozen_reads({"a": 1, "b": 3, "c": -1, "d": 0}, ("e", "a"), {"e": False, "a": True}))
    ['a']
    """
    trained = 0
    for i, p in enumerate(paths):
        if trainable.get(p, True):
            trained |= 1 << i
    return frozenset(p for p, deps in grad_deps.items() if deps and not deps & trained)
