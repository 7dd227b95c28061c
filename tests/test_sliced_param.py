"""A parameter read only through a static slice (UViT's learned position table, sized for the largest image
and cut to the patch count): its gradient is the window's, and XLA sums only the window over the batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P

import tpflax

D, T, MAX = 32, 16, 1024
X = (jax.ShapeDtypeStruct((8, T, D), jnp.float32),)


class PosMlp(nn.Module):
    """A table of MAX positions, the first T of them added to the tokens; an MLP on the result."""

    @nn.compact
    def __call__(self, x):
        pos = self.param("pos", nn.initializers.normal(0.02), (1, MAX, D))
        x = x + pos[:, : x.shape[1], :]
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(x)))


def _loss(out, x):
    return jnp.mean(out ** 2)


@pytest.mark.parametrize("rules", [[(".*", "replicate")],
                                   [(r"up/kernel", P(None, "model")), (r"up/bias", P("model")),
                                    (r"down/kernel", P("model", None)), (".*", "replicate")]],
                         ids=["replicated", "megatron"])
def test_a_sliced_table_all_reduces_only_its_window(rules):
    # the estimate summed the whole (1, 1024, 32) table's gradient over data=2 (128 KiB); the compiled step
    # sums f32[1,16,32] (flaxdiff's UViT, 4,096 rows of which 16 are read: every estimate 1.36x-1.67x of the
    # compiled collectives)
    mesh = {"data": 2, "model": 4}
    model = PosMlp()
    v = jax.eval_shape(model.init, jax.random.key(0), *X)
    plan = tpflax.plan(v, mesh, rules=rules)
    est = tpflax.estimate(plan, optax.adamw(1e-3), X, model=model, sample=X, loss=_loss, backend="cpu")
    pos = [i for i in est.items if i.source == "params/pos"]
    assert [(i.kind, i.size) for i in pos] == [("all-reduce", 1 * T * D * 4)]
    m = tpflax.make_mesh(mesh)
    ts = tpflax.make_train_step(model, plan, m, optax.adamw(1e-3), sample=X, loss=_loss, variables=v)
    got = tpflax.dry_run(ts, plan, m, compiler_options=COMM_XLA).comm_total
    assert abs(est.comm_total / got - 1) < 0.02, (est.comm_total, got)
