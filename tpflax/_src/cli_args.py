"""Command-line argument helpers: rules, roles, model loading, optimizers and batches.

The subcommands in :mod:`tpflax._src.cli` (and ``cli_diff``) parse with these and
hand the library what it takes; nothing here prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


class UsageError(Exception):
    """Bad command-line input that argparse itself cannot see (exit code 2)."""


def parse_rule(text: str) -> tuple[str, Any]:
    """``REGEX=TARGET``: a strategy name, or comma-separated axes (``None``/``-`` for
    an unsharded dim, ``a+b`` for several axes on one dim)."""
    from jax.sharding import PartitionSpec

    from tpflax._src.planner.plan import STRATEGIES

    if "=" not in text:
        raise UsageError(f"--rule {text!r} must be REGEX=TARGET, e.g. 'mlp/up=None,model' or 'norm=replicate'")
    pattern, _, target = text.rpartition("=")
    target = target.strip()
    how = ("write TARGET as a strategy or comma-separated axes, None for a dim left whole and a+b for several "
           "axes on one dim, e.g. 'mlp/up=None,model' or 'mlp/up=None,data+model'")
    # an empty side (an unset shell variable: --rule "$PAT=replicate", --rule "mlp/up=$SPEC") matched every leaf,
    # or read as P(None) replicated the leaves, without a word
    if not pattern:
        raise UsageError(f"--rule {text!r} has an empty REGEX, which matches every leaf; write '.*' to mean that")
    if not target:
        raise UsageError(f"--rule {text!r} has an empty TARGET; {how}")
    if any(c in target for c in "()[]'\""):  # a Python spec, P(None, "model") or (data,model): split at its commas
        raise UsageError(f"--rule {text!r}: {target!r} is not a TARGET; {how}")
    if target in STRATEGIES:
        return pattern, target
    dims = []
    for part in target.split(","):
        part = part.strip()
        if part in ("", "None", "none", "-"):
            dims.append(None)
        elif "+" in part:
            dims.append(tuple(p.strip() for p in part.split("+")))
        else:
            dims.append(part)
    return pattern, PartitionSpec(*dims)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse exits 2 with the message otherwise).

    >>> positive_int("8")
    8
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is below 1")
    return n


def byte_size(minimum: int = 1):
    """An argparse type for a byte size: ``1GiB``, ``512KiB``, ``256k``, ``1e6``, ``16GB`` or a number of bytes
    (:func:`tpflax._src.hardware.parse_bytes`), at least ``minimum``.

    >>> byte_size(0)("1GiB"), byte_size(0)("256k"), byte_size(0)("1e6"), byte_size(0)("0")
    (1073741824, 256000, 1000000, 0)
    """
    def size(text: str) -> int:
        from tpflax._src.errors import SuggestError
        from tpflax._src.hardware import parse_bytes

        try:
            return parse_bytes(text, "size", minimum)
        except SuggestError:
            least = f" of at least {minimum} byte{'s' if minimum != 1 else ''}" if minimum else ""
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a size{least}; write e.g. 1GiB, 512KiB, 256k, 1e6 or a number of bytes "
                "(k, KB = 1000; KiB = 1024)") from None

    size.__name__ = "size"
    return size


def parse_roles(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, role = item.partition("=")
        if not sep:
            raise UsageError(f"--axis-role {item!r} must be NAME=ROLE, e.g. 'x=tensor'")
        out[name.strip()] = role.strip()
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Arguments every model command shares."""
    p.add_argument("model", help="zoo name (see `tpflax zoo`) or package.module:factory")
    p.add_argument("--mesh", required=True, help="mesh shape, e.g. data=2,model=4")
    p.add_argument("--size", choices=["tiny", "real"], default=None,
                   help="zoo family size (default: tiny for family names, real for named sizes)")
    p.add_argument("--axis-role", action="append", default=[], metavar="NAME=ROLE",
                   help="role of a mesh axis with an unknown name (tensor, fsdp, data, expert)")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=TARGET",
                   help="override: first matching rule wins (strategy name or axes like None,model)")
    p.add_argument("--fsdp-min-bytes", type=byte_size(0), default=None, metavar="SIZE",
                   help="leaves this large (e.g. 1MiB, 256k) also shard over fsdp axes (default: decided by cost "
                        "per leaf)")
    p.add_argument("--min-channels", type=int, default=64,
                   help="narrowest conv chain to split; wider ones are priced split vs whole (default 64)")
    p.add_argument("--fused", choices=["split", "aligned"], default="split",
                   help="fused q|k|v kernels: split in the model's order (default) or stored head-aligned")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="emulate this many CPU devices (set before jax starts)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--strict", action="store_true", help="exit 1 when the plan has warnings")


def plan_from_args(args: argparse.Namespace):
    """Load the model and plan it; returns (Loaded, Plan)."""
    from tpflax._src.loading import load_model
    from tpflax._src.planner.plan import plan

    loaded = load_model(args.model, size=args.size)
    traced = {}
    if getattr(args, "trace", False):
        need_model(loaded, "--trace needs a model to trace")
        traced = {"model": loaded.model, "sample": loaded.sample}
    # every command's plan is priced for the batch it is given; estimate and dry-run (which have a
    # default batch) price it for the batch their step is estimated at, given or not
    if getattr(args, "batch", None) or getattr(args, "default_batch", None):
        traced["batch"] = estimate_inputs(args, loaded)[0]
    if getattr(args, "priced", False):  # `tpflax plan --hardware`: what the chooser prices the layouts for
        traced["hardware"] = args.hardware
        if args.hardware is not None:  # the library's message names plan(hardware=...), not the flag
            from tpflax._src.errors import TpflaxError
            from tpflax._src.hardware import get_hardware
            try:
                get_hardware(args.hardware)
            except TpflaxError as e:
                raise UsageError(f"--hardware {args.hardware}: {e}") from e
    p = plan(loaded.variables, args.mesh, rules=[parse_rule(r) for r in args.rule],
             axis_roles=parse_roles(args.axis_role) or None, fsdp_min_bytes=args.fsdp_min_bytes,
             min_channels=args.min_channels, fused=getattr(args, "fused", "split"), **traced)
    return loaded, p


def need_model(loaded, what: str) -> None:
    """A UsageError when ``loaded`` is a bare variable tree, or an nnx Module without sample inputs."""
    if loaded.model is None:
        raise UsageError(f"{what}: {loaded.name!r} gave only a variable tree; use a zoo name or a factory "
                         "returning a zoo model, (linen_module, *sample), (nnx_module, *sample) or "
                         "(fn, variables, *sample)")
    if loaded.sample is None and zoo_of(loaded) is None:
        raise UsageError(f"{what}: {loaded.name}() returned an nnx Module without sample inputs; return "
                         "(module, jax.ShapeDtypeStruct((batch, ...), dtype), ...) so tpflax can run it")


OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "adafactor", "lion", "rmsprop", "adagrad")


def optimizer_from_name(name: str, lr: float = 1e-3):
    """An optax optimizer by name (the state shapes are what matter here, not the rate)."""
    import optax

    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return getattr(optax, name)(lr)


def estimate_inputs(args: argparse.Namespace, loaded):
    """(abstract batch, sample or batch spec; global batch size) from --batch.

    A zoo model gets its own batch; a user model its sample with the leading dim
    set to N; a bare tree the spec string.
    """
    import jax

    from tpflax._src.model import as_model

    if args.batch is None and loaded.sample is not None:
        # the leading dim of the first sample array that has one: inputs may be dicts, or start with a scalar
        size = as_model(loaded.model, loaded.sample, loaded.variables).batch_size
        if size is None:
            raise UsageError(f"{args.model}'s sample inputs have no batch dim (every one is a scalar); pass "
                             "--batch N")
        return loaded.sample, size
    try:
        dims = [int(x) for x in str(args.batch or getattr(args, "default_batch", 8)).lower().split("x")]
    except ValueError:
        raise UsageError(f"--batch {args.batch!r} must be N or NxM..., e.g. 32 or 32x1024") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--batch {args.batch!r} must hold positive sizes")
    model = loaded.model
    if loaded.sample is None and zoo_of(loaded) is None:
        return "x".join(map(str, dims)), dims[0]
    if loaded.sample is not None:
        sample = as_model(model, loaded.sample, loaded.variables).with_batch(dims[0]).sample
        # as for a zoo model, NxM... that is the first input's shape is taken (8x32 was refused for a (8, 32) input)
        first = next((tuple(x.shape) for x in jax.tree_util.tree_leaves(sample) if getattr(x, "shape", ())), None)
        if len(dims) > 1 and tuple(dims) != first:
            shown = (f"{args.model}'s inputs are {'x'.join(map(str, first))} for a batch of {dims[0]}; pass --batch "
                     f"{'x'.join(map(str, first))} or just" if first else f"for {args.model} give only the batch size N:")
            raise UsageError(f"--batch {args.batch!r}: {shown} --batch {dims[0]} (the other dims come from the "
                             "model's sample inputs)")
        return sample, dims[0]
    seq = getattr(model.config, "seq_len", None)
    if len(dims) > 1 and seq is not None and dims[1] != seq:
        raise UsageError(f"{args.model} has seq_len {seq}; pass --batch {dims[0]}x{seq} or just --batch "
                         f"{dims[0]} (zoo configs fix the sequence length)")
    batch = jax.eval_shape(lambda: model.make_batch(0, dims[0]))
    x = batch["x"] if isinstance(batch, dict) and "x" in batch else None
    if len(dims) > 1 and x is not None and tuple(dims) != tuple(x.shape):
        shown = "x".join(map(str, x.shape))
        raise UsageError(f"--batch {args.batch!r}: {args.model}'s inputs are {shown} for a batch of {dims[0]}; "
                         f"pass --batch {shown} or just --batch {dims[0]} (zoo configs fix the other dims)")
    return batch, dims[0]


LOSS_HELP = ("the loss of a package.module:factory model: package.module:function, called as "
             "function(output, *sample) -> scalar, as loss= in the Python API (default: next-token "
             "cross-entropy when the model outputs logits over int ids)")


def add_loss_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", default=None, metavar="MODULE:FUNCTION", help=LOSS_HELP)


def loss_kwargs(args: argparse.Namespace, loaded) -> dict:
    """``{"loss": fn}`` from ``--loss package.module:function`` (nothing without it); a UsageError for a
    target that does not import, and for a model that trains with its own loss (a zoo model) or none."""
    name = getattr(args, "loss", None)
    if name is None:
        return {}
    if zoo_of(loaded) is not None or loaded.sample is None:
        raise UsageError(f"--loss is for a package.module:factory model with sample inputs; {args.model} "
                         + ("trains with its own loss" if zoo_of(loaded) is not None else "has none"))
    from tpflax._src.errors import ModelLoadError
    from tpflax._src.loading import load_callable

    try:
        return {"loss": load_callable(name, "--loss", "a function loss(output, *sample) -> scalar")}
    except ModelLoadError as e:
        raise UsageError(str(e)) from e


def zoo_of(loaded):
    """The model estimate() can read activations from: a zoo model (others: from the batch alone)."""
    from tpflax._src.model import is_zoo

    return loaded.model if is_zoo(loaded.model) else None


def model_kwargs(loaded) -> dict:
    """What ``estimate`` reads activations from: a zoo model, or a factory's model with its sample
    inputs (a bare tree: nothing, activations from the batch alone)."""
    if zoo_of(loaded) is not None:
        return {"model": loaded.model}
    if loaded.model is None or loaded.sample is None:
        return {}
    return {"model": loaded.model, "sample": loaded.sample}


def with_remat(loaded, remat: bool):
    """``loaded`` whose zoo model rematerialises its layers when ``--remat`` asks and its config can.

    A dry run compiles the model as built; ``--remat`` must change the compiled step too, or the
    estimate (priced with remat) and the compiled program (without) describe different steps.

    >>> from tpflax._src.loading import load_model
    >>> with_remat(load_model("llama"), True).model.config.remat
    True
    """
    from dataclasses import replace

    from tpflax import zoo

    config = getattr(loaded.model, "config", None)
    if not remat or zoo_of(loaded) is None or getattr(config, "remat", True) is not False:
        return loaded
    m = zoo.get(loaded.model.name, size=loaded.model.size, remat=True)
    return replace(loaded, model=m, variables=m.abstract_variables())

