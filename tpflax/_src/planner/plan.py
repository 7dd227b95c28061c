"""The plan() entry: ordered rule sets decide a PartitionSpec for every leaf.

``plan(tree, mesh)`` walks the tree, classifies the leaves and runs the rule
sets in order; the first that speaks for a leaf wins, and its evidence becomes
the reason:

    user rules -> model annotations -> dataflow rules (with ``model=``) ->
    tree heuristics (pairing, heads, channel, vocab, expert) -> FSDP fallback
    -> replicate

Planning is pure: it needs a mesh *shape*, never devices, and never allocates
the tree's arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import jax

from tpflax._src.errors import OptionError, RuleError, TpflaxError
from tpflax._src.facts.classify import (
    HEAD,
    Facts,
    classify,
    classify_weight,
    layer_group,
    quantized_scales,
    scale_dims,
    stacked_patterns,
)
from tpflax._src.facts.trainable import freeze
from tpflax._src.facts.tree import walk
from tpflax._src.mesh import EXPERT, FSDP, TENSOR, MeshShape, mesh_shape
from tpflax._src.planner import heuristics
from tpflax._src.planner.builders import Options, Proposal
from tpflax._src.planner.caches import follow_caches
from tpflax._src.planner.checks import plan_checks
from tpflax._src.planner.decision import Decision, Pair, Plan, check_tree_matches
from tpflax._src.planner.fused import check_mode, fused_layouts
from tpflax._src.planner.pricing import (
    expert_buffers,
    image_tokens,
    pricing,
    recompute,
    token_batch,
    token_tables,
)
from tpflax._src.planner.rules import Forced, default_logical_rules, force, parse_rules
from tpflax._src.specs import (
    bytes_per_device,
    entries,
    entry_axes,
    fmt_bytes,
    spec_problems,
    spec_to_json,
    to_pspec,
)
from tpflax._src.vocab import RULE_STRATEGIES

# What a user rule may name; the CLI reads it from here.
STRATEGIES = RULE_STRATEGIES

# The planner's public face: apply, checkpoint, cost, report and suggest import these from here.
__all__ = ["STRATEGIES", "Decision", "Pair", "Plan", "check_tree_matches", "default_logical_rules", "plan"]


def _size(value: Any, name: str) -> Any:
    """A byte threshold written as text (``"1MiB"``, ``"256k"``, as ``device_memory=`` and the CLI take sizes) as
    its int; anything else as given, for :func:`_check_options`.

    >>> _size("1MiB", "fsdp_min_bytes"), _size(4096, "fsdp_min_bytes")
    (1048576, 4096)
    """
    if not isinstance(value, str):
        return value
    from tpflax._src.hardware import parse_bytes

    try:
        return parse_bytes(value, name, minimum=0)
    except TpflaxError:
        raise OptionError("invalid planner options", [f"{name}={value!r} must be a non-negative number of bytes or "
                                                      f"a size such as '256KiB', e.g. {name}=262144"]) from None


def _check_options(**values: Any) -> None:
    """Byte and channel thresholds must be non-negative numbers (``fsdp_min_bytes`` may be None)."""
    # an example of each one's own kind: min_channels counts channels (its default is 64), not bytes
    examples = {"min_channels": 64}
    problems = [f"{k}={v!r} must be a non-negative number, e.g. {k}={examples.get(k, 262144)}" for k, v in values.items()
                if not (k == "fsdp_min_bytes" and v is None) and (
                    isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0)]
    if problems:
        raise OptionError("invalid planner options", problems)


# ---------------------------------------------------------------------------
# the planner


def plan(tree: Any, mesh: Any, *, rules: Any = None, logical_rules: Sequence[tuple[str, Any]] | None = None,
         axis_roles: Mapping[str, str] | None = None, fsdp_min_bytes: int | None = None,
         min_channels: int = 64, tensor_min_bytes: int = 0, stacked: str | Mapping[str, int] | None = None,
         use_annotations: bool = True, model: Any = None, sample: Any = None, hardware: Any = None,
         batch: Any = None, device_memory: Any = None, trainable: Any = None, fused: str = "split",
         optimizer: Any = None) -> Plan:
    """Plan a PartitionSpec for every leaf of ``tree``.

    Args:
        tree: params, a full variable dict, a FrozenDict, a tree of
            ``jax.ShapeDtypeStruct``, a tree boxed in flax metadata, or NNX state.
        mesh: ``{"data": 2, "model": 4}``, ``"data=2,model=4"``, a jax ``Mesh`` or
            ``AbstractMesh``.
        rules: ordered ``(regex, PartitionSpec | strategy name)`` pairs matched
            with ``re.search`` against paths; the first match wins and beats
            every heuristic.
        logical_rules: ``(logical name, mesh axes)`` pairs (or a ``{name: axes}`` dict) for flax logical
            annotations; defaults to :func:`default_logical_rules`.
        axis_roles: roles for mesh axes with unrecognised names.
        fsdp_min_bytes: leaves this large or larger also shard over fsdp axes (bytes, or text such as
            ``"1MiB"``); None (the default): the chooser decides every leaf's fsdp split by cost.
        min_channels: conv chains narrower than this stay whole, unpriced; the chooser prices the
            others split against whole, like any column -> row pair (0: every chain is priced). At
            tiny widths a channel split's activation sums can outweigh what it divides (a speech
            model's feature extractor runs its convs at every audio frame).
        tensor_min_bytes: column/row pairs whose kernels are all smaller stay replicated.
        stacked: regex forcing leaves to be treated as ``nn.scan`` stacks, their layers dim first;
            ``"regex:1"`` or ``{regex: 1}`` for a layers dim at index 1 (``nn.scan(...,
            variable_axes={'params': 1})``, MaxText's ``param_scan_axis=1``).
        use_annotations: honour flax partitioning metadata.
        model: a linen ``nn.Module``, an ``nnx.Module`` or a ``tpflax.zoo`` model
            whose forward pass is traced (abstractly) to decide column/row pairs,
            heads, experts, conv chains, embeddings and output heads from the
            dataflow rather than from names; see :mod:`tpflax.trace`.
        sample: example inputs for ``model`` (``jax.ShapeDtypeStruct`` suffice);
            a tracing example only: the plan is priced for ``batch``.
        hardware: the preset (``"tpu-v5e"``, the default) or
            :class:`tpflax.Hardware` the chooser prices candidate layouts on: each
            decision group (pair, embedding, output head, GQA key/value set, fsdp
            split) takes its candidate with the least step time (flops / peak +
            collective bytes per mesh axis / that axis's bandwidth).
        batch: the global batch candidates are priced with (anything
            :func:`tpflax.estimate` takes); default 16 sequences of 512 tokens,
            so that a plan with and without ``model=`` prices alike. A bare
            shape (``(8, 512)``, ``"8x512"``) of a model on token ids (its
            sample's first input is integer, or without one the tree has an
            embedding table) is that many ids: 4096 tokens. Without ``model=``, a
            batch of images ``(B, H, W, C)`` (or channels first) read by a patch
            embedding (an even ``(p, p, C, D)`` conv kernel tiling the image) is
            ``B * (H/p) * (W/p)`` tokens, a Swin's merged stages a quarter as many each.
        device_memory: bytes per device (or ``"16GB"``) the parameters, gradients
            and adam moments must fit; the chooser then moves groups to smaller
            candidates. Default: no constraint.
        trainable: the parameters the run trains, the rest frozen (fine-tuning LoRA adapters or a
            head): a regex searched in paths (``r"lora"``) or an nnx filter (``nnx.LoRAParam``, as
            ``nnx.Optimizer(..., wrt=)`` takes it). Frozen leaves are priced, estimated and stepped
            without gradients, optimizer state or gradient collectives (``Decision.trainable``
            False); :func:`tpflax.make_train_step` differentiates only the trainable ones.
            Default: every float parameter.
        optimizer: the ``optax.GradientTransformation`` the run steps with. Leaves whose gradient its
            ``update`` never reads (an ``optax.multi_transform`` label mapped to ``optax.set_to_zero()``,
            how optax users freeze a LoRA base) are frozen as ``trainable=`` freezes them, with a reason
            naming the optimizer; found by tracing ``update`` on the abstract parameters (an optimizer
            whose update does not trace abstractly freezes nothing). With ``trainable=`` too, a leaf
            trains only if both let it: the frozen leaves are the union. The step and the estimate take
            the same optimizer; default optimizers read every gradient, so the plan is unchanged.
        fused: ``"split"`` (default): a fused ``[q|k|v]`` kernel's fused dim is split in the model's
            order, and XLA reshards the pieces after the model cuts them apart. ``"aligned"``: the
            same specs, but where every piece divides by the ranks (and they divide the heads) the
            kernel and its bias are stored head-aligned, rank by rank (``Decision.layout``):
            :func:`tpflax.shard`, :func:`tpflax.init_sharded` and the restores put them in that
            order, :func:`tpflax.unshard` and :func:`tpflax.save_checkpoint` give back the model's,
            and :func:`tpflax.make_train_step` cuts the pieces per rank. A stored tree then computes
            wrong results in a plain ``model.apply``: opt in only with tpflax's step.

    Returns:
        A :class:`Plan`.

    Raises:
        MeshError, RuleError, SpecError, TreeError, TraceError: see their docs.

    >>> import jax
    >>> p = plan({"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...                   "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}},
    ...           "norm": {"scale": jax.ShapeDtypeStruct((64,), "float32")}}, {"model": 4})
    >>> p.decisions["mlp/up/kernel"].spec, p.decisions["mlp/down/kernel"].spec
    (P(None, 'model'), P('model', None))
    """
    def sizes(x: Any) -> bool:  # {"data": 2, "model": 4}
        return isinstance(x, Mapping) and bool(x) and all(type(v) is int for v in x.values())

    if isinstance(tree, (MeshShape, jax.sharding.Mesh, jax.sharding.AbstractMesh)) or (
            isinstance(tree, str) and ("=" in tree or ":" in tree)) or (sizes(tree) and not sizes(mesh)
                                                                      and isinstance(mesh, Mapping)):
        # plan(mesh, tree): the tree was read as a mesh ("axis 'params' has size {...}")
        raise OptionError(f"the tree is a mesh ({tree}): the order is plan(tree, mesh)")
    if isinstance(tree, str):  # plan("gpt2", mesh), as the command line takes a model
        raise OptionError(f"the tree is the string {tree!r}; pass the variables (a zoo model's: "
                          f"tpflax.zoo.get({tree!r}).abstract_variables()), or plan(variables, mesh, model=model)")
    ms = mesh_shape(mesh, axis_roles)
    fused = check_mode(fused)
    fsdp_min_bytes, tensor_min_bytes = _size(fsdp_min_bytes, "fsdp_min_bytes"), _size(tensor_min_bytes, "tensor_min_bytes")
    _check_options(fsdp_min_bytes=fsdp_min_bytes, min_channels=min_channels, tensor_min_bytes=tensor_min_bytes)
    parsed = parse_rules(rules, ms)
    if isinstance(logical_rules, Mapping):  # {name: axes}, as rules= takes {regex: target}
        logical_rules = list(logical_rules.items())
    _check_stacked_and_logical(stacked, logical_rules)
    tree, treedef, facts = _walked(tree, trainable, stacked)
    ignored = frozenset()
    if optimizer is not None:  # leaves the optimizer never updates: frozen before anything is priced
        from tpflax._src.planner.optimizer import optimizer_frozen, optimizer_name

        ignored = optimizer_frozen(facts, treedef, ms, optimizer)
        facts = [replace(f, leaf=replace(f.leaf, frozen=True)) if f.path in ignored else f for f in facts]
    opts = Options(fsdp_min_bytes=None if fsdp_min_bytes is None else int(fsdp_min_bytes),
                   min_channels=int(min_channels), tensor_min_bytes=int(tensor_min_bytes),
                   tied_guess=not any(f.kind == "dense" and HEAD.match(f.layer_name) for f in facts),
                   **pricing(hardware, token_batch(batch, sample, token_tables((f.kind, f.unit_name) for f in facts)),
                             device_memory))
    if model is None and (patches := image_tokens(batch, facts)):  # the trace reads them off the model's rows
        tokens, width, tower = patches  # (_traced_tokens)
        opts = (replace(opts, patch_width=width, towers=((tower, tokens / opts.tokens),)) if tower else
                replace(opts, tokens=tokens, patch_width=width))
    lrules = list(logical_rules) if logical_rules is not None else default_logical_rules(ms)
    forced = force(facts, parsed, ms, use_annotations, lrules)
    proposals, pairs, sources, disagreements, doubts, opts, facts = _propose(facts, ms, opts, forced, model, sample,
                                                                             tree, batch is not None)
    decisions = {f.path: _decision(f, proposals[f.path], sources.get(f.path, "heuristic"), ms) for f in facts}
    decisions = fused_layouts(facts, proposals, decisions, fused, ms, opts,
                              {f.path for f in facts if sources.get(f.path, "heuristic") == "heuristic"})
    if ignored:
        why = (f"; frozen: the optimizer ({optimizer_name(optimizer)}) never reads its gradient (optax.set_to_zero "
               "or alike), so it has no gradient, optimizer state or gradient collective, as trainable= leaves it out")
        decisions = {p: replace(d, reason=d.reason + why) if p in ignored else d for p, d in decisions.items()}
    warnings = [*forced.warnings, *doubts, *_replication_warnings(decisions, ms)]
    warnings += _ignored_annotations(facts) if use_annotations else []
    warnings += plan_checks(facts, decisions, lrules, ms)  # unknown logical names, idle mesh axes
    options = {"fsdp_min_bytes": opts.fsdp_min_bytes, "min_channels": opts.min_channels,
               "hardware": opts.hardware.name, "tokens": opts.tokens,
               "tokens_from": _tokens_from(batch, decisions), "device_memory": opts.device_memory,
               "tensor_min_bytes": opts.tensor_min_bytes, "stacked": stacked,
               "trainable": trainable if trainable is None or isinstance(trainable, str) else repr(trainable),
               "fused": fused,
               **({"optimizer": optimizer_name(optimizer), "frozen_by_optimizer": len(ignored)}
                  if optimizer is not None else {}),
               "rules": [[r.pattern.pattern, r.strategy or spec_to_json(r.spec or ())] for r in parsed]}
    specs = [decisions[f.path].spec for f in facts]
    return Plan(mesh=ms, specs=jax.tree_util.tree_unflatten(treedef, specs), decisions=decisions,
                pairs=tuple(pairs), warnings=tuple(warnings), options=options,
                disagreements=tuple(disagreements))


def _tokens_from(batch: Any, decisions: Mapping[str, Decision]) -> str | None:
    """What the chooser's tokens per step came from (``Plan.options["tokens_from"]``): ``batch=``, the default,
    or None where it priced nothing (rules or annotations decided every leaf), so a report says nothing of it."""
    if batch is not None:
        return "batch"
    return "default" if any(len(d.alternatives) > 1 for d in decisions.values()) else None


def _shard_map_pins(facts: Sequence[Facts], proposals: dict[str, Proposal], forced: Mapping[str, Proposal],
                    sources: dict[str, str], flow: Any, ms: MeshShape) -> None:
    """Lay each parameter a model's ``jax.shard_map`` takes out as its in_specs do (:attr:`Dataflow.in_specs`),
    unless a rule or an annotation decided it: inside the body its layout is theirs, and XLA reshards any other
    into it at every call (measured: EasyDeL's Mixtral, its experts split on the experts dim where its
    shard_map splits their hidden dim, 2.1x the collectives of its own layout). The leaf keeps its pair and
    role. An in_spec over an axis the plan's mesh sizes otherwise (EasyDeL's expert mesh, its fsdp devices
    named ``ep``) pins nothing."""
    roles = dict(ms.roles)
    for f in facts:
        pins, p = flow.in_specs.get(f.path), proposals.get(f.path)
        if not pins or p is None or f.path in forced:
            continue
        spec: list = [None] * len(f.leaf.shape)
        for dim, axes, sizes in pins:
            if dim < len(spec) and all(ms.sizes.get(a) == n for a, n in zip(axes, sizes, strict=True)):
                spec[dim] = axes[0] if len(axes) == 1 else tuple(axes)
        if not any(e is not None for e in spec):
            continue
        # a dim the in_specs leave whole keeps the plan's batch-axis (fsdp) split: gathered at the body's
        # boundary, as for any compute (MaxText's experts: fsdp on their embed dim, tensor on their hidden dim)
        now = entries(p.spec, len(spec))
        for d, e in enumerate(spec):
            kept = tuple(a for a in entry_axes(now[d]) if roles.get(a) not in (TENSOR, EXPERT)) if e is None else ()
            spec[d] = e if e is not None else kept[0] if len(kept) == 1 else kept or None
        if tuple(now) == tuple(spec) or spec_problems(f.path, f.leaf.shape, tuple(spec), ms):
            continue
        proposals[f.path] = replace(p, spec=tuple(spec), strategy="rule",
                                    fsdp=any(roles.get(a) == FSDP for e in spec for a in entry_axes(e)),
                                    reason="laid out as the model's jax.shard_map takes it (its in_specs): XLA "
                                           "reshards any other layout into them at every call")
        sources[f.path] = "trace"


def _ignored_annotations(facts: list[Facts]) -> list[str]:
    """One warning per distinct (annotation, shape) that :func:`tpflax._src.facts.tree.walk` dropped for not
    naming one dim each, with the first leaf's path and how many more leaves carry it.

    >>> import flax.linen as nn, jax
    >>> box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 4, 16), "float32"), ("embed", "kv"))
    >>> tree = {"params": {f"l{i}": {"query": {"kernel": box}} for i in range(2)}}
    >>> [w for w in plan(tree, {"model": 4}).warnings if "ignored" in w]  # doctest: +NORMALIZE_WHITESPACE
    ["params/l0/query/kernel: its annotation ('embed', 'kv') names 2 dims of a 3-D leaf (64, 4, 16), so it was
    ignored and the leaf planned as if unannotated (1 more leaf alike); annotate one name per dim, None for a dim
    left whole"]
    """
    seen: dict[tuple, list[str]] = {}
    for f in facts:
        if f.leaf.ignored is not None:
            seen.setdefault((tuple(f.leaf.ignored), f.leaf.shape), []).append(f.path)
    out = []
    for (names, shape), paths in seen.items():
        more = f" ({len(paths) - 1} more lea{'f' if len(paths) == 2 else 'ves'} alike)" if len(paths) > 1 else ""
        out.append(f"{paths[0]}: its annotation {names} names {len(names)} dims of a {len(shape)}-D leaf {shape}, "
                   f"so it was ignored and the leaf planned as if unannotated{more}; annotate one name per dim, "
                   "None for a dim left whole")
    return out


# one tree planned on many meshes (suggest_mesh): walked and classified once, inside walk_once()
_WALKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tpflax_walked", default=None)


@contextlib.contextmanager
def walk_once():
    """Within this block :func:`plan` walks and classifies each tree once, whatever the mesh (the facts do
    not depend on it): :func:`tpflax.suggest_mesh` plans one tree on every candidate mesh."""
    token = _WALKED.set({})
    try:
        yield
    finally:
        _WALKED.reset(token)


def _walked(tree: Any, trainable: Any, stacked: Any) -> tuple[Any, Any, list[Facts]]:
    """``(the tree walked, its treedef, its leaves' facts)``, from :func:`walk_once`'s cache when one is open."""
    cache = _WALKED.get()
    key = (id(tree), trainable if trainable is None or isinstance(trainable, str) else id(trainable), repr(stacked))
    if cache is not None and key in cache:
        return cache[key][2:]
    walked = _nnx_state_of(tree)
    leaves, treedef = walk(walked)
    out = (walked, treedef, classify(freeze(leaves, walked, trainable), stacked))
    if cache is not None:
        cache[key] = (tree, trainable, *out)  # the caller's objects kept alive: their ids stay their own
    return out


def _check_stacked_and_logical(stacked: Any, logical_rules: Any) -> None:
    if stacked is not None:
        try:
            dims = [d for _, d in stacked_patterns(stacked)]
        except (re.error, TypeError, ValueError, AttributeError) as e:
            raise RuleError(f"stacked={stacked!r} is not a regex, 'regex:dim' or {{regex: dim}} ({e}); pass e.g. "
                            "stacked=r'layers' or stacked={'layers': 1}") from None
        if any(d < 0 for d in dims):
            raise RuleError(f"stacked={stacked!r}: a layers dim must be >= 0; pass e.g. stacked={{'layers': 1}}")
        if any(not r.pattern for r, _ in stacked_patterns(stacked)):
            # "" (a config's empty default) matched every leaf: each kernel read as a stack of rows, all replicated
            raise RuleError(f"stacked={stacked!r} has an empty regex, which matches every leaf; pass None when "
                            "nothing is stacked, or a regex found in the stacks' paths (stacked=r'layers')")
    if logical_rules is not None:
        if isinstance(logical_rules, (str, bytes)) or not isinstance(logical_rules, Iterable):
            # an int was a bare TypeError ("'int' object is not iterable"), a string a problem per letter
            raise RuleError(f"logical_rules={logical_rules!r} is not a sequence of (logical name, mesh axes) pairs; "
                            "write e.g. [('mlp', 'model'), ('embed', None)] or {'mlp': 'model'}")
        bad = [f"logical_rules[{i}] = {r!r} is not a (logical name, mesh axes) pair"
               for i, r in enumerate(logical_rules) if not (isinstance(r, (tuple, list)) and len(r) == 2)]
        if bad:
            raise RuleError("invalid logical_rules; write e.g. [('mlp', 'model'), ('embed', None)]", bad)


def _nnx_state_of(tree: Any) -> Any:
    """An nnx Module's ``nnx.State``, else ``tree``: a module is planned as ``nnx.state(module)`` is, whose
    Variables say which leaves are Params (walked as a bare pytree, its BatchStats got optimizer state)."""
    try:
        from flax import nnx
    except Exception:  # noqa: BLE001 - flax without nnx
        return tree
    return nnx.state(tree) if isinstance(tree, nnx.Module) else tree


def _propose(facts: Sequence[Facts], ms: MeshShape, opts: Options, forced: Forced, model: Any, sample: Any,
             tree: Any, batch_given: bool = False
             ) -> tuple[dict[str, Proposal], list[Pair], dict[str, str], list[str], list[str], Options]:
    """The dataflow rules (with ``model``), then the tree heuristics for what they leave; and the
    options they priced with (``tokens`` read from the trace, see :func:`_traced_tokens`)."""
    traced: dict[str, Proposal] = {}
    tpairs: list[Pair] = []
    disagreements: list[str] = []
    sources = dict(forced.sources)
    flow = widest = None
    doubts: list[str] = []
    if model is not None:  # dataflow first; the tree heuristics handle what it does not explain
        from tpflax._src.planner import dataflow_rules
        from tpflax._src.trace.dataflow import dataflow

        flow = dataflow(model, sample, tree, ms)
        facts = traced_weights(facts, flow)
        dead = sorted(f.path for f in facts if f.path in flow.dead and f.leaf.trainable)
        if dead:  # (a training-mode BatchNorm's running statistics are read by no forward either: not trained)
            doubts.append(
                f"{len(dead)} leaves no output of the traced forward pass depends on ({', '.join(dead[:3])}"
                f"{', ...' if len(dead) > 3 else ''}): their gradients are zeros and they move no data; planned "
                "from the tree alone. Drop them from the tree, or leave them out of training (trainable=)")
        widest = max((u.token_rows for u in flow.uses), default=0)
        if batch_given:
            opts = replace(opts, tokens=_traced_tokens(opts.tokens, widest, _sample_rows(sample)))
        buffers = expert_buffers(model, sample, tree, flow)
        traced, tpairs = dataflow_rules.propose(facts, ms, opts, flow, skip=forced.proposals, widest_rows=widest,
                                                sample_rows=_sample_rows(sample), buffers=buffers,
                                                recomputed=recompute(model, sample, tree, ms, flow, facts))
        tree_only = heuristics.propose(facts, ms, opts, skip=forced.proposals)[0]
        disagreements = dataflow_rules.disagreements(traced, tree_only)
        sources.update({path: "trace" for path in traced})
    proposals, pairs = heuristics.propose([f for f in facts if f.path not in traced], ms, opts,
                                          skip=forced.proposals, first_pair=len(tpairs) + 1, doubts=doubts)
    proposals.update(traced)
    if flow is not None:
        _shard_map_pins(facts, proposals, forced.proposals, sources, flow, ms)
    pairs = tpairs + pairs
    if forced.proposals:
        own, own_pairs = _unforced(facts, ms, opts, flow, widest, _sample_rows(sample) if flow is not None else 0)
        forced_props, pairs = _forced_facts(forced.proposals, facts, pairs, own, own_pairs, ms)
        proposals.update(forced_props)
    _follow_scales(facts, proposals, forced.proposals)
    follow_caches(facts, proposals, forced.proposals, ms)
    return proposals, pairs, sources, disagreements, doubts, opts, facts


def traced_weights(facts: Sequence[Facts], flow: Any) -> list[Facts]:
    """``facts`` with each integer leaf of rank >= 2 the trace contracts with activations (a quantized
    kernel without a scale sibling to name it) classified as the float kernel it stands for."""
    dots = {u.path for u in flow.uses if u.op in ("dot", "conv")}
    return [classify_weight(f) if f.kind == "int" and f.leaf.numeric == "int" and len(f.body) >= 2
            and f.path in dots else f for f in facts]


def _follow_scales(facts: Sequence[Facts], proposals: dict[str, Proposal], forced: Mapping[str, Proposal]) -> None:
    """The float scale of a quantized kernel split as the kernel is on the dim it sizes (fsdp
    included), so dequantizing ``kernel * scale`` moves nothing; whole elsewhere."""
    shapes = {f.path: f.leaf.shape for f in facts}
    for spath, kpath in quantized_scales([f.leaf for f in facts]).items():
        k = proposals.get(kpath)
        if k is None or spath in forced or spath not in proposals:
            continue
        kspec = entries(k.spec, len(shapes[kpath]))
        spec = [None] * len(shapes[spath])
        for sd, kd in scale_dims(shapes[spath], shapes[kpath]).items():
            spec[sd] = kspec[kd]
        split = any(e is not None for e in spec)
        proposals[spath] = Proposal(
            spec=tuple(spec), strategy=k.strategy if split else "replicate", pair=k.pair, fsdp=k.fsdp and split,
            reason=f"dequantization scale of {kpath} ({k.strategy}): "
                   + ("split like the kernel on the dim it sizes" if split else "the kernel's dim it sizes is whole"))


def _unforced(facts: Sequence[Facts], ms: MeshShape, opts: Options, flow: Any,
              widest: int | None, sample_rows: int = 0) -> tuple[dict[str, Proposal], list[Pair]]:
    """The planner's own proposals and pairs for every leaf, as if nothing were forced (the trace's
    first, then the tree heuristics'): what a forced leaf is, whoever chose its spec."""
    own: dict[str, Proposal] = {}
    pairs: list[Pair] = []
    if flow is not None:
        from tpflax._src.planner import dataflow_rules

        own, pairs = dataflow_rules.propose(facts, ms, opts, flow, widest_rows=widest, sample_rows=sample_rows)
    rest, more = heuristics.propose([f for f in facts if f.path not in own], ms, opts, first_pair=len(pairs) + 1)
    return {**rest, **own}, pairs + more


def _traced_tokens(tokens: int, widest: int, sample_rows: int) -> int:
    """The batch's tokens as the layers see them: a batch of images or audio features counts its
    leading dims, while the trace shows the patches or frames its widest layer reads per sample
    (``widest`` rows for ``sample_rows`` counted the batch's way), so the chooser's per-token
    prices follow the traced rows as the estimate's do.

    >>> _traced_tokens(16, 16 * 197, 16), _traced_tokens(8192, 8192, 8192), _traced_tokens(64, 0, 8)
    (3152, 8192, 64)
    """
    if widest <= 0 or sample_rows <= 0:
        return tokens
    return max(1, round(tokens * widest / sample_rows))


def _sample_rows(sample: Any) -> int:
    """The traced sample's tokens as the chooser counts a batch's (0 where it reads no batch from it)."""
    from tpflax._src.cost.activations import token_rows
    from tpflax._src.cost.batch import parse_batch

    try:
        return max(0, int(token_rows(parse_batch(sample, None, None), None)))
    except (TpflaxError, TypeError, ValueError, IndexError):  # any sample traces; only per-row prices read it
        return 0


def _forced_facts(forced: Mapping[str, Proposal], facts: Sequence[Facts], pairs: Sequence[Pair],
                  own: Mapping[str, Proposal], own_pairs: Sequence[Pair],
                  ms: MeshShape) -> tuple[dict[str, Proposal], list[Pair]]:
    """Forced proposals with the facts the rule sets found about their leaves, and the pairs.

    A rule forces the spec, not what the leaf is, so that a spec costs the same
    whether a rule, an annotation or the planner chose it: a forced kernel in a
    pair this pass found keeps that pair and its side; else, where the planner's
    own proposal for it (:func:`_unforced`) splits it over the same tensor and
    expert axes, it is what the planner says it is: an output head, or a member
    of a pair whose every member is forced that way (a gated expert MLP forced
    by rules, an annotated model's blocks). A forced dense layer named like an
    output head is one.
    """
    side = {p: (pair.id, "column") for pair in pairs for p in pair.columns}
    side.update({p: (pair.id, "row") for pair in pairs for p in pair.rows})
    # named like a head, or projecting onto the token table's vocabulary whatever its name
    heads = {f.path for f in facts if f.kind == "dense" and HEAD.match(f.layer_name)}
    heads |= set(heuristics.output_heads(facts))
    rank = {f.path: len(f.leaf.shape) for f in facts}
    same = {path for path, p in forced.items() if path in own and path not in side
            and _tensor_split(entries(p.spec, rank[path]), ms) == _tensor_split(entries(own[path].spec, rank[path]), ms)}
    pairs = list(pairs)
    by_path = {f.path: f for f in facts}
    for pair in own_pairs:
        members = pair.columns + pair.rows
        if members and (all(m in same for m in members)
                        or (not side.keys() & set(members)
                            and (_experts_split_alike([by_path[m] for m in members], forced, ms,
                                                      pair.kind == "expert")
                                 or _a_priced_option(members, forced, own, rank, ms)))):
            new = replace(pair, id=len(pairs) + 1)
            pairs.append(new)
            side.update({m: (new.id, "column" if m in pair.columns else "row") for m in members})
    out = {}
    for path, p in forced.items():
        pid, role = side.get(path, (None, None))
        kind = p.kind or ("head" if path in heads and pid is None else None)
        if kind is None and path in same and own[path].kind == "head":
            kind = "head"
        out[path] = replace(p, pair=p.pair if p.pair is not None else pid, role=p.role or role, kind=kind)
    return out, pairs


def _a_priced_option(members: Sequence[str], forced: Mapping[str, Proposal], own: Mapping[str, Proposal],
                     rank: Mapping[str, int], ms: MeshShape) -> bool:
    """Every member of a pair forced to the layout of one and the same option the chooser priced for it (its
    runner-up: Megatron inside each expert where it split the experts over the tensor axis), split over a tensor
    or expert axis: still that pair, priced as that option is. Matched against the pick alone, a rule writing the
    runner-up left the kernels unpaired."""
    common: set[str] | None = None
    for m in members:
        if m not in forced or m not in own:
            return False
        want = _tensor_split(entries(forced[m].spec, rank[m]), ms)
        if not any(want):
            return False
        names = {a.name for a in own[m].alternatives if a.group != "fsdp"
                 and _tensor_split(entries(tuple(a.spec), rank[m]), ms) == want}
        common = names if common is None else common & names
        if not common:
            return False
    return bool(common)


def _experts_split_alike(members: Sequence[Facts], forced: Mapping[str, Proposal], ms: MeshShape,
                         traced: bool = False) -> bool:
    """Every kernel of an expert pair forced with its expert dim, and nothing else, split over the same tensor
    or expert axes: still a pair (the combine sums over the experts as the row sums over f), whichever dim
    the planner would have split. ``traced``: the trace paired them as experts (``w1``/``v1``/``w2`` stored
    (E, f, d), which the tree's names call dense); else each must be an expert kernel by the tree. Unpaired,
    the estimate priced no sum of the columns' input gradients (0.78x the compiled collectives, DBRX-style
    experts split over model by a rule, Megatron the planner's choice)."""
    splits = set()
    for f in members:
        p = forced.get(f.path)
        if p is None or (f.kind != "expert" and not traced):
            return False
        split = f.body_of(_tensor_split(entries(p.spec, len(f.leaf.shape)), ms))
        if not split[0] or any(split[1:]):
            return False
        splits.add(split[0])
    return len(members) > 1 and len(splits) == 1


def _tensor_split(spec: Sequence[Any], ms: MeshShape) -> tuple:
    """A spec's tensor and expert axes per dim (fsdp and data axes dropped): what pairs read.

    >>> _tensor_split(("fsdp", ("fsdp", "model")), mesh_shape({"fsdp": 2, "model": 4}))
    ((), ('model',))
    """
    roles = dict(ms.roles)
    return tuple(tuple(a for a in entry_axes(e) if roles.get(a) in (TENSOR, EXPERT)) for e in spec)


def _decision(f: Facts, p: Proposal, source: str, ms: MeshShape) -> Decision:
    spec = entries(p.spec, len(f.leaf.shape))
    pspec, per_device = _checked(f.path, tuple(f.leaf.shape), f.leaf.itemsize, spec, ms)
    return Decision(
        spec=pspec, strategy=p.strategy, reason=p.reason, shape=f.leaf.shape, dtype=f.leaf.dtype,
        bytes=f.leaf.nbytes, bytes_per_device=per_device,
        kind=p.kind or f.kind, source=source, pair=p.pair, role=p.role, layers_dim=p.layers_dim,
        unit=f.unit, group=layer_group(f.path), fsdp=p.fsdp, alternatives=p.alternatives,
        trainable=f.leaf.trainable)


def _checked(path: str, shape: tuple[int, ...], item: int, spec: tuple, ms: MeshShape) -> tuple[Any, int]:
    """``spec`` as a PartitionSpec and the leaf's bytes per device; the planner must never emit an
    invalid spec, so this guards the rule sets. Repeated layers repeat shapes and specs: see
    :func:`_valid`."""
    try:
        found = _valid(shape, item, spec, ms)
    except TypeError:  # an unhashable entry: never cached
        found = None
    if found is None:
        errs = spec_problems(path, shape, spec, ms)
        if errs:  # pragma: no cover - a rule-set bug; fail loudly rather than emit it
            raise AssertionError("tpflax produced an invalid spec:\n" + "\n".join(errs))
        found = to_pspec(spec), bytes_per_device(shape, item, spec, ms)
    return found


@functools.lru_cache(maxsize=1 << 12)
def _valid(shape: tuple[int, ...], item: int, spec: tuple, ms: MeshShape) -> tuple[Any, int] | None:
    """``(PartitionSpec, bytes per device)`` of a valid ``spec`` (None: invalid, which the caller
    reports with the leaf's path)."""
    if spec_problems("", shape, spec, ms):
        return None
    return to_pspec(spec), bytes_per_device(shape, item, spec, ms)


def _replication_warnings(decisions: Mapping[str, Decision], mesh: MeshShape) -> list[str]:
    if mesh.group(TENSOR)[1] * mesh.group(FSDP)[1] * mesh.group(EXPERT)[1] == 1:
        return []
    total = sum(d.bytes for d in decisions.values())
    limit = max(1 << 20, total // 100)
    out = []
    for path, d in decisions.items():
        if d.bytes >= limit and d.bytes_per_device == d.bytes:
            out.append(f"{path} {d.shape} ({fmt_bytes(d.bytes)}, {100 * d.bytes / total:.1f}% of the model) "
                       f"is replicated on every device: {d.reason}")
    return out


def traced_facts(p: Plan, model: Any, sample: Any = None, flow: Any = None) -> Plan:
    """``p`` with the pairs and output heads the trace of ``model`` finds for its forced leaves.

    A plan made without ``model=`` knows its rule- or annotation-forced leaves only by the
    tree's names and shapes: a block named as nothing the tree pass knows (diffusers'
    ``to_q``/``to_out_0``) leaves its forced columns and rows unpaired, and the estimate would
    price each column as gathering its output. The planner's own traced proposals
    (:func:`_unforced`, with the plan's options) say what those leaves are where they split
    them the same way (:func:`_forced_facts`); a forced leaf without a pair or head takes that,
    a pair only when every member had none. A plan made with ``model=`` (it has traced
    decisions), or without such leaves, is returned as it is, and so is ``p`` when ``model``
    cannot be traced. Linear in the leaves: no rule is matched. ``flow``: the model's
    :func:`tpflax._src.trace.dataflow.dataflow`, when the caller keeps it (one per model).
    """
    from tpflax._src.planner.params import planned_tree
    from tpflax._src.trace.dataflow import dataflow

    ds = p.decisions
    # only a leaf split over a tensor or expert axis has a pair or a head split that collectives follow; a
    # forced leaf's pair is the tree's reading (no trace made it), which widths can turn around (an MLP over
    # the tokens, as wide as the model: the tree's residual width): the trace's pair replaces it, whole
    loose = {q for q, d in ds.items() if d.source in ("rule", "annotation") and d.kind != "head"
             and any(_tensor_split(entries(d.spec, len(d.shape)), p.mesh))}
    if not loose or any(d.source == "trace" for d in ds.values()):
        return p
    o = p.options
    tree = planned_tree(p)
    facts = classify(walk(tree)[0], o.get("stacked"))
    if {f.path for f in facts} != set(ds):
        return p
    try:
        flow = flow if flow is not None else dataflow(model, sample, tree, p.mesh)
        opts = Options(fsdp_min_bytes=o.get("fsdp_min_bytes"), min_channels=int(o.get("min_channels", 64)),
                       tensor_min_bytes=int(o.get("tensor_min_bytes", 0)),
                       **pricing(o.get("hardware"), None, o.get("device_memory")))
        opts = replace(opts, tokens=int(o.get("tokens") or opts.tokens))
    except TpflaxError:
        return p
    widest = max((u.token_rows for u in flow.uses), default=0)
    own, own_pairs = _unforced(facts, p.mesh, opts, flow, widest, _sample_rows(sample))
    # a forced leaf left whole that the planner's own pair holds whole too (GQA's key/value kernels beside a split
    # query, a LoRA's unsplit adapters): a member as it is there, so the pair is adopted as the planner's own plan
    # has it (else its split members were priced alone: +9% model all-reduce, 4.8x the gathers, rules-planned LoRA)
    members_of = {m for pr in own_pairs for m in (*pr.columns, *pr.rows)}
    whole = {q for q, d in ds.items() if q not in loose and q in members_of and q in own
             and d.source in ("rule", "annotation") and d.kind != "head"
             and not any(_tensor_split(entries(d.spec, len(d.shape)), p.mesh))
             and not any(_tensor_split(entries(own[q].spec, len(d.shape)), p.mesh))}
    forced = {q: Proposal(entries(ds[q].spec, len(ds[q].shape)), ds[q].strategy, ds[q].reason) for q in loose | whole}
    found, pairs = _forced_facts(forced, facts, [], own, own_pairs, p.mesh)
    top = max([d.pair for d in ds.values() if d.pair is not None] + [pr.id for pr in p.pairs] + [0])
    traced = {q for q, f in found.items() if f.pair is not None or (f.kind == "head" and q not in whole)}
    # a tree pair is replaced only when the trace placed every member of it (else it is kept as it was)
    members: dict[int, set[str]] = {}
    for q, d in ds.items():
        if d.pair is not None:
            members.setdefault(d.pair, set()).add(q)
    replaced = {pid for pid, ms in members.items() if ms <= traced}
    new = dict(ds)
    for q in traced:
        f = found[q]
        if ds[q].pair is None or ds[q].pair in replaced:
            new[q] = replace(ds[q], pair=None if f.pair is None else top + f.pair, role=f.role,
                             kind=f.kind or ds[q].kind)
    # a quantized kernel's dequantization scale follows it as the planner's own plan has it (_follow_scales): in
    # its pair, on no side of it (a scale in a pair's columns took a column's items: the activation-sized sum of
    # its partial input gradients, +62% of the model all-reduce priced for a rules-planned int8 Llama)
    for spath, kpath in quantized_scales([f.leaf for f in facts]).items():
        if spath in new and kpath in new and (new[spath].pair, new[spath].role) != (new[kpath].pair, None):
            new[spath] = replace(new[spath], pair=new[kpath].pair, role=None)
    if new == ds:
        return p
    used = {d.pair for d in new.values()}
    return replace(p, decisions=new, pairs=tuple(pr for pr in p.pairs if pr.id not in replaced)
                   + tuple(replace(pr, id=top + pr.id) for pr in pairs if top + pr.id in used))
