"""``tpflax diff A.json B.json [--fail-on-change]``: compare two saved plans (a plan lockfile in CI).

Exit codes: 0 same plan (or differences without ``--fail-on-change``); 1 the
plans differ and ``--fail-on-change`` was given; 2 a file is missing or not a plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpflax._src.errors import PlanFormatError

RECIPE = """plan lockfile in CI:
  tpflax plan gpt2 --mesh data=2,model=4 --json > plan.lock.json     # once, committed
  tpflax plan gpt2 --mesh data=2,model=4 --json | tpflax diff plan.lock.json - --fail-on-change
"""


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("diff", help="compare two plans saved with --json (exit 1 on change with "
                                           "--fail-on-change)", epilog=RECIPE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("a", help="plan JSON file (tpflax plan ... --json), or - for stdin")
    d.add_argument("b", help="plan JSON file, or - for stdin")
    d.add_argument("--fail-on-change", action="store_true", help="exit 1 when the plans differ")
    d.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    d.add_argument("--batch", default=None, metavar="BxT",
                   help="a global batch shape such as 8x1024: also show each side's communication per "
                        "step (tpflax.estimate; token ids in, the next token out)")
    d.add_argument("--optimizer", default="adamw", help="optax optimizer for --batch (default adamw)")
    d.set_defaults(func=run)


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text()
    except OSError as e:
        raise PlanFormatError(f"cannot read plan file {name!r}: {e.strerror}; write one with "
                              "`tpflax plan MODEL --mesh ... --json > FILE`") from None


def _token_batch(text: str | None):
    """``--batch BxT`` as the help says it is read: ``B`` sequences of ``T`` token ids (a bare
    ``"8x1024"`` string would be read as float features, its tokens lost without a model config)."""
    if text is None:
        return None
    import jax

    from tpflax._src.cost.batch import shape_text

    try:
        dims = shape_text(text)
    except ValueError:
        return text  # the estimate's own message names what it accepts
    return {"x": jax.ShapeDtypeStruct(dims, "int32")} if len(dims) == 2 else text


def run(args: argparse.Namespace) -> int:
    from tpflax._src.diff import diff

    if args.a == "-" and args.b == "-":
        raise PlanFormatError("only one of the two plans can come from stdin (-)")
    opt = None
    if args.batch is not None:
        from tpflax._src.cli_args import optimizer_from_name

        opt = optimizer_from_name(args.optimizer)
    result = diff(_read(args.a), _read(args.b), optimizer=opt, batch=_token_batch(args.batch))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result)
    return 1 if args.fail_on_change and result.changed else 0
