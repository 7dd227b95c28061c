"""tpflax: plan and apply tensor-parallel and FSDP sharding for JAX/Flax models.

>>> import jax, tpflax
>>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
>>> sorted(p.decisions)
['w']
"""

from tpflax._src.apply.aligned import aligned
from tpflax._src.apply.batch import batch_sharding, batch_spec, constrain_batch, shard_batch
from tpflax._src.apply.init import init_sharded
from tpflax._src.apply.place import constrain, gathered_loss, shard, shardings, unshard
from tpflax._src.apply.state import (
                     optimizer_shardings,
                     shard_optimizer_state,
                     shard_train_state,
                     state_shardings,
                     train_state_shardings,
)
from tpflax._src.apply.step import Step, jit_step
from tpflax._src.checkpoint import (
                     checkpoint_tree,
                     convert_checkpoint,
                     restore_checkpoint,
                     save_checkpoint,
)
from tpflax._src.cost.activations import trace_activations
from tpflax._src.cost.estimate import estimate
from tpflax._src.cost.records import Estimate
from tpflax._src.diff import PlanDiff, diff
from tpflax._src.dryrun import DryRun, dry_run
from tpflax._src.errors import (
                     AbstractMeshError,
                     CheckpointError,
                     CompileError,
                     DeviceError,
                     EstimateError,
                     MeshError,
                     ModelLoadError,
                     NoFitError,
                     OptionError,
                     PlanFormatError,
                     PlanMismatchError,
                     RuleError,
                     SpecError,
                     SuggestError,
                     TpflaxError,
                     TpflaxWarning,
                     TraceError,
                     TreeError,
                     UnknownPathError,
)
from tpflax._src.from_rules import from_rules
from tpflax._src.hardware import Hardware
from tpflax._src.hardware import get_hardware as get_hardware
from tpflax._src.html.page import HtmlReport, show
from tpflax._src.mesh import MeshShape, abstract_mesh, make_mesh, mesh_shape
from tpflax._src.planner.decision import Alternative as Alternative
from tpflax._src.planner.plan import Decision, Pair, Plan, default_logical_rules, plan
from tpflax._src.report import fmt_bytes, report
from tpflax._src.step import TrainStep, make_train_step
from tpflax._src.suggest.records import Candidate, Degree, Suggestion, Verification
from tpflax._src.suggest.search import suggest_mesh
from tpflax._src.suggest.verify import verify_suggestion
from tpflax._src.tpu import quiet_libtpu
from tpflax._src.trace.dataflow import Dataflow, dataflow

# before jax starts its backends: no libtpu start-up warnings on a machine without TPUs
quiet_libtpu()

__version__ = "0.1.0"

__all__ = [
    "AbstractMeshError", "EstimateError", "OptionError", "TpflaxWarning",
    "CompileError", "Decision", "DeviceError", "MeshError", "MeshShape", "ModelLoadError", "Pair",
    "Plan", "PlanFormatError", "PlanMismatchError", "RuleError", "SpecError", "TpflaxError",
    "TreeError", "UnknownPathError", "abstract_mesh", "default_logical_rules", "fmt_bytes", "make_mesh", "mesh_shape",
    "plan", "report",
    # dataflow-aware planning (plan(..., model=, sample=))
    "Dataflow", "TraceError", "dataflow",
    # apply (the converter) and checkpoints
    "CheckpointError", "Step", "batch_sharding", "batch_spec", "checkpoint_tree", "constrain",
    "constrain_batch", "convert_checkpoint", "init_sharded", "jit_step", "optimizer_shardings",
    "restore_checkpoint", "save_checkpoint", "shard", "shard_batch", "shard_optimizer_state",
    "shard_train_state", "shardings", "state_shardings", "train_state_shardings", "unshard",
    # estimates and dry runs
    "DryRun", "Estimate", "TrainStep", "dry_run", "estimate", "make_train_step", "trace_activations",
    # mesh suggestion
    "Candidate", "Degree", "Hardware", "NoFitError", "SuggestError", "Suggestion", "Verification",
    "suggest_mesh", "verify_suggestion",
    # exports, imports and diffs of plans
    "PlanDiff", "diff", "from_rules",
    # the visual report (HTML)
    "HtmlReport", "show",
    # plans chosen by cost (plan(..., hardware=, batch=, device_memory=), report(plan, why=))
    "Alternative", "get_hardware",
    # ZeRO-3 loss for hand-written steps, scanned stacks gathered per layer (issue 12)
    "gathered_loss",
    # a hand-written step over a plan made with fused="aligned" (fused kernels stored head-aligned)
    "aligned",
]
