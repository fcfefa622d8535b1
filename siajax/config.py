"""A run's settings: one frozen :class:`RunConfig`, saved as config.json beside the results.

Everything that steers a run is a field here, the rules included
(:class:`~siajax.agents.rules.DecisionRule`, :class:`~siajax.agents.rules.AcceptanceRule`,
:class:`~siajax.agents.rules.EditGrid`), so a run directory says how it was made
and a resume can check it continues the same experiment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib

from siajax.agents.rules import LEVER_MODES, AcceptanceRule, DecisionRule, EditGrid, frozen_from_dict
from siajax.fieldtypes import check_field_types, type_problem
from siajax.models.hf_import import EMBEDDED_DEFAULT
from siajax.parallel import MeshConfig
from siajax.rl import RECIPES
from siajax.tracking import check_tracker_names
from siajax.train.learner import DEFAULT_SCHEDULES, UpdateSchedule
from siajax.train.optim import DEFAULT_CRITIC_LEARNING_RATE, LR_SCHEDULES

# May change on resume: how the work is laid out, and when the run stops itself, not what is computed.
RESUME_MAY_CHANGE = ("mesh", "micro_batches", "halt_after_flagged")
RULE_FIELDS = {"decision_rule": DecisionRule, "acceptance_rule": AcceptanceRule, "edit_grid": EditGrid}
AGENT_SETTINGS = {"feedback": ("heuristic", "llm"), "meta": ("default", "llm")}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str = "digits"
    model: str = EMBEDDED_DEFAULT  # HF directory, .gguf, hub id, or the embedded SmolLM2-135M-Instruct
    levers: str = "both"
    generations: int = 6
    seed: int = 0
    items_per_generation: int = 8  # train prompts per weight update
    updates_per_generation: int = 6  # weight updates per weights generation
    samples_per_prompt: int | None = None  # training group size; None: the harness's
    recipe: str | None = None  # force the weight lever's recipe; None: the Feedback-Agent's rule
    # modules imported before anything else, whose siajax.rl.register_recipe calls add recipes
    recipe_modules: tuple[str, ...] = ()
    # per recipe, its config's fields set (TOML: [recipe_settings.grpo] kl_coef = 0.02); see siajax.rl.losses
    recipe_settings: dict = dataclasses.field(default_factory=dict)
    loss: str | None = None  # "package.module:function" replacing every recipe's loss (siajax.rl.custom_loss)
    temperature: float | None = None  # sets the initial harness's sampling temperature
    epochs: int | None = None  # None: the recipe's default schedule
    minibatches: int | None = None
    micro_batches: int = 1
    target_kl: float | None = 0.05
    learning_rate: float | None = None  # None: siajax.train.optim.default_learning_rate(model)
    critic_learning_rate: float = DEFAULT_CRITIC_LEARNING_RATE  # the PPO value head's own rate (own partition)
    lr_schedule: str = "constant"  # or "cosine" (decays over all the run's optimiser steps)
    warmup_steps: int = 0
    lora_rank: int = 8
    dtype: str = "float32"
    # Samples a generation may draw to propose and judge a change (candidates' dev evaluations, rollouts,
    # the dev evaluation of new weights; votes and retries included); None: one weights generation's
    # rollouts plus two worst-case dev evaluations of the initial harness. Test evaluation is apart.
    generation_budget: int | None = None
    dev_items: int | None = None  # evaluate at most this many dev items (None: all)
    test_items: int | None = None
    feedback: str = "heuristic"  # or "llm": an OpenAI-compatible endpoint decides
    feedback_model: str | None = None
    feedback_base_url: str | None = None
    meta: str = "default"  # who writes harness v0: the task's harness.json, or "llm" from task.md
    meta_model: str | None = None
    meta_base_url: str | None = None
    trackers: str = ""  # comma-separated: "tensorboard", "wandb" (siajax.tracking); the ledger is always written
    halt_after_flagged: int = 2  # stop after this many generations in a row of verifier errors (siajax.health); 0: never
    mesh: str | None = None  # e.g. "data=2,fsdp=2,tensor=2" over this process's devices; None = one device
    # N > 0: the sampler decodes N tokens at a time and rows that finished leave the batch (one device;
    # each row then draws with its own key: other draws than 0's); 0: one decode program per call
    retire_finished_rows: int = 0
    decision_rule: DecisionRule = DecisionRule()
    acceptance_rule: AcceptanceRule = AcceptanceRule()
    edit_grid: EditGrid = EditGrid()

    def __post_init__(self):
        if isinstance(self.recipe_modules, list):  # from TOML / JSON
            object.__setattr__(self, "recipe_modules", tuple(self.recipe_modules))
        check_field_types(self, "config")
        import_recipe_modules(self.recipe_modules)
        for name, cls in RULE_FIELDS.items():
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, frozen_from_dict(cls, getattr(self, name), name))
            check_field_types(getattr(self, name), name)
        _check_choices(self)
        _check_ranges(self)
        for recipe in self.recipe_settings:
            self.recipe_config(recipe)  # every table names a recipe and fields its config has, well typed

    def recipe_config(self, recipe: str):
        """The recipe's config with this run's ``recipe_settings`` for it (one line on a bad setting)."""
        return checked_recipe_config(recipe, self.recipe_settings.get(recipe, {}))

    def schedule(self, recipe: str) -> UpdateSchedule:
        default = DEFAULT_SCHEDULES.get(recipe, UpdateSchedule())
        return UpdateSchedule(epochs=self.epochs or default.epochs, minibatches=self.minibatches or default.minibatches,
                              micro_batches=self.micro_batches, target_kl=self.target_kl)

    def group_size(self, harness) -> int:
        """Samples per training prompt: the run's ``samples_per_prompt``, else the harness's."""
        return self.samples_per_prompt or harness.sampling.samples_per_prompt

    @property
    def lever_names(self) -> tuple[str, ...]:
        return LEVER_MODES[self.levers]

    @property
    def tracker_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.trackers.split(",") if name.strip())

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = _split_feedback_rules(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**data)


def import_recipe_modules(names) -> None:
    """Imports each module a run names, so the recipes it registers exist before they are checked."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 -- the user's module: one line, whatever it raised
            raise ValueError(f"recipe_modules: cannot import {name} ({type(err).__name__}: {err})") from None


def checked_recipe_config(recipe: str, settings):
    """``recipe``'s config built from ``settings`` (a dict), each field checked against its annotation."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe_settings.{recipe}: no such recipe; registered: {sorted(RECIPES)}")
    if not isinstance(settings, dict):
        raise ValueError(f"recipe_settings.{recipe}: expected a table of its config's fields, got {settings!r}")
    config_type = RECIPES[recipe].config_type
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    for name, value in settings.items():
        if name not in fields:
            raise ValueError(f"recipe_settings.{recipe}.{name}: {config_type.__name__} has no such field; "
                             f"it has {sorted(fields)}")
        problem = type_problem(str(fields[name].type), value)
        if problem:
            raise ValueError(f"recipe_settings.{recipe}.{name}: {problem}")
    try:
        return config_type(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe_settings.{recipe}: {err}") from None


def _split_feedback_rules(data: dict) -> dict:
    """Reads a config.json written before the rules were split: its one ``feedback_rules`` table
    holds the fields of all three rule sets."""
    if "feedback_rules" not in data:
        return data
    data, legacy = dict(data), dict(data["feedback_rules"])
    del data["feedback_rules"]
    for name, cls in RULE_FIELDS.items():
        own = {f.name for f in dataclasses.fields(cls)}
        data.setdefault(name, {k: legacy.pop(k) for k in list(legacy) if k in own})
    if legacy:
        raise ValueError(f"unknown feedback_rules fields {sorted(legacy)}")
    return data


def _check_choices(config: RunConfig) -> None:
    """Named settings: levers, agents and their endpoints, recipe, schedule, trackers, mesh."""
    if config.mesh is not None:
        MeshConfig.parse(config.mesh)
    if config.levers not in LEVER_MODES:
        raise ValueError(f"levers must be one of {sorted(LEVER_MODES)}, got {config.levers!r}")
    for agent, choices in AGENT_SETTINGS.items():
        if getattr(config, agent) not in choices:
            raise ValueError(f"{agent} must be one of {choices}, got {getattr(config, agent)!r}")
        if getattr(config, agent) == "llm" and not getattr(config, f"{agent}_model"):
            raise ValueError(f"{agent}='llm' needs {agent}_model (and usually {agent}_base_url)")
    check_tracker_names(config.tracker_names)
    if config.recipe is not None and config.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} (or unset), got {config.recipe!r}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")


def _check_ranges(config: RunConfig) -> None:
    """Numeric settings: counts >= 1, rates > 0, the temperature in [0, 5]."""
    if config.temperature is not None and not 0 <= config.temperature <= 5:
        raise ValueError(f"temperature must be in [0, 5], got {config.temperature}")
    at_least_one = {"generations": config.generations, "items_per_generation": config.items_per_generation,
                    "updates_per_generation": config.updates_per_generation, "micro_batches": config.micro_batches,
                    "lora_rank": config.lora_rank, "samples_per_prompt": config.samples_per_prompt,
                    "generation_budget": config.generation_budget}
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if config.retire_finished_rows < 0 or (config.retire_finished_rows and config.mesh is not None):
        raise ValueError(f"retire_finished_rows must be >= 0 and runs on one device (no mesh), got "
                         f"{config.retire_finished_rows}{f' with mesh {config.mesh!r}' if config.mesh else ''}")
    if config.halt_after_flagged < 0:
        raise ValueError(f"halt_after_flagged must be >= 0 (0: never halt), got {config.halt_after_flagged}")
    for name in ("learning_rate", "critic_learning_rate"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def total_optimizer_steps(config: RunConfig) -> int:
    """An upper bound on the run's optimiser steps (the cosine schedule's horizon)."""
    most = max(config.schedule(r).epochs * config.schedule(r).minibatches for r in RECIPES)
    return config.generations * config.updates_per_generation * most


def load_settings(path: str | os.PathLike) -> dict:
    """A run TOML's settings (field names as in :class:`RunConfig`; rules as tables)."""
    with open(path, "rb") as handle:
        try:
            return tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from None
