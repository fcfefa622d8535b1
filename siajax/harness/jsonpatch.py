"""RFC 6902 JSON Patch on plain JSON values (dicts, lists, scalars), and a differ.

Applying never mutates its input. Errors are :class:`PatchError` with the op
index and the reason, so the caller can log and reject a bad edit.
"""

from __future__ import annotations

import copy
from typing import Any

OPS = ("add", "remove", "replace", "move", "copy", "test")


class PatchError(ValueError):
    """A patch that cannot be applied; the message says which op and why."""


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _escape(part) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def _list_index(container: list, token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"{token!r} is not a list index")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise PatchError(f"list index {index} out of range (length {len(container)})")
    return index


def _parent(doc, parts: list[str]):
    node = doc
    for token in parts[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path segment {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, allow_end=False)]
        else:
            raise PatchError(f"cannot descend into a {type(node).__name__} at {token!r}")
    return node


def _existing(doc, parts: list[str], path: str):
    """(container, key or index) of a value that must exist at ``parts``."""
    parent, token = _parent(doc, parts), parts[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchError(f"{path} does not exist")
        return parent, token
    if isinstance(parent, list):
        return parent, _list_index(parent, token, allow_end=False)
    raise PatchError(f"{path} does not exist")


def _get(doc, path: str):
    parts = _pointer(path)
    if not parts:
        return doc
    container, key = _existing(doc, parts, path)
    return container[key]


def _add(doc, path: str, value):
    parts = _pointer(path)
    if not parts:
        return value
    parent, token = _parent(doc, parts), parts[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, token, allow_end=True), value)
    else:
        raise PatchError(f"cannot add under a {type(parent).__name__}")
    return doc


def _remove(doc, path: str):
    parts = _pointer(path)
    if not parts:
        raise PatchError("cannot remove the whole document")
    container, key = _existing(doc, parts, path)
    del container[key]
    return doc


def _apply_op(doc, op: dict):
    kind = op.get("op")
    if kind not in OPS:
        raise PatchError(f"unknown op {kind!r}; use one of {OPS}")
    if "path" not in op:
        raise PatchError("missing 'path'")
    path = op["path"]
    if kind in ("add", "replace", "test") and "value" not in op:
        raise PatchError(f"'{kind}' needs a 'value'")
    if kind == "add":
        return _add(doc, path, copy.deepcopy(op["value"]))
    if kind == "remove":
        return _remove(doc, path)
    if kind == "replace":
        _get(doc, path)
        return _add(_remove(doc, path), path, copy.deepcopy(op["value"])) if _pointer(path) else op["value"]
    if kind == "test":
        if _get(doc, path) != op["value"]:
            raise PatchError(f"test failed at {path}")
        return doc
    if "from" not in op:
        raise PatchError(f"'{kind}' needs a 'from'")
    value = copy.deepcopy(_get(doc, op["from"]))
    if kind == "move":
        if path.startswith(op["from"] + "/"):
            raise PatchError("cannot move a value into its own child")
        doc = _remove(doc, op["from"])
    return _add(doc, path, value)


def apply_patch(doc: Any, patch: list[dict]) -> Any:
    """Returns a patched deep copy of ``doc``; raises PatchError naming the failing op."""
    if not isinstance(patch, list):
        raise PatchError(f"a patch is a list of operations, got {type(patch).__name__}")
    result = copy.deepcopy(doc)
    for index, op in enumerate(patch):
        if not isinstance(op, dict):
            raise PatchError(f"op {index}: expected an object, got {type(op).__name__}")
        try:
            result = _apply_op(result, op)
        except PatchError as err:
            raise PatchError(f"op {index} ({op.get('op')} {op.get('path')}): {err}") from None
    return result


def make_patch(source: Any, target: Any, path: str = "") -> list[dict]:
    """A patch that turns ``source`` into ``target`` (replace for changed lists)."""
    if isinstance(source, dict) and isinstance(target, dict):
        ops = []
        for key in sorted(source):
            if key not in target:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key in sorted(target):
            child = f"{path}/{_escape(key)}"
            if key not in source:
                ops.append({"op": "add", "path": child, "value": target[key]})
            else:
                ops += make_patch(source[key], target[key], child)
        return ops
    if source == target and type(source) is type(target):
        return []
    return [{"op": "replace", "path": path, "value": target}]
