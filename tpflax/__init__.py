"""tpflax: plan and apply tensor-parallel and FSDP sharding for JAX/Flax models.

>>> import jax, tpflax
>>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
>>> sorted(p.decisions)
['w']
"""

from .errors import (CompileError, DeviceError, MeshError, ModelLoadError, PlanFormatError,
                     PlanMismatchError, RuleError, SpecError, TpflaxError, TreeError)
from .heuristics import Pair
from .mesh import MeshShape, abstract_mesh, make_mesh, mesh_shape
from .plan import Decision, Plan, default_logical_rules, plan
from .report import fmt_bytes, report

__version__ = "0.1.0"

__all__ = [
    "CompileError", "Decision", "DeviceError", "MeshError", "MeshShape", "ModelLoadError", "Pair",
    "Plan", "PlanFormatError", "PlanMismatchError", "RuleError", "SpecError", "TpflaxError",
    "TreeError", "abstract_mesh", "default_logical_rules", "fmt_bytes", "make_mesh", "mesh_shape",
    "plan", "report",
]
