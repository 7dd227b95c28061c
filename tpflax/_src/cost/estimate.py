"""Memory and communication estimates for one training step of a plan.

``estimate(plan, optimizer, batch)`` is pure: it reads the plan's decisions
(spec, shape, dtype, kind, pair and role, layers dim, unit, trainable) and the
mesh's axis roles, asks optax for the optimizer state's *shape*
(``jax.eval_shape``), and never compiles or allocates. Everything is counted on
the fullest device (ceil division, so padding and replication show), next to
the same numbers for one device holding everything.

It runs in two halves: :func:`tpflax._src.cost.workload.prepare` (per model:
batch, activations, optimizer state) and :func:`price` (per plan and mesh: pure
arithmetic). The mesh suggestion calls both the same way, once and per
candidate, so its numbers are the estimate's.

Communication is modelled per collective (:mod:`tpflax._src.cost.comm`), priced
with the ring convention of :mod:`tpflax.hlo` so it can be compared with a
compiled program (:func:`tpflax.dry_run`), and kept per mesh axis:

* a sharded column -> row pair: all-reduce of the row output forward and of the
  column input gradient backward, over the tensor axes;
* a vocab-split embedding: all-reduce of its output forward; a vocab-split
  output head (or tied embedding ``attend``): all-reduce of its input gradient
  backward plus three small all-reduces (max, sum, label logit) for the softmax
  cross-entropy over the split vocabulary;
* fsdp: all-gather of the parameter for compute (the backward pass reuses it,
  with or without remat), and a reduce-scatter of its gradient; XLA:CPU has no
  reduce-scatter creator pass and emits a full all-reduce whose result each
  device slices, so ``backend="cpu"`` models that instead; XLA:TPU (libtpu 0.0.42.1)
  reduce-scatters it unless a data axis also sums it, its fsdp devices are no one ring or it is
  1-D (then it all-reduces it whole and slices; :mod:`tpflax._src.cost.gradients`) (``"gpu"``: reduce-scatter);
* data parallelism: all-reduce of the gradients over the batch axes that do not
  shard the leaf;
* expert parallelism: the expert axes split the batch too, so an expert layer
  gathers its tokens over them and sums its outputs back, forward and backward
  (``expert_dispatch="dense"``, what XLA compiles for an einsum over every expert);
  ``"all-to-all"``: two all-to-alls of the routed tokens forward and two backward;
* a traced fused ``[q|k|v]`` kernel split on its fused dim: XLA's halo-exchange
  collective-permutes resharding the pieces forward, all-to-alls backward
  (:mod:`tpflax._src.cost.reshard`); its mirror, a split kernel reading a concatenation of
  split outputs (a parallel block's output projection): all-to-alls forward, collective-permutes
  backward (:func:`tpflax._src.cost.reshard.concat_items`).

Activation sizes come from :func:`trace_activations` (exact shapes of every
layer's input and output, from ``jax.eval_shape``; compute it once and reuse it
across meshes), else, for a plain function, from the rows each contraction
reads in the traced jaxpr (patches, frames), else from the transformer formula
and the batch's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tpflax._src.cost.comm import comm_items, parted_split
from tpflax._src.cost.crossing import crossing_items
from tpflax._src.cost.experts import buffer_items, expert_items
from tpflax._src.cost.explicit import cpu_wire, explicit_items, row_split_mesh
from tpflax._src.cost.fft import cpu_gathers_ffts, fft_items
from tpflax._src.cost.grouped import grouped_conv_items
from tpflax._src.cost.kvsplit import kv_splits
from tpflax._src.cost.leaves import Leaves, merge, without_dead, without_grads
from tpflax._src.cost.memory import memory
from tpflax._src.cost.peak import peak
from tpflax._src.cost.records import MEMORY_FIELDS, Act, CommItem, Estimate, comm_table, plan_leaves
from tpflax._src.cost.reshard import (
    concat_items,
    fused_items,
    grouped_qkv_items,
    repeated_kv_items,
    split_head_items,
    whole_kv_items,
)
from tpflax._src.cost.scope import Scope
from tpflax._src.cost.straddle import straddled_split
from tpflax._src.cost.stream import split_grad_items
from tpflax._src.cost.whole import replicated_items, whole_members, whole_read_items
from tpflax._src.cost.workload import Workload, prepare
from tpflax._src.errors import EstimateError, MeshError
from tpflax._src.mesh import EXPERT, FSDP, TENSOR, MeshShape, batch_axes, tracing_for
from tpflax._src.planner.plan import traced_facts
from tpflax._src.specs import entries, entry_axes, used_axes
from tpflax._src.tpu import TOPOLOGIES, gathers_reduce, one_ring, parse_topology, slice_name

__all__ = ["estimate", "price", "price_leaves"]


def price(decisions: Mapping[str, Any], mesh: MeshShape, w: Workload) -> Estimate:
    """The estimate of a plan's ``decisions`` on ``mesh`` for a prepared workload.

    Pure arithmetic over the decisions: the specs are read, the bytes per device
    recomputed for ``mesh`` (so a plan shared by meshes with the same specs prices
    each of them exactly).

    >>> import jax, optax, tpflax
    >>> from tpflax._src.cost.workload import prepare
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"data": 2})
    >>> price(p.decisions, p.mesh, prepare(p, optax.sgd(0.1), (4, 8))).comm
    {'all-reduce': {'data': 128.0}}
    """
    priced = price_leaves(merge(decisions, w.activations, w.opt, w.saved, w.frozen_inputs, w.no_grad, w.rows), mesh, w)
    return replace(priced, made_for=plan_leaves(decisions))


def price_leaves(lv: Leaves, mesh: MeshShape, w: Workload) -> Estimate:
    """:func:`price` of already merged leaves (the mesh suggestion merges a shared plan once)."""
    b = w.batch
    axes = batch_axes(mesh)
    shards = math.prod(mesh.sizes[a] for a in axes)
    if b.size % shards:
        raise EstimateError(
            f"the global batch {b.size} does not divide over the batch axes "
            f"{', '.join(f'{a}={mesh.sizes[a]}' for a in axes)} (product {shards}); use a batch "
            f"that is a multiple of {shards}")
    notes: list[str] = []
    if w.ffts and w.backend == "cpu" and (shards > 1 or _splits_outside(lv, axes)) and cpu_gathers_ffts():
        # measured (a long convolution by rfft/irfft, data=2,model=4): each FFT's operand and, backward, its
        # output's gradient all-gathered whole (cost/fft.py prices them); XLA:TPU splits them
        notes.append(f"{len(w.ffts)} FFT(s) of activations ({w.ffts[0]}{', ...' if len(w.ffts) > 1 else ''}): "
                     "XLA:CPU does not partition an FFT, it gathers each one's operand whole, and its gradient's; "
                     "priced as all-gathers over the axes that split them (XLA:TPU splits them over the batch and "
                     "the other dims)")
    if w.crossed and shards > 1:
        # measured (XLA:CPU data=2,model=4, a 2-layer message-passing net over one graph): all-reduces and
        # collective-permutes of node-sized activations, 19x the gradient sums; priced by cost/crossing.py
        notes.append(f"{w.crossed[0]}{f' (and {len(w.crossed) - 1} more)' if len(w.crossed) > 1 else ''}: the step "
                     f"splits every input's leading dim over {', '.join(axes)}, so these rows cross devices: priced "
                     "as XLA:CPU moves them (the indexed array permuted, gathered or summed over the batch axes, "
                     "measured), which another compiler may do otherwise. A graph's nodes and edges are no batch "
                     "of examples: batch whole graphs, or check with dry_run")
    if w.remat and w.backend == "tpu" and any(d.layers_dim is not None for d in lv.decisions.values()):
        # measured (dry runs and buffer dumps, Llama-2-7B width, benchmarks/tpu_aot_notes.md, twentieth round): the
        # loop's carried buffers are in the peak (Peak.scan_grads, Peak.scan_stack), and on fsdp-only meshes the
        # float32 logits XLA:TPU keeps through the backward loop (Peak.scan_logits, twenty-first round); what is
        # left is the heap's slack
        notes.append("remat on TPU over a scanned stack: the peak counts the backward loop's carried gradients and "
                     "inputs stack, which the compiled temp holds twice, and with the vocabulary whole on a device "
                     "the float32 logits the loss's value reads after the loop; measured at Llama-2-7B width: -0.4% "
                     "on v5e-256 (fsdp=32,model=8), -7.1% (fsdp=256), -2% to -17% at 2-4 layers on v5e:2x4 (the "
                     "heap's slack); check with dry_run before booking")
    if not w.remat and any(d.layers_dim is not None for d in lv.decisions.values()):
        # measured (benchmarks/results/nnx_estimate.md): one decoder, scanned and unrolled alike here
        notes.append("a scanned layer stack without remat: jax saves every intermediate its backward needs "
                     "(norm statistics, softmax, hidden activations) as the scan's stacked residuals, which "
                     "this estimate's layer outputs do not count; measured at 1.8-2.4x the unrolled step's "
                     "compiled peak (XLA:TPU, v5e:2x4), this estimate 42-61% under it. Remat the scanned "
                     "layers, or check with dry_run before booking")
    if w.ignored:
        names = sorted(w.ignored)
        notes.append(f"the optimizer never reads the gradient of {len(names)} parameter(s) the plan trains "
                     f"({names[0]}{', ...' if len(names) > 1 else ''}: optax.set_to_zero or alike): priced as "
                     "frozen, as XLA drops their gradients and sums none of them. plan(..., optimizer=) with the "
                     "same optimizer (or trainable=) says so to the planner too, which then prices its layouts "
                     "without their gradients, moments and gradient sums")
    half = any(d.dtype in ("bfloat16", "float16") for d in lv.decisions.values())
    if w.backend == "cpu" and half:
        notes.append("XLA:CPU runs 16-bit collectives in float32 (it converts their operands; measured on a "
                     "bfloat16 model: 2x the bytes): activations and gradients are priced so, but a 16-bit "
                     "parameter's own gathers in its dtype, as a TPU sends them")
    per_device, unsharded = memory(lv, mesh, w, shards, notes)
    savings = {name: (100.0 * (1 - getattr(per_device, name) / getattr(unsharded, name))
                      if getattr(unsharded, name) else 0.0) for name in MEMORY_FIELDS + ("total",)}
    # the communication sees a shard_map's row split (cost/explicit.py); the memory above keeps the plan's mesh
    cmesh = row_split_mesh(mesh, w.row_axes, notes)
    caxes = batch_axes(cmesh)
    n = math.prod(mesh.sizes.values())
    ring = w.backend != "tpu" or one_ring(w.target, n)
    live = {role for a, role in mesh.roles if mesh.sizes[a] > 1}
    if not ring and live == {FSDP}:  # with a tensor axis its fsdp groups are smaller than the slice
        notes.append(f"{slice_name(w.target, n)}: XLA:TPU reduces over these "
                     "devices as an N-dimensional all-reduce, not one ring, so it all-reduces each fsdp gradient "
                     "whole and slices it (twice a reduce-scatter's bytes; measured); pass target= for another slice")
    # XLA:CPU sums a 16-bit leaf's gradient in float32 too; elsewhere a gradient is in grad_dtype or its leaf's
    g_item = cpu_wire(w.g_item, w.backend) if w.g_item else 4 if w.backend == "cpu" and half else None
    scope = Scope(mesh=cmesh, lv=without_grads(without_dead(lv, w.dead), w.no_grad), batch=b, batch_axes=caxes, shards=math.prod(cmesh.sizes[a] for a in caxes),
                  act_item=cpu_wire(w.act_item, w.backend),
                  g_item=g_item, backend=w.backend, dispatch=w.dispatch, activations=w.activations,
                  config=w.config, tied=w.tied, parts=w.parts, rows=w.rows, fused=w.fused, remat=w.remat,
                  shared=w.shared, lookups=w.lookups, lookup_rows=w.lookup_rows, scores=w.scores,
                  grouped=w.grouped, joined=w.joined, widths=w.widths, slices=w.slices, slice_reads=w.slice_reads, chained=w.chained, chain=w.chain, residual=w.residual,
                  residual_norms=w.residual_norms, loss_read=w.loss_read,
                  downstream=w.downstream,
                  buffers=w.buffers, streams=w.streams, grown=w.grown, in_rows=w.in_rows, combined=w.combined, reduced=w.reduced,
                  row_axes=tuple(a for a in caxes if a not in axes),
                  target=w.target, gathers_reduce=w.backend == "tpu" and gathers_reduce(w.target, n), meets=w.meets,
                  positional=w.positional, loops=w.loops, edges=w.edges, contracted=w.contracted, looked=w.looked,
                  batched=w.batched, ragged=w.ragged,
                  conditions=w.conditions, batch_dims=w.batch_dims, sliced=w.sliced, dots=w.dots, batched_dots=w.batched_dots, shard_mapped=w.shard_mapped, direct=w.direct, derived=w.derived, cast_to=w.cast_to, cast_some=w.cast_some,
                  written=frozenset(p for c in w.collectives if c.kind == "reduce-scatter" and not c.source.endswith("(backward)")
                                    for p in c.carries), apart=w.apart, split_widths=w.split_widths, parted=w.parted, concats=w.concats, concat_again=w.concat_again, streamed=w.streamed, expanded=w.expanded,
                  scanned=w.scanned, constrained=w.constrained, limits=w.limits, moments=param_moments(w.opt),
                  batch_read=w.batch_read, unbatched=w.unbatched)
    notes.extend(product_sum_notes(lv, mesh, w, scope.experts_split))
    every = (comm_items(scope, notes) + expert_items(scope) + buffer_items(scope) + fused_items(scope, notes)
             + split_head_items(scope) + grouped_qkv_items(scope) + repeated_kv_items(scope) + whole_kv_items(scope) + concat_items(scope, notes)
             + grouped_conv_items(scope) + explicit_items(w.collectives, notes, w.backend) + split_grad_items(scope) + whole_read_items(scope)
             + replicated_items(scope)
             + split_sum_items(scope, w.split_sums, w.fused or {}, w.broadcast_from) + split_grad_gathers(scope, w.split_grads, w.fused or {})
             + fft_items(scope, w.fft_reads) + crossing_items(scope, w.crossings))
    items = tuple(i for i in every if i.total > 0)
    return Estimate(
        per_device=per_device, unsharded=unsharded, savings=savings, comm=comm_table(items), items=items,
        mesh=mesh, batch={"size": b.size, "shards": shards, "axes": list(axes),
                          "leaves": [[n, list(s), d] for n, s, d in b.leaves]},
        notes=tuple(dict.fromkeys(notes)), settings=dict(w.settings),
        breakdown=peak(lv, mesh, w, shards, per_device))


def estimate(plan, optimizer: Any = None, batch: Any = None, *, config: Any = None,
             activations: Mapping[str, Sequence[Act]] | None = None, model: Any = None, sample: Any = None,
             remat: bool = False, grad_dtype: Any = None, act_dtype: Any = None,
             backend: str = "tpu", expert_dispatch: str = "dense",
             optimizer_name: str | None = None, loss: Any = None, target: str | None = None) -> Estimate:
    """Bytes per device and communication per training step for a plan.

    Args:
        plan: a :class:`tpflax.Plan`.
        optimizer: an ``optax.GradientTransformation``; its state shapes come from
            ``jax.eval_shape(optimizer.init, params)``. ``None``: no optimizer state.
        batch: the global batch (see :func:`tpflax._src.cost.batch.parse_batch`);
            default: the model's ``sample``.
        config: model config or a dict of hints (``vocab``, ``seq_len``,
            ``d_model``, ``n_heads``, ``n_layers``, ``d_ff``, ``dtype``).
        activations: from :func:`trace_activations` (exact layer shapes).
        model: any model :func:`tpflax.plan` accepts (zoo, linen or nnx Module, or
            ``fn(variables, *sample)``): supplies ``config`` (zoo) and, if
            ``activations`` is None, traces them (abstractly; linen layers only).
        sample: the model's example inputs (a tuple of arrays or
            ``jax.ShapeDtypeStruct``); the batch when ``batch`` is None.
        remat: activations are rematerialised: only layer inputs are saved. The
            backward's recompute runs some forward collectives again (a row sum
            a later op of the block reads, a head_dim-split key/value's gathers
            of whole heads); the rest it reuses. Read from the
            config's ``remat`` field when the model has one, and on when most of a
            ``model=``'s traced contractions run rematerialised (``nn.remat``,
            ``nnx.remat``, ``jax.checkpoint``).
        grad_dtype: gradient dtype (default: the parameter's).
        act_dtype: activation dtype (default: the batch's float dtype / config dtype).
        backend: ``"tpu"`` or ``"cpu"`` (XLA:CPU all-reduces the whole fsdp gradient and
            slices it; XLA:TPU reduce-scatters it where it can, measured) or ``"gpu"`` (fsdp
            gradients reduce-scatter).
        expert_dispatch: ``"dense"`` (every expert sees every token: an einsum over
            the experts, which XLA compiles to a gather of the tokens over the expert
            axes and a sum of the outputs) or ``"all-to-all"`` (routed tokens move to
            their experts, e.g. a ``shard_map`` dispatch; XLA compiles no all-to-all
            from an einsum).
        optimizer_name: how to name the optimizer in reports (default: from optax).
        loss: the ``loss(output, *sample)`` given to :func:`tpflax.make_train_step`, if any:
            the peak is for that step. A loss that reads a slice of the logits (as the
            default next-token loss reads ``logits[:, :-1]``) holds their gradient apart
            from them (``Peak.logits_grad``); one over whole logits forms it in place.
            Default: the step's default loss.
        target: the TPU slice the step compiles for (``"tpu-v5p:2x2x2"``, as
            :func:`tpflax.make_mesh` takes it) or a generation (``"tpu-v5p"``: its slice of
            the mesh's device count). XLA:TPU reduce-scatters fsdp gradients only where it
            reduces over their fsdp devices on one ring (the whole slice of an fsdp-only mesh:
            v5e and v6e 2x2, 2x4; v5p 2x2x1; fsdp groups smaller than the slice are assumed one
            ring), else it all-reduces them whole (:func:`tpflax._src.tpu.one_ring`). Default (backend ``"tpu"``):
            the plan's hardware preset (``plan.options["hardware"]``, ``"tpu-v5e"`` unless
            ``plan(hardware=)`` said otherwise) with the mesh's device count; a count with no
            known slice of it is priced as one ring.

    Returns:
        An :class:`Estimate`.

    >>> import jax, optax, tpflax
    >>> tree = {"params": {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...                            "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}}}
    >>> p = tpflax.plan(tree, {"data": 2, "model": 4})
    >>> e = estimate(p, optax.sgd(0.1), {"x": (8, 64)})
    >>> e.per_device.params, e.unsharded.params
    (32768, 131072)
    >>> sorted(e.comm["all-reduce"])
    ['data', 'model']
    """
    from tpflax._src.planner.plan import Plan

    if not isinstance(plan, Plan):
        raise EstimateError(f"expected a tpflax.Plan, got {type(plan).__name__}; make one with "
                            "tpflax.plan(tree, mesh) or tpflax.Plan.from_json(text)")
    with tracing_for(plan.mesh):  # the model's traces see the plan's mesh, as its step does
        if model is not None:
            plan = traced_facts(plan, model, sample)
        w = prepare(plan, optimizer, batch, config=config, activations=activations, model=model, sample=sample,
                    remat=remat, grad_dtype=grad_dtype, act_dtype=act_dtype, backend=backend,
                    expert_dispatch=expert_dispatch, optimizer_name=optimizer_name, loss=loss)
    if target is not None:
        w = replace(w, target=_check_target(target, math.prod(plan.mesh.sizes.values())),
                    settings={**w.settings, "target": target})
    elif w.backend == "tpu":  # the plan's hardware preset: its slice of the mesh's devices (tpu.one_ring)
        w = replace(w, target=plan_generation(plan.options.get("hardware")))
    return price(plan.decisions, plan.mesh, w)


def _gathered_heads(s: Scope) -> set[str]:
    """The leaves of pairs with a head_dim-split key/value (:func:`kv_splits`): XLA gathers whole heads there and
    sums no scores (:func:`split_sum_items`, :func:`split_grad_gathers`)."""
    kvs = set(kv_splits(s))
    return {p for pc in s.lv.pairs if set(pc.columns) & kvs for p in (*pc.columns, *pc.rows)}


def split_sum_items(s: Scope, sums: Sequence[tuple[frozenset[tuple[str, int]], float, int]],
                    fused: Any = (), sides: Mapping[int, frozenset[tuple[str, int]]] | None = None) -> list[CommItem]:
    """All-reduces of products of two activations that sum a kernel dim the plan splits over a tensor axis.

    A single-head attention (a VAE's mid-block) with q and k split over their channels computes its scores
    in partial sums (all-reduced forward), and ``probs @ v`` with v split so sums the gradient of the
    probabilities (backward): measured, tiny FlaxAutoencoderKL, data=2,model=4, four scores-sized
    all-reduces (384 KiB, 11% of the step's collectives) the pairs' items did not price. Multi-head
    attention split by heads sums only head_dims, which the trace does not count (:attr:`Workload.split_sums`).

    ``sides``: for a broadcast sum, the kernel dims of the side it forms the gradient of
    (:attr:`Workload.broadcast_from`). Where that side is the output of a member its split pair keeps whole, whose
    output gradient :func:`tpflax._src.cost.whole.whole_members` sums already, it is that sum: a per-token scalar
    gate ``gelu(up(y)) * sigmoid(gate(y))`` beside ``up`` split on its ffn dim, priced twice before (XLA:CPU
    data=2,model=4: one ``f32[4,8]`` all-reduce, est/comp 1.011).
    """
    tensor = set(s.mesh.axes_with(TENSOR))
    out = []
    gathered = _gathered_heads(s)
    # the members whose pieces' output gradients pieces.member_items sums over the ranks sharing each
    summed = {m for m, r in whole_members(s).items()
              if not r.grouped and not r.repeat and r.pieces and r.pieces < s.size(r.axes)} if sides else set()
    for i, (dims, per_example, runs) in enumerate(sums):
        side = {s.lv.rep(p) for p, _ in (sides or {}).get(i, ())}
        if side and side <= summed:
            continue  # the whole member's output-gradient sum (whole_members) is this one
        # a fused kernel's cut pieces: their reshards are priced with it; the dims of other kernels the product
        # sums still split it (Mamba's scan: C's gradient sums d_inner, in_proj's fused [x | z] but also dt_proj's
        # and the conv's channels, and is all-reduced on the hand layout; measured, XLA:CPU data=2,model=4)
        dims = frozenset((p, k) for p, k in dims if p not in fused)
        if not dims:
            continue
        if any(s.lv.rep(p) in gathered for p, _ in dims):
            continue
        if all(s.lv.rep(p) in s.experts_split and _experts_dim(s.lv.decisions[s.lv.rep(p)], k) for p, k in dims):
            continue  # the combine of experts split over the tensor axis: priced with their pair (comm.expert_split_items)
        axes = _split_axes(s, dims, tensor)
        if axes:
            ax = tuple(sorted(axes))
            n = math.prod(s.mesh.sizes[a] for a in ax)
            # experts stored flat (E * f, d) split over n = E * k ranks: the combine sums over the E experts only, the
            # k ranks of one expert having summed its f first (comm.parted_split)
            halves = {parted_split(s, s.lv.rep(p)) for p, _ in dims}
            if len(halves) == 1 and (ek := halves.pop()) is not None:
                n = ek[0]
            # blocks straddling experts: gathered into g parts of whole experts, the combine sums over the parts
            straddled = {straddled_split(s, s.lv.rep(p)) for p, _ in dims}
            if len(straddled) == 1 and (eng := straddled.pop()) is not None:
                n = eng[2]
                if n == 1:
                    continue
            out.append(CommItem("all-reduce", ax, per_example * s.batch.size / s.shards * s.act_item,
                                n, runs, ", ".join(sorted({p for p, _ in dims})),
                                "a product of two activations sums a split dim: all-reduce its partial sums"))
    return out


def _split_axes(s: Scope, dims: frozenset[tuple[str, int]], tensor: set[str]) -> set[str]:
    """The tensor axes the plan splits any of the kernel ``dims`` over; a layer alike an earlier one is read as its
    representative (the trace lists each layer's dims under its own paths, the alike view keeps the first's)."""
    axes: set[str] = set()
    for path, dim in dims:
        d = s.lv.decision_of(path)
        if d is not None:
            spec = entries(d.spec, len(d.shape))
            axes |= set(entry_axes(spec[dim])) & tensor if dim < len(spec) else set()
    return axes


def split_grad_gathers(s: Scope, grads: Sequence[tuple[frozenset[tuple[str, int]], frozenset[tuple[str, int]], float, int]],
                       fused: Any = ()) -> list[CommItem]:
    """Gathers of the gradient of one side of a product of two activations that the other side's split leaves split.

    Backward, ``bmc,bhwc->bmhw`` gives the gradient of ``bhwc`` as the output's gradient times ``bmc``: with the
    ``c`` of ``bmc`` split over a tensor axis (the hypernetwork MLPs' last column layer of SAM's mask decoder) and
    that of ``bhwc`` whole (its ``ConvTranspose`` upscaling replicated), that gradient comes out split on ``c``, and
    everything behind it reads it whole: priced as gathering it. XLA may sum the partial input gradient of the layer
    before instead (SAM: ``upscale_conv2``'s, the same bytes there); measured, SAM's mask decoder traced on
    data=2,model=4, 786,432 B (9% of the step's collectives) no item priced, est/comp 0.87. The exclusions are
    :func:`split_sum_items`'s (a fused kernel's pieces, gathered heads, experts' combines, priced with their pairs).
    """
    tensor = set(s.mesh.axes_with(TENSOR))
    gathered = _gathered_heads(s)
    out = []
    for dims, other, per_example, runs in grads:
        every = dims | other
        if any(p in fused for p, _ in every) or any(s.lv.rep(p) in gathered for p, _ in every):
            continue
        if any(s.lv.rep(p) in s.experts_split for p, _ in every):
            continue
        ax = tuple(sorted(_split_axes(s, dims, tensor) - _split_axes(s, other, tensor)))
        if ax:
            n = math.prod(s.mesh.sizes[a] for a in ax)
            out.append(CommItem("all-gather", ax, per_example * s.batch.size / s.shards * s.act_item, n, runs,
                                ", ".join(sorted({p for p, _ in dims})),
                                "a product of two activations contracts a dim split on one side only: gather the other "
                                "side's gradient (backward)"))
    return out


def _experts_dim(d: Any, dim: int) -> bool:
    """Whether leaf dim ``dim`` of an expert kernel is its experts dim (body dim 0)."""
    return dim == (1 if d.layers_dim == 0 else 0)


def _splits_outside(lv: Leaves, batch_axes: Sequence[str]) -> bool:
    """Whether the plan splits some leaf over an axis the batch does not split (so activations split too)."""
    return any(used_axes(d.spec) - set(batch_axes) for d in lv.decisions.values())


def product_sum_notes(lv: Leaves, mesh: MeshShape, w: Workload, priced: frozenset[str] = frozenset()) -> list[str]:
    """A note naming the parameters split over a tensor or expert axis on a dim whose activation a product of
    two activations sums (:attr:`Workload.product_sums`): a user MoE combining the experts' outputs by
    ``bsed,bse->bsd``. XLA reshards around that product with all-gathers and all-to-alls no item prices
    (measured -74% to -88% of the compiled collectives, benchmarks/tpu_aot_notes.md, twenty-first round).
    Not for the representatives in ``priced``: experts of a dispatched buffer split over the tensor axis, whose
    sums their pair prices (:attr:`tpflax._src.cost.scope.Scope.experts_split`)."""
    roles = dict(mesh.roles)
    split = {a for a, r in roles.items() if r in (TENSOR, EXPERT) and mesh.sizes[a] > 1}
    found = []
    for path, dims in w.product_sums.items():
        d = lv.decisions.get(path)
        if d is None or lv.rep(path) in priced:
            continue
        spec = entries(d.spec, len(d.shape))
        axes = sorted({a for k in dims if k < len(spec) for a in entry_axes(spec[k])} & split)
        if axes:
            found.append(f"{path} (over {', '.join(axes)})")
    if not found:
        return []
    return [f"{'; '.join(found)}: split on a dim that a product of two activations sums (such as an einsum combining "
            "the experts' outputs with the router weights, bsed,bse->bsd): XLA reshards around it with "
            "all-gathers and all-to-alls this estimate does not price, so its collectives are a lower bound "
            "(measured 4-8x more). Apply the router weights to the hidden activations instead and let the "
            "down projection's einsum sum over the experts (bsef,efd->bsd), as tpflax/zoo/moe.py does"]


def param_moments(opt: Any) -> dict[str, int] | None:
    """Per parameter path, the optimizer-state leaves of its whole shape (adam's two moments, sgd's one
    momentum trace); None without an optimizer.

    >>> import jax, optax, tpflax
    >>> from tpflax._src.cost.optstate import opt_layout
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"data": 1})
    >>> param_moments(opt_layout(p, optax.adam(1e-3))), param_moments(opt_layout(p, optax.sgd(1e-3, 0.9)))
    ({'w': 2}, {'w': 1})
    """
    if opt is None:
        return None
    out: dict[str, int] = {}
    for x in opt.leaves:
        paths = {f[0] for f in x.follows if f is not None}
        if len(paths) == 1 and x.follows == tuple((*paths, i) for i in range(len(x.follows))):
            out[next(iter(paths))] = out.get(next(iter(paths)), 0) + 1
    return out


def plan_generation(hardware: Any) -> str | None:
    """The TPU generation a plan's ``hardware`` option names (``"tpu-v5e"``), or None (a GPU, unknown).

    >>> plan_generation("tpu-v5p"), plan_generation("h100"), plan_generation(None)
    ('tpu-v5p', None, None)
    """
    return hardware if hardware in TOPOLOGIES else None


def _check_target(target: Any, devices: int) -> str:
    """``target`` if it names a known TPU topology of ``devices`` devices (as :func:`tpflax.make_mesh`
    requires) or a generation, else :class:`EstimateError`."""
    text = str(target).strip().lower()
    gen = text if text.startswith("tpu-") else f"tpu-{text}"
    try:
        if ":" in text:
            topo = parse_topology(text)
            if topo.devices != devices:
                raise EstimateError(f"target {topo.name} has {topo.devices} devices but the plan's mesh has "
                                    f"{devices}; pass a topology of {devices} devices or the generation "
                                    f"({topo.generation})")
        elif gen not in TOPOLOGIES:
            raise EstimateError(f"unknown TPU target {target!r}; a generation ({', '.join(TOPOLOGIES)}) or a "
                                "topology such as tpu-v5e:2x4")
    except MeshError as e:
        raise EstimateError(str(e)) from None
    return text
