"""The harness: everything about how the policy is asked, as frozen, versioned data.

A harness serialises to canonical JSON (sorted keys, no spaces, UTF-8); its
version is the first 12 hex digits of that JSON's SHA-256, so equal content
means equal version. Edits are JSON Patches validated by rebuilding the harness.
A field added to the schema later is marked :data:`ADDED`: left out of the JSON
while at its default, so the harnesses saved before it keep their versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import string
from typing import Any

from siajax.harness.jsonpatch import PatchError, apply_patch

PARSER_KINDS = ("raw", "regex", "json", "label_set")
PICKS = ("first", "last")
FAILURE_KINDS = ("parse_error", "invalid_label", "wrong_answer", "compile_error", "wrong_result", "timeout",
                 "crash", "oom", "forbidden", "wrong_shape", "negative_or_nan", "tool_error", "cheat", "wrong_label",
                 "verifier_error", "needs_gpu")


class HarnessError(ValueError):
    """A harness document that does not fit the schema; the message names the field."""


ADDED = {"omit_at_default": True}  # field metadata: a later field, absent from the JSON at its default


@dataclasses.dataclass(frozen=True)
class FewShot:
    """A worked example: the user's ``input`` and the final reply ``output``; with ``call`` (a tool
    call in the harness's format) the example first calls the tool and reads ``tool_result``."""

    input: str
    output: str
    call: str = ""
    tool_result: str = ""


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A tool the policy may call: name, description and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict = dataclasses.field(default_factory=lambda: {"type": "object", "properties": {}})


TRAIN_TURNS = ("all", "final_attempt")
TOOL_STYLES = ("siajax", "chat_template")
FEEDBACK_SLOTS = ("failure", "format_hint")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries are turns of the same episode: an answer that fails with a kind in ``retry_on`` is
    followed by ``feedback`` as a user turn ({failure} and {format_hint} filled in), up to
    ``max_attempts`` answers. ``train``: "all" trains every model turn of an episode,
    "final_attempt" only the turns of its last answer (earlier ones stay as context)."""

    max_attempts: int = 1
    retry_on: tuple[str, ...] = ("parse_error",)
    feedback: str = "That answer could not be used ({failure}). Answer again."
    train: str = "all"


@dataclasses.dataclass(frozen=True)
class ToolCallFormat:
    """How a reply calls a tool: ``open``, a JSON object {"name": ..., "arguments": {...}}, ``close``;
    at most ``max_rounds`` calls are answered per episode (then the reply is taken as the answer).

    ``style`` says who tells the policy about its tools: "siajax" writes a tool section into the
    system prompt (:func:`tool_instructions`); "chat_template" hands the specs to the model's own
    chat template (its ``tools`` argument), for models trained on a tool format of their own, such
    as Qwen2.5's ``<tool_call>{json}</tool_call>`` (set ``open``/``close`` to what it writes)."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    max_rounds: int = 3
    style: str = dataclasses.field(default="siajax", metadata=ADDED)


@dataclasses.dataclass(frozen=True)
class AnswerParser:
    """How an answer is read from a sample.

    kind="regex": the ``pick``-th ("first" or "last") match of ``pattern``
    (group 1 if present); "json": the first JSON object in the text;
    "label_set": the labels found (whole-label match, longest first); "raw":
    the stripped text. ``constrained`` asks the sampler to decode only
    ``answer_prefix label (label_separator label)* answer_suffix`` with labels
    from ``labels`` (a trie over their tokens). ``format_hint`` shows what a
    well-formed answer looks like (e.g. "Answer: 42"); a format instruction is
    written from it.
    """

    kind: str = "raw"
    pattern: str | None = None
    labels: tuple[str, ...] = ()
    constrained: bool = False
    answer_prefix: str = ""
    label_separator: str = ""
    answer_suffix: str = ""
    pick: str = "first"
    format_hint: str = ""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding. ``samples_per_prompt``: the group size of the weight lever's rollouts;
    ``votes``: samples per item at evaluation, answered by majority (self-consistency)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    votes: int = 1


@dataclasses.dataclass(frozen=True)
class Harness:
    """System prompt, template with named ``{slots}``, examples, tools, retries, parser, sampling."""

    task: str
    system_prompt: str
    template: str
    few_shot: tuple[FewShot, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_call: ToolCallFormat = ToolCallFormat()
    retry: RetryPolicy = RetryPolicy()
    parser: AnswerParser = AnswerParser()
    sampling: SamplingParams = SamplingParams()
    notes: str = ""

    @property
    def slots(self) -> tuple[str, ...]:
        return template_slots(self.template)

    @property
    def max_turns(self) -> int:
        """The most replies one episode can draw: every answer retried, every tool round used."""
        return self.retry.max_attempts + (self.tool_call.max_rounds if self.tools else 0)

    @property
    def version(self) -> str:
        return hashlib.sha256(to_json(self).encode("utf-8")).hexdigest()[:12]


def template_slots(template: str) -> tuple[str, ...]:
    """Named fields of a ``str.format`` template, in order of first use."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise HarnessError(f"template is not a valid format string: {err}") from None
    if any(not re.fullmatch(r"[A-Za-z_]\w*", name) for name in fields):
        raise HarnessError(f"template slots must be plain names like {{question}}, got {fields}")
    return tuple(dict.fromkeys(fields))


def _plain(value):
    """Dataclasses as dicts (fields marked ADDED left out at their default), tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_at_default") and getattr(value, f.name) == f.default)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(harness: Harness) -> dict:
    return json.loads(json.dumps(_plain(harness)))


def to_json(harness: Harness) -> str:
    """Canonical JSON: the bytes that define the version."""
    return json.dumps(to_dict(harness), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _build(cls, data: Any, where: str):
    """Rebuilds dataclass ``cls`` from JSON data, checking names and types field by field."""
    if not isinstance(data, dict):
        raise HarnessError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise HarnessError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise HarnessError(f"{where}.{name}: required field is missing")
            continue
        kwargs[name] = _convert(field.type, data[name], f"{where}.{name}")
    return cls(**kwargs)


_NESTED = {"FewShot": FewShot, "ToolSpec": ToolSpec, "RetryPolicy": RetryPolicy, "AnswerParser": AnswerParser,
           "SamplingParams": SamplingParams, "ToolCallFormat": ToolCallFormat}


def _convert(type_name: str, value: Any, where: str):
    type_name = str(type_name)
    for name, cls in _NESTED.items():
        if type_name == name:
            return _build(cls, value, where)
        if type_name == f"tuple[{name}, ...]":
            if not isinstance(value, list):
                raise HarnessError(f"{where}: expected a list, got {type(value).__name__}")
            return tuple(_build(cls, item, f"{where}[{i}]") for i, item in enumerate(value))
    if type_name == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HarnessError(f"{where}: expected a list of strings")
        return tuple(value)
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict,
                "str | None": (str, type(None))}[type_name]
    if isinstance(value, bool) and type_name in ("int", "float"):
        raise HarnessError(f"{where}: expected {type_name}, got bool")
    if not isinstance(value, expected):
        raise HarnessError(f"{where}: expected {type_name}, got {type(value).__name__}")
    return float(value) if type_name == "float" else value


def validate(harness: Harness) -> Harness:
    """Checks values the types cannot: ranges, parser consistency, slots, tool names."""
    s, p = harness.sampling, harness.parser
    problems = []
    if not 0.0 <= s.temperature <= 5.0:
        problems.append(f"sampling.temperature {s.temperature} not in [0, 5]")
    if not 0.0 < s.top_p <= 1.0:
        problems.append(f"sampling.top_p {s.top_p} not in (0, 1]")
    if s.top_k < 0 or s.samples_per_prompt < 1 or s.max_new_tokens < 1 or s.votes < 1:
        problems.append("sampling.top_k >= 0, samples_per_prompt >= 1, max_new_tokens >= 1 and votes >= 1 "
                        "are required")
    if s.votes > 1 and s.temperature <= 0:
        problems.append("sampling.votes > 1 needs temperature > 0 (greedy samples all agree)")
    if p.pick not in PICKS:
        problems.append(f"parser.pick {p.pick!r} not in {PICKS}")
    if p.kind not in PARSER_KINDS:
        problems.append(f"parser.kind {p.kind!r} not in {PARSER_KINDS}")
    if p.kind == "regex":
        try:
            re.compile(p.pattern or "")
        except re.error as err:
            problems.append(f"parser.pattern does not compile: {err}")
        if not p.pattern:
            problems.append("parser.kind 'regex' needs parser.pattern")
    if (p.kind == "label_set" or p.constrained) and not p.labels:
        problems.append("parser.labels must be non-empty for label_set parsing or constrained decoding")
    if harness.retry.max_attempts < 1:
        problems.append("retry.max_attempts must be >= 1")
    unknown_failures = set(harness.retry.retry_on) - set(FAILURE_KINDS)
    if unknown_failures:
        problems.append(f"retry.retry_on has unknown failure kinds {sorted(unknown_failures)}")
    if harness.retry.train not in TRAIN_TURNS:
        problems.append(f"retry.train {harness.retry.train!r} not in {TRAIN_TURNS}")
    try:
        unknown_slots = set(template_slots(harness.retry.feedback)) - set(FEEDBACK_SLOTS)
    except HarnessError as err:
        unknown_slots = {str(err)}
    if unknown_slots:
        problems.append(f"retry.feedback may use only {{failure}} and {{format_hint}}, got {sorted(unknown_slots)}")
    if not harness.tool_call.open or not harness.tool_call.close or harness.tool_call.max_rounds < 0:
        problems.append("tool_call.open and tool_call.close must be non-empty and tool_call.max_rounds >= 0")
    if harness.tool_call.style not in TOOL_STYLES:
        problems.append(f"tool_call.style {harness.tool_call.style!r} not in {TOOL_STYLES}")
    names = [t.name for t in harness.tools]
    if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z_][\w-]*", n) for n in names):
        problems.append(f"tool names must be unique identifiers, got {names}")
    template_slots(harness.template)
    if problems:
        raise HarnessError("; ".join(problems))
    return harness


def from_dict(data: Any) -> Harness:
    return validate(_build(Harness, data, "harness"))


def from_json(text: str) -> Harness:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise HarnessError(f"harness JSON does not parse: {err}") from None
    return from_dict(data)


def patch_harness(harness: Harness, patch: list[dict]) -> Harness:
    """Applies an RFC 6902 patch and validates the result; raises HarnessError with the reason."""
    try:
        return from_dict(apply_patch(to_dict(harness), patch))
    except PatchError as err:
        raise HarnessError(f"patch rejected: {err}") from None


def render_messages(harness: Harness, **slots: str) -> list[dict]:
    """Chat messages: system prompt, few-shot turns, then the filled template."""
    missing = set(harness.slots) - set(slots)
    if missing:
        raise HarnessError(f"template needs slot(s) {sorted(missing)}")
    system = "\n\n".join(part for part in (harness.system_prompt, tool_instructions(harness)) if part)
    messages = [{"role": "system", "content": system}] if system else []
    for shot in harness.few_shot:
        messages.append({"role": "user", "content": shot.input})
        if shot.call:
            messages += [{"role": "assistant", "content": shot.call}, {"role": "tool", "content": shot.tool_result}]
        messages.append({"role": "assistant", "content": shot.output})
    messages.append({"role": "user", "content": harness.template.format(**slots)})
    return messages


def tool_instructions(harness: Harness) -> str:
    """The system prompt's tool section ("" without tools): the call format, then each tool with its
    description and a call to copy (its arguments as typed placeholders, valid JSON)."""
    if not harness.tools or harness.tool_call.style == "chat_template":
        return ""
    fmt = harness.tool_call
    lines = [f"You can call tools. To call one, reply with only {fmt.open}<JSON: the tool's name and arguments>"
             f"{fmt.close}; its result comes back in the next message. Tools:"]
    for tool in harness.tools:
        arguments = {name: f"<{spec.get('type', 'value') if isinstance(spec, dict) else 'value'}>"
                     for name, spec in tool.parameters.get("properties", {}).items()}
        call = json.dumps({"name": tool.name, "arguments": arguments})
        lines.append(f"- {tool.name}: {tool.description} Call: {fmt.open}{call}{fmt.close}")
    return "\n".join(lines)


def template_tools(harness: Harness) -> list[dict] | None:
    """The exposed tools in the chat templates' ``tools`` format (OpenAI function specs) when the
    harness has the template render them (``tool_call.style == "chat_template"``); else None."""
    if not harness.tools or harness.tool_call.style != "chat_template":
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in harness.tools]


def retry_feedback(harness: Harness, failure: str) -> str:
    """The user turn that asks for another attempt after an answer failed with ``failure``."""
    hint = harness.parser.format_hint
    return harness.retry.feedback.format(failure=failure.replace("_", " "),
                                         format_hint=hint or "the requested format")
