"""Harness as versioned data: schema, JSON Patch edits, on-disk history."""

from siajax.harness.jsonpatch import PatchError, apply_patch, make_patch
from siajax.harness.schema import (
    AnswerParser, FewShot, Harness, HarnessError, RetryPolicy, SamplingParams, ToolCallFormat, ToolSpec, from_dict,
    from_json, patch_harness, render_messages, retry_feedback, template_tools, to_dict, to_json, tool_instructions,
    validate,
)
from siajax.harness.store import HarnessStore

__all__ = [
    "AnswerParser", "FewShot", "Harness", "HarnessError", "HarnessStore", "PatchError", "RetryPolicy",
    "SamplingParams", "ToolCallFormat", "ToolSpec", "apply_patch", "from_dict", "from_json", "make_patch",
    "patch_harness", "render_messages", "retry_feedback", "template_tools", "to_dict", "to_json", "tool_instructions",
    "validate",
]
