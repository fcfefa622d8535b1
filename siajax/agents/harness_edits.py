"""The harness lever's edit library: generic edits any task gets, plus the task's own hints.

Each entry looks at the current harness (and the task) and proposes zero or
more candidate patches. The loop evaluates candidates on dev and keeps one
only when it beats the current harness beyond noise, so no entry has to be
right: the library proposes, the dev set disposes. Entries:

  add_tool              expose a tool the task offers, with a short instruction and one worked call on a train item
  remove_tool           stop exposing a tool (and its instruction and worked calls)
  constrained_decoding  decode only within the parser's label set
  lenient_parser        accept the answer anywhere (drop regex anchors, take the last match)
  format_instruction    tell the model the answer format (from the parser's format_hint)
  few_shot              k worked examples from the train split (needs the task's demonstration())
  retries               answer again after a reply that fails to parse, told why and the format
  self_consistency      majority vote over k samples per item
  temperature           another sampling temperature
  task_hints            the task's own suggested parser pattern / instruction
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING

import numpy as np

from siajax.harness import Harness, HarnessError, patch_harness, render_messages
from siajax.tools import tool_functions

if TYPE_CHECKING:
    from siajax.agents.rules import EditGrid

EDIT_KINDS = ("add_tool", "constrained_decoding", "lenient_parser", "format_instruction", "few_shot", "retries",
              "self_consistency", "temperature", "task_hints", "remove_tool")
FIXABLE_FAILURES = ("parse_error", "invalid_label")


@dataclasses.dataclass(frozen=True)
class Candidate:
    kind: str
    patch: list
    why: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _replace(path: str, value) -> dict:
    return {"op": "replace", "path": path, "value": value}


def _say(harness: Harness, sentence: str) -> dict:
    """The patch op that appends ``sentence`` to the system prompt (:func:`_unsay` takes it back)."""
    return _replace("/system_prompt", (harness.system_prompt + " " + sentence).strip())


def _unsay(harness: Harness, sentence: str) -> dict:
    return _replace("/system_prompt", harness.system_prompt.replace(" " + sentence, "").replace(sentence, "").strip())


def constrained_decoding(harness: Harness, task, grid):
    if harness.parser.labels and not harness.parser.constrained:
        yield Candidate("constrained_decoding", [_replace("/parser/constrained", True)],
                        "decode only within the label set, so every answer names valid labels")


def unanchored(pattern: str) -> str:
    """A regex with its leading ^ / \\A and trailing $ / \\Z anchors removed."""
    return re.sub(r"(\\Z|\$)$", "", re.sub(r"^(\^|\\A)", "", pattern))


def lenient_parser(harness: Harness, task, grid):
    parser = harness.parser
    if parser.kind != "regex" or not parser.pattern:
        return
    loose = unanchored(parser.pattern)
    if loose != parser.pattern or parser.pick != "last":
        yield Candidate("lenient_parser", [_replace("/parser/pattern", loose), _replace("/parser/pick", "last")],
                        "accept the answer anywhere in the reply (last match wins)")


def format_instruction_text(harness: Harness) -> str | None:
    parser = harness.parser
    if parser.format_hint:
        return f"End your reply with your final answer in exactly this form: {parser.format_hint}"
    if parser.labels and len(parser.labels) <= 30:
        return "Answer with one of: " + ", ".join(parser.labels) + "."
    if parser.kind == "json":
        return "Reply with one JSON object."
    return None


def format_instruction(harness: Harness, task, grid):
    text = format_instruction_text(harness)
    if text and text not in harness.system_prompt:
        yield Candidate("format_instruction", [_say(harness, text)],
                        "state the answer format the parser expects")


def item_prompt(harness: Harness, item: dict) -> str:
    """The user turn ``harness`` writes for ``item`` (its filled template): a worked example's input."""
    return render_messages(dataclasses.replace(harness, system_prompt="", few_shot=(), tools=()),
                           **{s: item[s] for s in harness.slots})[-1]["content"]


def few_shot(harness: Harness, task, grid):
    demonstrate = getattr(task.verifier, "demonstration", None)
    if demonstrate is None:
        return
    train = task.train_items()
    for k in grid.few_shot_k:
        if k == len(harness.few_shot) or k > len(train):
            continue
        picks = np.random.default_rng(grid.few_shot_seed + k).choice(len(train), size=k, replace=False)
        shots = []
        for index in sorted(picks):
            item = train[index]
            output = demonstrate(item)
            if output is None:
                continue
            shots.append({"input": item_prompt(harness, item), "output": output})
        if shots:
            yield Candidate("few_shot", [_replace("/few_shot", shots)], f"show {len(shots)} solved train example(s)")


RETRY_FEEDBACK = "That answer could not be read ({failure}). Reply again, ending with your answer as: {format_hint}"


def retries(harness: Harness, task, grid):
    if harness.retry.max_attempts < 2:
        yield Candidate("retries", [_replace("/retry/max_attempts", 2),
                                    _replace("/retry/retry_on", list(FIXABLE_FAILURES)),
                                    _replace("/retry/feedback", RETRY_FEEDBACK)],
                        "after a reply that does not parse, say so and ask again, once")


def worked_call(harness: Harness, task, tool: str, grid) -> dict | None:
    """A few-shot example that calls ``tool`` on one train item (the task's ``tool_arguments``), reads
    the tool's real result and answers (the task's ``demonstration``); None when the task has none."""
    arguments_for = getattr(task.verifier, "tool_arguments", None)
    demonstrate = getattr(task.verifier, "demonstration", None)
    train = task.train_items()
    if arguments_for is None or demonstrate is None or not train:
        return None
    item = train[int(np.random.default_rng(grid.few_shot_seed).integers(len(train)))]
    arguments, output = arguments_for(item, tool), demonstrate(item)
    if arguments is None or output is None:
        return None
    result = tool_functions(task)[tool](**arguments)
    call = json.dumps({"name": tool, "arguments": arguments})
    return {"input": item_prompt(harness, item), "call": f"{harness.tool_call.open}{call}{harness.tool_call.close}",
            "tool_result": str(result), "output": output}


def tool_use_instruction(harness: Harness, task, tool: str) -> str:
    """The system prompt's sentence on when to use ``tool``: the task's own (task.json
    ``harness_hints.tool_instructions``), else a generic one naming the answer format."""
    own = task.spec.get("harness_hints", {}).get("tool_instructions", {}).get(tool)
    if own:
        return own
    hint = harness.parser.format_hint
    return f"Use the {tool} tool when it can help; then give your final answer" + (f" as: {hint}." if hint else ".")


def add_tool(harness: Harness, task, grid):
    exposed = {tool.name for tool in harness.tools}
    for name, spec in task.offered_tools().items():
        if name in exposed:
            continue
        instruction = tool_use_instruction(harness, task, name)
        patch = [{"op": "add", "path": "/tools/-", "value": dataclasses.asdict(spec)},
                 _say(harness, instruction)]
        shot = worked_call(harness, task, name, grid)
        if shot is not None:
            patch.append({"op": "add", "path": "/few_shot/-", "value": shot})
        yield Candidate("add_tool", patch, f"give the model the {name} tool, say when to use it"
                        + (", and show one worked call" if shot else ""))


def remove_tool(harness: Harness, task, grid):
    for index, tool in enumerate(harness.tools):
        marker = json.dumps({"name": tool.name})[:-1]  # '{"name": "<tool>"' opens its calls
        shots = [i for i, shot in enumerate(harness.few_shot) if marker in shot.call]
        patch = [{"op": "remove", "path": f"/few_shot/{i}"} for i in reversed(shots)]
        instruction = tool_use_instruction(harness, task, tool.name)
        if instruction in harness.system_prompt:
            patch.append(_unsay(harness, instruction))
        yield Candidate("remove_tool", patch + [{"op": "remove", "path": f"/tools/{index}"}],
                        f"stop offering the {tool.name} tool")


def self_consistency(harness: Harness, task, grid):
    for votes in grid.vote_counts:
        if votes > harness.sampling.votes and harness.sampling.temperature > 0:
            yield Candidate("self_consistency", [_replace("/sampling/votes", votes)],
                            f"answer by majority over {votes} samples")
            return


def temperature(harness: Harness, task, grid):
    for value in grid.temperatures:
        if abs(value - harness.sampling.temperature) > 1e-9:
            yield Candidate("temperature", [_replace("/sampling/temperature", value)],
                            f"sample at temperature {value}")


def task_hints(harness: Harness, task, grid):
    hints = task.spec.get("harness_hints", {})
    pattern = hints.get("lenient_answer_pattern")
    if harness.parser.kind == "regex" and pattern and harness.parser.pattern != pattern:
        yield Candidate("task_hints", [_replace("/parser/pattern", pattern)], "the task's suggested answer pattern")
    instruction = hints.get("format_instruction")
    if instruction and instruction not in harness.system_prompt:
        yield Candidate("task_hints", [_say(harness, instruction)],
                        "the task's suggested format instruction")


LIBRARY = {"add_tool": add_tool, "remove_tool": remove_tool, "constrained_decoding": constrained_decoding,
           "lenient_parser": lenient_parser,
           "format_instruction": format_instruction, "few_shot": few_shot, "retries": retries,
           "self_consistency": self_consistency, "temperature": temperature, "task_hints": task_hints}


def candidate_edits(harness: Harness, task, grid: EditGrid, tried: set[str] = frozenset()) -> list[Candidate]:
    """Valid candidates in ``grid.edit_order``, skipping any whose result was tried before
    (by harness version) and any that would not validate."""
    out, seen = [], set(tried)
    for kind in grid.edit_order:
        for candidate in LIBRARY[kind](harness, task, grid):
            try:
                version = patch_harness(harness, candidate.patch).version
            except HarnessError:
                continue
            if version not in seen and version != harness.version:
                seen.add(version)
                out.append(candidate)
    return out
