"""What the cost model reads from a model's traced forward pass, and from the loss it trains with.

:func:`traced_uses` runs the dataflow trace (:mod:`tpflax._src.trace.dataflow`) once
per model and keeps what the estimate prices: tied tables, gradient parts, the rows
each contraction reads, fused kernels, attention-score products. :func:`reads_slice`
traces the ``loss=`` a step is given on the model's abstract output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.cost.batch import dtype_name
from tpflax._src.cost.chain import ChainCall, chain_calls
from tpflax._src.errors import EstimateError
from tpflax._src.mesh import traced_under
from tpflax._src.model import check_scalar_loss
from tpflax._src.trace.records import InSpecs, frozen_reads


@dataclass(frozen=True)
class Scores:
    """One traced attention-score product (``q @ k``, see :class:`tpflax._src.trace.records.Product`).

    Attributes:
        per_example: its elements per example of the batch.
        count: how many times a step runs it (its layers: a scan's trip count).
        dims: per output dim, ``(size, ((param path, param dim), ...))``: the parameter dims
            it carries (the q and k kernels' head dims), which say how far a plan splits it.
        softmax: bytes per element its softmax computes in (:attr:`tpflax._src.trace.records.Product.softmax`;
            0: not seen).
    """

    per_example: float
    count: int
    dims: tuple[tuple[int, tuple[tuple[str, int], ...]], ...]
    softmax: int = 0


@dataclass(frozen=True)
class Traced:
    """What the cost model reads from the traced forward (see :func:`traced_uses`).

    Attributes:
        tied: lookup tables the forward also contracts (the logits of a tied embedding).
        parts: ``{path: n}`` for parameters used whole (every dim read) by ``n > 1``
            separate contractions or lookups, a tied table or a layer called twice
            (ALBERT): each use yields its own partial gradient, and XLA reduces each
            over the batch axes before adding them (measured). Uses of slices
            (experts indexed in a loop, a scan's layers) are one part.
        rows: ``{path: rows per example}`` of the activation a parameter's first
            contraction reads (a ViT layer's patches, a Whisper encoder's frames after
            its strided convolution; an expert kernel's dispatched tokens, every expert's,
            :mod:`tpflax._src.cost.buffers`): the rows its tensor-parallel collectives move,
            whatever the batch's own shape.
        buffers: ``{path: rows}`` of a batch-free buffer an expert kernel's contraction reads
            (GShard's ``(experts, capacity, d)``, the batch summed away by the dispatch): whole on
            every device, whatever the batch (:mod:`tpflax._src.cost.buffers`).
        fused: ``{path: (param dim, pieces)}`` for kernels whose output along that dim
            is cut into equal pieces (a ``[q|k|v]`` kernel; see :mod:`tpflax._src.cost.reshard`), or
            ``(param dim, piece sizes)`` for unequal ones (a parallel block's ``[q|k|v|gate|up]``), then
            the indices of the pieces read whole (an MQA key and value), then whether a reshape
            cut the pieces apart (:attr:`tpflax._src.trace.records.Dataflow.views`), then whether static
            slices cut them, their gradients padded back (:attr:`tpflax._src.trace.records.Dataflow.padded`).
        act_dtype: the dtype most of the contractions' rows come out in (a model that
            computes in bfloat16 from integer ids or float32 pixels).
        shared: kernels whose input gradient XLA:TPU reduces apart from the other readers': something
            other than a parameter contraction also reads their input activation (a post-norm block's
            residual add), or each reader casts it for itself (a bfloat16 Dense over a float32 norm
            output); see :mod:`tpflax._src.trace.sharing`.
        lookups: ``{path: n}`` for tables looked up whole by ``n > 1`` gathers (BART's
            and T5's shared table: the encoder's and the decoder's lookups); counted in
            ``parts`` too. XLA:TPU adds their scatter-adds before reducing them (one
            part for all of them, measured on BART-base, v5e:2x4); XLA:CPU reduces each.
        grouped: ``{path: (input, input plus output) elements per example}`` of a grouped
            convolution: XLA:CPU gathers both over the batch axes and reduces the kernel's gradient
            over every device (measured on RegNet); XLA:TPU gathers its input over a tensor axis
            splitting its kernel (:mod:`tpflax._src.cost.grouped`). ``(0, 0)`` for a depthwise one.
        joined: ``{path: rows of each other use / the first's}`` for a projection applied to
            several inputs whose outputs reach the same contraction (LongT5's
            transient-global keys and values; :func:`tpflax._src.planner.repeats.joined`):
            its pair runs once, and each other input's gradient is summed apart.
        widths: ``{path: elements}`` of the parameter dims its first contraction sums over: the width
            of the activation it reads (``d`` for a gate/up kernel stacked ``(2, d, f)`` and used as
            ``w[0]`` and ``w[1]``, whose first dim is not its input's); a convolution's, its input
            channels; 0 for one reading the model's inputs, whose gradient is not computed.
        slices: ``{path: n}`` for parameters contracted by ``n > 1`` separate contractions of slices of
            them (that stacked gate/up kernel): each yields its own partial input gradient, which
            XLA:CPU all-reduces apart (measured on a Gemma-style MLP, data=2,model=4).
        chained: ``{path: (calls reading the model's input, calls reading an earlier call's output)}`` for a
            kernel contracted whole by several ``dot`` calls (one ``nn.Dense`` called in a Python loop,
            ``x = x + d(f(x))``): the calls its collectives run at, and whose input needs a gradient
            (:func:`_chained`).
        chain: ``{path: calls}`` for a kernel whose plain ``dot`` calls form a chain
            (:func:`tpflax._src.cost.chain.chain_calls`): each call's rows, whether it reads the model's input,
            the rows a contraction reads its output at, and whether it adds it back onto its input's stream; the
            column split's collectives are priced from them as the planner's chooser prices them.
        residual: ``{path: (calls, dims)}`` for a kernel whose ``calls`` plain ``dot`` calls each add their output
            back onto the stream their own input is computed from (``h = inp(x); h = h + d(gelu(h))``; also
            the later calls of a layer chained through the residual): ``dims``, the kernel's kept dims and the
            stream's tags there (``(path, dim)``), which XLA keeps split as the kernel's split output or
            gradient is (:func:`_residual`).
        loss_read: kernels whose every call is a plain ``dot`` whose output reaches the model's output through
            elementwise ops only, read by nothing else (:func:`_loss_read`).
        downstream: ``{path: (calls, norms, gathers, writers)}`` for kernels whose ``calls`` plain ``dot`` calls each
            add their output onto a residual stream that runs on through ``norms`` norms (``gathers`` of them a
            kernel reads) or later calls of other kernels adding onto it (``writers``, their paths), and whether
            every call reads its input off that stream or off no kernel (``fed``; :func:`_downstream`).
        residual_norms: ``{path: sums}`` for those kernels whose calls read that stream through a norm, the sums
            per row the norms all-reduce each way, over the calls (:func:`_residual_norms`).
        slice_reads: ``{path: n}`` for those parameters, the distinct activations their contractions read
            (:attr:`Dataflow.apart`'s groups): one where every slice reads the same input (experts weighted after
            their matmuls), as many as the slices where each reads its own (experts on their dispatched slices).
        remat: most of the model's contractions run inside a rematerialised call
            (``nn.remat``, ``nnx.remat``, ``jax.checkpoint``): the step recomputes its layers.
        remat_layers: then, the outermost rematerialised calls as they run
            (:attr:`tpflax._src.trace.records.Dataflow.remat_calls`): the layers recomputed one at a time.
        erf: kernels whose output reaches the next contraction through ``erf``/``erfc`` (an exact GELU,
            ViT's ``fc1``; a tanh GELU or SiLU passes ``tanh``/``logistic``): XLA:TPU keeps that
            hidden twice in a 16-bit step (:mod:`tpflax._src.cost.forward_end`).
        contractions: ``(path, rows per example, kept dims, dtype)`` of each
            contraction of a parameter (its output's shape): a plain function's layer
            calls, where no module boundary shows them.
        scores: the attention-score products (``q @ k``) the forward forms.
        biased: parameters whose contraction's output gets a bias added (BERT's and BART's logits).
        streams: ``{path: (stream rows over its own, stream width, gathers)}`` for kernels whose output
            scales a larger activation elementwise (DiT's adaLN; :func:`tpflax._src.trace.spread.spread_streams`).
        collectives: the data-moving collectives ``shard_map`` bodies call by hand
            (:attr:`tpflax._src.trace.records.Dataflow.collectives`).
        row_axes: the mesh axes ``shard_map`` in_specs cut activations' rows over
            (:attr:`tpflax._src.trace.records.Dataflow.row_axes`).
        positional: ``{table: (rows looked up, dims not indexed)}``, tables every use of which is a lookup
            at indices computed from no model input that do not carry the batch (GPT-2's ``wpe`` at
            ``arange`` positions): XLA sums the looked-up rows' gradient over the batch, and XLA:TPU
            all-reduces those rows whatever the table's split (:meth:`Dataflow.positional`).
        loops: ``{path: (trip count, looked up)}`` for parameters a ``scan``/``while`` body uses unchanged at
            every step (a recurrent cell's kernels and the biases added to them; a table looked up by the ids
            the scan slices), whether a lookup (a gather) is among those uses: their partial gradients come
            out at every step of the backward loop (see :func:`tpflax._src.cost.gradients.loop_reps`).
        meets: ``(path, dim, other path, other dim)``: the activation dim a parameter dim makes or reads is
            one another parameter dim makes or reads (a contraction's input and the output it sums, a bias,
            a depthwise kernel or a per-channel parameter and the output they meet): split on the other's
            dim, its gradient comes out split there too (:func:`tpflax._src.cost.stream.split_grad_items`).
        product_sums: ``{path: dims}`` for parameter dims whose activation a product of two activations
            sums (:attr:`tpflax._src.trace.records.Dataflow.escapes`; a user MoE's ``bsed,bse->bsd``
            combine over the experts): split over a tensor or expert axis, XLA reshards around that
            product with collectives the estimate does not price (benchmarks/tpu_aot_notes.md).
        grad_deps: ``{path: bit mask}``: the parameters (bit ``i`` is ``param_paths[i]``) the activations its
            contractions read are computed from, OR-ed over its uses; -1 where the trace lost track
            (:attr:`tpflax._src.trace.records.Dataflow.grad_deps`). See :func:`frozen_inputs`.
        param_paths: the traced parameter paths, in tree order.
        conditions: ``{table: kernels}`` for lookup tables looked up at as many rows per example as
            :attr:`streams` kernels of the table's width read (DiT's class embedding ``y_embedder``, one row per
            example, summed into the conditioning vector that the adaLN modulations read): split on its
            features, the table splits that small activation, not the residual stream
            (:func:`tpflax._src.cost.stream.conditioned_leaves`).
        split_sums: ``(kernel dims, elements per example, runs)`` per sum of a product of two activations
            (:attr:`tpflax._src.trace.records.Dataflow.split_sums`, and its ``broadcast_sums``): a plan splitting one of those dims over
            a tensor axis all-reduces that many elements (:func:`tpflax._src.cost.estimate.split_sum_items`).
        split_grads: ``(kernel dims, other kernel dims, elements per example, runs)``
            (:attr:`tpflax._src.trace.records.Dataflow.split_grads`): a gradient a split of the first dims and not
            the second leaves split, gathered (:func:`tpflax._src.cost.estimate.split_grad_gathers`).
        batch_dims: ``{path: dims}``: parameter dims every contraction of it takes as ``dot_general`` batch dims
            (a block-diagonal gate's heads, ``...hi,hij->...hj``): split over a tensor axis, its input is split
            alike and its input gradient comes out split, not as partial sums (:mod:`tpflax._src.cost.comm`).
        batched: expert kernels contracted only with batch dims: they read a dispatched buffer
            (:func:`tpflax._src.cost.buffers.batched_paths`), whose rows are in ``rows`` or ``buffers``.
        ragged: ``{path: dims}``: the kernel dims a ``jax.lax.ragged_dot`` takes as its groups (an expert kernel's
            experts, ``(tokens, d) x (experts, d, f)``): no dim of the rows carries them, so a plan splitting them
            over a tensor axis sums that contraction's output and its input gradient there
            (:func:`tpflax._src.cost.comm.ragged_split_items`).
        dead: parameters the outputs do not depend on (:attr:`tpflax._src.trace.records.Dataflow.dead`).
        sliced: ``{path: fraction}``, parameters read only through static slices, the part the slices cover
            (:attr:`tpflax._src.trace.records.Dataflow.sliced`): the gradient all-reduce moves that part.
        no_grad: live parameters whose gradient is structurally zero (read only through ``stop_gradient``:
            :attr:`tpflax._src.trace.records.Dataflow.no_grad`).
        dots: ``{path: (contracted dims, kept dims)}`` of each parameter's first ``dot`` use without batch dims.
        batched_dots: the same of each parameter's first ``dot`` use with batch dims (an expert kernel's).
        shard_mapped: the parameters a ``shard_map`` takes, with the layout its in_specs give them in the body
            (:attr:`tpflax._src.trace.records.Dataflow.in_specs`): their matmuls run there, where XLA inserts no
            collective.
        limits: ``{(path, dim, other path, other dim): limit}`` per traced edge: the gcd of the activation dim
            sizes between the two parameter dims (a GQA key kernel's output into the attention output's split
            heads: its key/value heads, however the kernel stores them).
        looked: parameters a lookup reads (a gather or a one-hot matmul at integer ids): a table, whatever its
            kind and however a rule splits it.
        scanned: ``{path: leaf dim}``: parameters a ``scan`` slices one layer off per step
            (:attr:`tpflax._src.trace.records.Dataflow.scanned`), whether or not the plan knows the stack.
        constrained: ``(path, dim, mesh axes)``: parameter dims whose activation the model's own
            ``with_sharding_constraint`` lays out over those axes (:attr:`tpflax._src.trace.records.Dataflow.constraints`;
            priced by :func:`tpflax._src.cost.whole.constrained_dims`).
        grown: ``{path: rows its output reaches upsampled / rows it reads}`` (:func:`_grown`).
        in_rows: ``{path: input positions / output positions}`` of a convolution whose input gradient is not
            as large as its output (strided: more; transposed, StyleGAN2's upsampling: fewer); its first use.
        combined: ``{path: n}`` for parameters contracted whole and also combined whole with an activation ``n``
            times (StyleGAN2's modulated conv weight, scaled per example for its demodulation): ``n`` more
            gradient parts, each reduced over the batch apart (counted in no ``parts``: they are not calls).
        reduced: parameters whose contraction's output is only reduced row by row
            (:meth:`tpflax._src.trace.records.Dataflow.only_reduced`: an RBM's hidden units, summed).
        split_widths: ``(width, mesh axes)`` of activation dims a model's constraint splits
            (:attr:`tpflax._src.trace.records.Dataflow.split_widths`).
        streamed: ``(path, dim)``: kernel dims whose output is added onto a residual stream
            (:attr:`tpflax._src.trace.records.Dataflow.streamed`).
        expanded: ``{path: ((contraction, elements, item bytes), ...)}``: the kernels its contractions with
            activations read that an op made of it alone (a cast, a view, NetKet's symmetry-expanded kernels:
            :attr:`tpflax._src.trace.records.Dataflow.expanded`).
        apart: ``{path: group path}`` of each parameter's first ``dot`` use: uses reading one value share the
            group (:attr:`tpflax._src.trace.records.Dataflow.apart`: a model's sharding constraint makes another).
        direct: kernels that contract a value a model's constraint (or a ``shard_map``'s out_specs) laid out, as it
            is (:attr:`tpflax._src.trace.records.Dataflow.direct`).
        derived: kernels whose first plain ``dot`` reads them through an op, a dtype cast or a reshape
            (:meth:`tpflax._src.trace.records.Dataflow.derived_dots`).
        cast_to: ``{path: dtype}`` of parameters every matmul and lookup reads cast to that dtype
            (:meth:`tpflax._src.trace.records.Dataflow.cast_to`).
        cast_some: ``{path: dtype}`` of parameters some matmul or lookup reads as they are and others cast to that
            dtype (:meth:`tpflax._src.trace.records.Dataflow.cast_some`).
        unbatched: with the batch size given, the parameters (and their biases) whose every use is a ``dot`` reading
            an activation that carries the batch only from inputs of another leading dim, which the step keeps
            replicated: their gradients are alike on every device of the batch axes, nothing to sum.
        batch_read: parameters whose first ``dot`` reads an activation a dim of which carries the batch
            (:attr:`tpflax._src.trace.records.Dataflow.batch_reads`), wherever it sits: Swin's window attention
            reads ``(batch * windows, tokens, c)``, split over the batch axes though its leading dim is no batch's
            size (:meth:`tpflax._src.cost.scope.Scope.nbytes`).
    """

    tied: frozenset[str] | None = None
    parts: Mapping[str, int] | None = None
    rows: Mapping[str, float] | None = None
    fused: Mapping[str, tuple[int, int | tuple[int, ...], tuple[int, ...], bool]] | None = None
    act_dtype: str | None = None
    shared: frozenset[str] | None = None
    lookups: Mapping[str, int] | None = None
    grouped: Mapping[str, tuple[float, float]] | None = None
    joined: Mapping[str, tuple[float, ...]] | None = None
    widths: Mapping[str, int] | None = None
    slices: Mapping[str, int] | None = None
    buffers: Mapping[str, float] | None = None
    contractions: tuple[tuple[str, float, tuple[int, ...], str], ...] = ()  # (path, rows, kept dims, dtype)
    remat: bool = False
    scores: tuple[Scores, ...] = ()
    biased: frozenset[str] = frozenset()
    streams: Mapping[str, tuple[float, int, int]] | None = None
    collectives: tuple = ()
    row_axes: frozenset[str] = frozenset()
    meets: tuple[tuple[str, int, str, int], ...] = ()
    positional: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    loops: Mapping[str, tuple[int, bool]] | None = None
    remat_layers: int = 0
    erf: frozenset[str] = frozenset()
    product_sums: Mapping[str, frozenset[int]] = field(default_factory=dict)
    grad_deps: Mapping[str, int] = field(default_factory=dict)
    param_paths: tuple[str, ...] = ()
    split_sums: tuple[tuple[frozenset[tuple[str, int]], float, int], ...] = ()
    edges: frozenset[tuple[str, str]] | None = None
    contracted: frozenset[str] = frozenset()
    batched: frozenset[str] = frozenset()
    conditions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    dead: frozenset[str] = frozenset()
    batch_dims: Mapping[str, frozenset[int]] = field(default_factory=dict)
    sliced: Mapping[str, float] = field(default_factory=dict)
    looked: frozenset[str] = frozenset()
    no_grad: frozenset[str] = frozenset()
    dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    scanned: Mapping[str, int] = field(default_factory=dict)
    constrained: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    limits: Mapping[tuple[str, int, str, int], int] = field(default_factory=dict)
    grown: Mapping[str, float] = field(default_factory=dict)
    in_rows: Mapping[str, float] = field(default_factory=dict)
    combined: Mapping[str, int] = field(default_factory=dict)
    reduced: frozenset[str] = frozenset()
    apart: Mapping[str, str] = field(default_factory=dict)
    split_widths: frozenset[tuple[int, tuple[str, ...]]] = frozenset()
    streamed: frozenset[tuple[str, int]] = frozenset()
    expanded: Mapping[str, tuple[tuple[int, int, int], ...]] = field(default_factory=dict)
    crossed: tuple[str, ...] = ()  # (Dataflow.crossed)
    crossings: tuple = ()  # (Dataflow.crossings: trace.records.Crossing)
    ffts: tuple[str, ...] = ()  # (Dataflow.ffts)
    # per FFT (Dataflow.fft_reads): (operand bytes, output bytes, the (path, dim) keys of each operand dim, whether
    # its leading dim is the batch's (then the bytes are per example), whether its output has a gradient, runs)
    fft_reads: tuple[tuple[float, float, tuple[frozenset[tuple[str, int]], ...], bool, bool, int], ...] = ()
    # {path: {leaf dim: major size}}: a stored dim its contractions read cut into (major, minor) (DBRX's experts
    # stored (E * f, d), read as (E, f, d); Dataflow.parted)
    parted: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    # {path: (kernel dim, input sizes)}: a kernel dim contracting a concatenation of kernels' outputs (Dataflow.concats)
    concats: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    # {path: path}: a concats kernel reading the same concatenation as an earlier one (Dataflow.concat_again)
    concat_again: Mapping[str, str] = field(default_factory=dict)
    # {table: ids per example its lookups from the inputs gather, together}: a multi-codebook model's tables each
    # look up one codebook's ids of a (batch, codebooks, steps) input, not all of them; a shared table the
    # encoder's ids and the decoder's
    lookup_rows: Mapping[str, float] = field(default_factory=dict)
    batched_dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    shard_mapped: InSpecs = field(default_factory=dict)
    direct: frozenset[str] = frozenset()
    derived: frozenset[str] = frozenset()
    cast_to: Mapping[str, str] = field(default_factory=dict)
    cast_some: Mapping[str, str] = field(default_factory=dict)
    slice_reads: Mapping[str, int] = field(default_factory=dict)
    ragged: Mapping[str, frozenset[int]] = field(default_factory=dict)
    batch_read: frozenset[str] = frozenset()
    unbatched: frozenset[str] = frozenset()
    split_grads: tuple[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]], float, int], ...] = ()
    chained: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    chain: Mapping[str, tuple[ChainCall, ...]] = field(default_factory=dict)
    residual: Mapping[str, tuple[int, frozenset[tuple[str, int]]]] = field(default_factory=dict)
    # {index into split_sums: (path, param dim) of the broadcast side}: a broadcast sum (Dataflow.broadcast_sums)
    # forms the gradient of the side lax broadcast, whose kernel dims these are (Dataflow.broadcast_sides)
    broadcast_from: Mapping[int, frozenset[tuple[str, int]]] = field(default_factory=dict)
    residual_norms: Mapping[str, int] = field(default_factory=dict)
    loss_read: frozenset[str] = frozenset()
    downstream: Mapping[str, tuple[int, int, int, tuple[str, ...], bool]] = field(default_factory=dict)


def frozen_inputs(t: Traced, trainable: Mapping[str, bool]) -> frozenset[str]:
    """The parameters whose contractions read only activations computed from no trained parameter
    (``trainable``: ``{path: Decision.trainable}``): a frozen LoRA base's first layers, behind a frozen
    embedding. The backward computes no gradient of those activations (XLA drops it: nothing trained
    is upstream), so a tensor-split column there sums no partial input gradients.

    >>> frozen_inputs(Traced(grad_deps={"a": 1, "b": 3, "c": -1}, param_paths=("e", "a")), {"e": False, "a": True})
    frozenset({'a'})
    """
    return frozen_reads(t.grad_deps, t.param_paths, trainable)  # the chooser's fact too (Dataflow.frozen_reads)


def traced_uses(m: Any, shapes: Mapping[str, tuple[int, ...]], mesh: Any = None, batch: int | None = None) -> Traced:
    """What the cost model reads from the traced forward (see :class:`Traced`); all None when it cannot be traced.
    ``batch``: the batch size the user gave (``estimate(plan, tx, 8)``): an input leading with another size holds
    no batch (:func:`tpflax._src.trace.batchflags.batch_lead`), as ``make_train_step(batch=8)`` keeps it replicated.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> emb = jax.ShapeDtypeStruct((10, 4), "float32")
    >>> fn = lambda v, ids: v["emb"][ids] @ v["emb"].T
    >>> t = traced_uses(as_model(fn, (jax.ShapeDtypeStruct((2, 3), "int32"),), {"emb": emb}), {"emb": (10, 4)})
    >>> sorted(t.tied), t.parts, t.rows
    (['emb'], {'emb': 2}, {'emb': 3.0})
    """
    from tpflax._src.model_cache import cached
    from tpflax._src.trace.dataflow import mesh_key

    # a size every input leads with (or none does) changes nothing: the trace as without it
    leads = _leads(m, batch)
    batch = batch if batch is not None and _leads(m) != leads else None
    given = () if batch is None else (("batch", batch),)
    return cached("uses", m, lambda: _traced_uses(m, shapes, leads, mesh, batch),
                  (*sorted(shapes.items()), mesh_key(mesh), *given),
                  shared=(*sorted(shapes.items()), "any mesh", *given),
                  free=lambda t: not (t.constrained or t.split_widths or t.row_axes or t.collectives
                                           or t.shard_mapped))


def _traced_uses(m: Any, shapes: Mapping[str, tuple[int, ...]], leads: frozenset[int], mesh: Any = None,
                 batch: int | None = None) -> Traced:
    """:func:`traced_uses` on a cache miss; ``leads``: :func:`_leads` of ``m`` and ``batch``."""
    from tpflax._src.cost.buffers import (
        batched_paths,
        batched_rows,
        ragged_buffers,
        ragged_dot,
        ragged_groups,
    )
    from tpflax._src.planner.repeats import merge_uses
    from tpflax._src.trace.contractions import PRODUCT_SUM
    from tpflax._src.trace.dataflow import dataflow
    from tpflax._src.trace.spread import spread_streams

    flow = dataflow(m, mesh=mesh, batch=batch)  # a model that cannot run is a TraceError, as in plan(model=)
    examples = m.batch_size or 1
    ops: dict[str, set[str]] = {}
    whole: dict[str, int] = {}
    rows: dict[str, float] = {}
    lookups: dict[str, int] = {}
    widths: dict[str, int] = {}
    slices: dict[str, int] = {}
    grad_deps = flow.input_grad_deps()  # what frozen_inputs reads, as the chooser does (Dataflow.frozen_reads)
    calls: dict[str, int] = {}  # the uses with rows so far, by path
    input_reads = flow.input_reads()  # their input needs no gradient (the chooser reads the same fact)
    for u in flow.uses:
        ops.setdefault(u.path, set()).add(u.op)
        if u.rows and not u.scan_length:  # a cell's rows repeat at every time step
            calls[u.path] = calls.get(u.path, 0) + 1
            if u.path not in rows:
                rows[u.path] = u.rows / examples
            elif u.op == "conv":
                # a conv shared by calls of several sizes (a RetinaNet head over every FPN level): its calls' mean
                # rows, priced at each call (cost/comm.py), add up to theirs (est 1.66x the compiled before)
                rows[u.path] += (u.rows / examples - rows[u.path]) / calls[u.path]
        if u.op in ("dot", "conv") and u.path in shapes and u.path not in widths:
            # a conv's input channels are listed first, then its window's dims; none where the model's
            # inputs are read: their gradient is not computed
            widths[u.path] = 0 if u.path in input_reads else math.prod(
                shapes[u.path][d] for d in (u.contracted[:1] if u.op == "conv" else u.contracted))
        read = set(u.contracted) | set(u.kept) | set(u.batch)
        if u.path not in flow.scanned and len(read) == len(shapes.get(u.path, ())):
            whole[u.path] = whole.get(u.path, 0) + 1
            if u.op == "gather":
                lookups[u.path] = lookups.get(u.path, 0) + 1
        elif u.path not in flow.scanned and u.op == "dot":
            slices[u.path] = slices.get(u.path, 0) + 1
    # a parameter contracted whole and also combined whole with an activation (StyleGAN2's modulated conv:
    # its weight convolved, and scaled per example by the style for the demodulation): each combination's
    # gradient is one more part, summed over the batch apart (measured, XLA:CPU: the weight's gradient
    # all-reduced twice over data, replicated); not a call, its pair sums nothing more
    combined = {path: n for path, combos in flow.combined.items() if whole.get(path) and path not in flow.scanned
                and (n := sum(all(d in dims or size == 1 for d, size in enumerate(shapes.get(path, ())))
                              for dims in combos))}
    # an expert kernel's batched contraction records no rows: read them off its activation
    batched = batched_paths(flow)
    per_example, buffers = batched_rows(m, batched) if batched else ({}, {})
    rows.update(per_example)
    # ragged_dot experts reading tokens sorted over the whole batch: a batch-free buffer too
    ragged = frozenset(u.path for u in flow.uses if ragged_dot(u))
    if ragged and (sorted_rows := ragged_buffers(m, ragged)):
        buffers = {**buffers, **sorted_rows}
    tied = frozenset(p for p, o in ops.items() if o & {"gather", "onehot"} and "dot" in o)
    fused = {flow.uses[uid].path: (dim, *flow.cuts.get((uid, dim), (pieces, ())), (uid, dim) in flow.views,
                                   (uid, dim) in flow.padded)
             for (uid, dim), pieces in flow.fused.items()}
    by_dtype: dict[str, int] = {}
    for u in flow.uses:
        if u.rows and u.dtype:
            by_dtype[u.dtype] = by_dtype.get(u.dtype, 0) + u.rows
    act = dtype_name(max(by_dtype, key=by_dtype.get)) if by_dtype else None
    shared = frozenset(flow.uses[u].path for u in flow.shared)
    grouped: dict[str, tuple[float, float]] = {}
    for u in flow.uses:
        if u.grouped is not None:
            was = grouped.get(u.path, (0, 0))
            grouped[u.path] = (was[0] + (u.grouped_in or 0) / examples, was[1] + u.grouped / examples)
    joined: dict[str, tuple[float, ...]] = {}
    for u in merge_uses(flow, shapes).uses:
        if u.op.startswith("join:"):
            joined[u.path] = (*joined.get(u.path, ()), u.rows / examples / rows[u.path] if rows.get(u.path) else 1.0)
    contractions = tuple((u.path, u.rows / examples, u.kept, u.dtype)
                         for u in flow.uses if u.op == "dot" and u.rows and not u.batch and u.path in shapes)
    product_sums: dict[str, frozenset[int]] = {}
    for (uid, dim), why in flow.escapes.items():
        if why == PRODUCT_SUM:
            product_sums[flow.uses[uid].path] = product_sums.get(flow.uses[uid].path, frozenset()) | {dim}
    scores = tuple(Scores(math.prod(x.shape) / examples, x.count,
                          tuple((n, tuple(sorted({(flow.uses[u].path, d) for u, d in tags})))
                                for n, tags in zip(x.shape, x.tags, strict=True)), x.softmax)
                   for x in flow.products)
    streams = spread_streams(flow, shapes)
    return Traced(tied, {p: n for p, n in whole.items() if n > 1}, rows, fused, act, shared,
                  {p: n for p, n in lookups.items() if n > 1}, grouped, joined, widths,
                  {p: n for p, n in slices.items() if n > 1}, buffers, contractions, flow.remat >= 0.5,
                  scores, frozenset(flow.uses[uid].path for uid, _ in flow.biases.values()),
                  streams, flow.collectives, flow.row_axes, flow.meets(),
                  flow.positional(),
                  _loops(flow, m), flow.remat_calls if flow.remat >= 0.5 else 0,
                  frozenset(e.src for e in flow.edges if {"erf", "erfc"} & set(e.via)), product_sums,
                  grad_deps, tuple(flow.paths),
                  tuple((frozenset((flow.uses[u].path, d) for u, d in ks), n / examples, c)
                        for ks, n, c in flow.split_sums + flow.broadcast_sums),
                  frozenset((e.src, e.dst) for e in flow.edges),
                  frozenset(u.path for u in flow.uses if u.op in ("dot", "conv")), batched,
                  _conditions(flow, shapes, streams, rows, examples), flow.dead, _batch_dims(flow), dict(flow.sliced),
                  frozenset(u.path for u in flow.uses if u.op in ("gather", "onehot")), flow.no_grad - flow.dead,
                  flow.dots(), dict(flow.scanned),
                  tuple(sorted({(flow.uses[u].path, d, axes) for u, d, axes in flow.constraints})),
                  {(e.src, e.src_dim, e.dst, e.dst_dim): e.limit for e in flow.edges},
                  grown=_grown(flow), in_rows=_in_rows(flow), combined=combined,
                  reduced=frozenset(u.path for u in flow.uses if u.op == "dot" and u.kept
                                    and all(flow.only_reduced(u.id, k) for k in u.kept)),
                  apart=_apart(flow), split_widths=flow.split_widths,
                  streamed=frozenset((flow.uses[u].path, d) for u, d in flow.streamed),
                  expanded=_expanded(flow, _int_paths(m)), batched_dots=flow.dots(batched=True),
                  shard_mapped=dict(flow.in_specs), direct=frozenset(flow.uses[u].path for u in flow.direct),
                  derived=flow.derived_dots(), cast_to=flow.cast_to(), cast_some=flow.cast_some(),
                  slice_reads=_slice_reads(flow, slices), crossed=flow.crossed, crossings=flow.crossings, ffts=flow.ffts,
                  fft_reads=_fft_reads(flow, examples, leads),
                  lookup_rows=_lookup_rows(flow, examples), ragged=ragged_groups(flow),
                  parted=dict(flow.parted), batch_read=_batch_read(flow), unbatched=_unbatched(flow),
                  concats={flow.uses[uid].path: (dim, sizes) for (uid, dim), sizes in flow.concats.items()},
                  concat_again={flow.uses[u].path: flow.uses[f].path for (u, _), (f, _) in flow.concat_again.items()},
                  split_grads=tuple((frozenset((flow.uses[u].path, d) for u, d in a),
                                     frozenset((flow.uses[u].path, d) for u, d in b), n / examples, c)
                                    for a, b, n, c in flow.split_grads),
                  chained=_chained(flow, whole), chain=_chain(flow, whole), residual=_residual(flow),
                  broadcast_from={len(flow.split_sums) + i: frozenset((flow.uses[u].path, d) for u, d in side)
                                  for i, side in enumerate(flow.broadcast_sides) if side},
                  residual_norms=_residual_norms(flow), loss_read=_loss_read(flow),
                  downstream=_downstream(flow))


def _batch_read(flow: Any) -> frozenset[str]:
    """:attr:`Traced.batch_read`: the parameters whose first ``dot`` use reads an activation carrying the batch."""
    first: dict[str, int] = {}
    for u in flow.uses:
        if u.op == "dot":
            first.setdefault(u.path, u.id)
    return frozenset(p for p, uid in first.items() if uid in flow.batch_reads)


def _unbatched(flow: Any) -> frozenset[str]:
    """:attr:`Traced.unbatched`: the parameters every use of which is a ``dot`` reading an activation that carries no
    batch where the batch size given leaves an input out (:attr:`tpflax._src.trace.records.Dataflow.unbatched`), and
    their biases."""
    if not flow.unbatched:
        return frozenset()
    ok: dict[str, bool] = {}
    for u in flow.uses:
        ok[u.path] = ok.get(u.path, True) and u.op == "dot" and u.id in flow.unbatched
    kernels = {p for p, good in ok.items() if good}
    return frozenset(kernels | {p for p, (uid, _) in flow.biases.items()
                                if flow.uses[uid].path in kernels and all(u.path != p for u in flow.uses)})


def _leads(m: Any, batch: int | None = None) -> frozenset[int]:
    """The leading dims of the sample's inputs which the step splits over the batch axes
    (:func:`tpflax._src.trace.batchflags.batch_leads`, as :attr:`tpflax._src.cost.scope.Scope.batch_leads` reads
    the batch's)."""
    import jax

    from tpflax._src.trace.batchflags import batch_leads

    return batch_leads((tuple(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(m.sample)), batch)


def _fft_reads(flow: Any, examples: int, leads: frozenset[int] = frozenset()) -> tuple:
    """:attr:`Traced.fft_reads`: each traced FFT's operand and output bytes (per example where its leading dim is
    an input's, ``leads``, the first's when none is given: an activation's, not a weight's), the kernel dims each
    operand dim carries, by path."""
    out = []
    for r in flow.fft_reads:
        batched = r.fed and bool(r.shape) and r.shape[0] in (leads or {examples}) and 0 not in r.mixed
        per = examples if batched else 1
        dims = tuple(frozenset((flow.uses[u].path, d) for u, d in ks) for ks in r.tags)
        out.append((math.prod(r.shape) * r.itemsize / per, math.prod(r.out_shape) * r.out_itemsize / per, dims,
                    batched, r.live, r.count))
    return tuple(out)


def _chained(flow: Any, whole: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """:attr:`Traced.chained`: for each kernel contracted whole by several plain ``dot`` calls, outside scans, how many
    read the model's own input (no input gradient computed) and how many read, through any elementwise ops and adds,
    the output of an earlier call of the same kernel (a shared layer in a Python loop, its calls chained by the
    residual: ``for _ in range(3): x = x + d(gelu(x))``, calls 2 and 3).

    >>> from tpflax._src.trace.dataflow import Dataflow, Edge, Use
    >>> u = [Use(i, "d", "dot", (0,), (1,), from_input=i == 0) for i in range(3)]
    >>> e = [Edge("d", a, 1, "d", b, 0, 48, ()) for a, b in ((0, 1), (0, 2), (1, 2))]
    >>> _chained(Dataflow(("d",), tuple(u), tuple(e), {}, frozenset(), frozenset(), {}, frozenset(), {}), {"d": 3})
    {'d': (1, 2)}
    """
    calls = {u.id: u for u in flow.uses if u.op == "dot" and not u.scan_length and whole.get(u.path, 0) > 1
             and u.path not in flow.scanned}
    fed = {e.dst_use for e in flow.edges if e.dst_use in calls and e.src_use in calls and e.src_use != e.dst_use
           and e.src == e.dst and e.dst_dim in calls[e.dst_use].contracted}
    out: dict[str, tuple[int, int]] = {}
    for uid, u in calls.items():
        inputs, chained = out.get(u.path, (0, 0))
        out[u.path] = (inputs + bool(u.from_input), chained + (uid in fed))
    return out


def _chain(flow: Any, whole: Mapping[str, int]) -> dict[str, tuple[ChainCall, ...]]:
    """:attr:`Traced.chain`: the kernels contracted whole by several plain ``dot`` calls, outside scans, whose calls
    form a chain (:func:`tpflax._src.cost.chain.chain_calls`, the planner's test too)."""
    uses: dict[str, list[Any]] = {}
    for u in flow.uses:
        if u.op == "dot" and whole.get(u.path, 0) > 1 and u.path not in flow.scanned:
            uses.setdefault(u.path, []).append(u)
    return {p: c for p, us in uses.items() if (c := chain_calls(flow, us)) is not None}


def _residual(flow: Any) -> dict[str, tuple[int, frozenset[tuple[str, int]]]]:
    """:attr:`Traced.residual`: plain ``dot`` calls, outside scans, whose output is added (:attr:`Dataflow.added`)
    onto a stream carrying a tag that also reaches the call's contracted input (an edge, or a norm the call
    contracts straight, :attr:`Dataflow.norm_fed`: a pre-norm ``h + d(LayerNorm(h))``): the call's output is added
    back to the stream its input comes from. Per kernel, the calls and the dims they and the stream meet on.

    >>> from tpflax._src.trace.dataflow import Dataflow, Edge, Use
    >>> u = [Use(0, "inp", "dot", (0,), (1,)), Use(1, "d", "dot", (0,), (1,))]
    >>> f = Dataflow(("inp", "d"), tuple(u), (Edge("inp", 0, 1, "d", 1, 0, 16, ("tanh",)),), {}, frozenset(),
    ...              frozenset(), {}, frozenset(), {}, added={(1, 1): frozenset({(0, 1)})})
    >>> n, dims = _residual(f)["d"]
    >>> n, sorted(dims)
    (1, [('d', 1), ('inp', 1)])
    """
    out: dict[str, tuple[int, frozenset[tuple[str, int]]]] = {}
    for u, met in _residual_calls(flow):
        n, dims = out.get(u.path, (0, frozenset()))
        out[u.path] = (n + 1, dims | {(u.path, k) for k, _ in met} | {(flow.uses[t].path, td) for _, (t, td) in met})
    return out


def _loss_read(flow: Any) -> frozenset[str]:
    """:attr:`Traced.loss_read`: kernels each ``dot`` call of which (outside scans, no batch dims) keeps dims that all
    reach the model's output (:attr:`Dataflow.outputs`) and nothing else: no contraction reads them (no edge, no
    norm feeding one), no reduction or product ends them (no escape, no activation product). Split on such a dim
    (a column without a partner), the output stays split through to the loss, which reduces it where it lies: XLA
    gathers nothing forward (measured, XLA:CPU data=2,model=4: ``d(gelu(a(x))) * tanh(b(x))`` and
    ``d(a) * d(b)``, ``d`` a lone column, no gather; the loss's scalar all-reduced).

    >>> from tpflax._src.trace.dataflow import Dataflow, Use
    >>> u = [Use(0, "a", "dot", (0,), (1,)), Use(1, "d", "dot", (0,), (1,))]
    >>> f = Dataflow(("a", "d"), tuple(u), (), {}, frozenset({(1, 1)}), frozenset(), {}, frozenset(), {})
    >>> sorted(_loss_read(f))
    ['d']
    """
    read = {(e.src_use, e.src_dim) for e in flow.edges} | {(s, sd) for s, sd, *_ in flow.norm_fed}
    read |= {k for p in flow.products for ks in p.tags for k in ks}
    # the stream a call's input comes from reaching the output too (h * d(gelu(h))): XLA splits that stream with the
    # output and gathers it for the call's matmul, a residual (_residual_calls)
    inputs: dict[int, set[tuple[int, int]]] = {}
    for e in flow.edges:
        inputs.setdefault(e.dst_use, set()).add((e.src_use, e.src_dim))
    ok: dict[str, bool] = {}
    for u in flow.uses:
        good = (u.op == "dot" and not u.scan_length and not u.batch and u.path not in flow.scanned and bool(u.kept)
                and all((u.id, k) in flow.outputs and (u.id, k) not in flow.escapes and (u.id, k) not in read
                        for k in u.kept) and not inputs.get(u.id, set()) & flow.outputs)
        ok[u.path] = ok.get(u.path, True) and good
    return frozenset(p for p, good in ok.items() if good)


def _downstream(flow: Any) -> dict[str, tuple[int, int, int, tuple[str, ...], bool]]:
    """:attr:`Traced.downstream`: plain ``dot`` calls, outside scans, whose output joins a residual stream
    (:attr:`Dataflow.added`) that later norms reduce (:attr:`Dataflow.stream_ends`) or later calls of other kernels
    add onto, with the norms of the stream from the call on, those a kernel reads, those writers, and whether the
    call reads its input off the stream (or off no kernel). Split on
    that output (a column without a partner) or on its input (a row), XLA keeps the whole stream split on its
    features from there on, as a feature-split table's: gathered behind each norm for its readers and for each
    later writer's output gradient (measured, XLA:CPU data=2,model=4: a lone Dense added onto the stream before
    two pre-norm Megatron MLP blocks, 3 norms and 2 writers after it, 5 gathers of the stream beyond its own; a
    whole Dense added after it, ``h + d2(gelu(h))``, 2 gathers of its output gradient). A row reading a hidden its
    own block's column writes sums its partial outputs whole onto the stream: nothing more (``fed`` False).

    >>> from tpflax._src.trace.dataflow import Dataflow, Edge, Use
    >>> u = [Use(i, p, "dot", (0,), (1,)) for i, p in enumerate(("d", "up", "down"))]
    >>> up_down = (Edge("up", 1, 1, "down", 2, 0, 16),)  # down reads up's output: it depends on the stream
    >>> f = Dataflow(("d", "up", "down"), tuple(u), up_down, {}, frozenset(), frozenset(), {}, frozenset(), {},
    ...              added={(0, 1): frozenset({(2, 1)}), (2, 1): frozenset({(0, 1)})},
    ...              stream_ends=((frozenset({(0, 1)}), 1), (frozenset({(2, 1)}), 3)))
    >>> _downstream(f)["d"]  # 2 norms, the first read (by up); down writes the stream after d
    (1, 2, 1, ('down',), True)
    """
    out: dict[str, tuple[int, int, int, tuple[str, ...], bool]] = {}
    residual = {c.id for c, _ in _residual_calls(flow)}
    links = [(e.src_use, e.dst_use) for e in flow.edges] + [(a, b) for a, _, b, _, _ in flow.norm_fed]
    for u in flow.uses:
        if u.op != "dot" or u.scan_length or u.batch or u.path in flow.scanned:
            continue
        reach = {(u.id, k) for k in u.kept}
        todo = list(reach)
        while todo:
            for t in flow.added.get(todo.pop(), ()):
                if t[0] > u.id and t not in reach:
                    reach.add(t)
                    todo.append(t)
        ends = [n for ks, n in flow.stream_ends if ks & reach]
        # the later calls of other kernels adding onto the stream (a call of this kernel's own is its chain's)
        # ... that compute from this call's output (a sibling summed with it, d(x) + e(x), writes no stream after it)
        stream, todo = set(reach), list(reach)
        while todo:
            for t in flow.added.get(todo.pop(), ()):
                if t not in stream:
                    stream.add(t)
                    todo.append(t)
        # (a norm on the stream feeds the use recorded next, Dataflow.stream_ends: the trace links no edge there)
        dep = {n for ks, n in flow.stream_ends if ks & stream and n < len(flow.uses)}
        front = {t[0] for t in stream} | dep
        while front:
            front = {b for a, b in links if a in front and b not in dep and b > u.id}
            dep |= front
        writers = tuple(flow.uses[w].path for w in sorted({t[0] for t in reach} - {u.id})
                        if flow.uses[w].path != u.path and w in dep)
        siblings = any(flow.uses[w].path != u.path for w in {t[0] for t in reach} - {u.id})
        if ends or writers or siblings:
            # a norm a kernel reads after (a use recorded later: a sequential model's next block or its head) is
            # gathered for it; a final norm on the model's output is not (post-norm, read by the loss alone)
            read = sum(any(x.op == "dot" for x in flow.uses[n:]) for n in ends)
            # its input read off the stream it adds to (a residual), or off no kernel (the model's input, a lookup):
            # split as a row, its input splits the stream; a row reading a hidden of its own block does not
            fed = u.id in residual or not any(e.dst_use == u.id for e in flow.edges)
            calls, norms, gathers, was, fed_was = out.get(u.path, (0, 0, 0, (), True))
            out[u.path] = (calls + bool(ends or writers), max(norms, len(ends)), max(gathers, read), max(was, writers, key=len),
                           fed_was and fed)
    return out


def _residual_norms(flow: Any) -> dict[str, int]:
    """:attr:`Traced.residual_norms`: of :func:`_residual`'s kernels, those whose calls read the stream they add
    back onto through a norm (:attr:`Dataflow.norm_fed`), with the sums per row those norms take (a LayerNorm's
    mean and mean square, an RMSNorm's mean square), over the calls. XLA keeps the stream split on its features
    there, so each such norm all-reduces its sums forward and the same number backward (measured, XLA:CPU
    data=2,model=4, ``h = inp(x); h = h + d(LayerNorm(h))`` with ``d`` a lone column or row: ``f32[4,8]`` twice
    each way; with an RMSNorm once).

    >>> from tpflax._src.trace.dataflow import Dataflow, Use
    >>> u = [Use(0, "inp", "dot", (0,), (1,)), Use(1, "d", "dot", (0,), (1,))]
    >>> f = Dataflow(("inp", "d"), tuple(u), (), {(0, 1): "normed"}, frozenset(), frozenset(), {}, frozenset(), {},
    ...              added={(1, 1): frozenset({(0, 1)})}, norm_fed=frozenset({(0, 1, 1, 0, 2)}))
    >>> _residual_norms(f), _residual(f)["d"][0]
    ({'d': 2}, 1)
    """
    normed = {(d, dd, s, sd): n for s, sd, d, dd, n in flow.norm_fed}
    out: dict[str, int] = {}
    for u, met in _residual_calls(flow):
        sums = max((min(2, normed.get((u.id, c, *t), 0)) for _, t in met for c in u.contracted), default=0)
        if sums:
            out[u.path] = out.get(u.path, 0) + sums
    return out


def _residual_calls(flow: Any) -> list[tuple[Any, set[tuple[int, tuple[int, int]]]]]:
    """The plain ``dot`` calls of :func:`_residual`, each with the ``(kept dim, stream tag)`` it adds back on."""
    feeds: dict[int, set[tuple[int, int]]] = {}
    for e in flow.edges:
        if e.dst_dim in flow.uses[e.dst_use].contracted:
            feeds.setdefault(e.dst_use, set()).add((e.src_use, e.src_dim))
    for s, sd, d, dd, _ in flow.norm_fed:
        if dd in flow.uses[d].contracted:
            feeds.setdefault(d, set()).add((s, sd))
    out = []
    for u in flow.uses:
        if u.op != "dot" or u.scan_length or u.batch or u.path in flow.scanned or u.id not in feeds:
            continue
        # added onto it, or multiplied with it (h * d(gelu(h)), :attr:`Dataflow.gated`): XLA splits the stream alike
        met = {(k, t) for k in u.kept for t in flow.added.get((u.id, k), ()) if t in feeds[u.id]}
        met |= {(k, t) for k in u.kept for pair in flow.gated if (u.id, k) in pair
                for t in pair if t != (u.id, k) and t in feeds[u.id]}
        if met:
            out.append((u, met))
    return out


def _slice_reads(flow: Any, slices: Mapping[str, int]) -> dict[str, int]:
    """:attr:`Traced.slice_reads`: the distinct activations the contractions of each sliced parameter read."""
    groups: dict[str, set[int]] = {}
    for u in flow.uses:
        if u.op == "dot" and slices.get(u.path, 0) > 1:
            groups.setdefault(u.path, set()).add(flow.apart.get(u.id, u.id))
    return {p: len(g) for p, g in groups.items()}


def _int_paths(m: Any) -> frozenset[str]:
    """The model's integer parameters (int8 kernels): no gradient."""
    from tpflax._src.facts.tree import walk

    try:
        return frozenset(x.path for x in walk(m.variables)[0] if x.numeric != "float")
    except Exception:  # noqa: BLE001 - no tree to read: every reader counts
        return frozenset()


def _expanded(flow: Any, ints: frozenset[str] = frozenset()) -> dict[str, tuple[tuple[int, int, int], ...]]:
    """:attr:`Traced.expanded`: per parameter, the kernels an op made of it that its contractions read (with
    integer parameters, which have no gradient: a dequantized ``int8 kernel * scale`` is the scale's)."""
    out: dict[str, set[tuple[int, int, int]]] = {}
    readers: dict[int, set[str]] = {}
    other = {u.path for u in flow.uses if u.id not in flow.expanded}
    for uid, (key, n, item, batch) in flow.expanded.items():
        if flow.examples > 1 and flow.examples in batch:  # broadcast over the examples: its batch split, not summed
            other.add(flow.uses[uid].path)
        out.setdefault(flow.uses[uid].path, set()).add((key, n, item))
        if flow.uses[uid].path not in ints:
            readers.setdefault(key, set()).add(flow.uses[uid].path)
    # a kernel several parameters make together (an LSTM's gates concatenated, a merged LoRA) is left out: its
    # gradient's sum is not one parameter's; so is a parameter some use reads otherwise (as it is, or broadcast
    # over the examples), whose gradient has that use's part too (not measured)
    out = {p: {a for a in v if len(readers.get(a[0], ())) == 1} for p, v in out.items() if p not in other}
    return {p: tuple(sorted(v)) for p, v in out.items() if v}


def _apart(flow: Any) -> dict[str, str]:
    first: dict[str, str] = {}
    for uid, group in sorted(flow.apart.items()):
        first.setdefault(flow.uses[uid].path, flow.uses[group].path)
    return first


def _in_rows(flow: Any) -> dict[str, float]:
    """:attr:`Traced.in_rows`: a convolution's input positions over its output's, where they differ."""
    out: dict[str, float] = {}
    for u in flow.uses:
        if u.op == "conv" and u.rows and u.in_rows and u.path not in out and u.in_rows != u.rows:
            out[u.path] = u.in_rows / u.rows
    return out


def _grown(flow: Any) -> dict[str, float]:
    """``{path: rows its output reaches upsampled / rows it reads}`` where more than 1
    (:meth:`tpflax._src.trace.records.Dataflow.growth`)."""
    out: dict[str, float] = {}
    for uid, dim in flow.grown:
        if (g := flow.growth(uid, dim)) > 1:
            path = flow.uses[uid].path
            out[path] = max(out.get(path, 1.0), g)
    return out


def _batch_dims(flow: Any) -> dict[str, frozenset[int]]:
    """:attr:`Traced.batch_dims`: the parameter dims every ``dot`` use of it takes as a batch dim."""
    out: dict[str, frozenset[int]] = {}
    for u in flow.uses:
        if u.op == "dot":
            out[u.path] = out.get(u.path, frozenset(u.batch)) & frozenset(u.batch)
    return {p: d for p, d in out.items() if d}


def _conditions(flow: Any, shapes: Mapping[str, tuple[int, ...]], streams: Mapping[str, tuple[float, int, int]],
                rows: Mapping[str, float], examples: int) -> dict[str, tuple[str, ...]]:
    """:attr:`Traced.conditions`. The lookup's output carries no trace of its own (a gather's output starts
    no chain), so a table is matched to the modulation kernels by width and rows per example; a token table
    looked up at every position has more rows than any per-example modulation."""
    looked: dict[str, float] = {}
    for u in flow.uses:
        if u.op == "gather" and u.looked and u.path in shapes:
            looked[u.path] = max(looked.get(u.path, 0.0), math.prod(u.looked) / examples)
    out = {}
    for table, n in looked.items():
        readers = tuple(k for k, (_, width, _) in streams.items()
                        if width == shapes[table][-1] and rows.get(k) == n)
        if readers:
            out[table] = readers
    return out


def _loops(flow: Any, m: Any = None) -> dict[str, tuple[int, bool]]:
    """:attr:`Traced.loops`: the largest trip count of a parameter's uses inside loop bodies, and whether
    one of them is a lookup; a bias takes its contraction's; with the model ``m``, a parameter a scan reads as a
    loop constant outside any contraction takes that scan's (:func:`tpflax._src.trace.loopconsts.loop_consts`)."""
    from tpflax._src.trace.loopconsts import loop_consts

    out: dict[str, tuple[int, bool]] = {}
    for path, n in (loop_consts(m) if m is not None else {}).items():
        if n > 1:
            out[path] = (n, False)
    for u in flow.uses:
        if u.scan_length:
            n, looked = out.get(u.path, (0, False))
            out[u.path] = (max(n, u.scan_length), looked or u.op == "gather")
    for path, (uid, _) in flow.biases.items():
        if flow.uses[uid].scan_length and path not in out:
            out[path] = (flow.uses[uid].scan_length, False)
    return out


_THROUGH = ("convert_element_type", "copy", "reduce_precision", "optimization_barrier")
_SLICES = ("slice", "dynamic_slice")


def reads_slice(m: Any, loss: Any) -> bool:
    """Whether ``loss(output, *sample)`` (the ``loss=`` of :func:`tpflax.make_train_step`) reads a slice
    of the model's logits (its largest float output), as the next-token loss reads ``logits[:, :-1]``:
    then the logits' gradient is formed apart from them. Traced abstractly.

    >>> import jax, jax.numpy as jnp
    >>> from tpflax._src.model import as_model
    >>> m = as_model(lambda v, ids: v["emb"][ids], (jax.ShapeDtypeStruct((2, 5), "int32"),),
    ...              {"emb": jax.ShapeDtypeStruct((10, 4), "float32")})
    >>> reads_slice(m, lambda out, ids: out[:, :-1].mean()), reads_slice(m, lambda out, ids: out.mean())
    (True, False)
    """
    import jax
    import jax.numpy as jnp

    if m is None:
        return False
    try:
        out = traced_under(None, lambda: jax.eval_shape(m.forward, m.variables, *m.sample))
        leaves, tree = jax.tree_util.tree_flatten(out)
        closed = traced_under(None, lambda: jax.make_jaxpr(
            lambda o, x: loss(jax.tree_util.tree_unflatten(tree, o), *x))(leaves, m.sample))
    except Exception as e:  # noqa: BLE001 - the user's loss on the model's output; said once with the fix
        raise EstimateError(f"loss(output, *sample) failed on {m.name}'s abstract output "
                            f"({type(e).__name__}: {e}); pass the loss make_train_step is given") from e
    check_scalar_loss(closed.out_avals[0] if len(closed.out_avals) == 1 else tuple(closed.out_avals))
    floats = [i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return False
    logits = max(floats, key=lambda i: leaves[i].size)
    return _sliced(closed.jaxpr, closed.jaxpr.invars[logits])


def _sliced(jaxpr: Any, var: Any) -> bool:
    """Whether a slice of at least half of ``var`` reads it in ``jaxpr`` (through dtype casts and nested
    calls): the part a loss is computed over, not one label's logit picked out."""
    for eqn in jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if v is not var:
                continue
            name = eqn.primitive.name
            if name in _SLICES and 2 * math.prod(eqn.outvars[0].aval.shape) >= math.prod(var.aval.shape):
                return True
            if name in _THROUGH and _sliced(jaxpr, eqn.outvars[0]):
                return True
            sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner = getattr(sub, "jaxpr", sub)
            if inner is not None and hasattr(inner, "invars") and len(inner.invars) == len(eqn.invars) \
                    and _sliced(inner, inner.invars[i]):
                return True
    return False


def _lookup_rows(flow: Any, examples: int) -> dict[str, float]:
    """``{table: ids per example}`` its lookups at ids from the inputs gather, together (:attr:`Traced.lookup_rows`)."""
    out: dict[str, float] = {}
    for u in flow.uses:
        if u.op == "gather" and u.looked and not u.fixed:
            out[u.path] = out.get(u.path, 0.0) + math.prod(u.looked) / examples
    return out
