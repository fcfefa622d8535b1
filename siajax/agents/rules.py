"""The rules that steer a run, as frozen data saved in config.json beside its results.

Three rule sets, one job each: :class:`DecisionRule` (which lever and recipe
next, read by :func:`siajax.agents.decide.decide`), :class:`AcceptanceRule`
(when a change is kept, read by :func:`siajax.agents.acceptance.accept`) and
:class:`EditGrid` (the values the harness edit library proposes). The logic
that reads them is pure functions elsewhere; changing a threshold never means
changing code.
"""

from __future__ import annotations

import dataclasses
import typing

from siajax.agents.harness_edits import EDIT_KINDS
from siajax.fieldtypes import type_problem

LEVERS = ("harness", "weights")
LEVER_MODES = {"harness": ("harness",), "weights": ("weights",), "both": LEVERS}  # RunConfig.levers -> levers


def frozen_from_dict(cls, data: dict, where: str | None = None):
    """A frozen rule dataclass from its JSON form (lists back to the tuples its fields declare)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)

    def as_tuple(value):
        return tuple(as_tuple(x) if isinstance(x, list) else x for x in value)

    values = {k: as_tuple(v) if str(hints[k]).startswith("tuple") and isinstance(v, list) else v
              for k, v in data.items()}
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, value in values.items():  # before the rule's own range checks meet a string
        problem = type_problem(annotations[name], value)
        if problem:
            raise ValueError(f"{where or cls.__name__}.{name}: {problem}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class DecisionRule:
    """Which lever the built-in Feedback-Agent pulls, and with which recipe.

    A lever has plateaued when its last ``plateau_window`` generations kept nothing.
    """

    min_fixable_failures: float = 0.3  # harness-fixable failure share on dev that calls the harness lever
    plateau_window: int = 2
    rare_success_rate: float = 0.1  # below it the weight lever uses entropic weighting
    recipe_by_reward: tuple[tuple[str, str], ...] = (("binary", "grpo"), ("scalar", "ppo_gae"))

    def __post_init__(self):
        if self.plateau_window < 1:
            raise ValueError(f"plateau_window must be >= 1, got {self.plateau_window}")


@dataclasses.dataclass(frozen=True)
class AcceptanceRule:
    """When a change (a harness edit or new weights) is kept: its paired bootstrap p-value of
    "no gain" on dev passes Holm's correction at family-wise level ``alpha`` over the changes
    tried that generation; or, with ``keep_format_fixes``, it makes significantly fewer dev
    items fail in a harness-fixable way (parse errors, invalid labels) without a lower mean
    score (from a 0% start the first format fix's score gain is often inside the noise)."""

    alpha: float = 0.1
    bootstrap_resamples: int = 2000
    keep_format_fixes: bool = True

    def __post_init__(self):
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")


@dataclasses.dataclass(frozen=True)
class EditGrid:
    """What the harness edit library proposes, in ``edit_order``: few-shot sizes (drawn from train
    with ``few_shot_seed``), vote counts and sampling temperatures."""

    edit_order: tuple[str, ...] = EDIT_KINDS
    few_shot_k: tuple[int, ...] = (3, 1)
    few_shot_seed: int = 0
    vote_counts: tuple[int, ...] = (5,)
    temperatures: tuple[float, ...] = (0.3, 1.0)

    def __post_init__(self):
        unknown = set(self.edit_order) - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown harness edits {sorted(unknown)} in edit_order; choose from {EDIT_KINDS}")
