"""The planner's vocabulary: strategies, layer kinds, pair roles and decision sources.

Each is a ``Literal`` type plus the tuple of its values, so a typo is a type
error and a JSON value can be checked against the tuple. Strategies are never
assembled with ``"+"`` and parsed back: a decision that also shards over fsdp
says so in its own field.
"""

from __future__ import annotations

from typing import Literal, get_args

Strategy = Literal["column", "row", "heads", "channel", "vocab", "expert", "fsdp", "replicate",
                   "batch", "rule", "annotation"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
# What a user rule may name (``rule``/``annotation`` describe where a spec came from).
RULE_STRATEGIES: tuple[str, ...] = ("column", "row", "heads", "channel", "vocab", "expert", "fsdp",
                                    "replicate")

# Layer kinds. classify() gives all but "head": the planner marks the output heads
# it identifies (an output-head name in the tree, the logits in a trace).
Kind = Literal["embedding", "dense", "attention", "conv", "norm", "bias", "expert", "recurrent",
               "router", "head", "scalar", "state", "int", "other"]
KINDS: tuple[str, ...] = get_args(Kind)

# A leaf's side in a column->row (or channel->input-channel) pair.
Role = Literal["column", "row"]
ROLES: tuple[str, ...] = get_args(Role)

Source = Literal["rule", "annotation", "trace", "heuristic"]
SOURCES: tuple[str, ...] = get_args(Source)
