"""Which dims of each value carry the batch: the sample's leading dim, followed through the forward.

:func:`batch_dims` walks a jaxpr with a flag per dim of each value (contractions, reshapes, transposes,
broadcasts, reductions, gathers, sorts, calls and scans; elementwise ops keep them) and records each
``dot_general``'s operands' flags. The cost model reads them: whether an expert's dispatched buffer kept the
batch (:mod:`tpflax._src.cost.buffers`), and whether the activation a contraction reads carries it where its
leading dim is no batch's (Swin's windows, ``(batch * windows, tokens, c)``: :attr:`Dataflow.batch_reads`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tpflax._src.jaxprs import CALL_KEYS, body_of, scan_counts


def shape_of(v: Any) -> tuple[int, ...]:
    return tuple(getattr(getattr(v, "aval", None), "shape", ()))


def no_flags(v: Any) -> tuple[bool, ...]:
    return (False,) * len(shape_of(v))


def batch_lead(n: int, size: int | None = None) -> bool:
    """Whether an input whose leading dim is ``n`` holds the batch there, as the step splits its inputs: every
    input's leading dim, whatever its size (a dual encoder's 8 images and 16 captions), unless it is 1; with the
    batch size the user gave (``estimate(plan, tx, 8)``, as ``make_train_step(batch=8)`` is told), only a leading
    dim of that size (the step keeps an input of another leading dim replicated: a positional table)."""
    return n > 1 and size in (None, n)


def batch_leads(shapes: Iterable[Sequence[int]], size: int | None = None) -> frozenset[int]:
    """The leading dims of the inputs of ``shapes`` that hold the batch (:func:`batch_lead`).

    >>> sorted(batch_leads([(8, 32), (16, 32), (1, 4), ()])), sorted(batch_leads([(8, 32), (16, 32)], 8))
    ([8, 16], [8])
    """
    return frozenset(s[0] for s in shapes if s and batch_lead(s[0], size))


def input_flags(v: Any, examples: int | None = None) -> tuple[bool, ...]:
    """A sample input's flags: its leading dim where it holds the batch (:func:`batch_lead`); with ``examples``,
    only a leading dim of that size (the batch size given; the expert buffers' rows,
    :mod:`tpflax._src.cost.buffers`)."""
    return tuple(d == 0 and batch_lead(n, examples) for d, n in enumerate(shape_of(v)))


def sized(shape: Sequence[int], examples: int | None) -> tuple[bool, ...]:
    """A fallback where a primitive is not followed: the dims as long as the batch (a capacity as long as
    the batch reads as one)."""
    return tuple(n == examples for n in shape)


def reshape_flags(a: tuple[bool, ...], src: Sequence[int], dst: Sequence[int]) -> tuple[bool, ...]:
    """Flags through a reshape: the dims of each run whose sizes multiply alike on both sides share them."""
    out: list[bool] = []
    i = j = 0
    while j < len(dst):
        group_in, group_out, p, q = [i] if i < len(src) else [], [j], src[i] if i < len(src) else 1, dst[j]
        i, j = i + 1, j + 1
        while p != q:
            if p < q and i < len(src):
                group_in.append(i)
                p, i = p * src[i], i + 1
            elif j < len(dst):
                group_out.append(j)
                q, j = q * dst[j], j + 1
            else:
                break
        out += [any(a[k] for k in group_in if k < len(a))] * len(group_out)
    return tuple(out)


def _sub(eqn: Any) -> Any:
    """The one sub-jaxpr an equation calls with its own inputs and outputs (pjit, remat, custom_jvp/vjp,
    shard_map), or None."""
    for key in CALL_KEYS:
        j = body_of(eqn.params.get(key))
        if j is not None and len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars):
            return j
    return None


def _joined(a: list[tuple[bool, ...]], b: list[tuple[bool, ...]]) -> list[tuple[bool, ...]]:
    """Per value, the dims either side carries the batch on (one side's flags where the ranks differ)."""
    return [tuple(x or y for x, y in zip(f, g, strict=True)) if len(f) == len(g) else f for f, g in zip(a, b, strict=True)]


def _while(prm: dict, fs: list[tuple[bool, ...]], outs: list, dots: dict, examples: int | None) -> list[tuple[bool, ...]]:
    """A ``while``'s carries: its inputs are cond consts, body consts, then the carries; the body takes body
    consts + carries. The carries keep what they came in with and whatever the body adds, walked until no
    flag changes (each pass only sets flags); the body's contractions are recorded on the last pass."""
    body, n = prm["body_jaxpr"].jaxpr, len(outs)  # jax may one day leave the nconsts out (trace.control.while_)
    cn = int(prm.get("cond_nconsts", len(prm["cond_jaxpr"].jaxpr.invars) - n))
    bn = int(prm.get("body_nconsts", len(body.invars) - n))
    consts, carry = fs[cn:cn + bn], fs[cn + bn:]
    for _ in range(sum(map(len, carry)) + 1):
        got = _joined(carry, batch_dims(body, consts + carry, {}, examples))
        if got == carry:
            break
        carry = got
    return _joined(carry, batch_dims(body, consts + carry, dots, examples))


def _scan(eqn: Any, body: Any, fs: list[tuple[bool, ...]], dots: dict, examples: int | None) -> list[tuple[bool, ...]]:
    """A ``scan``'s outputs: its inputs are consts, carries, then the scanned arrays (each step takes one row of
    them); the body gives the carries, then the stacked rows. A carry keeps what it came in with and whatever the
    body adds (``h = h + x_t @ w`` over a batched ``x`` starts unbatched and picks the batch up on step one),
    walked like :func:`_while`'s until no flag changes; the body's contractions are recorded on the last pass."""
    k, c = scan_counts(eqn, body)  # jax 0.12's scan has no num_consts/num_carry
    consts, carry, xs = fs[:k], fs[k:k + c], [f[1:] for f in fs[k + c:]]
    for _ in range(sum(map(len, carry)) + 1):
        got = _joined(carry, batch_dims(body, consts + carry + xs, {}, examples)[:c])
        if got == carry:
            break
        carry = got
    got = batch_dims(body, consts + carry + xs, dots, examples)
    return _joined(carry, got[:c]) + [(False, *f) for f in got[c:]]


def batch_dims(jaxpr: Any, ins: list[tuple[bool, ...]], dots: dict, examples: int | None) -> list[tuple[bool, ...]]:
    """Walk ``jaxpr`` with the batch flags of its inputs; record each ``dot_general``'s operands' flags in
    ``dots`` (by equation id); the flags of its outputs."""
    env = {v: f for v, f in zip(jaxpr.invars, ins, strict=True)}

    def get(v: Any) -> tuple[bool, ...]:
        return env.get(v, no_flags(v)) if type(v).__name__ != "Literal" else ()

    for eqn in jaxpr.eqns:
        fs = [get(v) for v in eqn.invars]
        outs = [sized(shape_of(o), examples) for o in eqn.outvars]
        name, prm = eqn.primitive.name, eqn.params
        if name == "dot_general":
            dots.setdefault(id(eqn), fs)
            (lc, rc), (lb, rb) = prm["dimension_numbers"]
            lhs, rhs = fs
            outs = [tuple(lhs[a] or rhs[b] for a, b in zip(lb, rb, strict=True))
                    + tuple(lhs[d] for d in range(len(lhs)) if d not in lc and d not in lb)
                    + tuple(rhs[d] for d in range(len(rhs)) if d not in rc and d not in rb)]
        elif name == "ragged_dot_general":  # (rows, d) x (groups, d, f): the lhs's rows, then the kernel's free dims
            dots.setdefault(id(eqn), fs[:2])
            rn = prm["ragged_dot_dimension_numbers"]
            (lc, rc), (lb, rb) = rn.dot_dimension_numbers
            lhs, rhs = fs[:2]
            skip = set(rc) | set(rb) | set(rn.rhs_group_dimensions)
            outs = [tuple(lhs[a] or rhs[b] for a, b in zip(lb, rb, strict=True))
                    + tuple(lhs[d] for d in range(len(lhs)) if d not in lc and d not in lb)
                    + tuple(rhs[d] for d in range(len(rhs)) if d not in skip)]
        elif name == "sort":  # sorted along a dim that carried the batch, every device needs all of it
            same = [f for f in fs if len(f) == len(shape_of(eqn.outvars[0]))]
            flags = [any(x) for x in zip(*same, strict=True)] if same else list(no_flags(eqn.outvars[0]))
            flags[prm["dimension"]] = False
            outs = [tuple(flags)] * len(eqn.outvars)
        elif name == "gather":  # the index dims carry the indices' flags, the offset dims the operand's
            dn = prm["dimension_numbers"]
            kept = [f for d, f in enumerate(fs[0]) if d not in dn.collapsed_slice_dims
                    and d not in dn.operand_batching_dims]
            index = list(fs[1][:-1])
            o = []
            for d in range(len(shape_of(eqn.outvars[0]))):
                o.append(kept.pop(0) if d in dn.offset_dims and kept else index.pop(0) if index else False)
            outs = [tuple(o)]
        elif name == "reshape":
            outs = [reshape_flags(fs[0], shape_of(eqn.invars[0]), shape_of(eqn.outvars[0]))]
        elif name == "transpose":
            outs = [tuple(fs[0][d] for d in prm["permutation"])]
        elif name == "broadcast_in_dim":
            o = [False] * len(shape_of(eqn.outvars[0]))
            for k, d in enumerate(prm["broadcast_dimensions"]):
                o[d] = fs[0][k]
            outs = [tuple(o)]
        elif "axes" in prm and name.startswith(("reduce", "arg")):
            outs = [tuple(f for d, f in enumerate(fs[0]) if d not in prm["axes"])] * len(eqn.outvars)
        elif name == "squeeze":
            outs = [tuple(f for d, f in enumerate(fs[0]) if d not in prm["dimensions"])]
        elif name == "scan":
            body = body_of(prm["jaxpr"])
            outs = _scan(eqn, body, fs, dots, examples)
        elif name == "while":
            outs = _while(prm, fs, outs, dots, examples)
        elif name == "cond":  # the first input picks the branch; each takes the rest: a flag any branch sets
            got = [batch_dims(br.jaxpr, fs[1:], dots, examples) for br in prm["branches"]]
            outs = got[0]
            for g in got[1:]:
                outs = _joined(outs, g)
        elif (sub := _sub(eqn)) is not None:
            outs = batch_dims(sub, fs, dots, examples)
        else:  # elementwise, cumulative, top_k, select, ...: an output of an input's rank keeps its flags
            for k, o in enumerate(eqn.outvars):
                same = [f for f in fs if len(f) == len(shape_of(o))]
                if same:
                    outs[k] = tuple(any(x) for x in zip(*same, strict=True))
                elif all(len(f) == 0 for f in fs):  # made from no array, only scalars (iota, a constant): no batch
                    outs[k] = no_flags(o)
        for o, f in zip(eqn.outvars, outs, strict=True):  # a walk that lost track of a rank: the sized fallback
            env[o] = f if len(f) == len(shape_of(o)) else sized(shape_of(o), examples)
    return [get(v) for v in jaxpr.outvars]
