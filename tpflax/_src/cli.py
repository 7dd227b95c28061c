"""The ``tpflax`` command: parse, call the library, print.

Exit codes: 0 success; 1 the plan has warnings and ``--strict`` was given;
2 bad input (any :class:`tpflax.TpflaxError`). Messages go to stderr; ``--json``
output alone goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tpflax._src.cli_args import (
    OPTIMIZERS,
    UsageError,
    add_loss_arg,
    add_model_args,
    byte_size,
    estimate_inputs,
    loss_kwargs,
    model_kwargs,
    need_model,
    optimizer_from_name,
    parse_roles,
    parse_rule,
    plan_from_args,
    positive_int,
    with_remat,
)
from tpflax._src.hardware import DEFAULT_PLAN_HARDWARE
from tpflax._src.hardware import known as known_hardware

EXAMPLES = """examples:
  tpflax plan gpt2-small --mesh data=2,model=4
  tpflax plan llama --size real --mesh fsdp=4,model=2 --pairs
  tpflax plan llama-70b --mesh data=16,fsdp=16,model=8 --json > plan.json
  tpflax plan mypkg.models:make --mesh model=8 --rule 'embed=replicate' --rule 'mlp/up=None,model'
  tpflax plan gpt2 --mesh data=2,model=4 --devices 8     # also bind the plan to 8 CPU-emulated devices
  tpflax estimate llama --mesh fsdp=4,model=2 --optimizer adamw --batch 32
  tpflax dry-run gpt2 --mesh data=2,model=4 --devices 8 --batch 16
  tpflax plan llama --mesh data=2,model=4 --trace --pairs  # pair layers from the traced dataflow
  tpflax suggest llama-2-7b --world-size 64 --hardware tpu-v5p --batch 64   # which mesh, and does it fit
  tpflax plan gpt2-small --mesh data=2,model=4 --html report.html   # a visual report, one file
"""

# `tpflax plan --help` shows the plan examples only (the other commands' are in their own --help)
PLAN_EXAMPLES = "examples:\n" + "".join(line + "\n" for line in EXAMPLES.splitlines() if "tpflax plan " in line)


def _stdout_paths(args: argparse.Namespace) -> bool:
    """Whether ``--html -`` asks for the page on stdout (then the command prints nothing else there); a
    UsageError where another output wants stdout too. ``-`` was a file named ``-`` in the working directory."""
    if getattr(args, "why", None) == "-":
        raise UsageError("--why -: stdout carries the report; give --why a file path, e.g. --why why.txt")
    if args.html != "-":
        return False
    if args.json:
        raise UsageError("--html - and --json both write to stdout; give --html a file path, e.g. --html report.html")
    return True


def cmd_plan(args: argparse.Namespace) -> int:
    from tpflax._src.report import report

    page_only = _stdout_paths(args)
    loaded, p = plan_from_args(args)
    if page_only:
        from tpflax._src.why import leaf_named

        if leaf_named(p, args.why):  # before the page goes to stdout
            raise UsageError(f"--why {args.why}: a leaf's candidates are printed after the text report, and "
                             "--html - puts the page on stdout instead; give --why a file path, e.g. --why why.txt")
    bound = None
    if args.devices:
        import jax

        from tpflax._src.apply.place import shardings
        from tpflax._src.mesh import make_mesh

        mesh = make_mesh(p.mesh)
        tree = shardings(p, mesh)
        bound = f"bound to {len(jax.tree_util.tree_leaves(tree))} NamedShardings on {mesh.devices.size} " \
                f"{jax.devices()[0].platform} devices"
    if args.html:  # first: a path that cannot be written fails the command before anything is printed
        from tpflax._src.html.cli import write_cli_report

        # the page's step is the batch the plan is priced for; one the step cannot take leaves a parameters-only page
        write_cli_report(args.html, p, loaded, batch=estimate_inputs(args, loaded)[0] if args.batch else None)
    if page_only:
        if args.why:
            report(p, why=args.why)
        return 1 if args.strict and p.warnings else 0
    if args.json:
        print(report(p, fmt="json", why=args.why))
    else:
        print(report(p, reasons=not args.no_reasons, pairs=args.pairs, full=args.full, why=args.why))
        if bound:
            print(bound)
    return 1 if args.strict and p.warnings else 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from tpflax._src.cost.estimate import estimate
    from tpflax._src.report import report

    page_only = _stdout_paths(args)
    loaded, p = plan_from_args(args)
    batch, _ = estimate_inputs(args, loaded)
    est = estimate(p, optimizer_from_name(args.optimizer), batch, **model_kwargs(loaded),
                   **loss_kwargs(args, loaded), remat=args.remat,
                   backend=args.backend, act_dtype=args.act_dtype, grad_dtype=args.grad_dtype,
                   optimizer_name=args.optimizer)
    if args.html:  # first: a path that cannot be written fails the command before anything is printed
        from tpflax._src.html.cli import write_cli_report
        write_cli_report(args.html, p, loaded, est)
    if page_only:
        return 1 if args.strict and p.warnings else 0
    if args.json:
        print(report(p, est, fmt="json"))
    elif args.table:
        print(report(p, est, reasons=False))
    else:
        print(f"tpflax estimate  {args.model}  mesh {p.mesh}")
        print("\n".join(est.report_lines()))
    return 1 if args.strict and p.warnings else 0


def cmd_dry_run(args: argparse.Namespace) -> int:
    from tpflax._src.mesh import emulate_cpu_devices, mesh_shape

    need = mesh_shape(args.mesh, parse_roles(args.axis_role) or None).size
    if not args.devices and not args.target:
        # only the CPU backend honours this, and only before jax starts; on real
        # accelerators the mesh uses the devices that are there
        emulate_cpu_devices(need)
    from tpflax._src.cost.estimate import estimate
    from tpflax._src.dryrun import dry_run
    from tpflax._src.mesh import make_mesh
    from tpflax._src.report import report
    from tpflax._src.step import NoDefaultLoss, make_train_step

    loaded, p = plan_from_args(args)
    need_model(loaded, "dry-run needs a model to build the train step")
    loss = loss_kwargs(args, loaded)
    loaded = with_remat(loaded, args.remat)  # the compiled step remats as the estimate assumes
    batch, size = estimate_inputs(args, loaded)
    mesh = make_mesh(p.mesh, target=args.target)  # a TPU target: libtpu's abstract devices
    opt = optimizer_from_name(args.optimizer)
    step_batch = {"batch": batch} if loaded.sample is None else {"sample": batch}
    try:
        ts = make_train_step(loaded.model, p, mesh, opt, variables=loaded.variables,
                             gather_fsdp=not args.no_gather_fsdp, **step_batch, **loss)
    except NoDefaultLoss as e:
        raise UsageError(f"{e}; on the command line: --loss package.module:function, "
                         "a function(output, *sample) -> scalar") from e
    dr = dry_run(ts, p, mesh, progress=not args.json, compiler_options={} if args.xla_defaults else None)
    backend = args.backend or mesh.devices.flat[0].platform
    est = estimate(p, opt, batch, **model_kwargs(loaded), **loss, remat=args.remat,
                   backend=backend if backend in ("tpu", "gpu", "cpu") else "tpu",
                   optimizer_name=args.optimizer, target=args.target)  # the slice's ring decides fsdp gradients
    if args.json:
        print(report(p, est, fmt="json", dry_run=dr))
        return 1 if args.strict and p.warnings else 0
    print(f"tpflax dry-run  {args.model}  mesh {p.mesh}  batch {size}  optimizer {args.optimizer}")
    print("\n".join(est.report_lines()))
    print()
    print("\n".join(dr.report_lines()))
    print()
    print("\n".join(dr.compare(est).report_lines()))
    return 1 if args.strict and p.warnings else 0


def _add_estimate_args(p: argparse.ArgumentParser, *, dry: bool) -> None:
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optax optimizer (default adamw)")
    p.add_argument("--batch", default=None,
                   help="global batch the plan is priced for and the step is estimated at: N, or NxSEQ / "
                        "NxFEATURES (default: a factory model's own sample, else " + ("8" if dry else "32")
                        + ", the plan priced for it too)")
    p.set_defaults(default_batch=8 if dry else 32)
    p.add_argument("--remat", action="store_true", help="activations are rematerialised")
    add_loss_arg(p)
    p.add_argument("--backend", choices=["tpu", "gpu", "cpu"], default=None if dry else "tpu",
                   help="how XLA lowers fsdp gradient reduction (default: "
                        + ("the devices' platform)" if dry else "tpu)"))
    if dry:
        p.add_argument("--no-gather-fsdp", action="store_true",
                       help="do not constrain parameters to be gathered for compute (let GSPMD choose)")
    else:
        p.add_argument("--act-dtype", default=None, help="activation dtype (default: the model's)")
        p.add_argument("--grad-dtype", default=None, help="gradient dtype (default: the parameter's)")
        p.add_argument("--table", action="store_true", help="also print the per-leaf plan table")


def cmd_suggest(args: argparse.Namespace) -> int:
    """Rank mesh shapes for ``--world-size`` devices of ``--device-memory`` each."""
    import json

    from tpflax._src.errors import NoFitError, SuggestError
    from tpflax._src.suggest.verify import EMULABLE, target_hardware

    args.world = world_size(args)
    if args.world <= 0:
        raise SuggestError(f"--world-size must be a positive integer, got {args.world}")
    if args.device_memory is None and args.hardware is None and not args.target:
        # the library's words ("pass device_memory (e.g. '95GiB') or a hardware preset") named no flag
        from tpflax._src.hardware import known

        raise UsageError("suggest needs each device's memory: pass --device-memory (e.g. 16GiB) or --hardware "
                         f"({', '.join(known())}), whose preset gives it")
    if args.target:  # the TPU slice --verify compiles on; it names the hardware
        args.hardware = target_hardware(args.target, args.hardware, args.world)
    if args.verify and args.world <= EMULABLE and not args.target:
        from tpflax._src.mesh import emulate_cpu_devices

        emulate_cpu_devices(args.world)  # before jax starts: the dry run needs that many CPU devices
    from tpflax._src.loading import load_model
    from tpflax._src.suggest.search import suggest_mesh

    loaded = load_model(args.model, size=args.size)
    if args.batch is None:
        args.batch = str(args.world)
    batch, _ = estimate_inputs(args, loaded)
    kw = model_kwargs(loaded)  # a factory's model with its sample: traced and verified like a zoo model's
    if "sample" in kw:
        kw["variables"] = loaded.variables
    try:
        s = suggest_mesh(kw.pop("model", loaded.variables), args.world,
                         args.device_memory, args.hardware, **kw, optimizer=optimizer_from_name(args.optimizer),
                         batch=batch, config=getattr(loaded.model, "config", None), trace=args.trace,
                         **loss_kwargs(args, loaded),
                         remat=args.remat, optimizer_name=args.optimizer, ici_bandwidth=args.ici_bandwidth,
                         dcn_bandwidth=args.dcn_bandwidth, chips_per_host=args.chips_per_host,
                         reserve=args.reserve, rules=[parse_rule(r) for r in args.rule] or None,
                         fsdp_min_bytes=args.fsdp_min_bytes, verify=min(args.top, 3) if args.verify else 0)
    except NoFitError as e:
        if not args.json or e.suggestion is None:
            raise
        # nothing fits is an answer a script reads too: the JSON (every rejected shape and why, the error and
        # what would help), then the error on stderr and exit 2 as without --json
        print(json.dumps({"error": {"type": type(e).__name__, "message": e.message, "problems": list(e.problems)},
                          **e.suggestion.to_dict()}, indent=2, default=str))
        raise
    if args.json:
        print(json.dumps(s.to_dict(), indent=2, default=str))
    else:
        print(f"tpflax suggest  {args.model}")
        print("\n".join(s.report_lines(top=args.top, show_all=args.all)))
    return 1 if args.strict and any(v.agree is False for v in s.verified) else 0


def world_size(args: argparse.Namespace) -> int:
    """suggest's device count: ``--world-size``, or the old ``--devices`` with a deprecation note."""
    if args.world_devices is not None:
        print("tpflax: suggest --devices is deprecated: use --world-size (--devices means 'emulate N CPU "
              "devices' in plan, estimate and dry-run)", file=sys.stderr)
    world = args.world if args.world is not None else args.world_devices
    if world is None:
        raise UsageError("suggest needs --world-size N: how many devices to plan for")
    return world


def cmd_zoo(args: argparse.Namespace) -> int:
    from tpflax._src.zoo_table import zoo_lines

    print("\n".join(zoo_lines()))
    return 0


def _version() -> str:
    from tpflax import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpflax", description="Plan and apply tensor-parallel / FSDP sharding for Flax models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tpflax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a PartitionSpec for every parameter, with reasons",
                       epilog=PLAN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pairs", action="store_true", help="list the column->row pairs")
    p.add_argument("--trace", action="store_true",
                   help="trace the model's forward pass (abstractly) and pair layers by dataflow, not names")
    p.add_argument("--no-reasons", action="store_true", help="omit the reason column")
    p.add_argument("--full", action="store_true", help="one row per leaf at full width (default: alike layers grouped)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained visual report (HTML) to FILE "
                   "(-: to stdout, instead of the text report)")
    p.add_argument("--why", default=None, metavar="PATH",
                   help="write every candidate layout the chooser priced, with its cost, to PATH; given a "
                   "leaf's path (as the table shows it), print that leaf's candidates after the report")
    p.add_argument("--batch", default=None,
                   help="global training batch the layouts are priced for, and the --html page's step: N, or "
                   "NxSEQ / NxFEATURES (default: 8,192 tokens or rows, 16x512 for a model reading token ids; the "
                   "page's step: batch 32, or a factory model's sample)")
    p.add_argument("--hardware", default=None,
                   help="preset the layouts are priced on: " + ", ".join(
                       f"{h} (default)" if h == DEFAULT_PLAN_HARDWARE else h for h in known_hardware()))
    p.set_defaults(func=cmd_plan, priced=True)
    e = sub.add_parser("estimate", help="memory per device and communication per training step (pure)",
                       epilog="example: tpflax estimate gpt2 --mesh data=2,model=4 --optimizer adamw --batch 32",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(e)
    _add_estimate_args(e, dry=False)
    e.add_argument("--html", metavar="FILE", help="also write a self-contained visual report (HTML) to FILE "
                   "(-: to stdout, instead of the text report)")
    e.set_defaults(func=cmd_estimate)
    d = sub.add_parser("dry-run", help="compile the train step on the (CPU-emulated) mesh and compare",
                       epilog="example: tpflax dry-run llama --mesh fsdp=4,model=2 --devices 8 --batch 16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(d)
    _add_estimate_args(d, dry=True)
    d.add_argument("--target", default=None, help="compile for a TPU slice with the TPU compiler, e.g. "
                   'tpu-v5e:16x16 (needs pip install "tpflax[tpu]"); nothing is allocated')
    d.add_argument("--xla-defaults", action="store_true",
                   help="compile with XLA's default options: on CPU a dry run otherwise skips LLVM's optimisations, "
                        "which nothing it reports depends on (use this to time the real compile)")
    d.set_defaults(func=cmd_dry_run)
    g = sub.add_parser("suggest", help="rank (data, fsdp, tensor) mesh shapes for N devices and say what fits",
                       epilog="examples:\n  tpflax suggest llama-2-7b --world-size 64 --hardware tpu-v5p --batch 64\n"
                              "  tpflax suggest llama-70b --world-size 256 --device-memory 95GiB --top 5\n"
                              "  tpflax suggest llama --world-size 8 --device-memory 1GiB --verify",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="zoo name (see `tpflax zoo`) or package.module:factory")
    g.add_argument("--world-size", dest="world", type=positive_int, default=None,
                   help="how many devices to plan for (emulated only for --verify, up to 64)")
    g.add_argument("--devices", dest="world_devices", type=positive_int, default=None,
                   help="deprecated spelling of --world-size (--devices emulates CPU devices elsewhere)")
    g.add_argument("--device-memory", type=byte_size(), default=None, metavar="SIZE",
                   help="memory per device, e.g. 95GiB or 16GB (default: the --hardware preset's)")
    g.add_argument("--hardware", default=None, help="preset: " + ", ".join(known_hardware()))
    g.add_argument("--top", type=positive_int, default=5, help="show this many ranked shapes (default 5)")
    g.add_argument("--all", action="store_true", help="show every ranked shape and every rejected one, with why")
    g.add_argument("--size", choices=["tiny", "real"], default=None,
                   help="zoo family size (default: tiny for family names, real for named sizes)")
    g.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="optax optimizer (default adamw)")
    g.add_argument("--batch", default=None, help="global batch: N or NxSEQ (default: one per device)")
    g.add_argument("--remat", action="store_true", help="activations are rematerialised")
    add_loss_arg(g)
    g.add_argument("--trace", action=argparse.BooleanOptionalAction, default=None,
                   help="trace the model's layer shapes for exact activations (default: on for a model; "
                        "--no-trace: the transformer formula, faster for very deep unscanned models)")
    g.add_argument("--ici-bandwidth", default=None,
                   help="override: bytes/s each device sends within a host/slice, e.g. 400GB/s or 1600Gbps")
    g.add_argument("--dcn-bandwidth", default=None, help="override: bytes/s each device sends between hosts")
    g.add_argument("--chips-per-host", type=positive_int, default=None, help="override: devices per host")
    g.add_argument("--reserve", type=float, default=0.0, help="fraction of device memory to keep free (default 0)")
    g.add_argument("--rule", action="append", default=[], metavar="REGEX=TARGET",
                   help="planner override, as for `tpflax plan`")
    g.add_argument("--fsdp-min-bytes", type=byte_size(0), default=None, metavar="SIZE",
                   help="leaves this large (e.g. 1MiB, 256k) also shard over fsdp axes (default: decided by cost per leaf, "
                        "as `tpflax plan` decides it)")
    g.add_argument("--verify", action="store_true",
                   help="compile the top shapes (at most 3) on a CPU-emulated mesh (<= 64 devices) and compare")
    g.add_argument("--target", default=None, help="TPU slice for --verify, e.g. tpu-v5e:8x8 (sets --hardware; "
                   "default: the --hardware preset's topology with --world-size devices)")
    g.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    g.add_argument("--strict", action="store_true", help="exit 1 when XLA disagrees with the estimate on a fit")
    g.set_defaults(func=cmd_suggest)
    z = sub.add_parser("zoo", help="list the built-in models with their parameter counts and real-size bytes",
                       epilog="example: tpflax zoo   # then e.g. tpflax plan llama-2-7b --mesh fsdp=8,model=4",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    z.set_defaults(func=cmd_zoo)
    from tpflax._src import cli_diff

    cli_diff.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tpflax._src.errors import TpflaxError

    parser = build_parser()
    args = parser.parse_args(argv)
    from tpflax._src.progress import set_quiet

    set_quiet(getattr(args, "json", False))  # --json output: no progress even on a terminal
    if getattr(args, "devices", None):
        from tpflax._src.mesh import emulate_cpu_devices

        emulate_cpu_devices(args.devices)
    try:
        return int(args.func(args) or 0)
    except (TpflaxError, UsageError) as e:
        print(f"tpflax: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader closed the pipe (`tpflax plan ... | head`): stop quietly, as a tool killed by SIGPIPE does;
        # this said "tpflax: error: a file: Broken pipe" and exited 2, as for an unwritable --why path
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush writes nowhere
        except (OSError, ValueError):  # pragma: no cover - a stdout without a file descriptor
            pass
        return 141
    except OSError as e:  # a path given on the command line (--why, --html) that cannot be used
        print(f"tpflax: error: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
