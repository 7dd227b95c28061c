"""The cost model's records: memory per device, modelled collectives, the estimate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.hlo import ring_bytes
from tpflax._src.mesh import MeshShape
from tpflax._src.specs import fmt_bytes


@dataclass(frozen=True)
class Memory:
    """Bytes on one device for one training step.

    Attributes:
        params: trainable parameters.
        grads: their gradients.
        opt_state: optimizer state (from optax's real state shapes).
        activations: activations saved for the backward pass (an estimate).
        model_state: non-trainable variables (BatchNorm statistics, ...).
        inputs: the batch.
    """

    params: int = 0
    grads: int = 0
    opt_state: int = 0
    activations: int = 0
    model_state: int = 0
    inputs: int = 0

    @property
    def total(self) -> int:
        """The fields' sum. Not all of them are live at once, and the peak's working sets are not among
        them: :attr:`Estimate.peak` is what must fit on a device."""
        return (self.params + self.grads + self.opt_state + self.activations + self.model_state
                + self.inputs)

    @property
    def arguments(self) -> int:
        """What a train step receives: params, model state, optimizer state and batch.

        This is what XLA reports as ``argument_size_in_bytes``.
        """
        return self.params + self.model_state + self.opt_state + self.inputs

    def to_dict(self) -> dict:
        return {"params": self.params, "grads": self.grads, "opt_state": self.opt_state,
                "activations": self.activations, "model_state": self.model_state,
                "inputs": self.inputs, "total": self.total}


MEMORY_FIELDS = ("params", "grads", "opt_state", "activations", "model_state", "inputs")


@dataclass(frozen=True)
class CommItem:
    """One modelled collective.

    Attributes:
        kind: all-reduce, all-gather, reduce-scatter or all-to-all.
        axes: mesh axes of the group.
        size: ``S`` of :func:`tpflax.hlo.ring_bytes` (per device, one execution).
        group_size: devices per group.
        count: executions per step (forward + backward, stacked layers, remat).
        source: the leaf path or pair it comes from.
        why: the rule that produced it.
    """

    kind: str
    axes: tuple[str, ...]
    size: float
    group_size: int
    count: int
    source: str
    why: str

    @property
    def ring_bytes(self) -> float:
        """Bytes one device sends per execution."""
        return ring_bytes(self.kind, self.size, self.group_size)

    @property
    def total(self) -> float:
        return self.ring_bytes * self.count

    @property
    def axis_label(self) -> str:
        return "+".join(self.axes) if self.axes else "?"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axes": list(self.axes), "size": self.size,
                "group_size": self.group_size, "count": self.count, "ring_bytes": self.ring_bytes,
                "total": self.total, "source": self.source, "why": self.why}


@dataclass(frozen=True)
class Act:
    """Shapes at one layer call (global batch), from :func:`trace_activations`.

    ``members``: the members of the vmaps around the call (an ``nnx.vmap`` ensemble, a per-example
    ``nn.vmap``): the call runs that many times and its entry repeats that many times in a trace's list.
    """

    inputs: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    dtype: str
    itemsize: int
    members: int = 1


@dataclass(frozen=True)
class Peak:
    """The per-device peak of one training step, term by term (see :mod:`tpflax._src.cost.peak`).

    Attributes:
        arguments: params, model state, optimizer state and batch (donated, updated in place).
        grads: the gradients, all live at the end of the backward pass.
        activations: saved for the backward pass (layer outputs).
        scores: attention probabilities saved for the backward pass (none under remat).
        gathered: fsdp: the weights of the two largest layers gathered at once.
        attention: one attention layer's scores in flight (scores and their gradient).
        recompute: remat: one layer's activations recomputed in its backward pass.
        logits: the float32 logits at the loss (their gradient is formed in place).
        logits_grad: the logits' gradient, held apart from them when the loss reads a slice of the
            logits (tpflax's next-token default loss, ``logits[:, :-1]``, or a ``loss=`` that does,
            traced): bfloat16 on TPU (the head's
            matmuls read it at default precision), float32 when a bias added to the logits also
            reads it (its gradient sums it).
        gathered_last: fsdp: the last layer's gathered weights while its gradients form.
        experts: expert layers' hidden activations saved for the backward pass (every
            expert's for dense dispatch, ``top_k`` per token routed).
        expert_work: one expert layer's hidden activations in flight (their gradient).
        gathered_kept: fsdp on TPU without remat: the gathered weights of every layer but the two in
            ``gathered``, kept from their forward to their backward pass (zero at two layers).
        conv_work: a conv net on TPU with whole maps (batch first): the maps in flight in the backward
            pass of its first stage (its largest maps).
        gathered_async: XLA:TPU with async all-gathers (v5e): the layers' gathered kernels too
            large for the on-chip memory, which the all-gather's value holds in HBM and the compiled
            temp counts twice, less the last layer's first freed; under remat the last layer's
            recompute's alone (:func:`tpflax._src.cost.gathered.async_gathered_bytes`).
        gathered_overflow: the same on the same generations, for the kernels that fit the on-chip memory one
            by one: what one layer's exceed it by, every layer's but the last's
            (:func:`tpflax._src.cost.gathered.async_overflow_bytes`).
        phased: XLA:TPU: the last layer's backward phases hold their transients one at a time (its
            attention backward the scores in flight, its expert backward the expert gradient), so the
            layer's working set takes the larger of the two, not their sum (:attr:`layer`).
        head: XLA:TPU under remat, at the loss: the head's kernel gathered over the fsdp axes (a tied table
            held from the lookup) and, in a float32 step, its whole weight gradient, formed while the
            logits hold theirs (:attr:`start`). Without remat, an output layer's kernel gathered over the fsdp
            axes that split its features, held from the logits into its backward (a tied table: not counted).
        score_stack: XLA:TPU under remat, a 16-bit step with the heads split over a tensor axis: the float32
            scores' freed region that the attention backward's buffers in flight cannot take, counted twice
            by the compiled temp, less the layer's recompute it hosts (``tpflax._src.cost.peak.score_stack``).
        expert_phase: XLA:TPU under remat: the last layer's expert backward beside its recompute, a phase of its
            own: the recomputed hidden (the up-projection's output), its gradient, one gathered expert kernel and
            one whole expert gradient, where the other phases hold :attr:`gathered` (:attr:`layer`).
        loss_apart: XLA:TPU under remat: the loss (logits, :attr:`head`) and the last layer's backward are
            two phases, the logits dead in the latter (:attr:`start`).
        stem: XLA:TPU, a conv net whose blocks are remat'd: its stem's backward, a phase of its own: the stem's
            kept maps, the first block's input gradient and the max-pool input's gradient when the on-chip
            memory does not take it (:attr:`start`).
        stem_grad: that max-pool input's gradient in HBM, placed above the saved set: the heap holds both, and
            the compiled temp counts what the live peak leaves of the heap once more (:attr:`start`).
        tail: XLA:TPU under remat: the saved outputs of the last block and a final norm after it, in
            :attr:`activations` for the loss phase, dead in the last layer's backward (:attr:`start`;
            ``tpflax._src.cost.remat.tail_bytes``).
        forward_end: XLA:TPU without remat: the live set beside the arguments at the end of the forward pass, in
            the final norm, where that phase is larger than the last attention backward (0: not; then
            :attr:`start` is the backward start). By name: the saved set with each norm's input for its output,
            a 16-bit exact GELU's second hidden, the final norm's two float32 maps, the saved probabilities and
            the gathered weights, no score buffer in flight (``tpflax._src.cost.forward_end``).
        scan_grads: XLA:TPU under remat, a scanned layer stack: its layers' gradients, carried whole by the backward
            loop from its first iteration (the last layer's backward), in :attr:`grads` too (:attr:`start`).
        scan_stack: the same stack's saved block inputs, carried by its loops (in :attr:`activations` too); the
            compiled temp counts the carried buffers once more, up to what the loop's peak holds beside the stack:
            ``loop_carried`` in :meth:`phase` (``tpflax._src.cost.remat.scan_loop``).
        scan_logits: XLA:TPU under remat, a scanned layer stack whose head's vocabulary is not split over a tensor
            axis: the float32 logits (:attr:`logits`), live through the backward loop, since the loss's value reads
            them after it (:attr:`start`; ``tpflax._src.cost.remat.scan_logits``).
        saved_terms: ``(what, bytes)`` from :attr:`Memory.activations` (every layer's output, the memory table's
            row) to :attr:`activations` (what the step keeps): :attr:`activations` is that row plus these.
    """

    arguments: int = 0
    grads: int = 0
    activations: int = 0
    scores: int = 0
    gathered: int = 0
    attention: int = 0
    recompute: int = 0
    logits: int = 0
    gathered_last: int = 0
    logits_grad: int = 0
    experts: int = 0
    expert_work: int = 0
    gathered_kept: int = 0
    conv_work: int = 0
    gathered_async: int = 0
    phased: bool = False
    gathered_overflow: int = 0
    head: int = 0
    score_stack: int = 0
    loss_apart: bool = False
    stem: int = 0
    stem_grad: int = 0
    tail: int = 0
    expert_phase: int = 0
    forward_end: int = 0
    scan_grads: int = 0
    scan_stack: int = 0
    scan_logits: int = 0
    saved_terms: tuple[tuple[str, int], ...] = ()

    @property
    def layer(self) -> int:
        """The working set of the layer in flight: with :attr:`phased`, that of its larger backward phase.

        >>> Peak(gathered=5, attention=4, expert_work=3).layer, Peak(gathered=5, attention=4, expert_work=3,
        ...                                                          phased=True).layer
        (12, 9)
        """
        return sum(self._layer_terms().values())

    def _layer_terms(self) -> dict[str, int]:
        """:attr:`layer`'s terms: with :attr:`phased`, those of its larger backward phase (attention or expert)."""
        layer = {"recompute": self.recompute, "conv_work": self.conv_work}
        if not self.phased:
            layer.update(gathered=self.gathered, attention=self.attention, expert_work=self.expert_work)
        elif self.gathered + max(self.attention + self.score_stack, self.expert_work) >= self.expert_phase:
            layer["gathered"] = self.gathered
            layer.update({"attention": self.attention, "score_stack": self.score_stack}
                         if self.attention + self.score_stack >= self.expert_work else {"expert_work": self.expert_work})
        else:
            layer["expert_phase"] = self.expert_phase
        return layer

    @property
    def total(self) -> int:
        """Bytes that must fit on the device: the larger end of the backward pass.

        >>> Peak(arguments=10, grads=4, activations=6, logits=3).total  # 10 + max(6 + 3, 4)
        19
        """
        return self.arguments + max(self.start, self.end)

    @property
    def start(self) -> int:
        """Live beside the arguments when the backward pass starts: what the forward pass saved, and the working set;
        with :attr:`loss_apart`, the larger of the loss phase and the last layer's backward.

        >>> Peak(activations=6, gathered=5, logits=3, head=1).start, Peak(activations=6, gathered=5, logits=3,
        ...                                                                head=1, loss_apart=True).start
        (15, 11)
        >>> Peak(activations=6, gathered=5, logits=3, head=1, loss_apart=True, tail=2).start  # 6 + max(4, 5 - 2)
        10
        >>> Peak(activations=6, gathered=5, attention=4, phased=True, forward_end=12).start  # not 6 + 5 + 4
        12
        >>> Peak(activations=6, gathered=5, logits=3, loss_apart=True, scan_grads=1, scan_stack=4).start  # 12 + min(5, 8)
        17
        """
        return sum(self._start_phase()[1].values())

    def _start_phase(self) -> tuple[str, dict[str, int]]:
        """:attr:`start`'s phase and the terms it holds (see :meth:`phase`)."""
        saved = {"activations": self.activations, "scores": self.scores, "experts": self.experts,
                 "gathered_kept": self.gathered_kept, "gathered_overflow": self.gathered_overflow}
        loss = {"logits": self.logits, "logits_grad": self.logits_grad}
        layer = {**self._layer_terms(), "gathered_async": self.gathered_async}
        last = {**saved, **layer, "tail": -self.tail, "scan_logits": self.scan_logits}
        if self.loss_apart and (self.scan_grads or self.scan_stack):
            # a scanned stack's backward loop: its gradients whole, and the temp counts the carried buffers again
            last["scan_grads"] = self.scan_grads
            last["loop_carried"] = max(0, min(self.scan_stack + self.scan_grads, sum(last.values()) - self.scan_stack))
        if not self.loss_apart and self.forward_end:  # the whole live set of that phase, by name
            name, live = "forward end", {"forward_end": self.forward_end}
        elif not self.loss_apart:
            name, live = "backward start", {**saved, **layer, **loss, "head": self.head}
        elif sum(loss.values()) + self.head >= sum(last.values()) - sum(saved.values()):
            name, live = "backward start: loss", {**saved, **loss, "head": self.head}
        else:
            name, live = "backward start: last layer", last
        if self.stem > sum(live.values()):
            name, live = "stem backward", {"stem": self.stem}
        # the stem's gradient placed above the saved set: the heap holds both, and the compiled temp
        # counts what the live set leaves of the heap once more
        slack = max(0, self.activations + self.stem_grad - sum(live.values()))
        if slack:
            live["heap_slack"] = 2 * slack
        return name, live

    def phase(self) -> tuple[str, dict[str, int]]:
        """The phase of the step that sets :attr:`total`, and what it holds beside the arguments.

        The terms sum to ``total - arguments``; a term another phase holds is not among them
        (``tail`` is negative: saved outputs dead in the last layer's backward; ``heap_slack`` is
        the heap's unfilled space the compiled temp counts, see :attr:`start`; ``loop_carried`` a scanned
        stack's carried buffers counted again, see :attr:`scan_stack`).

        >>> Peak(arguments=10, grads=4, activations=6, logits=3).phase()[0]
        'backward start'
        >>> Peak(activations=6, gathered=5, logits=3, head=1, loss_apart=True, tail=2).phase()
        ('backward start: loss', {'activations': 6, 'scores': 0, 'experts': 0, 'gathered_kept': 0, \
'gathered_overflow': 0, 'logits': 3, 'logits_grad': 0, 'head': 1})
        >>> Peak(grads=9, gathered_last=2, activations=6).phase()
        ('backward end', {'grads': 9, 'gathered_last': 2})
        """
        if self.end > self.start:
            return "backward end", {"grads": self.grads, "gathered_last": self.gathered_last}
        return self._start_phase()

    @property
    def end(self) -> int:
        """Live beside the arguments when the backward pass ends: the gradients and the last gathered layer."""
        return self.grads + self.gathered_last

    def to_dict(self) -> dict:
        return {"arguments": self.arguments, "grads": self.grads, "activations": self.activations,
                "scores": self.scores, "gathered": self.gathered, "attention": self.attention,
                "recompute": self.recompute, "logits": self.logits, "logits_grad": self.logits_grad,
                "gathered_last": self.gathered_last,
                "experts": self.experts, "expert_work": self.expert_work, "gathered_kept": self.gathered_kept,
                "conv_work": self.conv_work, "gathered_async": self.gathered_async,
                "gathered_overflow": self.gathered_overflow, "head": self.head, "score_stack": self.score_stack,
                "tail": self.tail, "stem": self.stem, "stem_grad": self.stem_grad, "expert_phase": self.expert_phase,
                "forward_end": self.forward_end,
                "scan_grads": self.scan_grads, "scan_stack": self.scan_stack, "scan_logits": self.scan_logits,
                "saved_terms": dict(self.saved_terms), "total": self.total}

    def _saved_from(self) -> list[str]:
        """How :attr:`activations` differs from the memory table's activations row, when it does.

        >>> Peak(activations=6, saved_terms=(("row outputs freed", -4),))._saved_from()
        ['      = activations row 10 B - 4 B row outputs freed']
        """
        if not self.saved_terms:
            return []
        row = self.activations - sum(t for _, t in self.saved_terms)
        return [f"      = activations row {fmt_bytes(row)}"
                + "".join(f" {'-' if t < 0 else '+'} {fmt_bytes(abs(t))} {n}" for n, t in self.saved_terms)]

    def report_lines(self) -> list[str]:
        fmt = fmt_bytes
        at = self.phase()[0]
        # the formula's first side is the start-side phase's: a phase priced whole is named, not summed
        name, held = self._start_phase()
        start = {"forward end": "end of the forward pass", "stem backward": "conv stem backward",
                 "backward start: loss": "saved + logits + head",
                 "backward start: last layer": "saved + layer - dead outputs"}.get(
                     name, "saved + layer + logits" + (" + head" if held.get("head") else ""))
        start += " + the loop's gradients + its carried buffers again" if "loop_carried" in held else ""
        start += " + the logits the loss's value reads after the loop" if held.get("scan_logits") else ""
        start += f" + heap slack {fmt(held['heap_slack'])}" if "heap_slack" in held else ""
        out = [f"  peak per device{fmt(self.total):>13}  (at the {at}; arguments + max({start}, "
               "grads + last gathered layer))",
               f"    {'arguments':<36}{fmt(self.arguments):>12}  params, optimizer and model state, batch",
               f"    {'saved activations':<36}{fmt(self.activations):>12}  layer outputs kept for backward",
               *self._saved_from(),
               f"    {'saved attention scores':<36}{fmt(self.scores):>12}  attention probabilities (none under remat)"]
        if self.experts or self.expert_work:
            out.append(f"    {'saved expert hidden':<36}{fmt(self.experts):>12}  in flight {fmt(self.expert_work)}")
        if self.gathered_kept:
            out.append(f"    {'kept gathered weights':<36}{fmt(self.gathered_kept):>12}  fsdp, no remat: the other "
                       "layers', kept for backward")
        if self.gathered_async:
            out.append(f"    {'async-gathered weights, again':<36}{fmt(self.gathered_async):>12}  held by async "
                       "all-gathers: XLA:TPU's temp counts them twice")
        if self.gathered_overflow:
            out.append(f"    {'async-gathered, past the chip':<36}{fmt(self.gathered_overflow):>12}  a layer's "
                       "kernels beyond the on-chip memory, held by async all-gathers: counted twice")
        out += [f"    {'working set: one layer':<36}{fmt(self.layer):>12}  gathered fsdp weights "
                f"{fmt(self.gathered)}, attention scores {fmt(self.attention)}, remat recompute "
                f"{fmt(self.recompute)}" + (f", conv maps {fmt(self.conv_work)}" if self.conv_work else "")
                + (f", float32 scores' region stacked {fmt(self.score_stack)}" if self.score_stack else "")
                + ("; its larger backward phase (attention or expert)" if self.phased and self.expert_work else ""),
                f"    {'working set: logits':<36}{fmt(self.logits + self.logits_grad):>12}  float32, at the loss"
                + (f"; their gradient {fmt(self.logits_grad)} apart (a next-token loss reads a slice)"
                   if self.logits_grad else "")
                + (f"; head's gathered kernel (and gradient) {fmt(self.head)}" if self.head else "")
                + ("; remat: a phase apart from the layer's (the larger counts)" if self.loss_apart else "")
                + (f"; the last block's and final norm's saved outputs {fmt(self.tail)} dead in the layer's"
                   if self.tail else ""),
                f"    {'gradients (at the end)':<36}{fmt(self.grads):>12}  + last gathered layer "
                f"{fmt(self.gathered_last)}"]
        if self.forward_end:
            out.insert(-1, f"    {'end of the forward pass (a phase)':<36}{fmt(self.forward_end):>12}  the live set "
                       "then, beside the arguments: norm inputs kept for outputs, the final norm's float32 maps, no "
                       "scores in flight")
        if self.scan_grads or self.scan_stack:
            held = self.phase()[1]
            out.insert(-1, f"    {'scanned stack, backward loop':<36}{fmt(self.scan_grads):>12}  its layers' gradients, "
                       f"carried whole; the temp counts the carried buffers (inputs stack {fmt(self.scan_stack)}) "
                       f"again: {fmt(held.get('loop_carried', 0))}" + ("" if "loop_carried" in held else
                                                                      " (not in the phase that sets the peak)")
                       + (f"; the float32 logits live through it: {fmt(self.scan_logits)}" if self.scan_logits else ""))
        if self.stem:
            out.insert(-1, f"    {'conv stem backward (a phase)':<36}{fmt(self.stem):>12}  its kept maps and gradients"
                       + (f"; the pool input's gradient {fmt(self.stem_grad)} in HBM above the saved set (the "
                          "temp counts the heap's slack again)" if self.stem_grad else ""))
        return out


def plan_leaves(decisions: Mapping[str, Any]) -> tuple[tuple[str, tuple[int, ...], str, str], ...]:
    """``(path, shape, dtype, spec)`` of every decision: what an estimate was made for (:attr:`Estimate.made_for`).
    A leaf stored head-aligned (``Decision.layout``, ``plan(..., fused="aligned")``) has its layout after its spec
    (the estimate prices no reshard of it), a frozen one (``plan(..., trainable=)``) ``frozen`` (no gradient).

    >>> import jax, tpflax
    >>> plan_leaves(tpflax.plan({"w": jax.ShapeDtypeStruct((8, 4), "float32")}, {"model": 2}).decisions)
    (('w', (8, 4), 'float32', 'P(None, None)'),)
    """
    return tuple((p, tuple(d.shape), str(d.dtype),
                  str(d.spec) + (f" stored {d.layout}" if getattr(d, "layout", None) is not None else "")
                  + ("" if getattr(d, "trainable", True) else " frozen"))
                 for p, d in decisions.items())


@dataclass(frozen=True)
class Estimate:
    """Memory per device and communication per training step.

    Attributes:
        per_device: :class:`Memory` on the fullest device.
        unsharded: the same for one device holding everything.
        savings: percent saved per device, per field and ``"total"``.
        comm: ``{kind: {axis label: bytes per step}}`` (ring bytes one device sends).
        items: every modelled collective.
        mesh: the plan's mesh shape.
        batch: ``{"size", "shards", "axes"}`` of the global batch.
        notes: assumptions and anything that could not be modelled.
        settings: optimizer, backend, remat, dtypes used.
        breakdown: the per-device peak term by term (:class:`Peak`).
        made_for: the priced plan's leaves, ``(path, shape, dtype, spec)`` each (:func:`plan_leaves`): a report
            refuses the estimate beside another plan.
    """

    per_device: Memory
    unsharded: Memory
    savings: Mapping[str, float]
    comm: Mapping[str, Mapping[str, float]]
    items: tuple[CommItem, ...]
    mesh: MeshShape
    batch: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    breakdown: Peak = field(default_factory=Peak)
    made_for: tuple[tuple[str, tuple[int, ...], str, str], ...] = field(default=(), repr=False, compare=False)

    @property
    def peak(self) -> int:
        """Bytes per device that must fit in memory at once during one step (see :class:`Peak`)."""
        return self.breakdown.total

    @property
    def comm_total(self) -> float:
        """Bytes one device sends per step, all collectives."""
        return sum(v for by_axis in self.comm.values() for v in by_axis.values())

    def to_dict(self) -> dict:
        return {"per_device": self.per_device.to_dict(), "unsharded": self.unsharded.to_dict(),
                "savings_percent": {k: round(v, 3) for k, v in self.savings.items()},
                "comm_bytes_per_step": {k: dict(v) for k, v in self.comm.items()},
                "comm_total": self.comm_total, "items": [i.to_dict() for i in self.items],
                "batch": dict(self.batch), "notes": list(self.notes), "settings": dict(self.settings),
                "peak": self.peak, "peak_breakdown": self.breakdown.to_dict()}

    def report_lines(self) -> list[str]:
        fmt = fmt_bytes
        s = self.settings
        out = [f"estimate per training step  (optimizer {s.get('optimizer')}, batch "
               f"{self.batch.get('size')} over {self.batch.get('shards')} shard(s), backend "
               f"{s.get('backend')}, remat {'on' if s.get('remat') else 'off'})",
               f"  {'':<14}{'per device':>14}{'unsharded':>14}{'savings':>10}"]
        for name in MEMORY_FIELDS + ("total",):
            a = getattr(self.per_device, name)
            b = getattr(self.unsharded, name)
            if name in ("model_state", "inputs") and not b:
                continue
            # the rows' sum, not what must fit: labelled "total" beside the "peak per device" line below, it read
            # as a second, different requirement (1.7 MiB total over a 1.5 MiB peak for the tiny llama)
            label = "sum of rows" if name == "total" else name
            out.append(f"  {label:<14}{fmt(a):>14}{fmt(b):>14}{self.savings.get(name, 0.0):>9.1f}%")
        out += self.breakdown.report_lines()
        # which step: tpflax's (the README's hand-written one too, its loss in gathered_loss); a bare jitted step
        # may move 0.25x to 2.9x as much (benchmarks/results/plain_step.md)
        out.append("  communication per step of make_train_step's step (bytes each device sends, ring algorithm):")
        if not self.items:
            out.append("    none: every leaf and the batch are whole on every device")
        for kind, by_axis in self.comm.items():
            for axis, v in by_axis.items():
                out.append(f"    {kind:<19}{axis:<16}{fmt(v):>12}")
        if self.items:
            out.append(f"    {'total':<35}{fmt(self.comm_total):>12}")
        for n in self.notes:
            out.append(f"  note: {n}")
        return out


def comm_table(items: Iterable[CommItem]) -> dict[str, dict[str, float]]:
    """``{kind: {axis label: bytes per step}}`` summed over ``items`` (zero-byte items dropped).

    >>> comm_table([CommItem("all-reduce", ("data",), 8.0, 2, 1, "w", "dp")])
    {'all-reduce': {'data': 8.0}}
    """
    comm: dict[str, dict[str, float]] = {}
    for it in items:
        total = it.total
        if total <= 0:
            continue
        by_axis = comm.setdefault(it.kind, {})
        by_axis[it.axis_label] = by_axis.get(it.axis_label, 0.0) + total
    return comm
