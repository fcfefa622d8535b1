"""The task protocol: a task is a directory, checked piece by piece when loaded.

    tasks/<name>/
      task.md            what the task is (the Meta-Agent reads it)
      task.json          name, splits, reward kind, tools offered, optional harness hints
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
import itertools
import json
import os
import re
from functools import cached_property
from pathlib import Path

from siajax.deadline import DeadlineExceeded, call_with_deadline
from siajax.harness import Harness, HarnessError, ToolSpec, from_json

REQUIRED_FILES = ("task.md", "task.json", "harness.json", "verifier.py", "README.md")
REQUIRED_DIRS = ("data/public", "data/private")
REWARD_KINDS = ("binary", "scalar")
REFERENCE_FIELDS = ("answer", "answers", "label", "labels", "gold", "target", "solution")
DEFAULT_MIN_DEV_ITEMS = 4  # fewer and one item decides a generation; task.json may ask for more


def bundled_dir(name: str) -> Path:
    """A top-level directory of the checkout (``tasks``, ``kernels``), or its copy inside an
    installed wheel (``siajax/_bundled/<name>``, see pyproject.toml)."""
    package = Path(__file__).resolve().parent
    installed = package / "_bundled" / name
    return installed if installed.is_dir() else package.parent / name


BUNDLED_TASKS = bundled_dir("tasks")


class TaskError(ValueError):
    """A task directory that does not follow the protocol; names the piece."""


class TaskChanged(UserWarning):
    """The task a run names is not the one it ran (the copy in its run directory is used)."""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    root: Path
    spec: dict

    @property
    def description(self) -> str:
        return (self.root / "task.md").read_text(encoding="utf-8")

    @property
    def private_dir(self) -> Path:
        return self.root / "data" / "private"

    @property
    def reward_kind(self) -> str:
        return self.spec.get("reward", "scalar")

    def offered_tools(self) -> dict[str, ToolSpec]:
        """The tools the task offers a harness (task.json ``tools``): siajax's built-ins by name, or
        the task's own (``TOOLS`` functions and ``TOOL_SPECS`` descriptions in its verifier)."""
        from siajax.tools import BUILTIN_TOOLS

        specs = {name: spec for name, (spec, _) in BUILTIN_TOOLS.items()}
        own = getattr(self.verifier, "TOOL_SPECS", {})
        return {name: own[name] if name in own else specs[name] for name in self.spec.get("tools", [])}

    def default_harness(self) -> Harness:
        return from_json((self.root / "harness.json").read_text(encoding="utf-8"))

    @cached_property
    def verifier(self):
        return _load_module(self.root / "verifier.py", f"siajax_task_{self.name}_verifier")

    def has_split(self, split: str) -> bool:
        return split in self.spec["splits"]

    @property
    def leak_key(self) -> str | None:
        """The item field that names what an item asks (e.g. an arithmetic fact, a case's text): no
        value of it may be in two splits, so a dev or test item is never a train item reworded."""
        return self.spec.get("leak_key")

    @property
    def prompt_fields(self) -> frozenset[str]:
        """The item fields a harness template may show the model, never the reference answer
        (``prompt_fields`` in task.json, else the train items' fields but the id and answer fields)."""
        if "prompt_fields" in self.spec:
            return frozenset(self.spec["prompt_fields"])
        return frozenset(self.train_items()[0]) - {"id", *REFERENCE_FIELDS}

    @property
    def min_dev_items(self) -> int:
        return int(self.spec.get("min_dev_items", DEFAULT_MIN_DEV_ITEMS))

    def dev_items(self) -> list[dict]:
        return list(self._roles["dev"])

    def train_items(self) -> list[dict]:
        """Train items the weight lever (and few-shot examples) may use: never a dev or test item."""
        return list(self._roles["train"])

    def items(self, split: str) -> list[dict]:
        """Items of a declared split, after the whole task's splits passed ``check_splits``."""
        self._roles  # noqa: B018 -- the integrity check, once per task
        return list(self._read_split(split))

    @cached_property
    def _roles(self) -> dict[str, list[dict]]:
        """train / dev / test as the levers use them; a task without a dev split has one carved from
        train by a stable hash of each item's leak key (items sharing one stay together)."""
        train = self._read_split("train")
        if self.has_split("dev"):
            roles = {"train": train, "dev": self._read_split("dev")}
        else:
            carved = [_held_out(self._leak_value(item)) for item in train]
            roles = {"train": [i for i, c in zip(train, carved) if not c],
                     "dev": [i for i, c in zip(train, carved) if c]}
        roles["test"] = self._read_split("test") if self.has_split("test") else []
        check_splits(self.name, roles, self.leak_key, self.min_dev_items)
        return roles

    def _leak_value(self, item: dict) -> str:
        return _identity(item, self.leak_key or "id")

    @cached_property
    def loader(self):
        """The task's own item loader (``items_loader`` in task.json), for data that cannot ship
        with the task (e.g. gated datasets the user supplies)."""
        name = self.spec.get("items_loader")
        return None if name is None else _load_module(self.root / name, f"siajax_task_{self.name}_loader")

    @cached_property
    def _stored_splits(self) -> dict[str, tuple[dict, ...]]:
        return {}

    def _read_split(self, split: str) -> tuple[dict, ...]:
        splits = self.spec["splits"]
        if split not in splits:
            raise TaskError(f"task {self.name!r} has no split {split!r}; it has {sorted(splits)}")
        if split not in self._stored_splits:
            self._stored_splits[split] = self._load_split(split)
        return self._stored_splits[split]

    def _load_split(self, split: str) -> tuple[dict, ...]:
        """A split as stored (JSONL, one object per line with an "id" and template slots); a line that
        is not UTF-8, not JSON or not such an object is named by file and line."""
        splits = self.spec["splits"]
        if self.loader is not None:
            try:
                return tuple(self.loader.items(split))
            except Exception as err:  # task code, e.g. gated data the user has not supplied
                raise TaskError(f"task {self.name!r}: its items_loader cannot read split {split!r}: "
                                f"{str(err).splitlines()[0] if str(err) else repr(err)}") from None
        path = self.root / splits[split]
        return tuple(_jsonl_item(path, number, line)
                     for number, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip())


def _jsonl_item(path: Path, number: int, line: bytes) -> dict:
    try:
        item = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise TaskError(f"{path}:{number}: not UTF-8 (byte {err.start} of the line: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}:{number}: not valid JSON ({err})") from None
    if not isinstance(item, dict) or "id" not in item:
        raise TaskError(f"{path}:{number}: an item must be a JSON object with an \"id\"")
    return item


def _identity(item: dict, key: str) -> str:
    if not isinstance(item, dict) or key not in item:
        raise TaskError(f"an item has no {key!r} field: {str(item)[:120]}")
    return json.dumps(item[key], sort_keys=True, ensure_ascii=False)


def check_splits(name: str, roles: dict[str, list[dict]], leak_key: str | None, min_dev_items: int) -> None:
    """Refuses splits that could leak: an id or a leak-key value in two of train / dev / test, a
    repeated id within a split, or a dev split too small to decide on."""
    keys = ["id"] + ([leak_key] if leak_key and leak_key != "id" else [])
    for key in keys:
        values = {role: [_identity(item, key) for item in items] for role, items in roles.items()}
        if key == "id":
            for role, ids in values.items():
                if len(set(ids)) != len(ids):
                    repeated = next(i for i in ids if ids.count(i) > 1)
                    raise TaskError(f"task {name!r}: id {repeated} appears twice in its {role} split")
        for first, second in itertools.combinations(values, 2):
            shared = set(values[first]) & set(values[second])
            if shared:
                raise TaskError(f"task {name!r}: {len(shared)} {key!r} value(s) in both {first} and {second}, "
                                f"e.g. {sorted(shared)[0][:80]}; splits must not leak")
    if len(roles["dev"]) < min_dev_items:
        raise TaskError(f"task {name!r}: its dev split has {len(roles['dev'])} items, fewer than the "
                        f"{min_dev_items} a decision needs; declare a larger dev split in task.json")


def _check_tools(task: Task) -> None:
    """task.json ``tools``: names of siajax's built-in tools, or of the verifier's own (a function in
    ``TOOLS`` and a :class:`ToolSpec` in ``TOOL_SPECS``)."""
    from siajax.tools import BUILTIN_TOOLS

    names = task.spec.get("tools", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TaskError(f"task {task.root.name!r}: task.json 'tools' must be a list of tool names")
    functions, specs = getattr(task.verifier, "TOOLS", {}), getattr(task.verifier, "TOOL_SPECS", {})
    for name in names:
        own = callable(functions.get(name)) and isinstance(specs.get(name), ToolSpec)
        if name not in BUILTIN_TOOLS and not own:
            raise TaskError(f"task {task.root.name!r}: tool {name!r} is neither built in ({sorted(BUILTIN_TOOLS)}) "
                            "nor defined by its verifier (TOOLS function and TOOL_SPECS ToolSpec)")


IMPORT_SECONDS = 30.0  # a task module still importing after this is reported, not waited for


def _load_module(path: Path, name: str):
    """Imports a task's module; any error it raises, or an import still running after
    ``IMPORT_SECONDS`` (left behind), is a one-line TaskError naming the file."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    where = f"{path.parent.name}/{path.name}"
    try:
        call_with_deadline(IMPORT_SECONDS, spec.loader.exec_module, module, name=f"importing {where}")
    except DeadlineExceeded as err:
        raise TaskError(str(err)) from None
    except Exception as err:  # task code: SyntaxError, SystemExit (as RuntimeError), anything
        raise TaskError(f"{where} fails to import: {type(err).__name__}: {(str(err) or '-').splitlines()[0]}") from None
    return module


def _held_out(identity: str, share: float = 0.2) -> bool:
    """Stable across runs and machines: the identity hashed, not Python's salted hash()."""
    digest = hashlib.sha256(f"siajax-dev:{identity}".encode()).digest()
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
    extra = spec.get("failure_kinds", [])
    if not isinstance(extra, list) or not all(isinstance(k, str) and re.fullmatch(r"[a-z_]+", k) for k in extra):
        raise TaskError(f"task {root.name!r}: failure_kinds must be a list of snake_case names, got {extra!r}")
    task = Task(spec.get("name", root.name), root.resolve(), spec)
    try:
        task.default_harness()
    except HarnessError as err:
        raise TaskError(f"task {root.name!r}: harness.json is invalid: {err}") from None
    if not callable(getattr(task.verifier, "score", None)):
        raise TaskError(f"task {root.name!r}: verifier.py must define score(item, answer, text)")
    _check_tools(task)
    if loader is None:
        task.items("train")  # split integrity now; a task that loads its own data checks when first read
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
