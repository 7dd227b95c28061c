"""The ``tpflax`` command: parse, call the library, print.

Exit codes: 0 success; 1 the plan has warnings and ``--strict`` was given;
2 bad input (any :class:`tpflax.TpflaxError`). Messages go to stderr; ``--json``
output alone goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

EXAMPLES = """examples:
  tpflax plan gpt2-small --mesh data=2,model=4
  tpflax plan llama --size real --mesh fsdp=4,model=2 --pairs
  tpflax plan llama-70b --mesh data=16,fsdp=16,model=8 --json > plan.json
  tpflax plan mypkg.models:make --mesh model=8 --rule 'embed=replicate' --rule 'mlp/up=None,model'
  tpflax plan gpt2 --mesh data=2,model=4 --devices 8     # also bind the plan to 8 CPU-emulated devices
"""


class UsageError(Exception):
    """Bad command-line input that argparse itself cannot see (exit code 2)."""


def parse_rule(text: str) -> tuple[str, Any]:
    """``REGEX=TARGET``: a strategy name, or comma-separated axes (``None``/``-`` for
    an unsharded dim, ``a+b`` for several axes on one dim)."""
    from jax.sharding import PartitionSpec

    from .plan import STRATEGIES

    if "=" not in text:
        raise UsageError(f"--rule {text!r} must be REGEX=TARGET, e.g. 'mlp/up=None,model' or 'norm=replicate'")
    pattern, _, target = text.rpartition("=")
    target = target.strip()
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
    p.add_argument("--fsdp-min-bytes", type=int, default=1 << 18,
                   help="leaves this large also shard over fsdp axes (default 262144)")
    p.add_argument("--min-channels", type=int, default=64, help="narrowest conv chain to split (default 64)")
    p.add_argument("--devices", type=int, default=None,
                   help="emulate this many CPU devices (set before jax starts)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--strict", action="store_true", help="exit 1 when the plan has warnings")


def plan_from_args(args: argparse.Namespace):
    """Load the model and plan it; returns (Loaded, Plan)."""
    from .loading import load_model
    from .plan import plan

    loaded = load_model(args.model, size=args.size)
    p = plan(loaded.variables, args.mesh, rules=[parse_rule(r) for r in args.rule],
             axis_roles=parse_roles(args.axis_role) or None, fsdp_min_bytes=args.fsdp_min_bytes,
             min_channels=args.min_channels)
    return loaded, p


def cmd_plan(args: argparse.Namespace) -> int:
    from .report import report

    loaded, p = plan_from_args(args)
    bound = None
    if args.devices:
        import jax

        from .apply import shardings
        from .mesh import make_mesh

        mesh = make_mesh(p.mesh)
        tree = shardings(p, mesh)
        bound = f"bound to {len(jax.tree_util.tree_leaves(tree))} NamedShardings on {mesh.devices.size} " \
                f"{jax.devices()[0].platform} devices"
    if args.json:
        print(report(p, fmt="json"))
    else:
        print(report(p, reasons=not args.no_reasons, pairs=args.pairs))
        if bound:
            print(bound)
    return 1 if args.strict and p.warnings else 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from . import zoo

    for name in zoo.names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpflax", description="Plan and apply tensor-parallel / FSDP sharding for Flax models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a PartitionSpec for every parameter, with reasons",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--pairs", action="store_true", help="list the column->row pairs")
    p.add_argument("--no-reasons", action="store_true", help="omit the reason column")
    p.set_defaults(func=cmd_plan)
    z = sub.add_parser("zoo", help="list the built-in models")
    z.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import TpflaxError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "devices", None):
        from .mesh import emulate_cpu_devices

        emulate_cpu_devices(args.devices)
    try:
        return int(args.func(args) or 0)
    except (TpflaxError, UsageError) as e:
        print(f"tpflax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
