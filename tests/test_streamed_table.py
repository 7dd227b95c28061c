"""A token table under a residual stream a model's own constraint splits on its features (MaxText's and
EasyDeL's hidden states over the tensor axis).

The stream is split on its features whatever the table's layout, and XLA gathers it for every pair either way.
Split on its rows (vocab-parallel), the lookup sums the looked-up rows and reshards them into the constraint's
layout; split on its features, the lookup comes out in that layout and moves nothing. The planner offered the
feature split only for tables whose rows do not divide the tensor axis: EasyDeL's Llama planned with
``model=`` took 1.08x the collectives of EasyDeL's own layout, which splits the features
(``benchmarks/results/probe_easydel.md``). And the estimate priced the split stream twice for a feature-split
table, once as the table's stream and once for each pair: 1.20x the compiled collectives on EasyDeL's layout.
"""

from __future__ import annotations

import optax
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P
from test_stream_ends import MESH, built, loss

import tpflax


def test_the_table_splits_its_features_as_the_constraint_splits_the_stream(devices):
    mesh, fn, params, ids = built()
    chosen = tpflax.plan(params, MESH, model=fn, sample=(ids,), batch=(ids,))
    table = chosen.decisions["params/embed/embedding"]
    assert table.spec == P(None, "model"), table.reason
    assert "as the model's own sharding constraint splits the residual stream" in table.reason
    rows = tpflax.plan(params, MESH, model=fn, sample=(ids,), batch=(ids,),
                       rules=[("embed/embedding", P("model", None))])
    comm = {name: tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss),
                                 p, mesh, compiler_options=COMM_XLA).comm_total
            for name, p in (("features", chosen), ("rows", rows))}
    assert comm["features"] < comm["rows"]  # measured 0.87x
    e = tpflax.estimate(chosen, optax.adamw(1e-3), model=fn, sample=(ids,), loss=loss, backend="cpu")
    # measured 0.99: each gather of the stream priced once (1.19 before: the table's and each pair's); the norms'
    # row statistics, a few hundred bytes, are not priced
    assert abs(e.comm_total / comm["features"] - 1) < 0.05
