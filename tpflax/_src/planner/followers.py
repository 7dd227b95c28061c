"""Leaves that follow a decided kernel in the traced plan: depthwise convolution kernels, biases,
per-channel parameters (Mamba's ``A_log`` and ``D``), and the elementwise scales left whole; and the leaves
kept whole whose gradient a kernel's split would split (:func:`whole_reached`)."""

from __future__ import annotations

from collections.abc import Mapping

from tpflax._src.facts.classify import Facts
from tpflax._src.planner.builders import OUTPUT_SPLITS, State, bias_follows, short
from tpflax._src.specs import entry_axes, used_axes
from tpflax._src.trace.dataflow import Dataflow, Use
from tpflax._src.trace.records import reached_dims


def follow(st: State, flow: Dataflow, fx: Mapping[str, Facts]) -> None:
    """Depthwise kernels, biases and per-channel parameters split like the output they meet; the rest of
    the elementwise parameters whole."""
    _depthwise(st, flow, fx)
    _biases(st, flow, fx)
    _channels(st, flow, fx)
    _elementwise(st, flow, fx)


def _channels(st: State, flow: Dataflow, fx: Mapping[str, Facts]) -> None:
    """A parameter combined elementwise with a column's split output features: split like them (a bias's
    rule), so no device gathers its gradient from the others' channels."""
    for path, by in flow.channels.items():
        if path not in fx or path in st.out or any(u.path == path for u in flow.uses):
            continue
        for uid, align in sorted(by.items()):
            kpath = flow.uses[uid].path
            kp = st.decided(kpath)
            if kp is None or kpath in st.forced or kp.strategy not in OUTPUT_SPLITS:
                continue
            spec = [None] * len(fx[path].leaf.shape)
            for ld, kd in align.items():
                if ld < len(spec) and kd < len(kp.spec):
                    spec[ld] = kp.spec[kd]
            if any(spec):
                bias_follows(st, fx[path], fx[path].body_of(spec), kpath,
                             f"per-channel parameter (traced: combined elementwise with the output of {short(kpath)})")
                break


def _depthwise(st: State, flow: Dataflow, fx: Mapping[str, Facts]) -> None:
    """Depthwise convolution kernels: split like the output their input channels are (a bias's rule)."""
    for path, (uid, align) in flow.channelwise.items():
        if path not in fx or path in st.out:
            continue
        f, kpath = fx[path], flow.uses[uid].path
        kp = st.decided(kpath)
        if kp is None:
            st.replicate(f, f"depthwise conv (traced): its input channels come from {short(kpath)}, "
                              "which the trace does not decide")
            continue
        spec = [None] * len(f.leaf.shape)
        for ld, kd in align.items():
            if ld < len(spec) and kd < len(kp.spec):
                spec[ld] = kp.spec[kd]
        bias_follows(st, f, f.body_of(spec), kpath, f"depthwise conv (traced: one output channel per input "
                                                      f"channel, which the output of {short(kpath)} makes)")


def _biases(st: State, flow: Dataflow, fx: Mapping[str, Facts]) -> None:
    """Biases follow the contraction whose output they are added to."""
    for path, (uid, align) in flow.biases.items():
        if path not in fx or path in st.out:
            continue
        f = fx[path]
        kpath = flow.uses[uid].path
        kp = st.decided(kpath)  # a kernel a user rule or annotation forced is followed too
        if kp is None:
            continue
        spec = [None] * len(f.leaf.shape)
        for ld, kd in align.items():
            if ld < len(spec) and kd < len(kp.spec):
                spec[ld] = kp.spec[kd]
        bias_follows(st, f, f.body_of(spec), kpath, f"bias (traced: added to the output of {short(kpath)})")


def _elementwise(st: State, flow: Dataflow, fx: Mapping[str, Facts]) -> None:
    """Small parameters combined elementwise with activations (norm scales and shifts)."""
    for path, f in fx.items():
        if path in st.out or path not in flow.elementwise or len(f.body) != 1:
            continue
        st.replicate(f, "scale/shift (traced): combined elementwise with activations (a norm's or a "
                          "cell's parameter); tiny, not split over the tensor axes")


def whole_reached(st: State, flow: Dataflow, fx: Mapping[str, Facts], u: Use,
                  meets: tuple[tuple[str, int, str, int], ...]) -> list[Facts]:
    """The trained leaves whose gradient splitting ``u``'s output features would split: their dims meet those
    features along the trace (:meth:`~tpflax._src.trace.records.Dataflow.meets`; the kernels reading the
    output, what is summed with it), and they are not split over the tensor axes (nor undecided splits: a
    later decision is taken as whole). The kernel's own followers (its bias) split with it. The estimate
    prices the same leaves (:func:`tpflax._src.cost.stream.split_grads`): XLA runs their update split and
    gathers them back."""
    mine = {u.id} | {w.id for w in flow.uses if w.path == u.path}
    follows = {p for p, (uid, _) in (*flow.biases.items(), *flow.channelwise.items()) if uid in mine}
    follows |= {p for p, by in flow.channels.items() if set(by) & mine}
    tensor = set(entry_axes(st.tensor[0]))
    out = []
    for p in sorted({p for p, _ in reached_dims(meets, {(u.path, k) for k in u.kept})}):
        f, q = fx.get(p), st.decided(p)
        if p == u.path or p in follows or f is None or not f.leaf.trainable or \
                (q is not None and used_axes(q.spec) & tensor):
            continue
        out.append(f)
    return out
