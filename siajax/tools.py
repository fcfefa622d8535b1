"""Tools inside an episode: finding a call in a reply, the built-in tools, and running a round of calls.

A harness exposes tools (``Harness.tools``, data); their implementations come
from the built-ins here (``calculator``, ``python``) or from the task's verifier
module (``TOOLS``: name -> function). A task lists the tools it offers the
harness lever in task.json (``"tools"``). Every outcome is a tool-result
message, never an exception: a malformed call, an unknown tool, arguments the
tool's schema does not name, a tool that raises or runs out of time each
becomes an ``error`` result, counted by kind (:data:`TOOL_FAILURES`).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from siajax import timing
from siajax.harness import Harness, ToolCallFormat, ToolSpec

TOOL_FAILURES = ("malformed_call", "unknown_tool", "bad_arguments", "tool_error", "tool_timeout")
ILL_FORMED = ("malformed_call", "unknown_tool", "bad_arguments")  # the call itself was wrong, not the tool
RESULT_CHARS = 2000  # a tool result longer than this is cut (the policy's context is the limit)


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """One call and what came back: ``result`` (text) or ``failure`` (a kind of TOOL_FAILURES) with ``error``."""

    name: str | None
    arguments: object
    result: str | None = None
    failure: str | None = None
    error: str = ""

    def record(self) -> dict:
        out = {"name": self.name, "arguments": self.arguments}
        return {**out, "result": self.result} if self.failure is None else {
            **out, "failure": self.failure, "error": self.error}

    def message(self) -> dict:
        """The tool turn the policy reads next."""
        content = self.result if self.failure is None else f"error: {self.error}"
        return {"role": "tool", "content": content}


def find_call(fmt: ToolCallFormat, text: str) -> dict | ToolOutcome | None:
    """The first call in ``text``: {"name", "arguments"}; a ToolOutcome when it is malformed; None
    when the reply calls nothing."""
    start = text.find(fmt.open)
    if start < 0:
        return None
    end = text.find(fmt.close, start + len(fmt.open))
    body = text[start + len(fmt.open):] if end < 0 else text[start + len(fmt.open):end]
    try:
        call = json.loads(body)
        name, arguments = call["name"], call.get("arguments", {})
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise TypeError("name must be a string and arguments an object")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        return ToolOutcome(None, None, failure="malformed_call", error=f"malformed tool call: {err}")
    return {"name": name, "arguments": arguments}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_MAGNITUDE = 10 ** 30  # operands and results beyond this are refused (no 9 ** 9 ** 9 in the host process)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) * math.log2(max(abs(left), 2)) > 100:
            raise ValueError("exponent too large")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    else:
        raise ValueError(f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("number too large")
    return value


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression (parsed, never ``eval``): integers stay exact."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be a string of at most 200 characters")
    value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Runs ``code`` in :mod:`siajax.sandbox` (10 s, 64 KiB of output); -> its stdout, or the error."""
    from siajax.sandbox import SandboxLimits, run_sandboxed

    if not isinstance(code, str):
        raise ValueError("code must be a string")
    source = f"{code}\n\ndef _siajax_tool_entry():\n    return None\n"
    result = run_sandboxed(source, entry="_siajax_tool_entry",
                           limits=SandboxLimits(wall_seconds=10.0, cpu_seconds=10, output_bytes=64 << 10))
    if result.status == "timeout":
        raise TimeoutError("the code ran past 10 s")
    if not result.ok:
        raise RuntimeError((result.error.strip().splitlines() or [result.status])[-1])
    return result.stdout


BUILTIN_TOOLS: dict[str, tuple[ToolSpec, Callable]] = {
    "calculator": (ToolSpec("calculator", "Evaluates an arithmetic expression exactly, e.g. \"(12 + 7) * 31\".",
                            {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}), calculator),
    "python": (ToolSpec("python", "Runs Python code in a sandbox and returns what it prints.",
                        {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}), python),
}


def tool_functions(task) -> dict[str, Callable]:
    """Every implementation a harness of ``task`` may call: the built-ins, then the task's own TOOLS."""
    return {**{name: fn for name, (_, fn) in BUILTIN_TOOLS.items()}, **getattr(task.verifier, "TOOLS", {})}


def argument_problem(spec: ToolSpec, arguments: dict) -> str | None:
    """Why ``arguments`` do not fit the spec's schema (unknown or missing names); None when they do."""
    known = set(spec.parameters.get("properties", {}))
    unknown = set(arguments) - known if known else set()
    missing = set(spec.parameters.get("required", [])) - set(arguments)
    if unknown or missing:
        return (f"{spec.name} takes {sorted(known)}" + (f"; unknown {sorted(unknown)}" if unknown else "")
                + (f"; missing {sorted(missing)}" if missing else ""))
    return None


def _run_one(functions: dict[str, Callable], exposed: dict[str, ToolSpec], call: dict) -> ToolOutcome:
    name, arguments = call["name"], call["arguments"]
    if name not in exposed or name not in functions:
        return ToolOutcome(name, arguments, failure="unknown_tool", error=f"unknown tool {name!r}")
    problem = argument_problem(exposed[name], arguments)
    if problem:
        return ToolOutcome(name, arguments, failure="bad_arguments", error=problem)
    try:
        result = functions[name](**arguments)
    except TimeoutError as err:
        return ToolOutcome(name, arguments, failure="tool_timeout", error=f"{type(err).__name__}: {err}")
    except Exception as err:  # a failing tool is the policy's problem to handle, not a crash
        return ToolOutcome(name, arguments, failure="tool_error", error=f"{type(err).__name__}: {err}"[:RESULT_CHARS])
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return ToolOutcome(name, arguments, result=text[:RESULT_CHARS])


def run_calls(task, harness: Harness, calls: list[dict], max_workers: int = 8) -> list[ToolOutcome]:
    """A round's calls (from every live episode), run together: in threads, as the python tool's
    sandboxes are processes."""
    functions, exposed = tool_functions(task), {tool.name: tool for tool in harness.tools}
    if not calls:
        return []
    with timing.phase("verify"), ThreadPoolExecutor(max_workers=min(max_workers, len(calls))) as pool:
        return list(pool.map(lambda call: _run_one(functions, exposed, call), calls))
