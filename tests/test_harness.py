"""Harness data: canonical versions, schema errors, RFC 6902 patches, store history."""

from __future__ import annotations

import json

import pytest

from siajax.harness import (
    AnswerParser, FewShot, Harness, HarnessError, HarnessStore, PatchError, apply_patch, from_json, make_patch,
    patch_harness, render_messages, to_json,
)

BASE = Harness(
    task="toy", system_prompt="You are careful.", template="Case: {facts}\nAnswer with {fmt}.",
    few_shot=(FewShot("Case: x", "[罪名]盗窃<eoa>"),),
    parser=AnswerParser(kind="label_set", labels=("盗窃", "诈骗")),
)


def test_version_is_a_content_hash_and_json_round_trips():
    assert len(BASE.version) == 12
    again = from_json(to_json(BASE))
    assert again == BASE and again.version == BASE.version
    assert Harness(**{**BASE.__dict__, "notes": "x"}).version != BASE.version
    assert json.loads(to_json(BASE))["few_shot"][0]["output"] == "[罪名]盗窃<eoa>"  # UTF-8 kept


def test_a_field_added_later_leaves_earlier_versions_alone():
    """tool_call.style came after harnesses were saved: at its default it is not in the JSON (so
    their versions stand); set, it is, and round-trips."""
    import dataclasses

    from siajax.harness import ToolCallFormat

    import hashlib

    before = dataclasses.asdict(BASE)  # the schema as it was: every field, tool_call without style
    del before["tool_call"]["style"]
    canonical = json.dumps(json.loads(json.dumps(before)), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12] == BASE.version
    native = dataclasses.replace(BASE, tool_call=ToolCallFormat(style="chat_template"))
    assert json.loads(to_json(native))["tool_call"]["style"] == "chat_template"
    assert from_json(to_json(native)) == native and native.version != BASE.version


def test_rendered_messages_fill_named_slots():
    messages = render_messages(BASE, facts="张三盗窃", fmt="[罪名]X<eoa>")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Case: 张三盗窃\nAnswer with [罪名]X<eoa>."
    with pytest.raises(HarnessError, match="fmt"):
        render_messages(BASE, facts="x")


@pytest.mark.parametrize("bad,message", [
    ('{"task": "t"}', "system_prompt: required"),
    ('not json', "does not parse"),
    ('{"task": "t", "system_prompt": "", "template": "{x}", "sampling": {"temperature": "hot"}}',
     "sampling.temperature: expected float"),
    ('{"task": "t", "system_prompt": "", "template": "{x}", "colour": 1}', "unknown field"),
    ('{"task": "t", "system_prompt": "", "template": "{x", "parser": {}}', "template"),
    ('{"task": "t", "system_prompt": "", "template": "", "parser": {"kind": "regex", "pattern": "("}}', "compile"),
    ('{"task": "t", "system_prompt": "", "template": "", "parser": {"kind": "label_set"}}', "labels"),
    ('{"task": "t", "system_prompt": "", "template": "", "retry": {"retry_on": ["bad_luck"]}}', "failure kinds"),
    ('{"task": "t", "system_prompt": "", "template": "", "retry": {"feedback": "{answer} is wrong"}}',
     "retry.feedback may use only"),
    ('{"task": "t", "system_prompt": "", "template": "", "retry": {"train": "some"}}', "retry.train"),
    ('{"task": "t", "system_prompt": "", "template": "", "tool_call": {"open": ""}}', "tool_call.open"),
    ('{"task": "t", "system_prompt": "", "template": "", "tool_call": {"style": "xml"}}', "tool_call.style"),
])
def test_malformed_harness_json_names_the_problem(bad, message):
    with pytest.raises(HarnessError, match=message):
        from_json(bad)


def test_rfc6902_examples():
    doc = {"foo": ["bar", "baz"], "a/b": 1, "m~n": 2}
    assert apply_patch(doc, [{"op": "add", "path": "/foo/1", "value": "qux"}])["foo"] == ["bar", "qux", "baz"]
    assert apply_patch(doc, [{"op": "add", "path": "/foo/-", "value": "end"}])["foo"][-1] == "end"
    assert apply_patch(doc, [{"op": "remove", "path": "/foo/0"}])["foo"] == ["baz"]
    assert apply_patch(doc, [{"op": "replace", "path": "/a~1b", "value": 5}])["a/b"] == 5
    assert apply_patch(doc, [{"op": "move", "from": "/m~0n", "path": "/moved"}]) == {
        "foo": ["bar", "baz"], "a/b": 1, "moved": 2}
    assert apply_patch(doc, [{"op": "copy", "from": "/foo/1", "path": "/foo/0"}])["foo"] == ["baz", "bar", "baz"]
    assert doc == {"foo": ["bar", "baz"], "a/b": 1, "m~n": 2}  # input untouched
    for bad, reason in [
        ([{"op": "test", "path": "/a~1b", "value": 2}], "test failed"),
        ([{"op": "remove", "path": "/nope"}], "does not exist"),
        ([{"op": "add", "path": "/foo/9", "value": 1}], "out of range"),
        ([{"op": "frobnicate", "path": "/foo"}], "unknown op"),
        ([{"op": "add", "path": "foo", "value": 1}], "must start with"),
        ({"op": "add"}, "list of operations"),
    ]:
        with pytest.raises(PatchError, match=reason):
            apply_patch(doc, bad)


def test_make_patch_takes_source_to_target():
    source = {"a": 1, "b": {"c": [1, 2]}, "gone": True}
    target = {"a": 2, "b": {"c": [1, 2, 3], "d": "x"}, "new": None}
    assert apply_patch(source, make_patch(source, target)) == target
    assert make_patch(target, target) == []


def test_invalid_patch_is_rejected_with_reason_and_changes_nothing(tmp_path):
    store = HarnessStore(tmp_path)
    v0 = store.put(BASE, reason="meta-agent")
    with pytest.raises(HarnessError, match="temperature"):
        store.apply([{"op": "replace", "path": "/sampling/temperature", "value": -1.0}])
    with pytest.raises(HarnessError, match="patch rejected"):
        store.apply([{"op": "remove", "path": "/no_such_field"}])
    assert store.head == v0


def test_store_history_diff_and_rollback(tmp_path):
    store = HarnessStore(tmp_path)
    v0 = store.put(BASE)
    patch = [{"op": "replace", "path": "/sampling/temperature", "value": 0.2}]
    v1 = store.apply(patch, reason="too random")
    v2 = store.apply([{"op": "add", "path": "/few_shot/-", "value": {"input": "q", "output": "a"}}])
    assert [r["version"] for r in store.history()] == [v0, v1, v2]
    assert store.history()[1]["patch"] == patch and store.history()[1]["reason"] == "too random"
    assert apply_patch(json.loads(to_json(store.get(v0))), store.diff(v0, v2)) == json.loads(to_json(store.get(v2)))
    assert store.rollback(v1).sampling.temperature == 0.2
    assert store.head == v1 and HarnessStore(tmp_path).get() == patch_harness(BASE, patch)
    with pytest.raises(KeyError, match="not in"):
        store.rollback("deadbeef0000")
