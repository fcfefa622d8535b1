"""Reading an answer out of a sample, as the harness's parser says."""

from __future__ import annotations

import json
import re

from siajax.harness.schema import AnswerParser


def parse_answer(parser: AnswerParser, text: str):
    """-> the parsed answer, or None when the text holds none (a ``parse_error``).

    regex: group 1 of the first (or, with pick="last", the last) match (the whole
    match without groups);
    json: the first decodable JSON object; label_set: the labels present as whole
    labels, longest first so a label inside a longer one is not double counted;
    raw: the stripped text (None if empty).
    """
    if parser.kind == "raw":
        return text.strip() or None
    if parser.kind == "regex":
        matches = list(re.finditer(parser.pattern, text, flags=re.DOTALL))
        if not matches:
            return None
        match = matches[0] if parser.pick == "first" else matches[-1]
        return match.group(1) if match.groups() else match.group(0)
    if parser.kind == "json":
        return first_json_object(text)
    if parser.kind == "label_set":
        found, remaining = [], text
        for label in sorted(parser.labels, key=len, reverse=True):
            if label in remaining:
                found.append(label)
                remaining = remaining.replace(label, "\0")
        return found or None
    raise ValueError(f"unknown parser kind {parser.kind!r}")


def first_json_object(text: str) -> dict | None:
    """The first decodable JSON object in ``text`` (prose around it allowed); None when there is none."""
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            return decoder.raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    return None
