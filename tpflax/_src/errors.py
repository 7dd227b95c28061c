"""tpflax's exception types.

Every mistake tpflax can catch raises a subclass of :class:`TpflaxError`, so a
caller can ``except tpflax.TpflaxError`` once. Errors about a tree collect every
offending leaf and raise once; each line names the path, the shape, the mesh
axis and its size, and ends with a fix.
"""

from __future__ import annotations

from collections.abc import Iterable


class TpflaxError(Exception):
    """Base class of every error tpflax raises for bad input.

    Attributes:
        problems: one line per problem found (the message lists them all).
        message: the message without the problems' lines.
    """

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = tuple(problems)
        self.message = message.rstrip(":") if self.problems else message
        if self.problems:
            message = message.rstrip(":") + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class MeshError(TpflaxError, ValueError):
    """A mesh shape is malformed: zero/negative sizes, duplicate or unknown axis names."""


class DeviceError(TpflaxError, RuntimeError):
    """The mesh needs more devices than this process can see."""


class RuleError(TpflaxError, ValueError):
    """A user rule is malformed or names a mesh axis the mesh does not have."""


class SpecError(TpflaxError, ValueError):
    """A forced PartitionSpec does not fit its leaf (rank, divisibility, repeated axis)."""


class TreeError(TpflaxError, ValueError):
    """The parameter tree is empty or holds leaves that are not arrays."""


class PlanMismatchError(TpflaxError, ValueError):
    """A tree or mesh does not match the plan it is being used with."""


class AbstractMeshError(MeshError, PlanMismatchError):
    """Arrays were to be placed on a ``jax.sharding.AbstractMesh``, which has no devices (``shard``,
    ``shard_batch``, ``init_sharded``...); build a concrete mesh with ``tpflax.make_mesh``. A :class:`MeshError`
    (this mesh cannot hold arrays), and a :class:`PlanMismatchError` too, which the plan's placing functions
    raised for it before."""


class UnknownPathError(TpflaxError, KeyError):
    """A path that is not a leaf of the plan (``plan.spec(path)``, ``plan.decisions[path]``);
    a ``KeyError`` too, so ``except KeyError`` keeps working."""

    __str__ = Exception.__str__  # the message, not KeyError's repr of it


class PlanFormatError(TpflaxError, ValueError):
    """Serialized plan JSON is malformed or from an unsupported format version."""


class ModelLoadError(TpflaxError, ValueError):
    """A model name or ``package.module:factory`` string could not be loaded."""


class CompileError(TpflaxError, RuntimeError):
    """XLA could not compile a program built from a plan."""


class TraceError(TpflaxError, ValueError):
    """A model's forward pass could not be traced with the given sample inputs and variables."""


class CheckpointError(TpflaxError, RuntimeError):
    """A checkpoint is missing, incomplete (an interrupted save), or could not be written."""


class EstimateError(TpflaxError, ValueError):
    """Inputs to :func:`tpflax.estimate` are malformed (batch, optimizer, dtypes)."""


class OptionError(TpflaxError, ValueError):
    """An argument has the wrong type or an out-of-range value (``fsdp_min_bytes="big"``, a dict as plan)."""


class TpflaxWarning(UserWarning):
    """Something suspicious that tpflax handled anyway (e.g. NaN/inf in placed parameters)."""


class SuggestError(TpflaxError, ValueError):
    """Bad input to the mesh suggestion: device count, memory, hardware name, or nothing fits."""


class NoFitError(SuggestError):
    """No mesh shape fits the model in device memory; ``suggestion`` holds every candidate and why."""

    def __init__(self, message: str, problems: Iterable[str] = (), suggestion=None):
        super().__init__(message, problems)
        self.suggestion = suggestion
