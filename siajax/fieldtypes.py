"""Settings read from TOML or JSON checked against their dataclass's annotations, so that
``generations = "2"``, ``dev_items = 2.5`` or ``lora_rank = true`` is a one-line error naming the
field before a run writes anything, not a traceback (or a silent rank-1 LoRA) later."""

from __future__ import annotations

import dataclasses
import numbers


def type_problem(type_name: str, value) -> str | None:
    """Why ``value`` does not fit the annotation ``type_name`` (None when it does). Knows the plain
    types, ``X | None`` and homogeneous ``tuple[X, ...]``; any other annotation is left alone."""
    type_name = type_name.strip()
    if type_name.endswith("| None"):
        return None if value is None else type_problem(type_name[:-len("| None")], value)
    if type_name.startswith("tuple[") and type_name.endswith(", ...]"):
        if not isinstance(value, tuple):
            return f"expected a list, got {type(value).__name__} {value!r}"
        problems = (type_problem(type_name[len("tuple["):-len(", ...]")], item) for item in value)
        return next((p for p in problems if p), None)
    if type_name.startswith("tuple[") and type_name.endswith("]"):  # tuple[str, str]: a fixed pair
        parts = [p.strip() for p in type_name[len("tuple["):-1].split(",")]
        if not isinstance(value, tuple) or len(value) != len(parts):
            return f"expected a list of {len(parts)}, got {value!r}"
        return next((p for p in (type_problem(t, v) for t, v in zip(parts, value)) if p), None)
    checks = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool)}
    if type_name in checks and not checks[type_name](value):
        return f"expected {type_name}, got {type(value).__name__} {value!r}"
    return None


def check_field_types(instance, where: str) -> None:
    """ValueError naming the first field of dataclass ``instance`` whose value does not fit its annotation."""
    for field in dataclasses.fields(instance):
        problem = type_problem(str(field.type), getattr(instance, field.name))
        if problem:
            raise ValueError(f"{where}.{field.name}: {problem}")
