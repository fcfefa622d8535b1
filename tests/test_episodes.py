"""Multi-turn episodes with the tiny local policy: batched turns, exact token sequences, training rows
whose environment tokens are context only, and the built-in tools."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siajax.agents import LocalPolicyBackend, run_items
from siajax.agents.episodes import MODEL
from siajax.tools import calculator, find_call, python
from siajax.harness import ToolCallFormat, ToolSpec, patch_harness
from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.rl import RLBatch, get_recipe, recipe_config
from siajax.rl.losses import PolicyOutputs
from siajax.sampling import generate
from siajax.tasks import resolve_task
from siajax.train.rollouts import make_learner


class CountingBackend(LocalPolicyBackend):
    """The tiny policy, recording the rows of every sampler call."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def sample_ids(self, prompts, sampling, key, parser=None):
        self.calls.append(len(prompts))
        return super().sample_ids(prompts, sampling, key, parser)


@pytest.fixture(scope="module")
def backend():
    return CountingBackend(*from_pretrained(BUNDLED_TINY_MODEL))


def tool_harness(task, *, rounds=2, samples=4, train="all"):
    """A harness whose tool-call marker ("e") the random tiny model writes in most replies: such a
    reply is a (malformed) call, answered by an error result, so episodes run several turns."""
    harness = patch_harness(task.default_harness(), [
        {"op": "replace", "path": "/sampling", "value": {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                         "samples_per_prompt": samples, "max_new_tokens": 8,
                                                         "votes": 1}},
        {"op": "replace", "path": "/retry/train", "value": train}])
    import dataclasses
    return dataclasses.replace(harness, tools=(ToolSpec("calculator", "arithmetic"),),
                               tool_call=ToolCallFormat(open="e", close="!", max_rounds=rounds))


def test_each_turn_of_every_live_episode_is_one_sampler_call(backend):
    from siajax.budget import evaluation_cost

    task = resolve_task("digits")
    backend.calls.clear()
    harness = tool_harness(task)
    rollout = run_items(task, harness, backend, task.items("train")[:4], jax.random.key(0))
    turns = [r["turns"] for r in rollout.records]
    assert max(turns) == harness.max_turns == 3 and min(turns) < 3, turns  # some called twice, some answered early
    assert rollout.replies <= evaluation_cost(harness, 4 * 4)  # the budget's worst case bounds what was drawn
    # 16 episodes x up to 3 turns: one call per turn, each over the episodes still running
    assert backend.calls == [sum(t > turn for t in turns) for turn in range(3)]
    assert rollout.replies == sum(turns) and all(r["tool_calls"] for r in rollout.records if r["turns"] > 1)
    for record in rollout.records:  # turns alternate model / environment, ending with the model's answer
        roles = [s["role"] for s in record["segments"]]
        assert roles == [MODEL, "tool"] * (record["turns"] - 1) + [MODEL]


def test_environment_tokens_are_what_the_chat_template_puts_between_turns(backend):
    """A model turn's ids plus continuation_ids(message) are exactly the chat template's rendering of
    the conversation with that message added, whether the model wrote its stop token or was cut off."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    reply = backend.tokenizer.encode("Let me check.", add_special_tokens=False)
    stop = list(backend.decoding.stop_token_ids[:1])
    for message in ({"role": "tool", "content": "5"}, {"role": "user", "content": "Answer again."}):
        whole = backend.prompt_ids(conversation + [{"role": "assistant", "content": "Let me check."}, message])
        start = backend.prompt_ids(conversation)
        assert start + reply + stop + backend.continuation_ids(message, stopped=True) == whole
        assert start + reply + backend.continuation_ids(message, stopped=False) == whole


def test_episode_context_is_its_prompt_and_segments(backend):
    task = resolve_task("digits")
    rollout = run_items(task, tool_harness(task, samples=2), backend, task.items("train")[:3], jax.random.key(1))
    rows = rollout.training_rows(backend.decoding.pad_token_id)
    tokens, mask, prompts, prompt_mask = (np.asarray(a) for a in (rows.tokens, rows.mask, rows.prompt_tokens,
                                                                  rows.prompt_mask))
    for row, episode in enumerate(rollout.episodes):
        assert list(prompts[row][prompt_mask[row]]) + list(tokens[row][mask[row]]) == episode.context_ids()
        assert episode.context_ids()[:len(episode.prompt_ids)] == backend.prompt_ids(episode.messages)


@pytest.mark.parametrize("train", ["all", "final_attempt"])
def test_training_rows_score_every_model_token_as_the_sampler_did(backend, train):
    """logprob_mismatch over all model tokens of multi-turn episodes (tool turns and retries) <= 1e-4:
    the learner scores each turn in the very context it was sampled in."""
    task = resolve_task("digits")
    harness = patch_harness(tool_harness(task, rounds=1, train=train), [
        {"op": "replace", "path": "/retry", "value": {"max_attempts": 2, "retry_on": ["parse_error"],
                                                      "feedback": "Reply with digits only.", "train": train}}])
    model, tokenizer = from_pretrained(BUNDLED_TINY_MODEL)
    learner, state, frozen = make_learner(model, "ppo_gae", seed=0)  # a recipe that scores the old policy
    policy_backend = LocalPolicyBackend(learner.policy(state, frozen), tokenizer)
    rollout = run_items(task, harness, policy_backend, task.items("train")[:4], jax.random.key(2))
    rows = rollout.training_rows(policy_backend.decoding.pad_token_id)
    mask, policy = np.asarray(rows.mask), np.asarray(rows.policy_mask)
    assert (policy <= mask).all() and (policy < mask).any()  # environment tokens are in the rows, not trained
    retried = [row for row, e in enumerate(rollout.episodes) if len(e.verdicts) == 2]
    assert retried
    for row in retried:
        episode = rollout.episodes[row]
        first_answer = sum(len(s.token_ids) for s in episode.segments if s.role == MODEL and s.attempt == 1)
        model_tokens = sum(len(s.token_ids) for s in episode.segments if s.role == MODEL)
        assert policy[row].sum() == (model_tokens if train == "all" else model_tokens - first_answer)
    rewards = np.asarray([1.0, 0.0, 0.0, 1.0] * 4, np.float32)
    _, metrics = learner.make_batch(state, frozen, rows, rewards, group_size=4)
    assert float(metrics["logprob_mismatch"]) <= 1e-4


@pytest.mark.parametrize("recipe", ["grpo", "ppo_gae", "entropic"])
def test_the_loss_does_not_depend_on_environment_tokens(recipe):
    """The gradient of each recipe's loss with respect to the log-probs, entropies and values at
    environment positions is exactly zero."""
    rng = np.random.RandomState(0)
    policy = rng.rand(4, 12) < 0.6
    policy[:, 0] = True
    rl = RLBatch(mask=jnp.asarray(policy), old_logprobs=jnp.float32(-rng.rand(4, 12)),
                 advantages=jnp.float32(rng.randn(4, 12) * policy), ref_logprobs=jnp.float32(-rng.rand(4, 12)),
                 returns=jnp.float32(rng.randn(4, 12) * policy), old_values=jnp.float32(rng.randn(4, 12)))
    cfg = recipe_config(recipe)
    loss = get_recipe(recipe).loss

    def total(logprobs, entropy, values):
        return loss(PolicyOutputs(logprobs, entropy, values), rl, cfg)[0]

    grads = jax.grad(total, argnums=(0, 1, 2))(jnp.float32(-rng.rand(4, 12)), jnp.float32(rng.rand(4, 12)),
                                              jnp.float32(rng.randn(4, 12)))
    for grad in grads:
        assert (np.asarray(grad)[~policy] == 0).all()
    assert np.abs(np.asarray(grads[0])[policy]).max() > 0


def test_single_turn_episodes_are_the_sampler_rows(backend):
    """Without tools or retries an episode is one reply: its training row is the sampler's row."""
    task = resolve_task("digits")
    harness = tool_harness(task, rounds=0)
    rollout = run_items(task, harness, backend, task.items("train")[:2], jax.random.key(3))
    rows = rollout.training_rows(backend.decoding.pad_token_id)
    direct = generate(backend.model, [list(e.prompt_ids) for e in rollout.episodes], key=jax.random.fold_in(
        jax.random.split(jax.random.key(3))[1], 0), max_new_tokens=8, temperature=1.0,
        stop_token_ids=backend.decoding.stop_token_ids, pad_token_id=backend.decoding.pad_token_id)
    np.testing.assert_array_equal(np.asarray(rows.tokens), np.asarray(direct.tokens))
    np.testing.assert_array_equal(np.asarray(rows.mask), np.asarray(direct.mask))
    np.testing.assert_array_equal(np.asarray(rows.policy_mask), np.asarray(direct.mask))
    np.testing.assert_allclose(np.asarray(rows.logprobs), np.asarray(direct.logprobs), atol=1e-6)


# A Hermes-style template that renders tools its own way (as Qwen2.5's does): specs in the system
# turn, tool results as a user turn in <tool_response> tags.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "Functions you may call, one per reply as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_style_hands_the_tools_to_the_models_own_template(backend):
    """tool_call.style "chat_template": no siajax tool section; the prompt is the template's own
    rendering with ``tools``; an episode's ids stay the template's rendering of its conversation; a
    template without tools and a remote policy are refused in one line."""
    import copy
    import dataclasses

    from siajax.harness import render_messages, template_tools

    task = resolve_task("digits")
    siajax_style = tool_harness(task, rounds=1)
    harness = dataclasses.replace(siajax_style, system_prompt="Be brief.",
                                  tool_call=dataclasses.replace(siajax_style.tool_call, style="chat_template"))
    tokenizer = copy.deepcopy(backend.tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    native = LocalPolicyBackend(backend.model, tokenizer)
    tools = template_tools(harness)
    assert template_tools(siajax_style) is None and tools[0]["function"]["name"] == "calculator"

    messages = render_messages(harness, question="What is 2+3?")
    assert messages[0]["content"] == "Be brief."  # the template, not siajax, describes the tools
    prompt = tokenizer.decode(native.prompt_ids(messages, tools))
    assert '{"name": "calculator", "description": "arithmetic"' in prompt
    reply = tokenizer.encode("e 2+3 !", add_special_tokens=False) + list(native.decoding.stop_token_ids[:1])
    result = {"role": "tool", "content": "5"}
    whole = native.prompt_ids(messages + [{"role": "assistant", "content": "e 2+3 !"}, result], tools)
    assert native.prompt_ids(messages, tools) + reply + native.continuation_ids(result, stopped=True) == whole

    rollout = run_items(task, harness, native, task.items("train")[:2], jax.random.key(4))
    assert any(r["tool_calls"] for r in rollout.records)
    for episode in rollout.episodes:
        assert episode.context_ids()[:len(episode.prompt_ids)] == native.prompt_ids(episode.messages, tools)
    with pytest.raises(ValueError, match="renders no tools"):
        backend.prompt_ids(messages, tools)

    class Remote:  # any backend without local token ids
        def complete(self, conversations, sampling, key):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="needs the local policy"):
        run_items(task, harness, Remote(), task.items("train")[:1], jax.random.key(4))


def test_calculator_is_exact_and_refuses_anything_but_arithmetic():
    assert calculator("(123 + 877) * 31 - 4") == "30996" and calculator("7 / 2") == "3.5"
    assert calculator("-(2 ** 10) // 3") == "-342"
    for hostile in ("__import__('os').system('id')", "x + 1", "9 ** 9 ** 9", "[1] * 10", "'a' * 3", "1e400"):
        with pytest.raises((ValueError, SyntaxError, OverflowError)):
            calculator(hostile)


def test_find_call_reads_the_harness_format_and_names_malformed_calls():
    fmt = ToolCallFormat()
    assert find_call(fmt, 'ok <tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>') \
        == {"name": "calculator", "arguments": {"expression": "1+1"}}
    assert find_call(fmt, "no call here") is None
    for broken in ("<tool_call>{name: 1}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                   '<tool_call>{"name": "x", "arguments": [1]}</tool_call>'):
        assert find_call(fmt, broken).failure == "malformed_call"


def test_a_round_of_calls_never_raises_and_names_each_failure():
    import dataclasses

    from siajax.tools import BUILTIN_TOOLS, run_calls

    task = resolve_task("digits")
    harness = dataclasses.replace(task.default_harness(), tools=(BUILTIN_TOOLS["calculator"][0],))
    calls = [{"name": "calculator", "arguments": {"expression": "12 * 12"}},
             {"name": "python", "arguments": {"code": "print(1)"}},  # built in, but not exposed here
             {"name": "calculator", "arguments": {"expr": "1 + 1"}},
             {"name": "calculator", "arguments": {"expression": "1 / 0"}},
             {"name": "calculator", "arguments": {"expression": "__import__('os')"}}]
    outcomes = run_calls(task, harness, calls)
    assert outcomes[0].result == "144" and outcomes[0].failure is None
    assert [o.failure for o in outcomes[1:]] == ["unknown_tool", "bad_arguments", "tool_error", "tool_error"]
    assert "ZeroDivisionError" in outcomes[3].error and outcomes[2].message()["content"].startswith("error: ")


def test_python_tool_runs_in_the_sandbox():
    pytest.importorskip("numpy")
    try:
        assert python("print(6 * 7)").strip() == "42"
    except RuntimeError as err:  # a machine where the sandbox cannot start says why
        pytest.skip(f"sandbox unavailable: {err}")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        python("1 / 0")


def test_the_weight_lever_trains_tool_episodes_in_the_loop(tmp_path):
    """A weights generation on arithmetic_tool with the calculator exposed (its call marker one the
    tiny model writes): the rollouts are multi-turn episodes, trained with every model token scored
    as sampled, and the ledger reports tool use per generation."""
    import json
    import shutil

    from siajax.config import RunConfig
    from siajax.loop import run
    from siajax.tasks import BUNDLED_TASKS

    root = tmp_path / "arithmetic_tool"
    shutil.copytree(BUNDLED_TASKS / "arithmetic_tool", root)
    harness = json.loads((root / "harness.json").read_text())
    harness.update(tools=[{"name": "calculator", "description": "arithmetic",
                           "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}],
                   tool_call={"open": "e", "close": "!", "max_rounds": 2})
    harness["sampling"].update(samples_per_prompt=4, max_new_tokens=8, temperature=1.0)
    (root / "harness.json").write_text(json.dumps(harness))
    ledger = run(RunConfig(task=str(root), model=str(BUNDLED_TINY_MODEL), levers="weights", generations=1,
                           items_per_generation=2, updates_per_generation=1, recipe="grpo", dev_items=4,
                           test_items=4), tmp_path / "run")
    train = ledger[0]["train"]
    assert train["logprob_mismatch"] <= 1e-4 and train["tool_use"]["calls"] > 0
    assert "tool_use" in ledger[0]["after"]["dev"] or ledger[0]["failed"]
    records = [json.loads(line) for line in (tmp_path / "run" / "gen_000" / "trajectory.jsonl").open()]
    assert any(segment["role"] == "tool" for record in records for segment in record["segments"])


def test_training_episodes_get_the_most_turns_the_budget_covers():
    """The weight lever keeps tool rounds before retries, and cuts turns before updates."""
    import dataclasses

    from siajax.config import RunConfig
    from siajax.levers import capped_turns, training_plan

    task = resolve_task("digits")
    harness = patch_harness(tool_harness(task, rounds=2), [{"op": "replace", "path": "/retry/max_attempts", "value": 2}])
    assert harness.max_turns == 4
    assert [(capped_turns(harness, t).tool_call.max_rounds, capped_turns(harness, t).retry.max_attempts)
            for t in (4, 3, 2, 1)] == [(2, 2), (2, 1), (1, 1), (0, 1)]
    config = RunConfig(task="digits", items_per_generation=2, updates_per_generation=3)
    one_turn_update = 2 * 4  # items x group
    assert training_plan(3 * 4 * one_turn_update + 10, config, 4, 10, harness) == (3, 4)
    assert training_plan(3 * 2 * one_turn_update + 10, config, 4, 10, harness) == (3, 2)
    assert training_plan(2 * one_turn_update + 10, config, 4, 10, harness) == (2, 1)  # fewer updates only at 1 turn
    assert dataclasses.replace(harness, tools=()).max_turns == 2


def test_a_task_offering_a_tool_budgets_every_episode_at_its_reachable_turns():
    """The budget of a task that offers a tool counts each episode at the turns a tool harness can
    take, so once add_tool is kept the weight lever still trains whole episodes (call, result,
    answer) with every update it wanted; a task without tools keeps its one-turn budget."""
    from siajax.agents.harness_edits import candidate_edits
    from siajax.agents.rules import EditGrid
    from siajax.budget import evaluation_cost
    from siajax.config import RunConfig
    from siajax.levers import training_plan
    from siajax.protocol import generation_budget, reachable_turns

    tool_task, plain_task = resolve_task("arithmetic_tool"), resolve_task("arithmetic")
    config = RunConfig(task="arithmetic_tool", items_per_generation=4, updates_per_generation=2)
    start = tool_task.default_harness()
    assert not start.tools and start.max_turns == 1 and reachable_turns(start, tool_task) == 1 + 3
    budget = generation_budget(config, start, 32, tool_task)
    assert budget == 4 * 8 * 2 * 4 + 2 * 32 * 4
    added = patch_harness(start, next(c for c in candidate_edits(start, tool_task, EditGrid())
                                      if c.kind == "add_tool").patch)
    assert training_plan(budget - evaluation_cost(added, 32), config, 8, evaluation_cost(added, 32), added) == (2, 4)
    plain = plain_task.default_harness()
    assert reachable_turns(plain, plain_task) == plain.max_turns
    assert generation_budget(config, plain, 32, plain_task) == 4 * 8 * 2 * plain.max_turns + 2 * evaluation_cost(plain, 32)
