"""Training: TrainState, the jitted step, the optimiser, policy glue and surgery, the rollout driver,
orbax checkpoints."""

from siajax.train.checkpoint import restore_pytree, save_pytree
from siajax.train.policy import (
    PolicyParts, TrainBatch, attach_trainable, evaluate_responses, make_policy_loss, score_responses, split_policy,
    take_rows, with_full_batch_normaliser,
)
from siajax.train.state import TrainState, compile_step, init_train_state, make_train_step, train_step_fn

__all__ = [
    "PolicyParts", "TrainBatch", "TrainState", "attach_trainable", "compile_step", "evaluate_responses",
    "init_train_state", "make_policy_loss", "make_train_step", "restore_pytree", "save_pytree", "score_responses",
    "split_policy", "take_rows", "train_step_fn", "with_full_batch_normaliser",
]
