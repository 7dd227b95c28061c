"""Models that ship their own sharding annotations, written for a mesh named differently.

A library annotates its parameters for its own mesh: tunix writes
``('fsdp', 'tp')`` on NNX params, other code ``nn.with_partitioning(..., ('model', None))``.
On a mesh whose tensor axis is called ``tensor`` those names are the same roles,
so ``tpflax.plan`` reads them as that mesh's axes instead of dropping them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tpflax

S, F32 = jax.ShapeDtypeStruct, "float32"
MESH = {"fsdp": 2, "tensor": 4}


class _TunixLike(nnx.Module):
    """Tunix's layout: q/k/v (d, heads, head_dim) ``(fsdp, tp, None)``, o ``(tp, None, fsdp)``, mlp."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal()
        lazy = {"eager_sharding": False}  # metadata only, as tunix does: no mesh needed to build it
        self.q = nnx.Param(init(rngs.params(), (64, 8, 16)), out_sharding=("fsdp", "tp", None), **lazy)
        self.o = nnx.Param(init(rngs.params(), (8, 16, 64)), out_sharding=("tp", None, "fsdp"), **lazy)
        self.up = nnx.Linear(64, 256, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("fsdp", "tp"), **lazy))
        self.down = nnx.Linear(256, 64, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("tp", "fsdp"), **lazy))
        self.norm = nnx.Param(init(rngs.params(), (64,)), out_sharding=("tp",), **lazy)


@pytest.fixture(scope="module")
def state():
    return nnx.state(nnx.eval_shape(lambda: _TunixLike(nnx.Rngs(0))))


def test_a_role_spelled_differently_is_read_as_the_mesh_axis(state):
    p = tpflax.plan(state, MESH)
    want = {"q": P("fsdp", "tensor", None), "o": P("tensor", None, "fsdp"), "up/kernel": P("fsdp", "tensor"),
            "down/kernel": P("tensor", "fsdp"), "norm": P("tensor")}
    assert {k: p.decisions[k].spec for k in want} == want
    assert all(p.decisions[k].source == "annotation" for k in want)
    assert "'tp' read as the mesh's 'tensor'" in p.decisions["q"].reason
    assert not p.warnings  # nothing was dropped
    # the same plan as the annotations applied verbatim on a mesh named like the library's
    verbatim = tpflax.plan(state, {"fsdp": 2, "tp": 4})
    assert {k: verbatim.decisions[k].spec for k in want} == {
        k: P(*("tp" if e == "tensor" else e for e in s)) for k, s in want.items()}


def test_annotations_off_is_tpflax_own_plan(state):
    p = tpflax.plan(state, MESH, use_annotations=False)
    assert all(d.source != "annotation" for d in p.decisions.values())
    assert p.decisions["up/kernel"].spec != P(None, None)  # still sharded, by tpflax's own rules


def test_linen_mesh_axis_names_and_roles_the_mesh_lacks():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("dp", "model")),
                         name="a")(x)
            return nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("ep", None)),
                            name="b")(x)

    tree = jax.eval_shape(M().init, jax.random.key(0), S((2, 64), F32))
    p = tpflax.plan(tree, {"data": 2, "tensor": 4})
    assert p.decisions["params/a/kernel"].spec == P("data", "tensor")  # dp -> data, model -> tensor
    assert p.decisions["params/b/kernel"].spec == P(None, None)  # no expert axis: dropped, with a warning
    assert any("params/b/kernel" in w and "'ep'" in w for w in p.warnings)


# ---------------------------------------------------------------------------
# an unannotated bias beside an annotated kernel (``kernel_init=nn.with_logical_partitioning``
# without ``bias_init=``) follows the kernel's spec as it follows a kernel tpflax chose

_LOGICAL = nn.with_logical_partitioning
_INIT = nn.initializers.lecun_normal()


class _AnnotatedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, kernel_init=_LOGICAL(_INIT, ("embed", "mlp")), name="up")(x)
        return x + nn.Dense(64, kernel_init=_LOGICAL(_INIT, ("mlp", "embed")), name="down")(nn.gelu(h))


_X = S((8, 16, 64), F32)


def test_logical_rules_naming_an_axis_the_mesh_lacks_say_so():
    """A logical rule mapping to a mistyped axis (``("mlp", "modle")``) left the dim whole without a word, and a
    logical name the user's rules lack was called a "mesh axis" the mesh lacks."""
    tree = jax.eval_shape(_AnnotatedMLP().init, jax.random.key(0), _X)
    mesh = {"data": 2, "model": 4}
    p = tpflax.plan(tree, mesh, logical_rules=[("embed", None), ("mlp", "modle")])
    assert p.decisions["params/up/kernel"].spec == P(None, None)
    assert any("params/up/kernel" in w and "'mlp'" in w and "'modle'" in w for w in p.warnings), p.warnings
    # NNX metadata does not say which names are logical: one the rules lack is neither kind
    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Param(nnx.initializers.normal()(rngs.params(), (64, 256)), out_sharding=("embed", "mlp"),
                                eager_sharding=False)

    p = tpflax.plan(nnx.state(nnx.eval_shape(lambda: Mlp(nnx.Rngs(0)))), mesh, logical_rules=[("mlp", "model")])
    assert p.decisions["up"].spec == P(None, "model")
    said = [w for w in p.warnings if w.startswith("up:") and "'embed'" in w]
    assert said and "mesh axis 'embed'" not in said[0] and "logical_rules=" in said[0], p.warnings
    # the documented call takes any mesh, as plan() does
    for m in (mesh, tpflax.make_mesh(mesh), tpflax.abstract_mesh(mesh)):
        assert dict(tpflax.default_logical_rules(m))["mlp"] == "model"


@pytest.mark.parametrize("mesh", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}])
@pytest.mark.parametrize("traced", [False, True])
def test_a_plain_bias_follows_its_annotated_kernel(mesh, traced):
    tree = jax.eval_shape(_AnnotatedMLP().init, jax.random.key(0), _X)
    p = tpflax.plan(tree, mesh, **({"model": _AnnotatedMLP(), "sample": (_X,)} if traced else {}))
    up, f = p.decisions["params/up/kernel"], "fsdp" if "fsdp" in mesh else None
    assert (up.spec, up.source) == (P(f, "model"), "annotation")
    assert p.decisions["params/up/bias"].spec == P("model")
    assert p.decisions["params/down/bias"].spec == P(None)
    for name in ("up", "down"):
        why = p.decisions[f"params/{name}/bias"].reason
        assert (f"added to the output of {name}/kernel" if traced else f"bias of {name}/kernel") in why
        assert "(annotated P(" in why


def test_a_rule_for_the_bias_beats_following_its_annotated_kernel():
    tree = jax.eval_shape(_AnnotatedMLP().init, jax.random.key(0), _X)
    for kw in ({}, {"model": _AnnotatedMLP(), "sample": (_X,)}):
        p = tpflax.plan(tree, {"data": 2, "model": 4}, rules=[("up/bias", P(None))], **kw)
        d = p.decisions["params/up/bias"]
        assert (d.spec, d.source) == (P(None), "rule")
        assert p.decisions["params/up/kernel"].spec == P(None, "model")


def test_a_plain_bias_follows_a_kernel_a_rule_set():
    tree = jax.eval_shape(_AnnotatedMLP().init, jax.random.key(0), _X)
    p = tpflax.plan(tree, {"data": 2, "model": 4}, rules=[("up/kernel", P("model", None))],
                    use_annotations=False)
    d = p.decisions["params/up/bias"]
    assert d.spec == P(None)  # its output dim is whole
    assert "bias of up/kernel (set by a rule to P('model', None))" in d.reason


class _ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(256, kernel_init=_LOGICAL(_INIT, ("embed", "mlp")), name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(64, kernel_init=_LOGICAL(_INIT, ("mlp", "embed")), name="down")(nn.gelu(h)), None


class _ScannedMLP(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_ScannedBlock, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=4,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        return scan(name="blocks")(x, None)[0]


@pytest.mark.parametrize("mesh", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}])
@pytest.mark.parametrize("axis", [0, 1])  # 1: MaxText's param_scan_axis=1
@pytest.mark.parametrize("traced", [False, True])
def test_a_plain_bias_in_an_annotated_scan_is_stacked_and_follows_its_kernel(mesh, axis, traced):
    """Only the kernels name the ``layers`` dim; the biases beside them are stacked alike (the tree
    took them for unstacked ``(4, 256)`` tables and split the mlp dim over fsdp)."""
    m = _ScannedMLP(axis)
    tree = jax.eval_shape(m.init, jax.random.key(0), _X)
    p = tpflax.plan(tree, mesh, **({"model": m, "sample": (_X,)} if traced else {}))
    f = "fsdp" if "fsdp" in mesh else None
    stack = (lambda *s: P(None, *s)) if axis == 0 else (lambda a, *s: P(a, None, *s))
    assert p.decisions["params/blocks/up/kernel"].spec == stack(f, "model")
    assert p.decisions["params/blocks/up/bias"].spec == stack("model")
    assert p.decisions["params/blocks/down/bias"].spec == stack(None)
    up = p.decisions["params/blocks/up/bias"]
    assert up.layers_dim == axis
    assert ("added to the output of blocks/up/kernel" if traced else "bias of blocks/up/kernel") in up.reason
    assert "(annotated P(" in up.reason


class _Lm1bAttention(nn.Module):
    """flax's lm1b/wmt examples: ``DenseGeneral`` kernels (d, heads, head_dim) annotated ``('embed', 'kv')``."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "kv"))
        for name in ("query", "key", "value"):
            x = x + nn.DenseGeneral((4, 16), kernel_init=init, name=name)(x).reshape(x.shape)
        return x


def test_an_annotation_of_the_wrong_rank_is_ignored_with_one_warning_per_kind():
    tree = jax.eval_shape(lambda: _Lm1bAttention().init(jax.random.key(0), jax.numpy.zeros((2, 64))))
    p = tpflax.plan(tree, MESH)
    said = [w for w in p.warnings if "annotation" in w]
    assert said == ["params/key/kernel: its annotation ('embed', 'kv') names 2 dims of a 3-D leaf (64, 4, 16), "
                    "so it was ignored and the leaf planned as if unannotated (2 more leaves alike); annotate one "
                    "name per dim, None for a dim left whole"]
    assert p.decisions["params/key/kernel"].source == "heuristic"
    assert not [w for w in tpflax.plan(tree, MESH, use_annotations=False).warnings if "annotation" in w]
