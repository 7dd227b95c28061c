"""Compile a tpflax train step with the TPU compiler, with no TPU attached (libtpu's AOT path).

The one place the benchmarks build a TPU topology mesh and read the compiled
program; retarget it to ``tpflax.make_mesh(shape, target=...)`` and
``tpflax.dry_run`` once those accept a target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import tpflax  # noqa: F401 - on a machine without TPUs, importing tpflax quiets libtpu's start-up warnings


def libtpu_missing() -> str:
    """Why the TPU compiler cannot run here ("" when it can): libtpu is not installed."""
    import importlib.util

    return "" if importlib.util.find_spec("libtpu") is not None else 'libtpu is not installed (pip install -e ".[tpu]")'


def write_result(text: str, out: str) -> None:
    """A probe's markdown ``text`` written to ``out`` (``-``: printed instead)."""
    from pathlib import Path

    if out == "-":
        print(text)
    else:
        Path(out).write_text(text)
        print(f"wrote {out}")


@dataclass(frozen=True)
class Compiled:
    """What the TPU compiler decided for one step (bytes per device)."""

    argument: int
    output: int
    temp: int
    alias: int
    peak: int  # argument + output - alias + temp: what must fit in HBM at once
    comm: dict  # {kind: {axis label: ring bytes per step}}
    flops: float
    seconds: float
    hlo: str


def tpu_mesh(shape: dict, topology: str = "v5e:2x4"):
    """A ``jax.sharding.Mesh`` over the abstract devices of a TPU topology (nothing allocated)."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh

    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    devices = np.array(topo.devices)
    return Mesh(devices.reshape(tuple(shape.values())), tuple(shape))


def comm_of(hlo: str, mesh) -> dict:
    """``{kind: {axis label: ring bytes per step}}`` of a compiled program's HLO text on ``mesh``
    (a ``Mesh`` or ``{axis: size}``)."""
    from tpflax.hlo import parse_collectives, summarize

    sizes = dict(mesh.shape) if hasattr(mesh, "devices") else dict(mesh)
    comm: dict = {}
    for (kind, axis), v in summarize(parse_collectives(hlo, sizes, num_devices=math.prod(sizes.values())),
                                     by="axis").items():
        if v > 0:
            comm.setdefault(kind, {})[axis] = v
    return comm


def compile_step(ts, mesh) -> Compiled:
    """Lower and compile a :class:`tpflax.TrainStep` for ``mesh``'s (TPU) devices."""
    import jax

    t0 = time.perf_counter()
    c = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
                donate_argnums=ts.donate_argnums).lower(*ts.args).compile()
    seconds = time.perf_counter() - t0
    ma = c.memory_analysis()
    text = c.as_text()
    comm = comm_of(text, mesh)
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    arg, out, temp, alias = (int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                                               "alias"))
    return Compiled(arg, out, temp, alias, arg + out - alias + temp, comm, float((ca or {}).get("flops", 0)),
                    seconds, text)
