"""The SIA loop: each generation the Feedback-Agent picks a lever, and held-out dev items judge it.

One generation, top to bottom (:func:`run_generation`): summarise the entering
state on dev (``agents.summary``), decide the lever (``agents.decide`` or the
LLM's ``agents.feedback``), pull it (``levers``: harness search or a weights
generation, each judged by ``agents.acceptance`` against the entering state
re-scored under this generation's dev key, ``protocol``), and write the ledger
line (``rundir``). Every generation draws from one hard sample budget
(``siajax.budget``); test evaluation is reported apart. Keys derive from the
seed and a purpose tag (``siajax.rng.purpose_key``), per generation by fold-in.

With several processes (hosts) every one runs this same driver on the same
state; the backends split the rows among them and hand every result back
(``siajax.parallel.distributed``), a hash checks each generation's decision
agrees everywhere, and process 0 alone writes the run directory
(``rundir.process_files``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax

from siajax import timing
from siajax.agents import OpenAIBackend
from siajax.agents.decide import Decision, decide, weights_problem
from siajax.agents.feedback import llm_decide
from siajax.agents.harness_edits import candidate_edits
from siajax.agents.meta import initial_harness
from siajax.agents.summary import dev_summary
from siajax.budget import SampleBudget, Spend
from siajax.config import RunConfig
from siajax.harness import Harness, HarnessStore, to_json
from siajax.harness.store import atomic_write_text
from siajax.health import RunHalted, flag_message, generation_flags, halt_reason, needs_rescoring
from siajax.levers import LeverOutcome, no_change, search_harness, weights_generation
from siajax.parallel.distributed import check_same, from_primary, is_primary
from siajax.protocol import EvalPlan, checked_budget, evaluate_state, evaluation_plan, state_record
from siajax.rl import RECIPES
from siajax.rl.custom_loss import load_loss
from siajax.rng import purpose_key
from siajax.rundir import (
    append_ledger, current_dev_records, fresh_generation_dir, is_resume, keep_task_copy, ledger_row, load_config,
    process_files, read_ledger, run_task, save_config, tried_versions, write_evaluations, write_json, write_jsonl,
)
from siajax.taskcheck import task_problems
from siajax.tasks import Task, TaskError
from siajax.tracking import Trackers
from siajax.train.trainable import TrainablePolicy


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every generation of a run shares (fixed for the run)."""

    config: RunConfig
    task: Task
    policy: TrainablePolicy
    store: HarnessStore
    plan: EvalPlan
    run_dir: Path  # where this process writes the run's files (``rundir.process_files``)
    checkpoints: Path  # where train states are saved: the run directory, by every process together
    budget_limit: int  # samples each generation may draw
    feedback_backend: object | None  # the LLM Feedback-Agent's endpoint; None: the built-in rule
    emit: Callable[[str, dict], None]


def run(config: RunConfig, run_dir: str | os.PathLike, *, on_event: Callable[[str, dict], None] | None = None,
        stop_after: int | None = None) -> list[dict]:
    """Runs (or resumes) a run to ``config.generations`` (or ``stop_after``); returns the ledger."""
    run_dir = Path(run_dir)
    task = check_start(config, run_dir)
    policy = TrainablePolicy(config)  # loads the model before the run directory exists: a bad model leaves nothing
    with process_files(run_dir) as files:  # with several processes, only process 0's reach run_dir
        return _run(config, task, policy, files, run_dir, on_event, stop_after)


def _run(config: RunConfig, task: Task, policy: TrainablePolicy, run_dir: Path, checkpoints: Path,
         on_event: Callable[[str, dict], None] | None, stop_after: int | None) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir)
    keep_task_copy(task, run_dir)
    trackers = Trackers(config.tracker_names if is_primary() else (), run_dir, config.to_dict(),
                        config.updates_per_generation)
    emit = _emitter(trackers, on_event if is_primary() else None)
    store, plan, ledger = HarnessStore(run_dir / "harness"), evaluation_plan(task, config), read_ledger(run_dir)
    if ledger:
        entering, limit = restore_state(config, task, store, policy, plan, run_dir, checkpoints, ledger)
    else:
        entering, limit = start_state(config, task, store, policy, plan, run_dir, emit)
    context = RunContext(config, task, policy, store, plan, run_dir, checkpoints, limit,
                         _agent_backend(config.feedback, config.feedback_model, config.feedback_base_url), emit)
    last = config.generations if stop_after is None else min(config.generations, stop_after)
    for generation in range(len(ledger), last):
        entry = run_generation(context, generation, ledger, entering)
        entry["flags"] = generation_flags(entry)
        append_ledger(run_dir, entry)
        ledger.append(entry)
        entering = entry["after"]
        for flag in entry["flags"]:
            emit("warning", {"generation": generation, "message": flag_message(flag, entry)})
        emit("generation", entry)
        halt = halt_reason(ledger, config.halt_after_flagged)
        if halt and generation + 1 < last:  # stop spending: more generations were to come
            trackers.close()
            raise RunHalted(halt)
    trackers.close()
    return ledger


def resume(run_dir: str | os.PathLike, **kwargs) -> list[dict]:
    """Continues a run from its last finished generation with its stored config."""
    return run(load_config(run_dir), run_dir, **kwargs)


def run_generation(run: RunContext, generation: int, ledger: list[dict], entering: dict) -> dict:
    """Decide, pull the lever, judge it; -> the generation's ledger line (its files written), with
    where its time went (``siajax.timing``)."""
    with timing.measuring() as clock:
        gen_dir = fresh_generation_dir(run.run_dir, generation)
        feedback_key, train_key = jax.random.split(jax.random.fold_in(purpose_key(run.config.seed, "loop"),
                                                                      generation))
        harness = run.store.get()
        atomic_write_text(gen_dir / "harness.json", to_json(harness))
        run.emit("deciding", {"generation": generation})
        with timing.phase("agents"):
            decision = decide_next(run, harness, ledger, entering, feedback_key)
        check_same(f"generation {generation}'s decision",
                   json.dumps([harness.version, decision.to_dict()], sort_keys=True, default=str).encode())
        write_json(gen_dir / "decision.json", decision.to_dict())
        budget, spend = SampleBudget(run.budget_limit), Spend()
        outcome = pull_lever(run, decision, harness, entering, generation, budget, spend, train_key, gen_dir)
        if outcome.evaluations is not None:
            write_evaluations(gen_dir, outcome.evaluations)
        return ledger_row(generation, decision, harness, run.store, entering, outcome, spend, budget, ledger,
                          clock.summary())


def decide_next(run: RunContext, harness: Harness, ledger: list[dict], entering: dict, key) -> Decision:
    """The Feedback-Agent's decision on the entering state's dev summary, the history and the untried edits."""
    config, levers = run.config, run.config.lever_names
    summary = dev_summary(entering["dev"], current_dev_records(run.run_dir, ledger))
    candidates = tuple(candidate_edits(harness, run.task, config.edit_grid, tried_versions(ledger))) \
        if "harness" in levers else ()
    inputs = dict(candidates=candidates, group_size=config.group_size(harness),
                  forced_recipe=config.recipe)
    if run.feedback_backend is None:
        return decide(summary, ledger, harness, run.task, levers, config.decision_rule, **inputs)
    return from_primary(lambda: llm_decide(run.feedback_backend, summary, ledger, harness, run.task, levers,
                                           config.decision_rule, key, **inputs))


def pull_lever(run: RunContext, decision: Decision, harness: Harness, entering: dict, generation: int,
               budget: SampleBudget, spend: Spend, key, gen_dir: Path) -> LeverOutcome:
    if decision.lever == "harness" and decision.candidates:
        outcome = search_harness(decision, run.store, run.task, run.policy, run.plan, entering, generation, budget,
                                 spend, run.config, run.emit)
        write_json(gen_dir / "candidates.json", outcome.candidates)
        return outcome
    if decision.lever == "weights":
        outcome, records = weights_generation(decision, run.policy, run.task, harness, run.plan, entering, generation,
                                              budget, spend, run.config, key, run.emit, run.checkpoints)
        if outcome.train is not None:
            write_jsonl(gen_dir / "trajectory.jsonl", records)
        return outcome
    return no_change(entering)


def start_state(config: RunConfig, task: Task, store: HarnessStore, policy: TrainablePolicy, plan: EvalPlan,
                run_dir: Path, emit) -> tuple[dict, int]:
    """A new run: the Meta-Agent's harness v0, stored and scored with the base weights; -> (state record,
    the generation budget, checked before the first evaluation is spent)."""
    meta_backend = _agent_backend(config.meta, config.meta_model, config.meta_base_url)
    harness, origin = from_primary(lambda: initial_harness(task, meta_backend, purpose_key(config.seed, "meta_agent")))
    harness = with_temperature(harness, config.temperature)
    limit = checked_budget(config, harness, len(plan.dev), task)
    store.put(harness, reason=origin)
    emit("evaluation", {"generation": -1})
    initial = evaluate_state(task, harness, policy.backend(), plan, key_index=0)
    write_evaluations(run_dir / "initial", initial)
    return state_record(*initial, key_index=0), limit


def restore_state(config: RunConfig, task: Task, store: HarnessStore, policy: TrainablePolicy, plan: EvalPlan,
                  run_dir: Path, checkpoints: Path, ledger: list[dict]) -> tuple[dict, int]:
    """A resumed run: harness HEAD and train state as the last ledger line left them; its scores, or
    after a generation scored by verifier errors, the state scored again (``siajax.health``)."""
    store.rollback(ledger[-1]["next_harness"])
    policy.restore(checkpoints, ledger)
    limit = checked_budget(config, store.get(ledger[0]["harness_version"]), len(plan.dev), task)
    if not needs_rescoring(ledger):
        return ledger[-1]["after"], limit
    key_index = ledger[-1]["after"]["dev"].get("key_index", len(ledger) - 1)
    evaluations = evaluate_state(task, store.get(), policy.backend(), plan, key_index=key_index)
    write_evaluations(run_dir / ledger[-1]["eval_records_from"], evaluations, keep_previous="before_rescoring")
    return state_record(*evaluations, key_index=key_index), limit


def check_start(config: RunConfig, run_dir: Path) -> Task:
    """Checks everything a run needs before anything is written or loaded; -> the task."""
    task = run_task(config, run_dir)  # a resume: the run's own copy
    problems = task_problems(task)  # every split read, slots, demonstrations: data a task loads itself must exist
    if problems:
        more = f" ({len(problems) - 1} more: siajax tasks --check {config.task})" if len(problems) > 1 else ""
        raise TaskError(problems[0] + more)
    dev = task.dev_items()[:config.dev_items]
    if len(dev) < task.min_dev_items:
        raise ValueError(f"dev_items={config.dev_items} leaves {len(dev)} dev items; task {task.name!r} decides on "
                         f"no fewer than {task.min_dev_items}")
    task.items("test")
    if config.levers != "harness":
        _check_weight_lever(config, with_temperature(task.default_harness(), config.temperature))
    is_resume(config, run_dir)
    return task


def _check_weight_lever(config: RunConfig, harness: Harness) -> None:
    """The forced recipe can run, every recipe's schedule splits the batch, a custom loss loads."""
    group = config.group_size(harness)
    recipes = [config.recipe] if config.recipe else sorted(RECIPES)
    if config.recipe and (problem := weights_problem(config.recipe, harness, group)):
        raise ValueError(f"--recipe {config.recipe}: {problem}")
    for recipe in recipes:
        config.schedule(recipe).check_rows(config.items_per_generation * group)
    if config.loss is not None:  # before the model loads: a loss that cannot serve costs nothing
        load_loss(config.loss, [config.recipe_config(recipe) for recipe in recipes])


def with_temperature(harness: Harness, temperature: float | None) -> Harness:
    """The harness with the run's sampling temperature (unchanged when the run sets none)."""
    if temperature is None:
        return harness
    return dataclasses.replace(harness, sampling=dataclasses.replace(harness.sampling, temperature=temperature))


def _agent_backend(setting: str, model: str | None, base_url: str | None):
    """The Meta- or Feedback-Agent's LLM endpoint; None when the agent is the built-in rule."""
    return OpenAIBackend(model, base_url=base_url) if setting == "llm" else None


def _emitter(trackers: Trackers, on_event: Callable[[str, dict], None] | None) -> Callable[[str, dict], None]:
    def emit(kind: str, payload: dict) -> None:
        trackers.on_event(kind, payload)
        if on_event is not None:
            on_event(kind, payload)

    return emit
