"""The task protocol: a task is a directory, checked piece by piece when loaded.

    tasks/<name>/
      task.md            what the task is (the Meta-Agent reads it)
      task.json          name, splits, reward kind, optional harness hints
      harness.json       the default harness (schema: siajax.harness)
      verifier.py        score(item, answer, text) -> {"reward", "failure", "metrics"}
      data/public/       what agents may see (train / dev items, JSONL)
      data/private/      held-out items (test); never readable by agent code
      README.md          provenance and licence
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from functools import cached_property
from pathlib import Path

from siajax.harness import Harness, HarnessError, from_json

REQUIRED_FILES = ("task.md", "task.json", "harness.json", "verifier.py", "README.md")
REQUIRED_DIRS = ("data/public", "data/private")
REWARD_KINDS = ("binary", "scalar")
BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "tasks"


class TaskError(ValueError):
    """A task directory that does not follow the protocol; names the piece."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    root: Path
    spec: dict

    @property
    def description(self) -> str:
        return (self.root / "task.md").read_text(encoding="utf-8")

    @property
    def public_dir(self) -> Path:
        return self.root / "data" / "public"

    @property
    def private_dir(self) -> Path:
        return self.root / "data" / "private"

    @property
    def reward_kind(self) -> str:
        return self.spec.get("reward", "scalar")

    def default_harness(self) -> Harness:
        return from_json((self.root / "harness.json").read_text(encoding="utf-8"))

    @cached_property
    def verifier(self):
        return _load_module(self.root / "verifier.py", f"siajax_task_{self.name}_verifier")

    def has_split(self, split: str) -> bool:
        return split in self.spec["splits"]

    def dev_items(self) -> list[dict]:
        """The dev split, or, for a task that declares none, the train items a stable hash sets aside."""
        if self.has_split("dev"):
            return self.items("dev")
        carved = [item for item in self.items("train") if _held_out(item)]
        return carved or self.items("train")  # too few items to hold any out: decide on train

    def train_items(self) -> list[dict]:
        """Train items the weight lever may learn from (never the ones carved out as dev)."""
        items = self.items("train")
        if self.has_split("dev"):
            return items
        return [item for item in items if not _held_out(item)] or items

    @cached_property
    def loader(self):
        """The task's own item loader (``items_loader`` in task.json), for data that cannot ship
        with the task (e.g. gated datasets the user supplies)."""
        name = self.spec.get("items_loader")
        return None if name is None else _load_module(self.root / name, f"siajax_task_{self.name}_loader")

    def items(self, split: str) -> list[dict]:
        """Items of a split (JSONL, one object per line with an "id" and template slots)."""
        splits = self.spec["splits"]
        if split not in splits:
            raise TaskError(f"task {self.name!r} has no split {split!r}; it has {sorted(splits)}")
        if self.loader is not None:
            return self.loader.items(split)
        path = self.root / splits[split]
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{path}:{number}: not valid JSON ({err})") from None
        return items


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _held_out(item: dict, share: float = 0.2) -> bool:
    """Stable across runs and machines: the item's id hashed, not Python's salted hash()."""
    digest = hashlib.sha256(f"siajax-dev:{item['id']}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < share * 2**32


def load_task(path: str | os.PathLike) -> Task:
    """Loads and checks a task directory; every missing or invalid piece is named."""
    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"task directory {root} does not exist")
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()] + [
        d for d in REQUIRED_DIRS if not (root / d).is_dir()]
    if missing:
        raise TaskError(f"task {root.name!r} is missing {', '.join(missing)}")
    try:
        spec = json.loads((root / "task.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskError(f"task {root.name!r}: task.json does not parse ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("splits"), dict):
        raise TaskError(f"task {root.name!r}: task.json needs a 'splits' object mapping split names to files")
    loader = spec.get("items_loader")
    if loader is not None and not (root / loader).is_file():
        raise TaskError(f"task {root.name!r}: items_loader {loader} does not exist")
    for split, file in spec["splits"].items():
        if loader is not None:
            continue  # the loader makes the items (and keeps the test split's answers private)
        if not (root / file).is_file():
            raise TaskError(f"task {root.name!r}: split {split!r} points to missing file {file}")
        if split == "test" and not str(file).startswith("data/private/"):
            raise TaskError(f"task {root.name!r}: the test split must live under data/private/")
    if spec.get("reward", "scalar") not in REWARD_KINDS:
        raise TaskError(f"task {root.name!r}: reward must be one of {REWARD_KINDS}")
    task = Task(spec.get("name", root.name), root.resolve(), spec)
    try:
        task.default_harness()
    except HarnessError as err:
        raise TaskError(f"task {root.name!r}: harness.json is invalid: {err}") from None
    if not callable(getattr(task.verifier, "score", None)):
        raise TaskError(f"task {root.name!r}: verifier.py must define score(item, answer, text)")
    return task


def task_roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SIAJAX_TASKS_PATH", "").split(os.pathsep) if p]
    return extra + [BUNDLED_TASKS]


def find_tasks() -> dict[str, Task | TaskError]:
    """Every task directory under the task roots, loaded, or the error that stops it."""
    found = {}
    for root in task_roots():
        if not root.is_dir():
            continue
        for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            try:
                found.setdefault(directory.name, load_task(directory))
            except TaskError as err:
                found.setdefault(directory.name, err)
    return found


def resolve_task(name_or_path: str) -> Task:
    if Path(name_or_path).is_dir():
        return load_task(name_or_path)
    tasks = find_tasks()
    if name_or_path not in tasks:
        raise TaskError(f"no task named {name_or_path!r}; known: {sorted(tasks)}")
    task = tasks[name_or_path]
    if isinstance(task, TaskError):
        raise task
    return task


def failed_verdict(kind: str, detail: str, reward: float = -1.0) -> dict:
    """A verifier's answer for a sample that failed: the kind, a bounded detail, the failure reward."""
    return {"reward": reward, "failure": kind, "metrics": {"detail": detail[:2000]}}
