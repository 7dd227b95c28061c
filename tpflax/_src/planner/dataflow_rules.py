"""Dataflow rules: proposals for the leaves the traced forward pass explains.

Reads a :class:`tpflax._src.trace.dataflow.Dataflow` and speaks the tree
heuristics' vocabulary (pairs, conv pairs, experts, fsdp).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tpflax._src.trace.dataflow import Dataflow, Edge, Use

_CONTRACT = ("dot", "conv")


def _via(via: Sequence[str]) -> str:
    return "through " + ", ".join(via) if via else "directly"


def propose(facts: Sequence[Any], mesh: Any, opts: Any, flow: Dataflow, skip: Iterable[str] = ()):
    """Proposals for the leaves the dataflow explains; ``(proposals, pairs)``.

    Leaves in ``skip`` (rules, annotations) and leaves the trace says nothing
    about are left to the tree heuristics. Uses the heuristics' pair, conv-pair,
    expert and fsdp helpers so both planners speak the same vocabulary.
    """
    from tpflax._src.planner import heuristics as H
    from tpflax._src.planner.heuristics import Proposal, _axis, _short
    from tpflax._src.mesh import EXPERT

    st = H._State(mesh, opts, forced=set(skip))
    t_entry, t_size = st.tensor
    e_entry, e_size = mesh.group(EXPERT)
    known = set(flow.paths)
    fx: dict[str, Any] = {}
    for f in facts:
        if f.path not in known or f.path in st.forced:
            continue
        # The trace knows which dim a scan slices: that, not a name, makes a stack.
        stacked = 1 if flow.scanned.get(f.path) == 0 else 0
        fx[f.path] = f if stacked == f.stacked else dataclasses.replace(f, stacked=stacked)
    uses: dict[str, list[Use]] = defaultdict(list)
    for u in flow.uses:
        if u.path in fx:
            uses[u.path].append(u)

    def replicate(f, reason: str, pair: int | None = None) -> None:
        st.put(f, (None,) * len(f.body), "replicate", reason, pair)

    # 1. recurrent cells: a kernel applied at every step of a loop.
    for path, us in uses.items():
        steps = [u.scan_length for u in us if u.op in _CONTRACT and u.scan_length]
        if steps:
            back = any(u.id in flow.recurrent for u in us)
            replicate(fx[path], f"recurrent cell kernel (traced): contracted inside a loop body at each of "
                                f"its {steps[0]} steps" + ("; its output returns through the carry" if back
                                                          else "") +
                      "; a tensor split would need a collective at every step, so kept whole")

    # 2. embeddings: gathered rows or one-hot matmuls; tied when also the logits kernel.
    for path, us in uses.items():
        look = [u for u in us if u.op in ("gather", "onehot")]
        f = fx[path]
        if not look or path in st.out or len(f.body) != 2 or len(look[0].contracted) != 1:
            continue
        u = look[0]
        v = u.contracted[0] - f.stacked
        d = 1 - v
        tied = any(w.op == "dot" and (d + f.stacked) in w.contracted for w in us)
        how = "one-hot matmul" if u.op == "onehot" else "gather"
        ev = f"looked up by integer ids ({how} over dim {v}, {f.body[v]} rows)"
        if tied:
            ev += f"; also contracted over dim {d} as the logits kernel (tied output projection)"
        if t_size == 1:
            replicate(f, f"embedding (traced): {ev}; no tensor axis in the mesh")
        elif f.body[v] % t_size == 0:
            spec = [None, None]
            spec[v] = t_entry
            st.put(f, spec, "vocab", f"vocab: {ev}; {f.body[v]} rows split over {_axis(t_entry, t_size)} "
                                     f"(vocab-parallel lookup{' and logits' if tied else ''})")
        elif f.body[d] % t_size == 0:
            spec = [None, None]
            spec[d] = t_entry
            st.put(f, spec, "vocab", f"vocab: {ev}; {f.body[v]} rows not divisible by {t_size}, so the "
                                     f"embedding dim {f.body[d]} is split over {_axis(t_entry, t_size)}")
        else:
            replicate(f, f"embedding (traced): {ev}; neither dim divides {_axis(t_entry, t_size)}")

    # 3. column -> row pairs, in program order of the row.
    counts = {p: sum(u.op in _CONTRACT for u in us) for p, us in uses.items()}
    cand = {u.id: u for p, us in uses.items() for u in us if u.op in _CONTRACT and counts[p] == 1}
    out_edges: dict[tuple[int, int], list[Edge]] = defaultdict(list)
    in_edges: dict[int, list[Edge]] = defaultdict(list)
    for e in flow.edges:
        if e.src_use in cand and e.dst_use in cand:
            out_edges[(e.src_use, e.src_dim)].append(e)
            in_edges[e.dst_use].append(e)

    def col_ok(uid: int, dim: int) -> bool:
        return (uid, dim) not in flow.escapes and (uid, dim) not in flow.outputs

    for rid in sorted(cand):
        R = cand[rid]
        if R.path in st.out:
            continue
        fR = fx[R.path]
        by_rdim: dict[int, dict[int, Edge]] = defaultdict(dict)
        for e in in_edges[rid]:
            S = cand[e.src_use]
            if S.path in st.out or S.path == R.path or not col_ok(S.id, e.src_dim):
                continue
            if {x.dst_use for x in out_edges[(S.id, e.src_dim)]} != {rid}:
                continue  # its output also feeds another contraction: not a clean pair
            prev = by_rdim[e.dst_dim].get(S.id)
            if prev is None or e.src_dim < prev.src_dim:
                by_rdim[e.dst_dim][S.id] = e
        if not by_rdim:
            continue
        # An expert dim: the leading dim of both kernels, kept by the column and summed by
        # the row together with the features (or a dot_general batch dim).
        lead = fR.stacked
        expert = None
        if len(fR.body) == 3 and len(by_rdim) >= 2 and lead in by_rdim and all(
                e.src_dim == fx[e.src].stacked and len(fx[e.src].body) == 3 for e in by_rdim[lead].values()):
            expert = lead
        if R.batch and len(fR.body) == 3:
            expert = R.batch[0]
        choices = [d for d in by_rdim if d != expert]
        if not choices:
            continue
        rdim = max(choices, key=lambda d: (len(by_rdim[d]), -d))
        cols = by_rdim[rdim]
        vias = sorted({_via(e.via) for e in cols.values()}, key=len)
        rb = rdim - fR.stacked
        if expert is not None and len(cols) == 1:
            (sid, e), = cols.items()
            fS = fx[cand[sid].path]
            cb = e.src_dim - fS.stacked
            E = fR.body[expert - fR.stacked]
            if fS.body[0] == E and cb == 2 and rb == 1 and fS.body[2] == fR.body[1]:
                H._shard_experts(st, fS, fR, E, fS.body[2], t_entry, t_size, e_entry, e_size)
                for p in (fS.path, fR.path):
                    q = st.out[p]
                    st.out[p] = Proposal(q.spec, q.strategy, q.reason + (
                        f"; traced: dim 0 ({E}) is kept by {_short(fS.path)} and summed by "
                        f"{_short(fR.path)} with the ffn dim, {_via(e.via)} (experts)"), q.pair)
                continue
        lins = []
        for sid, e in sorted(cols.items()):
            S = cand[sid]
            fS = fx[S.path]
            cb = e.src_dim - fS.stacked
            limit = 0
            for x in out_edges[(sid, e.src_dim)]:
                limit = math.gcd(limit, x.limit)
            lins.append(H._Linear(
                fS, tuple(c - fS.stacked for c in S.contracted), (cb,),
                heads=cb if len(fS.body) == 3 else None, role="column",
                why=f"traced: its output reaches {_short(R.path)} {_via(e.via)}",
                limit=limit if limit and limit != fS.body[cb] else None))
        row = H._Linear(fR, (rb,), tuple(k - fR.stacked for k in R.kept),
                        heads=rb if len(fR.body) == 3 else None, role="row",
                        why=f"traced: its contraction sums kernel dim {rb} against that output")
        if R.op == "conv" and len(lins) == 1 and cand[next(iter(cols))].op == "conv":
            H._shard_conv_pair(st, lins[0].f, fR, lins[0].out_dims[0], rb,
                               why=f"traced: output channels reach {_short(R.path)} {vias[0]}")
            continue
        kind = "attention" if any("dot" in e.via for e in cols.values()) else "mlp"
        H._shard_pair(st, kind, lins, row, t_entry, t_size)

    # 4. output projections and unpaired contractions.
    for path, f in fx.items():
        if path in st.out:
            continue
        cu = [u for u in uses[path] if u.op in _CONTRACT]
        if not cu:
            continue
        if len(cu) > 1:
            replicate(f, f"shared weights (traced): contracted {len(cu)} times in the forward pass; "
                         "kept whole")
            continue
        u = cu[0]
        heads = [k for k in u.kept if (u.id, k) in flow.outputs and not out_edges.get((u.id, k))]
        kind = "conv" if u.op == "conv" else "dense"
        if heads and u.op == "dot":
            b = heads[0] - f.stacked
            n = f.body[b]
            ev = f"output projection (traced): its {n} outputs (dim {b}) are the model's output, with no " \
                 "later contraction"
            if t_size > 1 and n % t_size == 0:
                spec = [None] * len(f.body)
                spec[b] = t_entry
                st.put(f, spec, "column", f"{ev}; split over {_axis(t_entry, t_size)} (vocab-parallel logits)")
            else:
                replicate(f, f"{ev}; " + ("no tensor axis in the mesh" if t_size == 1 else
                                          f"{n} not divisible by {_axis(t_entry, t_size)}, kept whole"))
            continue
        replicate(f, f"{kind} without a partner (traced): {_why_not_column(u, flow, st, out_edges)}; "
                     f"{_why_not_row(u, in_edges, st)}")

    # 5. biases follow the contraction whose output they are added to.
    for path, (uid, align) in flow.biases.items():
        if path not in fx or path in st.out:
            continue
        f = fx[path]
        kpath = flow.uses[uid].path
        kp = st.out.get(kpath)
        if kp is None:
            continue
        spec = [None] * len(f.leaf.shape)
        for ld, kd in align.items():
            if ld < len(spec) and kd < len(kp.spec):
                spec[ld] = kp.spec[kd]
        if any(spec) and kp.strategy.split("+")[0] in ("column", "heads", "channel", "vocab", "expert"):
            strategy = "channel" if kp.strategy.startswith("channel") else "column"
            st.out[path] = Proposal(tuple(spec), strategy,
                                    f"bias (traced: added to the output of {_short(kpath)}, "
                                    f"{kp.strategy}): split like that output", kp.pair)
        else:
            st.out[path] = Proposal((None,) * len(f.leaf.shape), "replicate",
                                    f"bias (traced: added to the output of {_short(kpath)}, "
                                    f"{kp.strategy}): added after the reduction, so replicated", kp.pair)

    # 6. small parameters combined elementwise with activations (norm scales and shifts).
    for path, f in fx.items():
        if path in st.out or path not in flow.elementwise or len(f.body) != 1:
            continue
        replicate(f, "scale/shift (traced): combined elementwise with activations (a norm's or a "
                     "cell's parameter); tiny and needed whole by every device")

    H._fsdp(st, [f for p, f in fx.items() if p in st.out])
    out = {p: q for p, q in st.out.items() if p not in st.forced}
    return out, list(st.pairs)


def _why_not_column(u: Use, flow: Dataflow, st: Any, out_edges) -> str:
    from tpflax._src.planner.heuristics import _short

    for k in u.kept:
        if (u.id, k) in flow.escapes:
            return f"its output (dim {k}) {flow.escapes[(u.id, k)]}"
        dsts = sorted({e.dst for e in out_edges.get((u.id, k), ())})
        if len(dsts) > 1:
            return f"its output feeds {len(dsts)} contractions ({', '.join(_short(d) for d in dsts[:3])})"
        if dsts and dsts[0] in st.out:
            return f"its output feeds {_short(dsts[0])}, already {st.out[dsts[0]].strategy}"
    return "its output is not summed by another parameter's contraction"


def _why_not_row(u: Use, in_edges, st: Any) -> str:
    from tpflax._src.planner.heuristics import _short

    srcs = sorted({e.src for e in in_edges.get(u.id, ())})
    if not srcs:
        return "its input is not a split-able output of another kernel (model input, lookup or norm)"
    return f"its input comes from {', '.join(_short(s) for s in srcs[:3])}, which cannot stay split"


def disagreements(traced: Mapping[str, Any], tree: Mapping[str, Any]) -> list[str]:
    """One line per leaf where the traced proposal and the tree heuristics' differ."""
    from tpflax._src.specs import entries, to_pspec

    out = []
    for path, p in traced.items():
        b = tree.get(path)
        if b is None:
            continue
        n = max(len(p.spec), len(b.spec))
        if entries(p.spec, n) != entries(b.spec, n):
            out.append(f"{path}: traced {to_pspec(p.spec)} ({p.strategy}) but the tree heuristics give "
                       f"{to_pspec(b.spec)} ({b.strategy}: {b.reason.split(';')[0]}); the trace wins")
    return out
