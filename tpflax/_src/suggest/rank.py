"""Ranking the candidates: link bandwidths, the reason for each rank, degrees, and the no-fit error."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tpflax._src.cost.batch import config_value
from tpflax._src.cost.scope import body
from tpflax._src.errors import NoFitError
from tpflax._src.hardware import Hardware
from tpflax._src.mesh import TENSOR, MeshShape, batch_label
from tpflax._src.specs import fmt_bytes
from tpflax._src.suggest.records import Candidate, Degree, Suggestion, fmt_time


def link_local(ms: MeshShape, axes: Sequence[str], domain: int) -> bool:
    """True when every group of ``axes`` lies within one aligned block of ``domain`` devices.

    >>> from tpflax._src.mesh import mesh_shape
    >>> ms = mesh_shape({"data": 2, "model": 4})
    >>> link_local(ms, ["model"], 4), link_local(ms, ["data"], 4)
    (True, False)
    """
    n = ms.size
    if domain >= n:
        return True
    return _within_block(tuple(s for _, s in ms.axes), tuple(ms.names.index(a) for a in axes), domain)


@functools.lru_cache(maxsize=4096)
def _within_block(shape: tuple[int, ...], idx: tuple[int, ...], domain: int) -> bool:
    n = math.prod(shape)
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    span = sum((shape[k] - 1) * strides[k] for k in idx)
    coords = np.indices(shape).reshape(len(shape), -1)
    base = np.zeros(n, dtype=np.int64)
    for k in range(len(shape)):
        if k not in idx:
            base += coords[k] * strides[k]
    base = np.unique(base)
    return bool(np.all(base // domain == (base + span) // domain))


def comm_times(hw: Hardware, ms: MeshShape, comm) -> tuple[float, dict[str, float], dict[str, str]]:
    """Seconds per step (no overlap), seconds per axis label, and the link each label uses.

    >>> from tpflax._src.hardware import get_hardware
    >>> from tpflax._src.mesh import mesh_shape
    >>> t, _, links = comm_times(get_hardware("h100"), mesh_shape({"data": 2}), {"all-reduce": {"data": 1e9}})
    >>> links
    {'data': 'NVLink'}
    """
    by_axis: dict[str, float] = {}
    links: dict[str, str] = {}
    for kind_axes in comm.values():
        for label, v in kind_axes.items():
            axes = [a for a in label.split("+") if a in ms.sizes]
            fast = link_local(ms, axes, hw.fast_domain)
            bw = hw.fast_bandwidth if fast else hw.slow_bandwidth
            links[label] = hw.fast_name if fast else hw.slow_name
            by_axis[label] = by_axis.get(label, 0.0) + v / bw
    return sum(by_axis.values()), by_axis, links


# ---------------------------------------------------------------------------


def biggest(memory) -> str:
    """The largest part of a :class:`tpflax._src.cost.records.Memory`, for a rejection reason.

    >>> from tpflax._src.cost.records import Memory
    >>> biggest(Memory(params=10, grads=10, opt_state=20 << 20))
    'largest: optimizer state 20.0 MiB'
    """
    parts = {"params": memory.params, "grads": memory.grads, "optimizer state": memory.opt_state,
             "activations": memory.activations}
    name = max(parts, key=parts.get)
    return f"largest: {name} {fmt_bytes(parts[name])}"


def _top_term(c: Candidate) -> tuple[str, str, float]:
    best = ("", "", 0.0)
    for kind, by in c.comm.items():
        for label, v in by.items():
            t = c.time_by_axis.get(label, 0.0) * (v / max(sum(x.get(label, 0.0) for x in c.comm.values()), 1e-30))
            if t > best[2]:
                best = (kind, label, t)
    return best


def _term_times(c: Candidate) -> dict[tuple[str, str], float]:
    out = {}
    for kind, by in c.comm.items():
        for label, v in by.items():
            total = sum(x.get(label, 0.0) for x in c.comm.values())
            out[(kind, label)] = c.time_by_axis.get(label, 0.0) * v / total if total else 0.0
    return out


def why(c: Candidate, first: Candidate, n: int, hw: Hardware) -> str:
    """One line on a ranked candidate's place (against #1 for the runners-up); see :func:`tpflax.suggest_mesh`."""
    t_deg = c.degree(TENSOR)
    if c.rank == 1:
        kind, label, t = _top_term(c)
        text = (f"least estimated communication of the {n} shapes that fit: {fmt_time(c.comm_time)} per step"
                + (f", mostly {kind} over {label} ({fmt_time(t)}, {c.links.get(label, '')})" if kind else
                   ", no collectives at all")
                + f"; {fmt_bytes(c.headroom)} headroom")
        if not c.tensor_local:
            text += (f"; tensor parallelism model={t_deg} crosses hosts ({hw.chips_per_host} per host) because "
                     "no shape keeping it within a host fits")
        return text
    if not c.tensor_local and first.tensor_local:
        return (f"tensor parallelism model={t_deg} crosses hosts ({hw.chips_per_host} devices per host): ranked "
                f"after every shape that keeps it within a host ({fmt_time(c.comm_time)} per step)")
    if first.comm_time and abs(c.comm_time / first.comm_time - 1) < 0.005:
        more = c.per_device - first.per_device
        return (f"ties #1 on communication ({fmt_time(c.comm_time)} per step, within 0.5%); ranked lower for "
                + (f"{fmt_bytes(more)} more memory per device" if more > 0 else "its mesh order")
                + f"; {fmt_bytes(c.headroom)} headroom")
    # by kind of collective, whatever axes it runs over (an all-reduce over data+fsdp replaces one
    # over data): the kind whose time grew most
    mine, theirs = _by_kind(_term_times(c)), _by_kind(_term_times(first))
    diff = max(set(mine) | set(theirs), key=lambda k: _total(mine, k) - _total(theirs, k), default=None)
    ratio = c.comm_time / first.comm_time if first.comm_time else float("inf")
    if diff is None or _total(mine, diff) - _total(theirs, diff) <= 0:
        if math.isclose(c.comm_time, first.comm_time, rel_tol=1e-9):
            return f"same communication time as #1; {fmt_bytes(c.headroom)} headroom vs {fmt_bytes(first.headroom)}"
        return f"{ratio:.2f}x the communication time of #1"
    return (f"{ratio:.2f}x the communication time of #1: {diff} takes {_spent(mine, diff)} vs "
            f"{_spent(theirs, diff)}; {fmt_bytes(c.headroom)} headroom")


def _by_kind(times: Mapping[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (kind, label), t in times.items():
        if t > 0:
            out.setdefault(kind, {})[label] = t
    return out


def _total(by_kind: Mapping[str, Mapping[str, float]], kind: str) -> float:
    return sum(by_kind.get(kind, {}).values())


def _spent(by_kind: Mapping[str, Mapping[str, float]], kind: str) -> str:
    """``"471.8 ms over data+fsdp"`` (its axes, largest first), or ``"none"``."""
    labels = by_kind.get(kind, {})
    if not labels:
        return "none"
    return (f"{fmt_time(_total(by_kind, kind))} over "
            + ", ".join(sorted(labels, key=labels.__getitem__, reverse=True)))


def devices_guess(best: Candidate, devices: int, mem_limit: int) -> int | None:
    """Devices at which the sharded states of ``best`` would shrink enough for its peak to fit (the
    bound of :func:`tpflax._src.suggest.search.more_devices`' search; the activations shrink too, so
    fewer often fit), or None when the states alone cannot make up the excess.
    """
    m = best.memory
    over = best.peak - mem_limit
    states = m.params + m.grads + m.opt_state + m.model_state
    return math.ceil(devices * states / (states - over)) if states > over else None


def no_fit(s: Suggestion, batch_size: int, mem_limit: int, shrink: Any = None, more: Any = None) -> NoFitError:
    """The error when nothing fits: how far the best shape was, and what would help (see ``NoFitError``).

    ``shrink``: the largest smaller batch that fits (:func:`tpflax._src.suggest.shrink.smaller_batch`),
    or None when none does. ``more``: ``(devices, tried)``: the fewest devices some mesh shape fits
    on (a :class:`Candidate`, or None when none of the ``tried`` counts fits).
    """
    est = [c for c in s.rejected if c.memory is not None]
    if not est:
        reasons = list(dict.fromkeys(c.rejected for c in s.rejected))[:8]
        return NoFitError(f"no mesh shape for {s.devices} devices could be planned and estimated", reasons,
                          suggestion=s)
    best = min(est, key=lambda c: c.per_device)
    m = best.memory
    over = best.peak - mem_limit
    helps = []
    states = m.params + m.grads + m.opt_state + m.model_state
    if more is not None and more[0] is not None:
        fit = more[0]
        helps.append(f"more devices: {fit.mesh.size} fit, on {fit.mesh} ({fmt_bytes(fit.peak)} per device at its "
                     "peak; checked with the same estimate)")
    elif more is not None:
        helps.append(f"more devices: none of {', '.join(str(n) for n in more[1])} fits with this batch (checked "
                     "with the same estimate)")
    elif states <= over:
        helps.append(f"more devices alone will not do: params, grads and optimizer state are only {fmt_bytes(states)} "
                     "per device; the rest is activations")
    if shrink is not None:
        helps.append(f"a smaller global batch: {shrink.batch} instead of {batch_size} fits on {shrink.mesh} "
                     f"({fmt_bytes(shrink.needs)} per device; the batch must be a multiple of its {batch_label(shrink.mesh)} = "
                     f"{shrink.shards}); checked with the same estimate")
    elif m.activations:
        helps.append("a smaller global batch alone will not do: none below "
                     f"{batch_size} fits on any mesh shape (activations are {fmt_bytes(m.activations)} per device)")
    # remat saves at most the activations, another optimizer at most its state: a lever smaller than the excess
    # is named as not enough alone, as the device count and the batch are
    if m.activations and not s.settings.get("remat"):
        helps.append(f"remat (rematerialise activations; they are {fmt_bytes(m.activations)} per device)"
                     if m.activations > over else
                     f"remat alone will not do: the activations are only {fmt_bytes(m.activations)} per device")
    if m.opt_state:
        helps.append(f"a cheaper optimizer: its state is {fmt_bytes(m.opt_state)} per device (adafactor factors the "
                     "moments; sgd keeps none)" if m.opt_state > over else
                     f"a cheaper optimizer alone will not do: its state is only {fmt_bytes(m.opt_state)} per device")
    return NoFitError(
        f"the model fits on no mesh shape of {s.devices} devices with {fmt_bytes(mem_limit)} each: the best, "
        f"{best.mesh}, needs {fmt_bytes(best.peak)} per device at its peak ({fmt_bytes(over)} over, "
        f"{100 * over / mem_limit:.0f}%; params {fmt_bytes(m.params)}, grads {fmt_bytes(m.grads)}, optimizer state "
        f"{fmt_bytes(m.opt_state)}, activations {fmt_bytes(m.activations)}); what would help", helps, suggestion=s)


# ---------------------------------------------------------------------------
# tensor-parallel degrees

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def degrees(config: Any, decisions: Mapping[str, Any], devices: int, hw: Hardware) -> tuple[Degree, ...]:
    """Tensor-parallel degrees the model's sizes (config, else its embedding) allow.

    >>> from tpflax._src.hardware import get_hardware
    >>> degrees({"n_heads": 12}, {}, 8, get_hardware("h100"))[0].line()
    'heads 12 allow {1, 2, 3, 4, 6}; blocks model=8: pad to 16 (+4) to allow them'
    """
    cfg = config
    sizes: list[tuple[str, int]] = []
    for name, key in (("heads", "n_heads"), ("kv heads", "n_kv_heads"), ("vocab", "vocab"),
                      ("hidden", "d_model"), ("mlp", "d_ff"), ("experts", "n_experts")):
        v = config_value(cfg, key)
        if isinstance(v, int) and v > 0 and not isinstance(v, bool):
            sizes.append((name, v))
    if not sizes:  # a bare tree: read the embedding
        for d in decisions.values():
            if d.kind == "embedding" and len(body(d)) == 2:
                sizes += [("vocab", body(d)[0]), ("hidden", body(d)[1])]
                break
    usable = [d for d in _divisors(devices) if 1 < d <= max(hw.chips_per_host, 1)]
    out = []
    seen = set()
    for name, v in sizes:
        if (name, v) in seen:
            continue
        seen.add((name, v))
        allowed = tuple(d for d in _divisors(v) if d <= devices)
        blocked = tuple(d for d in usable if v % d)
        pad = None
        if blocked:
            step = math.lcm(*blocked)
            pad = -(-v // step) * step
        out.append(Degree(name, v, allowed, blocked, pad))
    return tuple(out)
