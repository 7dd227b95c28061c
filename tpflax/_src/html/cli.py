"""``tpflax plan ... --html FILE``: the report with a default training-step estimate.

``tpflax plan`` has no optimizer flag: the page prices one adamw step of the
``--batch`` the plan is priced for, else the way ``tpflax estimate`` does by
default: a global batch of 32 for a zoo model (rounded up to a multiple of the
batch shards) or the model's own sample inputs. A bare variable tree without
``--batch`` has no batch: its page shows parameters only.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from tpflax._src.cost.estimate import estimate
from tpflax._src.cost.records import Estimate
from tpflax._src.errors import TpflaxError
from tpflax._src.html.page import write_html
from tpflax._src.mesh import batch_axes
from tpflax._src.model import is_zoo
from tpflax._src.planner.decision import Plan

DEFAULT_BATCH = 32


def default_estimate(plan: Plan, model: Any = None, sample: Any = None) -> Estimate | None:
    """One adamw step of ``model`` (batch 32 for a zoo model, else ``sample``); None without a model.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> default_estimate(p) is None
    True
    """
    import jax
    import optax

    if model is None:
        return None
    batch = None
    if is_zoo(model):
        shards = math.prod(plan.mesh.sizes[a] for a in batch_axes(plan.mesh))
        size = math.lcm(DEFAULT_BATCH, shards)
        batch = jax.eval_shape(lambda: model.make_batch(0, size))
    return estimate(plan, optax.adamw(1e-3), batch, model=model, sample=sample if batch is None else None,
                    optimizer_name="adamw")


def write_cli_report(path: str, plan: Plan, loaded: Any, est: Estimate | None = None, batch: Any = None) -> None:
    """Write the page for a CLI-loaded model (``"-"``: to stdout); ``est`` defaults to one adamw step of ``batch``
    (``tpflax plan --batch``), else :func:`default_estimate`."""
    if est is None:
        try:
            if batch is None:
                est = default_estimate(plan, loaded.model, loaded.sample)
            else:
                import optax

                from tpflax._src.cli_args import model_kwargs

                est = estimate(plan, optax.adamw(1e-3), batch, **model_kwargs(loaded), optimizer_name="adamw")
        except TpflaxError as e:  # the plan is still worth a page: show parameters only, say why
            print(f"tpflax: note: the HTML report shows parameters only ({e})", file=sys.stderr)
    if path == "-":  # the page on stdout (the command prints nothing else there)
        from tpflax._src.html.page import html_report

        sys.stdout.write(html_report(plan, est, title=loaded.name))
        return
    write_html(path, plan, est, title=loaded.name)
    print(f"tpflax: wrote the visual report to {path}", file=sys.stderr)
