"""Pure-functional training: a TrainState pytree and one jitted, donated step.

The imperative shell (sampling, I/O, the SIA loop) stays outside; inside,
``train_step(state, frozen, batch) -> (state, metrics)`` is a pure function.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from siajax.parallel.mesh import mesh_context
from siajax.parallel.rules import StepShardings, replicated, shard_tree
from siajax.rng import purpose_key

# loss_fn(trainable_params, frozen_params, batch, key) -> (scalar, metrics dict)
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """Everything that changes during training. Frozen base weights live outside it.

    params: trainable pytree (LoRA adapters, value head); opt_state: optax state;
    step: [] int32; rng: raw uint32 PRNG key data (orbax-serialisable).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state over a copy of ``params``: the step donates its state, and the
    caller's arrays (often shared with a live model) must survive that. Its RNG
    stream is the seed's "train_state" key (:func:`siajax.rng.purpose_key`)."""
    params = jax.tree.map(jnp.copy, params)
    return TrainState(
        params=params, opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(purpose_key(seed, "train_state")),
    )


def _split_micro_batches(batch, micro_batches: int):
    def split(x):
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={micro_batches}")
        return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
    return jax.tree.map(split, batch)


MAX_METRICS = ("logprob_change",)  # step metrics that are maxima: micro-batches combine them by max, not sum


def _combine_micro_batches(total, value):
    """((loss, metrics), grads) of two micro-batches: shares add up, the MAX_METRICS take the max."""
    (loss, metrics), grads = jax.tree.map(jnp.add, total, value)
    (_, total_metrics), _ = total
    (_, value_metrics), _ = value
    maxima = {name: jnp.maximum(total_metrics[name], value_metrics[name]) for name in MAX_METRICS
              if name in metrics}
    return (loss, {**metrics, **maxima}), grads


def _within_kl(metrics: dict, max_approx_kl: float | None) -> jax.Array:
    """Whether the policy before the step is within ``max_approx_kl`` of the sampling one."""
    return jnp.asarray(True) if max_approx_kl is None else metrics["approx_kl"] <= max_approx_kl


def _gradient_fn(loss_fn: LossFn, micro_batches: int, max_approx_kl: float | None = None):
    """(params, frozen, batch, key) -> ((loss, metrics), grads); with ``micro_batches > 1`` a
    ``lax.scan`` adds the micro-batches' values (memory of one micro-batch): each is a share
    (the MAX_METRICS, maxima, combine by max).

    With one micro-batch and a KL limit, the backward pass runs only when the forward finds the
    policy within the limit: past it the step is not applied, so its gradient (about half the
    step's time) is left as zeros. Micro-batches know the KL only after every backward pass."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        return grad_fn if max_approx_kl is None else partial(_gradient_within_kl, loss_fn, max_approx_kl)

    def gradients(params, frozen, batch, key):
        chunks = _split_micro_batches(batch, micro_batches)
        keys = jax.random.split(key, micro_batches)

        def accumulate(total, inputs):
            chunk, chunk_key = inputs
            return _combine_micro_batches(total, grad_fn(params, frozen, chunk, chunk_key)), None

        first = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], chunks), keys[0])
        value, _ = jax.lax.scan(accumulate, first, jax.tree.map(lambda x: x[1:], (chunks, keys)))
        return value

    return gradients


def _gradient_within_kl(loss_fn: LossFn, max_approx_kl: float, params, frozen, batch, key):
    """((loss, metrics), grads): the forward pass, then its backward under a ``lax.cond`` on the KL."""
    loss, pullback, metrics = jax.vjp(lambda p: loss_fn(p, frozen, batch, key), params, has_aux=True)
    grads = jax.lax.cond(_within_kl(metrics, max_approx_kl), lambda: pullback(jnp.ones_like(loss))[0],
                         lambda: jax.tree.map(jnp.zeros_like, params))
    return (loss, metrics), grads


def _step_outcomes(loss, grad_norm, metrics: dict, max_approx_kl: float | None):
    """-> (apply?, the counts of why not): a policy already past the KL limit before stepping, its loss
    finite (``kl_stop``: decided from the forward pass, its gradient may not have been computed),
    else a non-finite loss or gradient (``skipped``) or an exactly zero gradient (``no_signal``)."""
    kl_stop = jnp.isfinite(loss) & ~_within_kl(metrics, max_approx_kl)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # the norm is finite iff every entry is
    signal = grad_norm > 0
    counts = {"skipped": (~kl_stop & ~finite).astype(jnp.int32),
              "no_signal": (~kl_stop & finite & ~signal).astype(jnp.int32), "kl_stop": kl_stop.astype(jnp.int32)}
    return ~kl_stop & finite & signal, counts


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, micro_batches: int = 1,
                    prepare_batch: Callable[[Any], Any] | None = None, shardings: StepShardings | None = None,
                    max_approx_kl: float | None = None):
    """Returns ``train_step(state, frozen, batch) -> (state, metrics)``, jitted, state donated
    (:func:`train_step_fn`'s pure step; SPMD over ``shardings.mesh`` when given)."""
    return compile_step(train_step_fn(loss_fn, optimizer, micro_batches=micro_batches, prepare_batch=prepare_batch,
                                      max_approx_kl=max_approx_kl), shardings)


def train_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, micro_batches: int = 1,
                  prepare_batch: Callable[[Any], Any] | None = None, max_approx_kl: float | None = None):
    """The pure ``train_step(state, frozen, batch) -> (state, metrics)``, for jitting alone
    (:func:`make_train_step`) or inside a larger program (an update's whole schedule).

    ``prepare_batch`` runs on the whole batch inside the step, before anything
    else. With ``micro_batches > 1`` the micro-batches' losses, metrics and
    gradients are added (MAX_METRICS by max), so each must be its share of the full batch's (policy
    losses get that from ``prepare_batch=with_full_batch_normaliser``).

    A step is applied only when its loss and gradient are finite, its gradient
    is not exactly zero (Adam would move on momentum alone) and, with
    ``max_approx_kl``, the policy before it is within that KL of the sampling
    policy; otherwise params and optimiser state are left as they were (one
    ``lax.cond``, for any optimiser) and ``metrics`` counts why (``skipped``,
    ``no_signal``, ``kl_stop``). ``state.step`` counts applied steps. A step
    past the KL limit runs no backward pass (one micro-batch): its ``grad_norm`` reads 0.
    """
    gradients = _gradient_fn(loss_fn, micro_batches, max_approx_kl)

    def apply_update(operands):
        params, opt_state, grads = operands
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def keep(operands):
        params, opt_state, _ = operands
        return params, opt_state

    def train_step(state: TrainState, frozen, batch):
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        (loss, metrics), grads = gradients(state.params, frozen, batch, step_key)
        grad_norm = optax.tree.norm(grads)
        apply, counts = _step_outcomes(loss, grad_norm, metrics, max_approx_kl)
        params, opt_state = jax.lax.cond(apply, apply_update, keep, (state.params, state.opt_state, grads))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, **counts}
        return TrainState(params=params, opt_state=opt_state, step=state.step + apply.astype(jnp.int32),
                          rng=jax.random.key_data(key)), metrics

    return train_step


def compile_step(fn: Callable, shardings: StepShardings | None = None) -> Callable:
    """``fn(state, frozen, batch) -> (state, outputs)`` jitted with the state donated. With
    ``shardings`` (:func:`siajax.parallel.step_shardings`) it runs SPMD over their mesh: the
    state keeps its rule layout, outputs come back replicated, each batch is split over
    ``data`` x ``fsdp`` on the way in, and ``frozen`` is expected already placed."""
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    return _sharded(fn, shardings)


def _sharded(train_step, shardings: StepShardings):
    """The step jitted SPMD: state keeps its layout, outputs replicated, the batch placed on the way in."""
    mesh = shardings.mesh
    jitted = jax.jit(train_step, donate_argnums=0, out_shardings=(shardings.state, replicated(mesh)))

    def sharded_train_step(state: TrainState, frozen, batch):
        with mesh_context(mesh):
            return jitted(state, frozen, shard_tree(batch, mesh, shardings.rules, prefix="batch"))

    return sharded_train_step
