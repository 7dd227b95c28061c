"""Where a layout disagrees with a model's own sharding constraint, and what a whole kernel meeting split features
moves: pure over specs and widths, so the estimate (:mod:`tpflax._src.cost.whole`, over a plan) and the chooser
(:mod:`tpflax._src.planner.constraints`, over a candidate layout of one group) price the same quantities.

A dim a ``with_sharding_constraint`` lays out over tensor axes that the layout does not split it over
(:func:`disagreeing`) is split anyway: XLA keeps the constraint's layout. Its split reaches the kernels kept
whole along the trace's meets (:func:`reached_whole`), and each of those sums or gathers around its matmul
(:func:`kernel_reads`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from tpflax._src.cost.pieces import WholeRead, narrower
from tpflax._src.trace.records import reached_dims


def disagreeing(constrained: Iterable[tuple[str, int, tuple[str, ...]]], tensor: Iterable[str],
                split: Callable[[str, int], frozenset[str]]) -> dict[tuple[str, ...], set[tuple[str, int]]]:
    """``{tensor axes: (leaf, dim)}``: the ``constrained`` parameter dims (``(path, dim, mesh axes)``) laid out over
    ``tensor`` axes (live, size > 1) that ``split(path, dim)`` (the tensor axes the layout splits the dim over)
    does not split them over. Axes over the batch, and dims split as the constraint says, cost nothing.

    >>> disagreeing([("up", 1, ("data", "model"))], {"model"}, lambda p, d: frozenset())
    {('model',): {('up', 1)}}
    >>> disagreeing([("up", 1, ("data", "model"))], {"model"}, lambda p, d: frozenset({"model"}))
    {}
    """
    live = set(tensor)
    out: dict[tuple[str, ...], set[tuple[str, int]]] = {}
    for p, d, axes in constrained:
        want = tuple(sorted(set(axes) & live))
        if want and not split(p, d) & set(want):
            out.setdefault(want, set()).add((p, d))
    return out



def replicated(constrained: Iterable[tuple[str, int, tuple[str, ...]]], tensor: Iterable[str],
               split: Callable[[str, int], frozenset[str]], meets: tuple[tuple[str, int, str, int], ...],
               dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]
               ) -> list[tuple[str, int, tuple[str, ...], list[str]]]:
    """``[(path, dim, tensor axes, readers)]``: the parameter dims a constraint replicates (no axes: ``None``, or
    past a short spec's end) that ``split(path, dim)`` splits over ``tensor`` axes, each with the kernels split
    over those axes that contract the activation (along ``meets``; ``dots``: each kernel's ``(contracted, kept)``
    dims). XLA gathers the activation where the constraint stands and each reader's kernel whole, for the
    backward product (:func:`tpflax._src.cost.whole.replicated_items`).

    >>> meets = (("down", 0, "up", 1), ("up", 1, "down", 0))
    >>> dots = {"up": ((0,), (1,)), "down": ((0,), (1,))}
    >>> replicated([("up", 1, ())], {"model"}, lambda p, d: frozenset({"model"}), meets, dots)
    [('up', 1, ('model',), ['down'])]
    """
    live, out = set(tensor), []
    for p, d, axes in sorted(set(constrained)):
        hit = split(p, d) & live
        if axes or not hit or p not in dots:
            continue
        readers = sorted({q for q, e in reached_dims(meets, {(p, d)}) if q != p and q in dots
                          and e in dots[q][0] and split(q, e) & hit})
        out.append((p, d, tuple(sorted(hit)), readers))
    return out

def reached_whole(meets: tuple[tuple[str, int, str, int], ...], begin: set[tuple[str, int]],
                  whole: Callable[[str], bool]) -> set[tuple[str, int]]:
    """The dims of the leaves ``whole`` accepts (kept whole on the tensor axes) that a split of ``begin`` reaches
    along the trace's meets: their gradient comes out split, and their matmuls meet split features.

    >>> sorted(reached_whole((("down", 0, "up", 1), ("up", 1, "down", 0)), {("up", 1)}, lambda p: True))
    [('down', 0), ('up', 1)]
    """
    return {(p, d) for p, d in reached_dims(meets, begin) if whole(p)}


def kernel_reads(path: str, axes: tuple[str, ...], in_size: float, out_size: float, hit: set[int],
                 use: tuple[tuple[int, ...], tuple[int, ...]], sums: bool, input_grad: bool = True,
                 cast: bool = False, remat: bool = False, gate: bool = False, reshard: float = 0.0) -> list[WholeRead]:
    """What a whole kernel moves when split features meet its dims ``hit`` (leaf dims) in its dot ``use``
    (``(contracted, kept)``): contracting them, the partial outputs summed or the input gathered (forward); its
    output read split, the partial input gradients summed or the output gradient gathered (backward; none when
    its input needs no gradient, ``input_grad``). ``in_size``/``out_size``: its input and output activations, in
    bytes or elements per row alike. The narrower of the two (an all-reduce moves twice its bytes) where the
    matmul reads the parameter as it was placed. Where it reads a value an op made of it (``sums``: a dtype cast,
    a reshape, a scanned stack's slice), XLA lays that value out as the matmul prefers, split like the features it
    meets, and sums whatever the width (measured, XLA:CPU and XLA:TPU data=2,model=4:
    ``tests/test_constraint_cost.py``'s scanned kernels; ``tests/test_stream_ends.py``'s output head cast to
    bfloat16, its ``(4, 64, 8016)`` partial logits all-reduced where the float32 head gathers its 256-wide input).
    Inside rematerialised layers (``remat``), with one side split, the recompute sums the partial outputs again,
    whichever way the forward went (the backward reads them: ``tests/test_expert_split_rows.py``'s experts,
    MaxText's mixtral's).

    Both sides split (its input and its output, as a model's constraints on both lay them out): XLA partitions
    the matmul by its output's split and gathers the input forward, whatever the widths, inside a scan too.
    Backward, it gathers the output gradient for the input gradient, or sums the partial input gradients where
    the matmul reads a copy ``cast`` to a narrower dtype; and its weight gradient, computed split, gathers the
    narrower of its input and its output gradient once more (phase ``"weight"``). Rematerialised, the recompute
    gathers the input again where it is no wider than the output (the weight gradient takes it), and the input
    gradient is the narrower of the two, cast or not. The second kernel of a gated pair (``gate``: ``wi_1`` of
    ``silu(x @ wi_0) * (x @ wi_1)``, :func:`gate_seconds`) is recomputed by summing its partial outputs instead,
    then gathers its output gradient and its input again. Without remat, a second kernel reading the input as it
    is (no ``cast`` copy of its own) shares the first's gathers of it, forward and for the weight gradient.
    Measured, XLA:CPU data=2,model=4: ``tests/test_constraint_stream.py``'s MLPs between constraints
    (256 -> 1024 -> 256, plain and gated, unrolled and scanned, float32 and bfloat16 compute, with and without
    ``nn.remat``; 64 -> 256 -> 64 without remat); MaxText's gpt3, llama3, gemma2 and mixtral under their full
    remat, replicated. At 64 -> 256 -> 64 under remat XLA also gathers the stream again for the weight gradients
    (about 0.91 of the compiled collectives: not modelled), and float32 gated pairs share some of the gathers
    above (0.99-1.05).

    A fused kernel (``[q|k|v]``) whose output's pieces a constraint each splits (``reshard``: the columns of the
    collective-permutes that reshard them, :func:`tpflax._src.cost.reshard.piece_permutes`, in ``out_size``'s unit),
    both sides split: XLA computes the output split contiguously, as a naive split of the kernel would, and
    reshards the pieces out of it (forward); backward, it gathers each piece's gradient back into that layout
    (``"pieces"``: the fused width in all, or collective-permutes of as many bytes), then the output gradient
    for the input gradient and again for the weight gradient, not the narrower input (measured, XLA:CPU
    data=2,model=4 and fsdp=2,model=4: EasyDeL's Phi-3 ``qkv_proj``, ``tests/test_constraint_block.py``'s fused
    blocks, equal and GQA pieces). Not priced where the matmul reads a cast copy (a bfloat16 model's float32
    kernel: not measured). Rematerialised, the recompute reshards the pieces again, and the rest is priced
    as for any kernel (the block under ``nn.remat``: 0.90 of the compiled collectives, 0.86 without the permutes;
    XLA also sums some of the recomputed outputs there, not modelled).

    >>> [(r.kind, r.phase, r.size) for r in kernel_reads("down", ("model",), 64, 256, {0}, ((0,), (1,)), False)]
    [('all-gather', 'forward', 64)]
    >>> [(r.kind, r.phase, r.size) for r in kernel_reads("down", ("model",), 64, 256, {0}, ((0,), (1,)), True)]
    [('all-reduce', 'forward', 256)]
    >>> [(r.kind, r.phase, r.size) for r in kernel_reads("wo", ("model",), 256, 64, {0, 1}, ((0,), (1,)), True)]
    [('all-gather', 'forward', 256), ('all-gather', 'backward', 64), ('all-gather', 'weight', 64)]
    >>> [(r.kind, r.phase, r.size, r.redo) for r in kernel_reads("wi", ("model",), 64, 256, {0, 1}, ((0,), (1,)),
    ...                                                         True, remat=True)]
    [('all-gather', 'forward', 64, True), ('all-reduce', 'backward', 64, False)]
    """
    pick = summed if sums else narrower
    both = both_sides(hit, use)
    if both and gate and (remat or not cast):
        # rematerialised: its own reads; else it reads its first's input as it is, and shares that kernel's
        # gathers of it (forward and for the weight gradient): only its output gradient is its own
        return [*([gathered(path, axes, out_size, in_size, "forward"),
                   WholeRead(path, axes, "all-reduce", out_size, "recompute")] if remat else []),
                *([gathered(path, axes, in_size, out_size, "backward")] if input_grad else []),
                *([WholeRead(path, axes, "all-gather", min(in_size, out_size), "weight")] if remat else [])]
    out = []
    if hit & set(use[0]):
        r = (gathered if both else pick)(path, axes, out_size, in_size, "forward")
        out.append(replace(r, redo=remat and (in_size <= out_size if both else r.kind == "all-reduce")))
        if remat and not both and r.kind == "all-gather":
            out.append(WholeRead(path, axes, "all-reduce", out_size, "recompute"))
    if both and reshard and remat:  # each forward run reshards the pieces; the rest as for any kernel (not measured)
        out.append(WholeRead(path, axes, "collective-permute", reshard, "forward", redo=True))
    elif both and reshard and not cast:
        return [*out, WholeRead(path, axes, "collective-permute", reshard, "forward"),
                WholeRead(path, axes, "all-gather", out_size, "pieces"),
                *([gathered(path, axes, in_size, out_size, "backward")] if input_grad else []),
                WholeRead(path, axes, "all-gather", out_size, "weight")]
    if hit & set(use[1]) and input_grad:
        how = narrower if both and remat else summed if both and cast else gathered if both else pick
        out.append(how(path, axes, in_size, out_size, "backward"))
    if both and not remat:
        out.append(WholeRead(path, axes, "all-gather", min(in_size, out_size), "weight"))
    return out


def both_sides(hit: set[int], use: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    """Whether split features meet a kernel's dims ``hit`` on both sides of its dot ``use`` (``(contracted, kept)``):
    its input and its output split, as a model's constraints on both lay them out.

    >>> both_sides({0, 1}, ((0,), (1,))), both_sides({0}, ((0,), (1,)))
    (True, False)
    """
    return bool(hit & set(use[0]) and hit & set(use[1]))


def gate_seconds(meets: Iterable[tuple[str, int, str, int]],
                 dots: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]], hit: Mapping[str, set[int]]) -> set[str]:
    """The second kernel (in path order) of each gated pair among the kernels ``hit`` on both sides of their dot
    (``dots``: ``(contracted, kept)``): two whose outputs meet, as ``silu(x @ wi_0) * (x @ wi_1)``'s do.

    >>> dots = {"wi_0": ((0,), (1,)), "wi_1": ((0,), (1,))}
    >>> gate_seconds((("wi_0", 1, "wi_1", 1),), dots, {"wi_0": {0, 1}, "wi_1": {0, 1}})
    {'wi_1'}
    """
    both = {p for p, h in hit.items() if p in dots and both_sides(h, dots[p])}
    return {q for p, d, q, e in meets if p in both and q in both and p < q and d in dots[p][1] and e in dots[q][1]}


def gathered(path: str, axes: tuple[str, ...], total: float, gathered: float, phase: str) -> WholeRead:
    """An all-gather of ``gathered`` bytes (the input forward, the output gradient backward), however few
    ``total`` would sum."""
    return WholeRead(path, axes, "all-gather", gathered, phase)


def summed(path: str, axes: tuple[str, ...], total: float, gathered: float, phase: str) -> WholeRead:
    """An all-reduce of ``total`` bytes, however many ``gathered`` would move."""
    return WholeRead(path, axes, "all-reduce", total, phase)
