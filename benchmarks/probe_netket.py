"""tpflax's plans on NetKet's neural-network wave functions (PyPI ``netket`` 3.23, linen), against Megatron by hand.

NetKet writes variational wave functions for quantum many-body systems as Flax modules: a restricted
Boltzmann machine (one dense layer whose hidden units' log-cosh is summed), an MLP, an autoregressive
network (dense layers whose kernels are multiplied by a constant mask) and a group-equivariant CNN (kernels
expanded over the lattice's symmetry group); complex parameters are common. The models map spin
configurations ``(batch, sites)`` to ``log psi``; the step here is the adamw step of
``tpflax.make_train_step`` on a real loss of that output (a stand-in for the variational energy's gradient,
which has the same collectives: it reduces over the samples). NetKet itself shards the samples and keeps the
parameters whole, which is the replicated row. Tiny widths (``models()``), 64 sites, batch 64.

    pip install --no-deps netket==3.23.0 && pip install equinox igraph numba orjson plum-dispatch sparse
    python benchmarks/probe_netket.py                     # every model, both meshes
    python benchmarks/probe_netket.py --arch rbm --mesh data=2,model=4

NetKet turns on ``jax_enable_x64`` when it is imported: the runs compute in float64 where NetKet does.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

B, N = 64, 64
NAMES = ("rbm", "mlp", "arnn", "gcnn")


def available() -> str:
    """'' if netket imports, else why not."""
    for mod in ("netket", "equinox", "igraph", "numba", "plum", "sparse"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install --no-deps netket==3.23.0, then its dependencies: see the script)"
    return ""


def _hand(columns: str, rows: str):
    """Megatron: kernels matching ``columns`` split on their outputs (biases with them), ``rows`` on their inputs."""
    def rules(mesh):
        from jax.sharding import PartitionSpec as P

        f = "fsdp" if "fsdp" in mesh else None
        return [(rf"({columns})/kernel$", P(f, "model")), (rf"({columns})/bias$", P("model")),
                (rf"({rows})/kernel$", P("model", f)), (r".*", P())]
    return rules


def models() -> dict:
    """``{name: (module, hand rules)}`` at tiny widths."""
    import jax.numpy as jnp
    import netket as nk

    return {
        # a complex RBM, 4 hidden units per site
        "rbm": (nk.models.RBM(alpha=4, param_dtype=complex), _hand("Dense", "^$")),
        "mlp": (nk.models.MLP(hidden_dims=(256, 256), param_dtype=jnp.complex64), _hand("Dense_0", "Dense_1")),
        "arnn": (nk.models.ARNNDense(hilbert=nk.hilbert.Spin(0.5, N), layers=3, features=32, param_dtype=jnp.float32),
                 _hand("_layers_0", "_layers_1")),
        "gcnn": (nk.models.GCNN(symmetries=nk.graph.Chain(N), layers=2, features=16, param_dtype=jnp.float32,
                                mode="irreps"), lambda mesh: [(r".*", "replicate")]),
    }


def _loss(out, x):
    import jax.numpy as jnp

    return jnp.mean(jnp.real(out)) + jnp.mean(jnp.imag(out) ** 2)


def build(name: str):
    """(Built, hand rules): concrete variables, the model's apply and a real loss of ``log psi``."""
    import jax
    import jax.numpy as jnp
    from third_party import Built

    m, hand = models()[name]
    sample = (jax.ShapeDtypeStruct((B, N), jnp.float32),)
    variables = m.init(jax.random.key(0), jnp.ones((B, N), jnp.float32))
    return Built(name, m, variables, sample, m.apply, _loss), hand


def main(argv=None) -> int:
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_netket.md", title="# tpflax on NetKet's wave functions",
                      intro=INTRO, tail=OBSERVATIONS, available=available)


INTRO = ("`python benchmarks/probe_netket.py` (generated; netket 3.23.0 with jax 0.10). Tiny widths (`models()` "
         "in the script), 64 sites, batch 64; the adamw train step of `tpflax.make_train_step` on a real loss of "
         "`log psi`, compiled on 8 CPU-emulated devices and measured as `benchmarks/third_party.py` measures "
         "(`measure`). **x hand**: ratio to the Megatron layout written by hand in the script (GCNN's: every leaf "
         "whole, NetKet's own); lower is better. **est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` "
         "collective bytes over the compiled ones.")

OBSERVATIONS = """
## Observations (by hand)

Numbers from the table above; "before" is this round's start (7c515f8).

- **Complex parameters** (the RBM's `complex128`, the MLP's `complex64`) plan, shard, compile and estimate as
  real ones do, at their itemsize.
- **rbm `model`**: the hidden layer splits on its units; its log-cosh is summed per configuration, so each shard
  sums its part and XLA all-reduces one value per configuration. The estimate priced a gather of the whole
  hidden layer, 2.43x the compiled collectives before; now 0.991 (`Dataflow.only_reduced`). NetKet's `log_cosh`
  takes `jnp.signbit`, a `bitcast_convert_type` the trace had taken as opaque, which ended the hidden units'
  dataflow there (`tests/test_wavefunctions.py`).
- **rbm `tree`**, above the hand layout (3.6-3.9x; the replicated layout's numbers): one dense layer alone, and
  what reads its output (a sum) is in no name or shape; tree-only keeps a dense without a partner whole.
  Left as it is: `model=` finds it.
- **mlp `tree`**, before: `Dense_0`, `Dense_1`, `Dense_2` in one module, no name or residual width to orient
  them, all whole (3.9x the hand layout's bytes); the first two of numbered layers chained in their numbers'
  order are now a column and a row, the hand layout.
- **arnn `model`**, before: every masked kernel (`kernel * mask`, a constant) was taken for an activation, so
  nothing was paired (the replicated row, 3.4x the hand layout's bytes); a parameter combined with constants is
  now still a weight. Now below the hand layout on all three numbers on both meshes (0.854 / 0.932 / 0.853,
  data=2,model=4): the chooser also splits the output layer, whose output is only reduced (a log-softmax per
  site and a sum).
- **gcnn**: the estimate was 0.17-0.24 of the compiled collectives on every plan before issue 11's forty-fifth
  round, now 1.000. In `irreps` mode the `DenseSymm` kernel `(16, 1, 64)` is looked up at the symmetry group's
  128 constant site permutations before its contraction, and XLA sums that `f32[16,128,1,64]` gradient over the
  batch, 128x the parameter; the equivariant layer's kernel `(16, 16, 128)` is contracted with the irreps
  (float64 constants) and summed so, `f64[31,16,2,16,2]` and `f64[4,16,1,16,1]`. The estimate now prices the
  kernels the matmuls read where an op made them of one parameter and they are larger than its gradient
  (`Dataflow.expanded`, `cost/gradients.py` `expanded_bytes`, `tests/test_expanded_kernels.py`). (In the default
  `fft` mode XLA:CPU also gathers the whole batch around every FFT.) The `fsdp` rows' 1.086x comm is the fsdp
  split of these small kernels, priced as XLA:TPU's reduce-scatter (`results/third_party.md`).
- **Estimates** on every other row are within 1% of the compiled collectives.
"""


if __name__ == "__main__":
    sys.exit(main())
