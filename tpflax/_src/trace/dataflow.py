"""Dataflow-aware planning: read the forward pass instead of the names.

Name and shape heuristics fail on models written by other people: layers called
``dense_3``, kernels stored transposed ``(out, in)`` and applied as
``x @ kernel.T``, attention written as raw einsums. With a model and example
inputs, tpflax traces the forward pass with ``jax.make_jaxpr`` on abstract values
(nothing is computed), maps the jaxpr's inputs back to parameter paths, and
follows the activations:

* every **contraction** that consumes a parameter (``dot_general``,
  ``conv_general_dilated``, ``gather`` and one-hot matmuls for embeddings) is a
  *use*, with the parameter dims it contracts, keeps and batches over;
* every kept dim of a use **tags** the activation dim it produces. Tags follow
  elementwise ops, reshapes (the major factor of a split dim keeps the tag, so
  heads survive ``(d) -> (heads, head_dim)``), transposes, broadcasts and
  activation-activation einsums along batch/free dims, through ``pjit``,
  ``remat``, ``custom_jvp``/``custom_vjp`` and ``scan``/``while``/``cond`` bodies;
* an op that reduces, slices, concatenates or mixes a tagged dim, or any op
  tpflax does not know, **ends** the chain for that tag (an *escape*: a norm over
  features, a reshape that interleaves the dim, ...);
* a tagged dim that a later parameter contraction sums over is an **edge**
  ``producer -> consumer``: a column -> row (Megatron) candidate.

:func:`propose` turns the dataflow into the same ``Proposal`` and ``Pair``
records the tree heuristics use (and reuses their pair/conv/expert sharding
helpers), with reasons that name the evidence.

>>> import jax, flax.linen as nn
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x):
...         return nn.Dense(8, name="b")(nn.relu(nn.Dense(32, name="a")(x)))
>>> x = jax.ShapeDtypeStruct((2, 8), "float32")
>>> v = jax.eval_shape(Net().init, jax.random.key(0), x)
>>> flow = dataflow(Net(), (x,), v)
>>> [(e.src, e.dst) for e in flow.edges]
[('params/a/kernel', 'params/b/kernel')]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from tpflax._src.errors import TraceError
from tpflax._src.model import abstract, as_model
from tpflax._src.facts.tree import unboxed, walk

# ---------------------------------------------------------------------------
# records


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
    """

    id: int
    path: str
    op: str
    contracted: tuple[int, ...]
    kept: tuple[int, ...]
    batch: tuple[int, ...] = ()
    scan_length: int = 0


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
class Dataflow:
    """What tracing a model's forward pass found.

    Attributes:
        paths: every parameter path, in tree order.
        uses: contractions and lookups of parameters, in program order.
        edges: producer -> consumer links along summed dims.
        escapes: ``{(use id, param dim): why}`` for kept dims whose activation is
            reduced, sliced or mixed before any parameter contraction sums it.
        outputs: ``(use id, param dim)`` whose activation dim reaches the model output.
        recurrent: use ids whose output returns to the carry of the scan that
            applies them at every step (recurrent cells).
        biases: ``{path: (use id, {param dim: kept param dim of the use})}`` for
            parameters added straight to a use's output.
        elementwise: paths combined elementwise with activations (norm scales...).
        scanned: ``{path: leaf dim}`` for parameters sliced by a ``scan`` (``nn.scan`` stacks).
        n_eqns: equations visited (sub-jaxprs included).
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
    n_eqns: int = 0

    def uses_of(self, path: str) -> list[Use]:
        return [u for u in self.uses if u.path == path]


# ---------------------------------------------------------------------------
# tracing

def trace_jaxpr(model: Any, sample: Any = None, variables: Any = None):
    """``(closed jaxpr, parameter paths of its first invars, n parameter invars)``.

    ``model`` is anything :func:`tpflax._src.model.as_model` accepts (zoo, linen,
    nnx, or a plain ``fn(variables, *sample)``). Nothing is computed: inputs and
    parameters are ``jax.ShapeDtypeStruct``.
    """
    m = as_model(model, sample, variables)
    if m.variables is None:
        raise TraceError(f"tracing {m.name} needs its variables: pass the tree you plan")
    leaves, _ = walk(m.variables)
    tree = unboxed(m.variables)
    abstract_tree = jax.tree_util.tree_map(abstract, tree)
    try:
        closed = jax.make_jaxpr(m.forward)(abstract_tree, *m.sample)
    except Exception as e:  # noqa: BLE001 - any failure here is a model/sample mismatch
        shapes = ", ".join(f"{getattr(s, 'shape', '?')}:{getattr(s, 'dtype', '?')}" for s in m.sample)
        raise TraceError(
            f"could not trace the forward pass of {m.name} with sample inputs ({shapes}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; pass sample= matching "
            "the model's __call__ and the full variable tree it was initialised with") from e
    n = len(jax.tree_util.tree_leaves(abstract_tree))
    if n != len(leaves):
        raise TraceError(f"the variable tree flattens to {n} arrays but walks to {len(leaves)} leaves; "
                         "pass a tree of plain arrays or flax boxes holding one array each")
    return closed, [leaf.path for leaf in leaves], n


def dataflow(model: Any, sample: Any = None, variables: Any = None) -> Dataflow:
    """Trace ``model`` on ``sample`` and analyse which parameter feeds which.

    Args:
        model: a linen ``nn.Module`` (with ``variables``), a ``tpflax.zoo`` model,
            or an ``nnx.Module``.
        sample: example forward inputs; ``jax.ShapeDtypeStruct`` suffice. A
            ZooModel defaults to its own sample inputs (batch 1).
        variables: the variable tree (linen); paths in the result match
            ``tpflax.plan(variables, ...).decisions``.

    Returns:
        A :class:`Dataflow`.

    Raises:
        TraceError: the model cannot be traced with these inputs.

    >>> from tpflax import zoo
    >>> flow = dataflow(zoo.get("mlp"))
    >>> sorted({(e.src, e.dst) for e in flow.edges})[0]
    ('params/block_0/mlp/up/kernel', 'params/block_0/mlp/down/kernel')
    """
    closed, paths, n = trace_jaxpr(model, sample, variables)
    return analyze(closed, paths)


# ---------------------------------------------------------------------------
# the walk

# A tag is one kept parameter dim of one use: (use id, param dim) -> (limit, via).
TagMap = dict

_EMPTY: dict = {}


@dataclass(frozen=True)
class _Val:
    """What the walk knows about one jaxpr value."""

    rank: int
    origin: tuple[tuple[str, tuple[int | None, ...]], ...] = ()  # (path, leaf dim per value dim)
    tags: tuple[TagMap, ...] | None = None
    onehot: bool = False
    iota: bool = False
    fresh: int | None = None  # use id whose raw output this is (bias detection)
    const_of: int = 0  # scan trip count when a parameter enters a loop body unchanged

    def dim_tags(self, d: int) -> TagMap:
        return self.tags[d] if self.tags is not None else _EMPTY


# Ops that keep every dim in place (n-ary, equal shapes up to rank-0 operands).
ELEMENTWISE = frozenset("""
add sub mul div rem pow integer_pow max min neg sign floor ceil round is_finite exp exp2 log log1p
expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh atan2 sqrt rsqrt cbrt
square abs erf erfc erf_inv lgamma digamma igamma select_n clamp convert_element_type copy copy_p
stop_gradient reduce_precision and or not xor eq ne lt le gt ge nextafter real imag conj
shift_left shift_right_logical shift_right_arithmetic population_count clz optimization_barrier
""".split())
# Ops that only change the dtype or identity of a value: a parameter stays a parameter.
_VIEW = frozenset({"convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision",
                   "optimization_barrier"})
# Names worth reporting in a reason ("through logistic, mul").
_NOTABLE = frozenset({"mul", "div", "logistic", "tanh", "exp", "erf", "erfc", "max", "min",
                      "dot", "integer_pow", "square", "sqrt", "rsqrt", "log"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor", "argmax", "argmin"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Walk:
    """Walks a jaxpr once (loop bodies to a fixed point), recording uses and edges."""

    def __init__(self) -> None:
        self.uses: list[Use] = []
        self.use_key: dict[Any, int] = {}
        self.edges: dict[tuple[int, int, int, int], tuple[int, tuple[str, ...]]] = {}
        self.escapes: dict[tuple[int, int], str] = {}
        self.outputs: set[tuple[int, int]] = set()
        self.recurrent: set[int] = set()
        self.biases: dict[str, tuple[int, dict[int, int]]] = {}
        self.elementwise: set[str] = set()
        self.scanned: dict[str, int] = {}
        self.n_eqns = 0

    # -- tags ------------------------------------------------------------

    def merge(self, maps: Iterable[TagMap], op: str | None = None) -> TagMap:
        out: TagMap = {}
        for m in maps:
            for k, (limit, via) in m.items():
                if k in self.escapes:
                    continue  # its chain already ended: no column can come of it
                if op and (not via or via[-1] != op) and op in _NOTABLE and len(via) < 6:
                    via = via + (op,)
                old = out.get(k)
                if old is None:
                    out[k] = (limit, via)
                else:
                    out[k] = (math.gcd(old[0], limit), old[1] if len(old[1]) >= len(via) else via)
        return out

    def escape(self, m: TagMap, why: str) -> None:
        for k in m:
            self.escapes.setdefault(k, why)

    def escape_all(self, val: _Val, why: str) -> None:
        if val.tags is not None:
            for m in val.tags:
                self.escape(m, why)

    def use(self, ctx: tuple, eqn: Any, path: str, op: str, contracted, kept, batch, scan_length) -> int:
        key = (ctx, id(eqn), path)
        if key in self.use_key:
            return self.use_key[key]
        u = Use(len(self.uses), path, op, tuple(contracted), tuple(kept), tuple(batch), scan_length)
        self.uses.append(u)
        self.use_key[key] = u.id
        return u.id

    # -- driver ----------------------------------------------------------

    def run(self, jaxpr: Any, args: Sequence[_Val], ctx: tuple = ()) -> list[_Val]:
        env: dict[Any, _Val] = {}
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a
        for v in jaxpr.constvars:
            env[v] = _Val(len(getattr(v.aval, "shape", ())))

        def read(v: Any) -> _Val:
            if type(v).__name__ == "Literal":
                return _Val(len(getattr(v.aval, "shape", ())))
            return env.get(v) or _Val(len(getattr(v.aval, "shape", ())))

        for eqn in jaxpr.eqns:
            self.n_eqns += 1
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, ctx)
            for v, o in zip(eqn.outvars, outs, strict=True):
                if type(v).__name__ != "DropVar":
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[_Val], ctx: tuple) -> list[_Val]:
        name = eqn.primitive.name
        ranks = [len(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        handler = getattr(self, "_" + name, None)
        if name in ELEMENTWISE:
            return self._elementwise(eqn, ins, name, ranks)
        if handler is not None:
            return handler(eqn, ins, ctx, ranks)
        if name in _REDUCE:
            return self._reduce(eqn, ins, name, ranks)
        if name in _CUMULATIVE:
            axis = eqn.params.get("axis", 0)
            self.escape(ins[0].dim_tags(axis), f"{name} runs along it")
            return [dataclasses.replace(ins[0], origin=(), fresh=None)]
        sub = self._sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub[0], ins[sub[1]:], ctx + (id(eqn),))
        return self._opaque(eqn, ins, name, ranks)

    def _sub_jaxpr(self, eqn: Any):
        """``(jaxpr, first invar)`` for call-like primitives whose body takes the eqn's inputs."""
        for key in _CALL_KEYS:
            j = eqn.params.get(key)
            if j is None:
                continue
            inner = getattr(j, "jaxpr", j)
            if not hasattr(inner, "eqns"):
                continue
            skip = len(eqn.invars) - len(inner.invars)
            if skip >= 0:
                return inner, skip
        return None

    def _opaque(self, eqn, ins, name, ranks) -> list[_Val]:
        for v in ins:
            self.escape_all(v, f"passed to {name}")
            for path, _ in v.origin:
                self.elementwise.add(path)
        return [_Val(r) for r in ranks]

    # -- elementwise -----------------------------------------------------

    def _elementwise(self, eqn, ins, name, ranks) -> list[_Val]:
        rank = ranks[0]
        full = [v for v in ins if v.rank == rank and rank > 0]
        params = [v for v in full if v.origin]
        acts = [v for v in full if not v.origin]
        if name in _VIEW or (params and not acts):
            # A view of parameters (a cast, a weight computed from weights) is still a parameter.
            origin = tuple(o for v in params for o in v.origin)
            tags = self._pointwise([v for v in full if v.tags is not None], rank, name)
            base = full[0] if full else _Val(rank)
            outs = [dataclasses.replace(base, origin=origin, tags=tags,
                                        const_of=max([v.const_of for v in params] or [0]))
                    for _ in ranks]
            return outs
        if params:
            fresh = [v for v in acts if v.fresh is not None]
            for p in params:
                for path, dims in p.origin:
                    self.elementwise.add(path)
                    if name == "add" and len(fresh) == 1 and len(acts) == 1:
                        # Added straight to a contraction's output: that contraction's bias.
                        uid = fresh[0].fresh
                        align = {ld: kd for d, ld in enumerate(dims) if ld is not None
                                 for (u, kd) in fresh[0].dim_tags(d) if u == uid}
                        self.biases.setdefault(path, (uid, align))
        tags = self._pointwise([v for v in acts if v.tags is not None], rank, name)
        onehot = name == "eq" and any(v.iota for v in ins) and not all(v.iota for v in ins)
        onehot = onehot or (name in _VIEW and any(v.onehot for v in ins))
        iota = all(v.iota or v.rank == 0 for v in ins) and any(v.iota for v in ins) and name in (
            "add", "sub", "mul", "convert_element_type", "copy")
        return [_Val(r, tags=tags, onehot=onehot, iota=iota) for r in ranks]

    def _pointwise(self, vals: list[_Val], rank: int, name: str):
        if not vals:
            return None
        tags = tuple(self.merge((v.tags[d] for v in vals), name) for d in range(rank))
        return tags if any(tags) else None

    def _reduce(self, eqn, ins, name, ranks) -> list[_Val]:
        axes = tuple(eqn.params.get("axes", ()))
        v = ins[0]
        for a in axes:
            self.escape(v.dim_tags(a), f"{name} reduces over it (a norm, a mean or a softmax over "
                                       "features needs the whole dim)")
        if v.tags is None:
            return [_Val(r) for r in ranks]
        tags = tuple(self.merge([v.tags[d]]) for d in range(v.rank) if d not in axes)
        return [_Val(ranks[0], tags=tags if any(tags) else None)]

    # -- layout ops ------------------------------------------------------

    def _moved(self, v: _Val, mapping: Sequence[int | None], rank: int, *, keep_flags=True,
               limit: Mapping[int, int] | None = None) -> _Val:
        """``v`` with output dim ``i`` taken from input dim ``mapping[i]`` (None: new dim)."""
        origin = tuple((p, tuple(dims[m] if m is not None else None for m in mapping))
                       for p, dims in v.origin)
        tags = None
        if v.tags is not None:
            out = []
            for i, m in enumerate(mapping):
                t = self.merge([v.tags[m]]) if m is not None else {}
                if t and limit and i in limit:
                    t = {k: (math.gcd(lim, limit[i]), via) for k, (lim, via) in t.items()}
                out.append(t)
            tags = tuple(out) if any(out) else None
        return _Val(rank, origin=origin, tags=tags, onehot=v.onehot and keep_flags,
                    iota=v.iota and keep_flags, fresh=v.fresh, const_of=v.const_of)

    def _transpose(self, eqn, ins, ctx, ranks):
        return [self._moved(ins[0], list(eqn.params["permutation"]), ranks[0])]

    def _broadcast_in_dim(self, eqn, ins, ctx, ranks):
        shape = eqn.params["shape"]
        bd = eqn.params["broadcast_dimensions"]
        mapping: list[int | None] = [None] * len(shape)
        for i, d in enumerate(bd):
            mapping[d] = i
        return [self._moved(ins[0], mapping, ranks[0])]

    def _squeeze(self, eqn, ins, ctx, ranks):
        dims = set(d % max(ins[0].rank, 1) for d in eqn.params["dimensions"])
        return [self._moved(ins[0], [d for d in range(ins[0].rank) if d not in dims], ranks[0])]

    def _reshape(self, eqn, ins, ctx, ranks):
        v = ins[0]
        src = tuple(eqn.invars[0].aval.shape)
        dst = tuple(eqn.params["new_sizes"])
        mapping: list[int | None] = [None] * len(dst)
        limits: dict[int, int] = {}
        for gin, gout in _reshape_groups(src, dst):
            big_in = [d for d in gin if src[d] != 1]
            big_out = [d for d in gout if dst[d] != 1]
            if len(big_in) == 1 and len(big_out) == 1:
                mapping[big_out[0]] = big_in[0]
                continue
            if not big_in or not big_out:
                continue
            # Split or merge: the major input dim maps to the major output dim; a
            # tag on any other input dim is interleaved with its neighbours.
            mapping[big_out[0]] = big_in[0]
            limits[big_out[0]] = dst[big_out[0]]
            for d in big_in[1:]:
                self.escape(v.dim_tags(d), f"a reshape {src} -> {dst} merges it as a minor dim")
        # For a reshaped parameter the major dim of a merged group stands for the group.
        return [self._moved(v, mapping, ranks[0], limit=limits)]

    def _slice(self, eqn, ins, ctx, ranks):
        v = ins[0]
        src = tuple(eqn.invars[0].aval.shape)
        dst = tuple(getattr(eqn.outvars[0].aval, "shape", ()))
        for d in range(v.rank):
            if src[d] != dst[d]:
                self.escape(v.dim_tags(d), "sliced (a split of the dim needs its other shards)")
        return [self._moved(v, list(range(v.rank)), ranks[0])]

    def _split(self, eqn, ins, ctx, ranks):
        v = ins[0]
        axis = eqn.params["axis"]
        self.escape(v.dim_tags(axis), "split into pieces (a fused kernel sliced along its output)")
        return [self._moved(v, list(range(v.rank)), r) for r in ranks]

    def _dynamic_slice(self, eqn, ins, ctx, ranks):
        v = ins[0]
        src = tuple(eqn.invars[0].aval.shape)
        sizes = tuple(eqn.params["slice_sizes"])
        for d in range(v.rank):
            if src[d] != sizes[d]:
                self.escape(v.dim_tags(d), "dynamically sliced")
        return [self._moved(v, list(range(v.rank)), ranks[0])]

    def _concatenate(self, eqn, ins, ctx, ranks):
        dim = eqn.params["dimension"]
        rank = ranks[0]
        for v in ins:
            self.escape(v.dim_tags(dim), "concatenated with other values along it")
        origin = tuple(o for v in ins for o in v.origin)
        tags = self._pointwise([v for v in ins if v.tags is not None], rank, "")
        if tags is not None:
            tags = tuple({} if d == dim else t for d, t in enumerate(tags))
        return [_Val(rank, origin=origin, tags=tags if tags and any(tags) else None,
                     const_of=max([v.const_of for v in ins] or [0]))]

    def _pad(self, eqn, ins, ctx, ranks):
        v = ins[0]
        for d, (lo, hi, inner) in enumerate(eqn.params["padding_config"]):
            if lo or hi or inner:
                self.escape(v.dim_tags(d), "padded")
        return [self._moved(v, list(range(v.rank)), ranks[0])]

    def _rev(self, eqn, ins, ctx, ranks):
        v = ins[0]
        for d in eqn.params["dimensions"]:
            self.escape(v.dim_tags(d), "reversed")
        return [self._moved(v, list(range(v.rank)), ranks[0])]

    def _iota(self, eqn, ins, ctx, ranks):
        return [_Val(ranks[0], iota=True)]

    def _sort(self, eqn, ins, ctx, ranks):
        d = eqn.params.get("dimension", 0)
        for v in ins:
            self.escape(v.dim_tags(d), "sorted along it")
        return [self._moved(ins[i], list(range(ins[i].rank)), r) if i < len(ins) else _Val(r)
                for i, r in enumerate(ranks)]

    def _top_k(self, eqn, ins, ctx, ranks):
        v = ins[0]
        self.escape(v.dim_tags(v.rank - 1), "top_k picks along it")
        return [_Val(r, tags=tuple(self.merge([t]) for t in v.tags[:-1]) + ({},)
                     if v.tags is not None else None) for r in ranks]

    # -- contractions ----------------------------------------------------

    def _dot_general(self, eqn, ins, ctx, ranks):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        lf = [d for d in range(lhs.rank) if d not in lc and d not in lb]
        rf = [d for d in range(rhs.rank) if d not in rc and d not in rb]
        out_rank = ranks[0]
        lp, rp = bool(lhs.origin), bool(rhs.origin)
        if lp and rp:  # a weight computed from weights (x @ (a @ b)): still parameters
            origin = []
            for p, dims in lhs.origin:
                origin.append((p, tuple(dims[d] for d in lb) + tuple(dims[d] for d in lf)
                               + (None,) * len(rf)))
            for p, dims in rhs.origin:
                origin.append((p, tuple(dims[d] for d in rb) + (None,) * len(lf)
                               + tuple(dims[d] for d in rf)))
            return [_Val(out_rank, origin=tuple(origin))]
        if not lp and not rp:
            return [self._act_dot(lhs, rhs, lc, rc, lb, rb, lf, rf, out_rank)]
        if lp:  # weight on the left: mirror so the activation is on the left
            act, par, ac, pc, ab, pb, af, pf = rhs, lhs, rc, lc, rb, lb, rf, lf
            order = "param_first"
        else:
            act, par, ac, pc, ab, pb, af, pf = lhs, rhs, lc, rc, lb, rb, lf, rf
            order = "act_first"
        shape_p = tuple(eqn.invars[0 if lp else 1].aval.shape)
        tag_b: list[TagMap] = [dict(self.merge([act.dim_tags(a)])) for a in ab]
        tag_pf: list[TagMap] = [{} for _ in pf]
        fresh = None
        for path, dims in par.origin:
            op = "onehot" if act.onehot else "dot"
            uid = self.use(ctx, eqn, path, op, [dims[d] for d in pc if dims[d] is not None],
                           [dims[d] for d in pf if dims[d] is not None],
                           [dims[d] for d in pb if dims[d] is not None], par.const_of)
            fresh = uid if len(par.origin) == 1 else None
            if op == "onehot":
                continue
            for a, p in zip(ac, pc, strict=True):
                if dims[p] is None:
                    continue
                for k, (limit, via) in self.merge([act.dim_tags(a)]).items():
                    self._edge(k, uid, dims[p], math.gcd(limit, shape_p[p]), via)
            for i, p in enumerate(pb):
                if dims[p] is not None:
                    tag_b[i][(uid, dims[p])] = (shape_p[p], ())
            for i, p in enumerate(pf):
                if dims[p] is not None:
                    tag_pf[i][(uid, dims[p])] = (shape_p[p], ())
        if act.onehot:
            return [_Val(out_rank)]  # an embedding lookup: its rows are not a column's output
        tag_af = [self.merge([act.dim_tags(a)]) for a in af]
        if order == "act_first":
            tags = tag_b + tag_af + tag_pf
        else:
            tags = tag_b + tag_pf + tag_af
        return [_Val(out_rank, tags=tuple(tags) if any(tags) else None, fresh=fresh)]

    def _edge(self, k: tuple[int, int], dst: int, dst_dim: int, limit: int, via) -> None:
        if k[0] == dst:
            return
        key = (k[0], k[1], dst, dst_dim)
        old = self.edges.get(key)
        if old is None:
            self.edges[key] = (limit, tuple(via))
        else:
            self.edges[key] = (math.gcd(old[0], limit), old[1])

    def _act_dot(self, lhs, rhs, lc, rc, lb, rb, lf, rf, out_rank) -> _Val:
        for v, cs in ((lhs, lc), (rhs, rc)):
            for d in cs:
                self.escape(v.dim_tags(d), "summed by a product of two activations (needs an all-reduce)")
        tags = [self.merge([lhs.dim_tags(a), rhs.dim_tags(b)], "dot") for a, b in zip(lb, rb, strict=True)]
        tags += [self.merge([lhs.dim_tags(a)], "dot") for a in lf]
        tags += [self.merge([rhs.dim_tags(b)], "dot") for b in rf]
        return _Val(out_rank, tags=tuple(tags) if any(tags) else None)

    def _conv_general_dilated(self, eqn, ins, ctx, ranks):
        lhs, rhs = ins
        dn = eqn.params["dimension_numbers"]
        lspec, rspec, ospec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = eqn.params.get("feature_group_count", 1)
        out_rank = ranks[0]
        if lhs.origin or not rhs.origin:
            return self._opaque(eqn, ins, "conv_general_dilated", ranks)
        shape_p = tuple(eqn.invars[1].aval.shape)
        tags: list[TagMap] = [{} for _ in range(out_rank)]
        tags[ospec[0]] = self.merge([lhs.dim_tags(lspec[0])])
        for d in lspec[2:]:
            self.escape(lhs.dim_tags(d), "a spatial dim of a convolution window")
        fresh = None
        for path, dims in rhs.origin:
            o, i = dims[rspec[0]], dims[rspec[1]]
            contracted = [dims[d] for d in rspec[1:] if dims[d] is not None]
            uid = self.use(ctx, eqn, path, "conv", contracted, [o] if o is not None else [], [],
                           rhs.const_of)
            fresh = uid if len(rhs.origin) == 1 else None
            if groups == 1 and i is not None:
                for k, (limit, via) in self.merge([lhs.dim_tags(lspec[1])]).items():
                    self._edge(k, uid, i, math.gcd(limit, shape_p[rspec[1]]), via)
            if o is not None:
                tags[ospec[1]][(uid, o)] = (shape_p[rspec[0]], ())
        if groups != 1:
            self.escape(lhs.dim_tags(lspec[1]), f"a grouped convolution ({groups} groups)")
        return [_Val(out_rank, tags=tuple(tags) if any(tags) else None, fresh=fresh)]

    def _gather(self, eqn, ins, ctx, ranks):
        operand = ins[0]
        if not operand.origin:
            self.escape_all(operand, "gathered (indexed by data)")
            return [_Val(r) for r in ranks]
        dn = eqn.params["dimension_numbers"]
        indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims)
        for path, dims in operand.origin:
            self.use(ctx, eqn, path, "gather", [dims[d] for d in sorted(indexed) if dims[d] is not None],
                     [dims[d] for d in range(operand.rank) if d not in indexed and dims[d] is not None],
                     [], operand.const_of)
        return [_Val(r) for r in ranks]

    # -- control flow ----------------------------------------------------

    def _loop(self, body, consts: list[_Val], carry: list[_Val], xs: list[_Val], length: int,
              ctx: tuple) -> tuple[list[_Val], list[_Val]]:
        """Walk a loop body until the carry's tags stop growing; returns (carry out, ys)."""
        consts = [dataclasses.replace(c, const_of=length or 1) if c.origin else c for c in consts]
        state = list(carry)
        outs: list[_Val] = []
        for _ in range(4):
            outs = self.run(body, consts + state + xs, ctx)
            new = [self._join(a, b) for a, b in zip(carry, outs[:len(carry)], strict=True)]
            if all(_same_tags(a, b) for a, b in zip(new, state, strict=True)):
                break
            state = new
        for v in outs[:len(carry)]:
            for m in v.tags or ():
                for uid, _ in m:
                    if self.uses[uid].scan_length:  # applied every step and fed back: a cell
                        self.recurrent.add(uid)
        return outs[:len(carry)], outs[len(carry):]

    def _join(self, a: _Val, b: _Val) -> _Val:
        if a.tags is None and b.tags is None:
            return dataclasses.replace(a, fresh=None)
        rank = a.rank
        tags = tuple(self.merge([a.dim_tags(d), b.dim_tags(d)]) for d in range(rank))
        return _Val(rank, origin=a.origin, tags=tags if any(tags) else None)

    def _scan(self, eqn, ins, ctx, ranks):
        p = eqn.params
        nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"].jaxpr
        consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
        sliced = []
        for x in xs:
            for path, dims in x.origin:
                if dims and dims[0] is not None:
                    self.scanned.setdefault(path, dims[0])
            if x.tags is not None:
                self.escape(x.tags[0], "scanned over (each step sees one slice)")
            sliced.append(self._moved(x, list(range(1, x.rank)), x.rank - 1))
        c_out, ys = self._loop(body, consts, carry, sliced, length, ctx + (id(eqn),))
        ys = [self._moved(y, [None] + list(range(y.rank)), y.rank + 1) for y in ys]
        return c_out + ys

    def _while(self, eqn, ins, ctx, ranks):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        c_out, _ = self._loop(p["body_jaxpr"].jaxpr, bconsts, carry, [], 0, ctx + (id(eqn),))
        self.run(p["cond_jaxpr"].jaxpr, cconsts + c_out, ctx + (id(eqn), "cond"))
        return c_out

    def _cond(self, eqn, ins, ctx, ranks):
        outs: list[_Val] | None = None
        for i, br in enumerate(eqn.params["branches"]):
            o = self.run(br.jaxpr, ins[1:], ctx + (id(eqn), i))
            outs = o if outs is None else [self._join(a, b) for a, b in zip(outs, o, strict=True)]
        return outs or [_Val(r) for r in ranks]


def _same_tags(a: _Val, b: _Val) -> bool:
    ta = [set(m) for m in a.tags] if a.tags is not None else []
    tb = [set(m) for m in b.tags] if b.tags is not None else []
    return ta == tb


def _reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products (row-major reshape)."""
    groups = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if i < len(src) and (pi <= pj or j >= len(dst)) and not (gi and gj and pi == pj):
                gi.append(i)
                pi *= src[i]
                i += 1
            elif j < len(dst) and not (gi and gj and pi == pj):
                gj.append(j)
                pj *= dst[j]
                j += 1
            else:
                break
            if gi and gj and pi == pj:
                # absorb trailing size-1 dims into this group
                while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
                    gi.append(i)
                    i += 1
                while j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
                    gj.append(j)
                    j += 1
                break
        groups.append((gi, gj))
    return groups


def analyze(closed: Any, paths: Sequence[str]) -> Dataflow:
    """Analyse a closed jaxpr whose first ``len(paths)`` invars are the parameters at ``paths``."""
    jaxpr = closed.jaxpr
    w = _Walk()
    args = []
    for i, v in enumerate(jaxpr.invars):
        rank = len(getattr(v.aval, "shape", ()))
        if i < len(paths):
            args.append(_Val(rank, origin=((paths[i], tuple(range(rank))),)))
        else:
            args.append(_Val(rank))
    outs = w.run(jaxpr, args)
    for v in outs:
        if v.tags is not None:
            for m in v.tags:
                w.outputs.update(m)
    edges = tuple(
        Edge(w.uses[s].path, s, sd, w.uses[d].path, d, dd, limit, via)
        for (s, sd, d, dd), (limit, via) in sorted(w.edges.items()))
    return Dataflow(paths=tuple(paths), uses=tuple(w.uses), edges=edges, escapes=dict(w.escapes),
                    outputs=frozenset(w.outputs), recurrent=frozenset(w.recurrent),
                    biases=dict(w.biases), elementwise=frozenset(w.elementwise),
                    scanned=dict(w.scanned), n_eqns=w.n_eqns)
