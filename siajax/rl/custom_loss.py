"""A loss named in the run config (``loss = "package.module:function"``), checked before a run starts.

Any function with the loss signature, ``loss(policy, batch, cfg) -> (scalar, metrics)``
(``siajax.rl.losses``), can replace the recipe's loss; the recipe still makes the
advantages and its config is passed as ``cfg``. It is imported, then dry-run
(jitted and differentiated) on a toy batch, so a loss that cannot serve fails
with one line before any model loads. The step's monitors (``approx_kl`` for the
KL stop, ``clip_fraction``) are added when the loss does not report them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from siajax.rl.losses import PolicyOutputs, RLBatch, aggregate, approx_kl_to_old


class LossSpecError(ValueError):
    """A configured loss that cannot be used; the message is one line."""


def resolve_loss(spec: str) -> Callable:
    """'package.module:function' -> the function (importable, callable, three parameters)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise LossSpecError(f"loss {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any import failure is the user's module's
        raise LossSpecError(f"loss {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise LossSpecError(f"loss {spec!r}: {module_name} has no function {name}")
    try:
        inspect.signature(function).bind(None, None, None)
    except TypeError:
        raise LossSpecError(f"loss {spec!r}: must take (policy, batch, cfg), takes {inspect.signature(function)}") \
            from None
    return function


def toy_inputs(rows: int = 4, tokens: int = 3) -> tuple[PolicyOutputs, RLBatch]:
    """A small batch with every field a recipe may fill (values and returns included)."""
    mask = jnp.asarray(np.arange(tokens)[None, :] < np.array([tokens, tokens, 2, 1])[:rows, None])
    logprobs = jnp.full((rows, tokens), -1.0)
    advantages = jnp.where(mask, jnp.linspace(-1.0, 1.0, rows)[:, None], 0.0)
    count = jnp.full((rows,), jnp.sum(mask), jnp.float32)
    zeros = jnp.zeros((rows, tokens))
    policy = PolicyOutputs(logprobs, jnp.ones((rows, tokens)), zeros)
    batch = RLBatch(mask, logprobs - 0.1, advantages, logprobs, zeros + 0.5, zeros, count, count)
    return policy, batch


def check_loss(function: Callable, cfg, spec: str = "") -> None:
    """Jits and differentiates ``function`` on :func:`toy_inputs` with ``cfg``: a finite scalar, a
    dict of scalar metrics and a finite gradient, or one line saying which is wrong."""
    policy, batch = toy_inputs()

    def scalar_loss(logprobs):
        return function(policy._replace(logprobs=logprobs), batch, cfg)

    def dry_run(run):
        try:
            return run()
        except Exception as err:  # noqa: BLE001 -- report whatever the user's loss raised, in one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LossSpecError(f"loss {spec}: the dry run failed ({type(err).__name__}: {first})") from None

    shapes = dry_run(lambda: jax.eval_shape(scalar_loss, policy.logprobs))
    if not (isinstance(shapes, tuple) and len(shapes) == 2 and getattr(shapes[0], "shape", None) == ()
            and isinstance(shapes[1], dict) and all(getattr(v, "shape", None) == () for v in shapes[1].values())):
        raise LossSpecError(f"loss {spec}: must return (scalar, dict of scalar metrics)")
    (loss, _), grad = dry_run(lambda: jax.jit(jax.value_and_grad(scalar_loss, has_aux=True))(policy.logprobs))
    if not (np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()):
        raise LossSpecError(f"loss {spec}: not finite on a toy batch (loss {float(loss)})")


def with_step_monitors(function: Callable) -> Callable:
    """The loss, with the step's monitors filled in when it does not report them."""

    def loss(policy: PolicyOutputs, batch: RLBatch, cfg):
        value, metrics = function(policy, batch, cfg)
        monitors = {"approx_kl": aggregate(approx_kl_to_old(policy.logprobs, batch.old_logprobs), batch.mask,
                                           "token-mean", batch.token_count),
                    "clip_fraction": jnp.zeros(())}
        return value, {**monitors, **metrics}

    return loss


def load_loss(spec: str, cfgs) -> Callable:
    """Resolves and checks ``spec`` against every recipe config it may be given; -> the loss."""
    function = resolve_loss(spec)
    for cfg in cfgs:
        check_loss(function, cfg, spec)
    return with_step_monitors(function)
