"""A pair's member kept whole beside a tensor split, as XLA:CPU compiles it: the estimate's and the chooser's rule.

Pure arithmetic over sizes (no :class:`~tpflax._src.cost.scope.Scope`, no planner import), so the estimate
(:func:`tpflax._src.cost.whole.whole_members`, :func:`tpflax._src.cost.stream.split_grads`) and the planner's
chooser (the "Megatron, K/V replicated" option of :func:`tpflax._src.planner.builders.shard_pair`) price a
whole GQA key/value column with the same functions: its output in ``K`` pieces each shared by ``n / K`` ranks
(:func:`pieces_of`), each piece's output gradient summed over those ranks, its input gradient summed or its output
gradient gathered over the ``K`` pieces (:func:`column_read`, :func:`member_items`), its weight gradient computed
on its piece and its update gathered over them (:func:`update_pieces`). Sizes are in any unit (bytes on one
device for the estimate, elements per token for the chooser): every rule here is linear in them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tpflax._src.cost.headcut import repeated_kv_gathers
from tpflax._src.cost.records import CommItem


@dataclass(frozen=True)
class WholeRead:
    """One collective of a whole kernel meeting split features: ``kind`` of ``size`` bytes over ``axes``."""

    path: str
    axes: tuple[str, ...]
    kind: str
    size: float
    phase: str
    pieces: int | None = None  # a pair's whole column: its output as XLA splits it (:func:`pieces_of`)
    out: float = 0.0  # with pieces: the column's output bytes on one device
    share: float = 1.0  # of an alike class of kernels, the share this read is of (a gated pair's second kernel)
    redo: bool = False  # a forward collective a remat recompute runs again (:func:`tpflax._src.cost.disagree.kernel_reads`)
    # a GQA key/value expanded by ``jnp.repeat`` to query heads its pieces do not follow
    # (:func:`tpflax._src.cost.headcut.repeated_kv_groups`): the repeated output's bytes on one device
    repeat: float = 0.0
    # a whole GQA key/value beside a split query that ``jax.nn.dot_product_attention`` regroups into head groups its
    # ranks do not follow (:func:`tpflax._src.cost.headcut.whole_kv`): its gathers are the pair's
    # (:func:`tpflax._src.cost.reshard.whole_kv_items`), none here; its update still runs in ``pieces``
    grouped: bool = False

    @property
    def how(self) -> str:
        """What moves, in words."""
        what = {("all-reduce", "forward"): "sum its partial outputs", ("all-gather", "forward"): "gather its input",
                ("all-reduce", "backward"): "sum its partial input gradients",
                ("all-gather", "backward"): "gather its output gradient",
                ("all-reduce", "recompute"): "sum its partial outputs in the remat recompute",
                ("all-gather", "weight"): "gather its input or its output gradient again for its weight gradient",
                ("collective-permute", "forward"): "reshard its output's pieces out of the split it computes",
                ("all-gather", "pieces"): "gather its pieces' gradients back into that split"}[self.kind, self.phase]
        return f"{what} ({'forward' if self.forward else 'backward'})"

    @property
    def forward(self) -> bool:
        """Whether it runs in the forward pass (or its remat recompute), not in the backward."""
        return self.phase in ("forward", "recompute")

    @property
    def side(self) -> str:
        """The activation it moves: the kernel's ``"in"`` or ``"out"`` side."""
        if self.kind == "collective-permute" or self.phase == "pieces":
            return "out"  # a fused output's pieces, resharded or their gradients gathered back
        return "out" if (self.kind == "all-reduce") == self.forward else "in"


def narrower(path: str, axes: tuple[str, ...], summed: float, gathered: float, phase: str) -> WholeRead:
    """An all-reduce of ``summed`` bytes or an all-gather of ``gathered`` bytes, whichever moves fewer on a
    ring (an all-reduce moves twice its bytes).

    >>> narrower("k", ("model",), 64, 16, "backward").kind
    'all-gather'
    """
    if 2 * summed <= gathered:
        return WholeRead(path, axes, "all-reduce", summed, phase)
    return WholeRead(path, axes, "all-gather", gathered, phase)


def pieces_of(limit: int, n: int) -> int | None:
    """How many pieces XLA splits a whole column's output into where the traced ``limit`` of its edge into a
    dim split over ``n`` ranks says how far it divides: ``n`` if the limit is a multiple of ``n`` (a gate's
    expansion), the limit if it divides ``n`` (a GQA key/value's ``K`` heads; 1 for MQA: whole, its output
    gradient summed over every rank), None where neither divides the other.

    >>> pieces_of(2, 4), pieces_of(1, 4), pieces_of(8, 4), pieces_of(3, 4)
    (2, 1, 4, None)
    """
    return n if limit % n == 0 else limit if n % limit == 0 else None


def column_read(path: str, axes: tuple[str, ...], in_b: float, out_b: float, k: int | None,
                sums_input: bool) -> WholeRead:
    """A pair's column kept whole, its output in ``k`` pieces (None: untraced or no divisor): its partial input
    gradients (``in_b``) summed or its output gradient (``out_b``) gathered, whichever moves fewer; in pieces
    and ``sums_input`` (inside ``jax.checkpoint`` or a scanned stack, the kernel not gathered whole by tpflax's
    fsdp step: the matmul reads a copy XLA splits in the pieces too), XLA:CPU sums the input gradient whatever
    it moves. Measured, XLA:CPU data=2,model=4, an nnx decoder of 8 query heads, K 1, 2 and 4 (tests/
    test_hand_layout_estimates.py): in a Python loop ``f32[4,16,K,8]`` output gradients gathered, under
    ``nnx.remat`` or ``nnx.scan`` the ``f32[4,16,64]`` input gradients all-reduced.

    >>> r = column_read("k", ("model",), 64, 16, 2, sums_input=True)
    >>> r.kind, r.size, r.pieces, r.out
    ('all-reduce', 64, 2, 16)
    """
    read = narrower(path, axes, in_b, out_b, "backward")
    if k is not None and sums_input:
        read = WholeRead(path, axes, "all-reduce", in_b, "backward")
    return replace(read, pieces=k, out=out_b)


def member_items(r: WholeRead, what: str, n: int, count: int, source: str, moved: float) -> list[CommItem]:
    """A pair's member kept whole (:func:`column_read`, or a row's :func:`narrower`) as collectives: its
    collective of ``moved`` bytes (the side :attr:`WholeRead.side` names; traced pieces: the bytes it read off the
    trace) over the ``n`` ranks or its output's pieces (none for one piece, whole on every rank, or nothing
    moved), and each piece's output gradient summed over the ranks sharing it; a key/value repeated to query heads
    its groups do not follow (:attr:`WholeRead.repeat`) has its repeated gradient gathered instead
    (:func:`tpflax._src.cost.headcut.repeated_kv_gathers`).

    >>> [(i.kind, i.size, i.group_size) for i in member_items(column_read("k", ("model",), 64, 16, 2, False),
    ...                                                       "column k", 4, 1, "k", 0)]
    [('all-gather', 16, 2), ('all-reduce', 8.0, 2)]
    """
    if r.grouped:
        return []
    k = r.pieces or n
    moved = r.size if r.pieces else moved  # a stacked (2, K, d, head_dim) output's batch is not its first dim
    items = [] if k == 1 or not moved else [CommItem(r.kind, r.axes, moved, k, count, source, f"replicated {what} in "
                                                     f"a split pair{f' (XLA splits its output in {k})' if k < n else ''}"
                                                     f": {r.how}")]
    if r.repeat:  # the query heads a rank holds straddle its groups: their gradient gathered, not summed
        items += [CommItem("all-gather", r.axes, size, ranks, count, source, f"replicated {what}, repeated to the "
                           f"query heads, in {k} head group(s): gather, {why}")
                  for size, ranks, why in repeated_kv_gathers(r.out, r.repeat, k, n, split=False)]
    elif k < n:
        items.append(CommItem("all-reduce", r.axes, r.out / k, n // k, count, source, f"replicated {what} in a split "
                              f"pair, its output in {k} piece(s) read split by {n // k} ranks each: sum each "
                              "piece's output gradient over them (backward)"))
    return items


def update_pieces(r: WholeRead, n: int) -> int | None:
    """The pieces a whole member's weight gradient comes out split in, its update run split and gathered over
    that many ranks (:func:`tpflax._src.cost.stream.update_gathers`): a column in the pieces XLA splits its
    output into (none for one piece, MQA), untraced one whose output gradient XLA does not gather over all
    ``n`` ranks; None: not split.

    >>> update_pieces(column_read("k", ("model",), 64, 16, 2, False), 4), update_pieces(column_read(
    ...     "k", ("model",), 64, 16, 1, False), 4), update_pieces(column_read("k", ("model",), 4, 16, None, False), 4)
    (2, None, 4)
    """
    if (r.pieces or 0) > 1:
        return r.pieces
    if r.pieces is None and (r.phase, r.kind) != ("backward", "all-gather"):
        return n
    return None
