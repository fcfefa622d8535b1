"""A run directory: what is written where, and how a finished generation is read back.

    runs/<run_id>/
      config.json         the run's RunConfig, rules included (a resume checks and reads it)
      task/               the run's own copy of its task (eval and resume use it; a task edited
                          or moved since is reported, not silently used)
      ledger.jsonl        one fsynced line per finished generation (append-only)
      initial/            eval_dev.jsonl, eval_test.jsonl of harness v0 with the base weights
      harness/            HarnessStore: every harness version tried, parent, patch, why kept or rolled back
      gen_<g>/            harness.json (entering), decision.json, candidates.json, trajectory.jsonl
                          (training rollouts), eval_dev.jsonl / eval_test.jsonl (the evaluation
                          after the lever), train_state/ (orbax) when the weights moved

A generation counts once its ledger line is written; a resume restores the
harness HEAD, train state and dev scores named by the last line and redoes the
interrupted generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

from siajax.agents.decide import Decision
from siajax.agents.evaluation import evaluate
from siajax.budget import SampleBudget, Spend
from siajax.config import RESUME_MAY_CHANGE, RunConfig
from siajax.harness import Harness, HarnessStore
from siajax.harness.store import atomic_write_text
from siajax.levers import LeverOutcome
from siajax.parallel.distributed import barrier, check_same, from_primary, is_primary
from siajax.protocol import evaluation_plan
from siajax.tasks import Task, TaskChanged, TaskError, load_task, resolve_task
from siajax.train.trainable import TrainablePolicy


TIMING_FIELDS = ("wall_seconds", "time")  # the ledger fields a replay of the same run does not repeat
TASK_COPY = "task"  # the run's own copy of its task, inside the run directory


def read_ledger(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "ledger.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a crash: that generation did not finish
    return lines


def append_ledger(run_dir: Path, entry: dict) -> None:
    """One fsynced line; a write that fails (full disk) is cut off again, so the ledger never keeps a
    torn line that a resumed run's next line would be glued to."""
    path = run_dir / "ledger.jsonl"
    with open(path, "a", encoding="utf-8") as handle:
        size = handle.tell()
        try:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as err:
            os.truncate(path, size)
            raise OSError(err.errno, err.strerror, str(path)) from err


def write_json(path: Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, ensure_ascii=False))


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_config(run_dir: str | os.PathLike) -> RunConfig:
    config_path = Path(run_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a siajax run (no config.json)")
    return RunConfig.from_dict(json.loads(config_path.read_text()))


def is_resume(config: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds this run; refuses a directory started with another config
    (only where arrays live and when the run stops itself, ``RESUME_MAY_CHANGE``, may change, and ``generations`` by
    :func:`extended_config`)."""
    if not (run_dir / "config.json").exists():
        return False
    stored = load_config(run_dir)
    kept = dataclasses.replace(stored, **{name: getattr(config, name) for name in RESUME_MAY_CHANGE})
    if kept != config and dataclasses.replace(kept, generations=config.generations) == config:
        extended_config(stored, config.generations, read_ledger(run_dir))
    elif kept != config:
        raise ValueError(f"{run_dir} was started with a different config; use `siajax resume {run_dir}`")
    return True


def extended_config(config: RunConfig, generations: int, ledger: list[dict]) -> RunConfig:
    """``config`` run to ``generations`` instead (``siajax resume RUN --generations N``): never fewer
    than the run has finished, and only under a constant learning rate (a cosine schedule's horizon is
    the run's length, so the steps already taken would have had other rates)."""
    if generations < len(ledger):
        raise ValueError(f"the run has finished {len(ledger)} generations; --generations {generations} would "
                         f"drop some (give at least {len(ledger)})")
    if generations != config.generations and config.lr_schedule != "constant":
        raise ValueError(f"the run's {config.lr_schedule} learning-rate schedule decays over its "
                         f"{config.generations} generations, so it cannot be extended; start a new run")
    return dataclasses.replace(config, generations=generations)


@contextlib.contextmanager
def process_files(run_dir: Path) -> Iterator[Path]:
    """Where this process writes the run's files: the run directory itself on process 0; on every
    other process, a private copy of it (train states left out), removed afterwards. Every process
    then runs the same code on the same files while only process 0's reach the run directory;
    train states are the exception: they are written collectively, into the run directory."""
    if jax.process_count() == 1:
        yield run_dir
        return
    check_shared_directory(run_dir)
    with tempfile.TemporaryDirectory(prefix=f"siajax-process{jax.process_index()}-") as scratch:
        files = run_dir if is_primary() else Path(scratch) / "run"
        if not is_primary():
            shutil.copytree(run_dir, files, ignore=shutil.ignore_patterns("train_state", "*.orbax-checkpoint-tmp*"))
        barrier("siajax-run-files")  # every copy taken before process 0 writes
        yield files


def check_shared_directory(run_dir: Path) -> None:
    """Refuses a run directory that is not one directory for every process (each host's own disk):
    process 0 leaves a random token there, and every process must read it back."""
    token = from_primary(lambda: secrets.token_hex(16))
    probe = run_dir / ".siajax-shared-check"
    if is_primary():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, token)
    barrier("siajax-shared-check-written")
    seen = probe.read_text() if probe.exists() else ""
    barrier("siajax-shared-check-read")
    if is_primary():
        probe.unlink()
    check_same(f"what {run_dir} holds (the run directory must be on a filesystem every process shares)",
               seen.encode())


def save_config(config: RunConfig, run_dir: Path) -> None:
    """Writes config.json unless it already says exactly this (a resume on a new mesh rewrites it)."""
    path = run_dir / "config.json"
    if not path.exists() or json.loads(path.read_text()) != config.to_dict():
        write_json(path, config.to_dict())


def fresh_generation_dir(run_dir: Path, generation: int) -> Path:
    """gen_<g>/, emptied of an interrupted attempt's leftovers."""
    gen_dir = run_dir / f"gen_{generation:03d}"
    if gen_dir.exists():
        shutil.rmtree(gen_dir)
    gen_dir.mkdir()
    return gen_dir


def write_evaluations(directory: Path, evaluations, keep_previous: str | None = None) -> None:
    """eval_dev.jsonl and eval_test.jsonl of a (dev, test) evaluation pair; ``keep_previous``: a
    subdirectory the files already there move to first (a state scored again keeps its old records)."""
    directory.mkdir(exist_ok=True)
    if keep_previous is not None:
        (directory / keep_previous).mkdir(exist_ok=True)
        for name in ("eval_dev.jsonl", "eval_test.jsonl"):
            if (directory / name).exists():
                os.replace(directory / name, directory / keep_previous / name)
    write_jsonl(directory / "eval_dev.jsonl", evaluations[0].records)
    write_jsonl(directory / "eval_test.jsonl", evaluations[1].records)


def current_dev_records(run_dir: Path, ledger: list[dict]) -> list[dict]:
    """The dev evaluation records of the current state (for failure examples in the summary)."""
    return read_jsonl(run_dir / (ledger[-1]["eval_records_from"] if ledger else "initial") / "eval_dev.jsonl")


def tried_versions(ledger: list[dict]) -> set[str]:
    """Every harness version some generation already evaluated as a candidate."""
    return {c["version"] for entry in ledger for c in entry.get("candidates", [])}


def ledger_row(generation: int, decision: Decision, harness: Harness, store: HarnessStore, before: dict,
               outcome: LeverOutcome, spend: Spend, budget: SampleBudget, ledger: list[dict], time: dict) -> dict:
    """The ledger line of a finished generation. ``checkpoint`` names the train state the run continues
    from (the latest kept), ``eval_records_from`` the directory holding the current state's records,
    ``time`` where the generation's wall time went (``siajax.timing.PhaseClock.summary``)."""
    previous = ledger[-1] if ledger else {"eval_records_from": "initial"}
    kept_weights = outcome.kept and outcome.trained_state is not None
    return {
        "generation": generation, "decision": decision.to_dict(), "harness_version": harness.version,
        "next_harness": store.head, "checkpoint": outcome.trained_state if kept_weights else previous.get("checkpoint"),
        "trained_state": outcome.trained_state, "before": before, "after": outcome.after,
        "comparison": outcome.comparison, "rolled_back": outcome.rolled_back, "failed": outcome.failed,
        "kept": outcome.kept, "kept_by": outcome.kept_by if outcome.kept else None,
        "baseline_dev_score": outcome.baseline_dev_score, "accepted_patch": outcome.accepted_patch,
        "candidates": outcome.candidates, "train": outcome.train,
        "logprob_mismatch": None if outcome.train is None else outcome.train["logprob_mismatch"],
        "spend": spend.to_dict(budget),
        "eval_records_from": f"gen_{generation:03d}" if outcome.evaluations is not None else
        previous["eval_records_from"],
        "wall_seconds": time["wall"], "time": time,
    }


def saved_policy(run_dir: str | os.PathLike, generation: int | None = None):
    """A finished generation of a run (the last by default) with its weights loaded;
    -> (config, ledger, generation, policy)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    ledger = read_ledger(run_dir)
    if not ledger:
        raise FileNotFoundError(f"{run_dir} has no finished generation")
    generation = len(ledger) - 1 if generation is None else generation
    if not 0 <= generation < len(ledger):
        raise ValueError(f"generation {generation} is not in {run_dir} (it has 0..{len(ledger) - 1})")
    policy = TrainablePolicy(config)
    policy.restore(run_dir, ledger[:generation + 1])
    return config, ledger, generation, policy


def task_digest(root: Path) -> str:
    """A content hash of a task directory: every file's relative path and bytes (caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def keep_task_copy(task: Task, run_dir: Path) -> None:
    """Copies the task into the run directory once, so the run can be re-scored and resumed from
    anywhere, with the verifier and items it ran with."""
    copy = run_dir / TASK_COPY
    if copy.exists():
        return
    partial = run_dir / f".task.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(task.root, partial, ignore=shutil.ignore_patterns("__pycache__"))
    except shutil.Error as err:  # its first failure as the OSError it was (a full disk: one line)
        shutil.rmtree(partial, ignore_errors=True)
        _, target, why = err.args[0][0]
        code = re.match(r"\[Errno (\d+)\] ([^:]+)", why)
        raise OSError(int(code.group(1)), code.group(2), target) if code else err
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, copy)


def replace_task_copy(config: RunConfig, run_dir: str | os.PathLike) -> Path:
    """``siajax resume RUN --update-task``: the run goes on with the task as it is now (a fixed
    verifier); the copy it ran with so far moves to ``task.before-gen<N>``. -> where it moved."""
    run_dir = Path(run_dir)
    task = resolve_task(config.task)
    kept = run_dir / f"{TASK_COPY}.before-gen{len(read_ledger(run_dir))}"
    if (run_dir / TASK_COPY).exists():
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(run_dir / TASK_COPY, kept)
    keep_task_copy(task, run_dir)
    return kept


def run_task(config: RunConfig, run_dir: str | os.PathLike) -> Task:
    """The task a run ran: its copy in the run directory (a warning when the task ``config.task``
    names now differs), else (a new run, or one made before runs kept a copy) ``config.task``."""
    copy = Path(run_dir) / TASK_COPY
    if not copy.is_dir():
        return resolve_task(config.task)
    task = load_task(copy)
    try:
        named = resolve_task(config.task)
    except TaskError:
        return task  # moved or deleted since: the copy is the task
    if task_digest(named.root) != task_digest(copy):
        warnings.warn(f"task {config.task!r} ({named.root}) has changed since this run started; using the run's "
                      f"copy ({copy})", TaskChanged, stacklevel=2)
    return task


def evaluate_saved(run_dir: str | os.PathLike, generation: int | None = None, split: str = "test") -> dict:
    """Re-scores a saved generation's harness and weights (the last one by default) on ``split``,
    with the key the run scored it with."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    run_dir = Path(run_dir)
    config, ledger, generation, policy = saved_policy(run_dir, generation)
    task = run_task(config, run_dir)
    harness = HarnessStore(run_dir / "harness").get(ledger[generation]["next_harness"])
    plan = evaluation_plan(task, config)
    dev_key = plan.dev_key_at(ledger[generation]["after"]["dev"].get("key_index", 0))
    items, key = (plan.dev, dev_key) if split == "dev" else (plan.test, plan.test_key)
    return {"generation": generation, "harness": harness.version,
            **evaluate(task, harness, policy.backend(), items, key, split=split).summary()}
