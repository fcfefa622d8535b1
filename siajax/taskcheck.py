"""A task read end to end before anything trusts it: ``siajax tasks --check NAME``, and ``siajax run``
before it writes a file.

Loading a task (:func:`siajax.tasks.load_task`) checks its files, task.json, the
harness and that the verifier imports; this reads every item of every split and
the task's own demonstrations, so what would fail after the model load fails
first, in one line that names the file, the split or the item.
"""

from __future__ import annotations

from siajax.harness.parsing import parse_answer
from siajax.tasks import Task, TaskError, resolve_task
from siajax.verdicts import score_answer

DEMONSTRATIONS_CHECKED = 16  # train items whose demonstration must parse and pass


def task_problems(task: Task) -> list[str]:
    """Every problem found, one line each; empty when the task is sound."""
    try:
        roles = task._roles  # every split read (JSON, UTF-8, ids with file and line), ids unique, splits disjoint
    except TaskError as err:
        return [str(err)]
    problems = [f"task {task.name!r}: its {role} split is empty" for role in ("train", "test")
                if not roles[role] and (role == "train" or task.has_split("test"))]
    problems += _missing_slots(task, roles)
    return problems + _demonstration_problems(task, roles["train"])


def check_task(name_or_path: str) -> list[str]:
    """:func:`task_problems` of a task by name or directory (a task that does not load: its error)."""
    try:
        return task_problems(resolve_task(name_or_path))
    except TaskError as err:
        return [str(err)]


def _missing_slots(task: Task, roles: dict[str, list[dict]]) -> list[str]:
    """The default harness's template slots every item must fill (the first item lacking each)."""
    slots = task.default_harness().slots
    problems = []
    for role, items in roles.items():
        for slot in slots:
            lacking = [item for item in items if slot not in item]
            if lacking:
                problems.append(f"task {task.name!r}: {len(lacking)} {role} item(s) lack the template slot "
                                f"{{{slot}}}, e.g. id {lacking[0].get('id')!r}")
    return problems


def _demonstration_problems(task: Task, train: list[dict]) -> list[str]:
    """The task's ``demonstration(item)`` (what few-shot examples show) must parse with its default
    harness's parser and pass its own verifier: else the harness lever teaches a format that fails."""
    demonstrate = getattr(task.verifier, "demonstration", None)
    if demonstrate is None:
        return []
    parser, problems = task.default_harness().parser, []
    for item in train[:DEMONSTRATIONS_CHECKED]:
        try:
            text = demonstrate(item)
        except Exception as err:  # task code
            return [f"task {task.name!r}: demonstration() raised {err!r} on train item {item['id']!r}"]
        if text is None:
            continue
        answer = parse_answer(parser, text)
        verdict = score_answer(task, item, answer, text)
        if verdict["failure"] is not None or (task.reward_kind == "binary" and verdict["reward"] != 1.0):
            reason = verdict.get("verifier_error") or verdict["failure"] or f"reward {verdict['reward']}"
            problems.append(f"task {task.name!r}: the demonstration of train item {item['id']!r} ({text[:60]!r}) "
                            f"fails its own check: {reason}")
            break
    return problems
