"""RL over a device mesh, one process per host: the script to launch on a TPU slice or GPU nodes.

Every process runs the same command. Each samples and rewards only its own
block of prompts; sampling and updates run SPMD over the global mesh; the
final TrainState is saved with orbax (each process writes its shards).
Process 0 writes metrics.json and final_params.npz (the gathered params).

    # one process, all of its devices (8 GPUs of a node, or CPU devices for a dry run):
    python experiments/multihost_rl.py --mesh data=2,fsdp=2,tensor=2 --out experiments/out/mesh_rl
    # several processes: the same command on each, with
    SIAJAX_COORDINATOR=host0:12355 SIAJAX_NUM_PROCESSES=2 SIAJAX_PROCESS_ID=<i> python experiments/multihost_rl.py ...
    # TPU slice (JAX finds the coordinator itself):
    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "cd siajax && .venv/bin/python experiments/multihost_rl.py --mesh fsdp=-1"
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=2,tensor=2 (one axis may be -1)")
    parser.add_argument("--recipe", default="grpo", choices=["grpo", "ppo_gae", "entropic"])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--reward", default="digits", choices=["digits", "letter-e"],
                        help="share of response tokens containing a digit (rare: the learning-curve task) or the "
                             "letter e (common: every group has signal, for short checks)")
    parser.add_argument("--model", default=None, help="HF-format directory (default: bundled tiny model)")
    parser.add_argument("--out", default="experiments/out/multihost_rl")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where every thread is (a hung collective)
    from siajax.parallel.distributed import initialize_from_env

    initialize_from_env()  # before any other JAX work

    import jax
    import numpy as np

    from experiments.rl_learning_curves import chat_prompts
    from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
    from siajax.parallel import MeshConfig, make_mesh, path_string
    from siajax.parallel.distributed import gather_to_host, is_primary
    from siajax.train import save_pytree
    from siajax.train.rollouts import make_learner, rl_updates
    from experiments import toy_rewards

    mesh = make_mesh(MeshConfig.parse(args.mesh))
    out = Path(args.out).resolve()
    model, tokenizer = from_pretrained(args.model or BUNDLED_TINY_MODEL)
    learner, state, frozen = make_learner(model, args.recipe, mesh=mesh)
    prompts = chat_prompts(tokenizer)
    table = {"digits": toy_rewards.digit_token_table, "letter-e": toy_rewards.letter_token_table}[args.reward]
    processes = jax.process_count()
    prompts = [prompts[i % len(prompts)] for i in range(-(-len(prompts) // processes) * processes)]  # >= 1 per host
    state, history = rl_updates(
        learner, state, frozen, prompts, toy_rewards.token_fraction_reward(table(tokenizer)),
        updates=args.updates, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        on_update=lambda u, m: print(f"[process {jax.process_index()}] update {u}: reward {m['reward']:.3f} "
                                     f"loss {m['loss']:.5f}", flush=True),
    )
    save_pytree(out / "train_state", state)
    params = gather_to_host(state.params)
    if is_primary():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({
            "mesh": dict(mesh.shape), "processes": jax.process_count(), "devices": jax.device_count(),
            "history": history}, indent=1))
        np.savez(out / "final_params.npz",
                 **{path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
