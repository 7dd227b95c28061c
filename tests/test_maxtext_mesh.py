"""A MaxText 0.2 model as its users run it: logical names on every parameter, MaxText's twelve-axis mesh.

MaxText (since 0.2) names its embedding's and output head's model dim ``embed_vocab``, its MoE kernels'
``embed_moe`` and ``mlp_moe``, splits its norm scales over ``tensor`` (``norm``), and runs on a mesh of
twelve axes (``diloco``, ``data``, ``stage``, ``fsdp``, ...), most of size 1 on any one job. Before, the
mesh raised "axis 'diloco' has no known role", and with roles given the default plan left every MoE kernel
whole (MaxText's mixtral: 2.6-5.1x the bytes and 3.2-5.8x the collectives of MaxText's own layout) with a
warning per unknown name. The module below is written as MaxText writes its layers (boxed logical names,
experts stacked first, layers scanned on axis 1); ``benchmarks/probe_maxtext.py`` runs MaxText itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _util import specs
from jax.sharding import PartitionSpec as P

import tpflax

AXES = ("diloco", "data", "stage", "fsdp", "fsdp_transpose", "context", "context_usp_ulysses",
        "context_autoregressive", "tensor", "tensor_sequence", "expert", "autoregressive")
MESH = {a: {"fsdp": 2, "tensor": 4}.get(a, 1) for a in AXES}
D, F, E, V = 64, 128, 4, 1000
# A few of MaxText 0.2.4's base.yml rules, as it writes them: a dim over a list of axes, most of size 1 here.
MAXTEXT_RULES = [("vocab", ["tensor", "tensor_sequence", "autoregressive"]),
                 ("embed_vocab", ["fsdp", "fsdp_transpose", "context", "context_usp_ulysses", "expert"]),
                 ("exp", "expert"), ("mlp_moe", ["fsdp_transpose", "tensor", "tensor_sequence", "autoregressive"]),
                 ("embed_moe", ["fsdp", "fsdp_transpose", "context", "context_usp_ulysses"]),
                 ("embed_moe", ["fsdp", "context", "context_usp_ulysses"]),
                 ("embed", ["fsdp", "fsdp_transpose", "context", "context_usp_ulysses", "expert"]),
                 ("norm", ["tensor"]), ("layers", "stage")]


class MoeLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        lp, init = nn.with_logical_partitioning, nn.initializers.lecun_normal()
        scale = self.param("pre_norm", lp(nn.initializers.ones, ("norm",)), (D,))
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
        gate = self.param("gate", lp(init, ("embed", None)), (D, E))
        wi = self.param("wi", lp(init, ("exp", "embed_moe", "mlp_moe")), (E, D, F))
        wo = self.param("wo", lp(init, ("exp", "mlp_moe", "embed_moe")), (E, F, D))
        weights = jax.nn.softmax(h @ gate)  # dense routing: every expert, weighted
        hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", h, wi))
        return x + jnp.einsum("bte,btef,efd->btd", weights, hidden, wo), None


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, ids):
        lp = nn.with_logical_partitioning
        table = self.param("embedding", lp(nn.initializers.normal(), ("vocab", "embed_vocab")), (V, D))
        x = table[ids]
        stack = nn.scan(MoeLayer, variable_axes={"params": 1}, split_rngs={"params": True}, length=2,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(name="layers")(x, None)
        head = self.param("logits", lp(nn.initializers.lecun_normal(), ("embed_vocab", "vocab")), (D, V))
        return x @ head


@pytest.fixture(scope="module")
def tree():
    return jax.eval_shape(Decoder().init, jax.random.key(0), jax.ShapeDtypeStruct((8, 16), jnp.int32))


# MaxText's own layout of these parameters on this mesh (its rules, then its remove_size_one_mesh_axis)
WANT = {"embedding": P("tensor", "fsdp"), "logits": P("fsdp", "tensor"),
        "layers/wi": P(None, None, "fsdp", "tensor"), "layers/wo": P(None, None, "tensor", "fsdp"),
        "layers/gate": P("fsdp", None, None), "layers/pre_norm": P("tensor", None)}


def test_axes_of_size_one_need_no_role():
    shape = tpflax.mesh_shape(MESH)
    assert dict(shape.axes) == MESH and tpflax.make_mesh(MESH).axis_names == AXES
    with pytest.raises(tpflax.MeshError, match="'stage' has no known role"):
        tpflax.mesh_shape({**MESH, "stage": 2})  # a size that splits needs a role, as before


def test_maxtext_names_read_by_default_as_maxtext_lays_them_out(tree):
    p = tpflax.plan(tree, MESH)
    assert not p.warnings, p.warnings
    assert specs(p, WANT) == WANT


def test_maxtext_own_rules_give_its_layout_without_its_axes_of_size_one(tree):
    p = tpflax.plan(tree, MESH, logical_rules=MAXTEXT_RULES)
    assert specs(p, WANT) == WANT  # no ('fsdp', 'fsdp_transpose', 'context', ...) entries: the same placement
    assert all(d.source == "annotation" for d in p.decisions.values())
