"""Sharded training and sampling on 8 host devices equal one device; layouts follow the rules.

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from siajax.models import BUNDLED_TINY_MODEL, KVCache, LoRAConfig, ValueHead, add_lora, from_pretrained
from siajax.parallel import (
    PARTITION_RULES, REPLICATED_LORA_RULES, MeshConfig, fit_spec, make_mesh, path_string, shard_tree,
    step_shardings, train_state_shardings,
)
from siajax.rl import GRPOConfig, RLBatch, grpo_loss
from siajax.sampling import _constrain_cache, generate
from siajax.train import (
    TrainBatch, init_train_state, make_policy_loss, make_train_step, restore_pytree, save_pytree, split_policy,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32], [41, 42, 43, 44], [51]]

# Written out here, not read from the rules: what each kind of array should be split over.
EXPECTED_SPECS = {
    "embed": ("tensor", "fsdp"),
    "q_proj/kernel": ("fsdp", "tensor"), "k_proj/kernel": ("fsdp", "tensor"), "v_proj/kernel": ("fsdp", "tensor"),
    "gate_proj/kernel": ("fsdp", "tensor"), "up_proj/kernel": ("fsdp", "tensor"),
    "o_proj/kernel": ("tensor", "fsdp"), "down_proj/kernel": ("tensor", "fsdp"),
    "q_proj/lora_a": ("fsdp",), "k_proj/lora_a": ("fsdp",), "v_proj/lora_a": ("fsdp",),
    "gate_proj/lora_a": ("fsdp",), "up_proj/lora_a": ("fsdp",),
    "q_proj/lora_b": (None, "tensor"), "k_proj/lora_b": (None, "tensor"), "v_proj/lora_b": (None, "tensor"),
    "gate_proj/lora_b": (None, "tensor"), "up_proj/lora_b": (None, "tensor"),
    "o_proj/lora_a": ("tensor",), "down_proj/lora_a": ("tensor",),
    "o_proj/lora_b": (None, "fsdp"), "down_proj/lora_b": (None, "fsdp"),
    "scale": (), "value_head/kernel": (), "value_head/bias": (),
}


def _canonical(spec) -> tuple:
    """PartitionSpec -> tuple without trailing Nones, 1-tuples of axes unwrapped."""
    entries = [e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in tuple(spec)]
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _expected_spec(path: str) -> tuple:
    matches = [spec for suffix, spec in EXPECTED_SPECS.items() if path.endswith(suffix)]
    assert len(matches) == 1, f"no single expectation for {path}"
    # Blocks are stacked: a leading layer axis that is never split.
    return (None, *matches[0]) if path.startswith(("layers/", "lora/layers/")) and matches[0] else matches[0]


def _flat(tree) -> dict[str, jax.Array]:
    return {path_string(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def policy():
    model, _ = from_pretrained(BUNDLED_TINY_MODEL)
    add_lora(model, LoRAConfig(rank=4), key=jax.random.key(0))
    parts, params, frozen = split_policy(model, ValueHead(model.config.hidden_size))
    # Nonzero adapters (B = 0 at init) so sampling and the loss go through them.
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), params)
    return nnx.merge(parts.graphdef, params["lora"], frozen), parts, params, frozen


def test_mesh_config_parses_fills_and_rejects():
    assert MeshConfig.parse("data=2,fsdp=2,tensor=2").resolve(8) == (2, 2, 2)
    assert MeshConfig.parse("fsdp=4").resolve(8) == (2, 4, 1)
    assert MeshConfig.parse("2,4,1").resolve(8) == (2, 4, 1)
    assert MeshConfig().resolve(8) == (8, 1, 1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        MeshConfig(2, 2, 3).resolve(8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        MeshConfig.parse("data=2,model=4")
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(-1, -1, 1)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert _canonical(fit_spec(P(("data", "fsdp"), "tensor"), (8, 6), mesh)) == (("data", "fsdp"), "tensor")
    assert _canonical(fit_spec(P(("data", "fsdp"), "tensor"), (2, 3), mesh)) == ("data",)
    assert _canonical(fit_spec(P("tensor", "fsdp"), (211, 48), mesh)) == (None, "fsdp")
    with pytest.raises(ValueError, match="rank"):
        fit_spec(P("data", None, "tensor"), (4, 4), mesh)


@pytest.mark.parametrize("shape", MESHES)
def test_every_parameter_and_moment_is_laid_out_as_the_rules_say(policy, shape):
    _, _, params, frozen = policy
    mesh = make_mesh(MeshConfig(*shape))
    sizes = dict(zip(("data", "fsdp", "tensor"), shape))
    optimizer = optax.adam(1e-3)
    state = init_train_state(params, optimizer, 0)
    state = jax.device_put(state, train_state_shardings(state, mesh))
    placed = {**_flat(shard_tree(frozen, mesh)), **_flat(state.params)}
    assert len(placed) == 27  # embed, final norm, 9 stacked block weights, 14 stacked adapters, value head 2
    for path, array in placed.items():
        expected = _expected_spec(path)
        assert _canonical(array.sharding.spec) == expected, path
        shard_shape = tuple(dim // (sizes[axis] if axis else 1)
                            for dim, axis in zip(array.shape, expected + (None,) * (array.ndim - len(expected))))
        assert array.addressable_shards[0].data.shape == shard_shape, path
    moments = _flat(state.opt_state)
    for path, array in moments.items():
        if path.endswith("count"):
            assert array.sharding.is_fully_replicated
        else:
            param_path = path.split("mu/", 1)[-1].split("nu/", 1)[-1]
            assert _canonical(array.sharding.spec) == _canonical(placed[param_path].sharding.spec), path


def test_replicated_lora_rules_replicate_only_the_adapters(policy):
    _, _, params, frozen = policy
    mesh = make_mesh(MeshConfig(2, 2, 2))
    lora = _flat(shard_tree(params, mesh, REPLICATED_LORA_RULES))
    base = _flat(shard_tree(frozen, mesh, REPLICATED_LORA_RULES))
    assert all(x.sharding.is_fully_replicated for x in lora.values())
    assert _canonical(base["layers/attn/q_proj/kernel"].sharding.spec) == (None, "fsdp", "tensor")


def test_kv_cache_is_split_by_batch_and_kv_head(policy):
    model = policy[0]
    mesh = make_mesh(MeshConfig(2, 2, 2))
    cache = KVCache.empty(model.config, 8, 16)
    with jax.set_mesh(mesh):
        laid_out = jax.jit(lambda c: _constrain_cache(c, tuple(PARTITION_RULES)))(cache)
    assert _canonical(laid_out.keys.sharding.spec) == (None, ("data", "fsdp"), None, "tensor")
    assert laid_out.keys.addressable_shards[0].data.shape == (model.config.num_layers, 2, 16, 1, 32)
    assert _canonical(laid_out.valid.sharding.spec) == (("data", "fsdp"),)


@pytest.mark.parametrize("shape", MESHES)
def test_greedy_and_sampled_decoding_match_one_device(policy, shape):
    model = policy[0]
    mesh = make_mesh(MeshConfig(*shape))
    for temperature in (0.0, 1.0):
        kwargs = dict(key=jax.random.key(7), max_new_tokens=10, temperature=temperature)
        single = generate(model, PROMPTS, **kwargs)
        sharded = generate(model, PROMPTS, mesh=mesh, **kwargs)
        np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
        np.testing.assert_array_equal(np.asarray(sharded.lengths), np.asarray(single.lengths))
        np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), rtol=1e-5, atol=1e-5)
        assert len(sharded.tokens.sharding.device_set) == 8, "decoding ran on the whole mesh"


def _train_batch(model, key) -> TrainBatch:
    samples = generate(model, PROMPTS + PROMPTS[:2], key=key, max_new_tokens=6, temperature=1.0)
    rewards = jax.random.normal(jax.random.key(1), (8,))
    advantages = (rewards - rewards.mean())[:, None] * samples.mask
    rl = RLBatch(mask=samples.mask, old_logprobs=samples.logprobs, advantages=advantages,
                 ref_logprobs=samples.logprobs - 0.01)
    return TrainBatch(jnp.concatenate([samples.prompt_tokens, samples.tokens], 1),
                      jnp.concatenate([samples.prompt_mask, samples.mask], 1), rl)


@pytest.mark.parametrize("shape", MESHES)
def test_train_step_matches_one_device(policy, shape):
    """SGD keeps the update linear in the gradient, so params compare at 1e-5 too."""
    model, parts, params, frozen = policy
    batch = _train_batch(model, jax.random.key(3))
    optimizer = optax.sgd(0.5)
    loss_fn = make_policy_loss(parts, grpo_loss, GRPOConfig(kl_coef=0.1))

    single_step = make_train_step(loss_fn, optimizer)
    single_state, single_metrics = single_step(init_train_state(params, optimizer, 0), frozen, batch)

    mesh = make_mesh(MeshConfig(*shape))
    state = init_train_state(params, optimizer, 0)
    shardings = step_shardings(state, mesh)
    sharded_step = make_train_step(loss_fn, optimizer, shardings=shardings)
    sharded_state, metrics = sharded_step(jax.device_put(state, shardings.state), shard_tree(frozen, mesh), batch)

    # Scalars summed over the whole batch or every parameter: sharded, float32 sums run in another
    # order, ~sqrt(N) ulps apart (3.46675 vs 3.46679, 1.3e-5, on one batch of the sampler's draws).
    for name in ("loss", "grad_norm", "kl_ref", "entropy"):
        np.testing.assert_allclose(float(metrics[name]), float(single_metrics[name]), rtol=5e-5, atol=1e-5)
    for path, value in _flat(sharded_state.params).items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(_flat(single_state.params)[path]), rtol=1e-5,
                                   atol=1e-5)
        assert value.sharding == _flat(shardings.state.params)[path], "the step kept the rule layout"


def test_checkpoint_saved_on_one_mesh_restores_on_another(policy, tmp_path):
    _, _, params, _ = policy
    optimizer = optax.adam(1e-3)
    state = init_train_state(params, optimizer, 0)
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 3 * jnp.ones_like(x), state.opt_state))
    saved_on = make_mesh(MeshConfig(2, 2, 2))
    save_pytree(tmp_path / "ckpt", jax.device_put(state, train_state_shardings(state, saved_on)))

    for target in (make_mesh(MeshConfig(8, 1, 1)), make_mesh(MeshConfig(1, 4, 2))):
        shardings = train_state_shardings(state, target)
        restored = restore_pytree(tmp_path / "ckpt", state, shardings)
        for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert got.sharding == sharding
    single = restore_pytree(tmp_path / "ckpt", init_train_state(params, optimizer, 1))
    for got, want in zip(jax.tree.leaves(single), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert len(got.sharding.device_set) == 1


@pytest.mark.parametrize("shape", MESHES + [(1, 1, 8)])
def test_memory_accounting_matches_the_bytes_a_device_holds(policy, shape):
    from siajax.parallel.memory import abstract_mesh, memory_budget, per_device_bytes

    model, _, params, frozen = policy
    mesh = make_mesh(MeshConfig(*shape))
    placed = shard_tree({"frozen": frozen, "params": params}, mesh)
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed))
    abstract = jax.eval_shape(lambda: {"frozen": frozen, "params": params})
    assert per_device_bytes(abstract, abstract_mesh(shape)) == held

    cache = KVCache.empty(model.config, 8, 32)
    with jax.set_mesh(mesh):
        laid_out = jax.jit(lambda c: _constrain_cache(c, tuple(PARTITION_RULES)))(cache)
    cache_held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(laid_out))
    budget = memory_budget(model.config, shape, lora=LoRAConfig(rank=4), batch=8, slots=32)
    assert budget.kv_cache == cache_held
    frozen_held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed["frozen"]))
    assert budget.params == frozen_held


def test_distributed_config_reads_the_environment_and_hosts_get_disjoint_rows():
    from siajax.parallel.distributed import DistributedConfig, host_rows

    env = {"SIAJAX_COORDINATOR": "node0:12355", "SIAJAX_NUM_PROCESSES": "4", "SIAJAX_PROCESS_ID": "2",
           "SIAJAX_LOCAL_DEVICE_IDS": "0,1"}
    assert DistributedConfig.from_env(env) == DistributedConfig("node0:12355", 4, 2, (0, 1))
    assert DistributedConfig.from_env({}) == DistributedConfig()  # auto-detect (TPU, SLURM, MPI)
    blocks = [host_rows(12, i, 4) for i in range(4)]
    assert [list(range(12))[b] for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match="do not split evenly"):
        host_rows(10, 0, 4)
