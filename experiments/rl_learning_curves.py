"""Learning curves of PPO-GAE, GRPO and entropic weighting on checkable rewards.

Two settings, both starting from the bundled tiny model with fresh LoRA:
  dense   reward = share of response tokens containing a digit (clean scalar);
  sparse  reward = 1 if the response holds >= k digit tokens (success rate
          < 5% at the start: the high-failure regime entropic weighting targets).
Writes JSON (every update's metrics) and a PNG of reward per update.

    python experiments/rl_learning_curves.py [--updates 40] [--seeds 0 1 2] [--out experiments/out/rl_curves]
"""

from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: experiments.* imports

import numpy as np

from siajax.models import BUNDLED_TINY_MODEL, from_pretrained
from siajax.rl import recipe_config
from siajax.train.rollouts import rl_run
from experiments.toy_rewards import at_least_k_digits_reward, digit_token_table, token_fraction_reward

PROMPTS = ["Count to ten.", "What year is it?", "Give me some numbers.", "List the digits you know."]


def chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


def run_setting(setting: str, recipes, seeds, updates: int, *, k: int, group_size: int,
                max_new_tokens: int, learning_rate: float, temperature: float = 1.0, model_dir=BUNDLED_TINY_MODEL,
                log=print):
    """-> {recipe: [history per seed]}. Each recipe runs its default update schedule."""
    results = {}
    for recipe in recipes:
        results[recipe] = []
        for seed in seeds:
            model, tokenizer = from_pretrained(model_dir)
            table = digit_token_table(tokenizer)
            reward = token_fraction_reward(table) if setting == "dense" else at_least_k_digits_reward(table, k)
            # No KL regularisation in any recipe, so they are compared on the reward alone.
            no_kl = {"reward_kl_coef": 0.0} if recipe == "ppo_gae" else {"kl_coef": 0.0}
            cfg = recipe_config(recipe, **no_kl)
            start = time.perf_counter()
            history = rl_run(model, chat_prompts(tokenizer), reward, recipe, cfg=cfg, updates=updates,
                             group_size=group_size, max_new_tokens=max_new_tokens, seed=seed,
                             learning_rate=learning_rate, temperature=temperature, pad_token_id=tokenizer.pad_token_id)
            rewards = [h["reward"] for h in history]
            log(f"{setting:6s} T={temperature} {recipe:8s} seed {seed}: reward {np.mean(rewards[:3]):.3f} -> "
                f"{np.mean(rewards[-3:]):.3f}, clip fraction {np.mean([h['clip_fraction'] for h in history]):.3f}, "
                f"max logprob mismatch {max(h['logprob_mismatch'] for h in history):.1e} "
                f"({time.perf_counter() - start:.0f}s)")
            results[recipe].append(history)
    return results


def summarise_runs(runs) -> dict:
    def mean_of(key, part=slice(None)):
        return float(np.mean([np.mean([h[key] for h in run[part]]) for run in runs]))

    return {"initial_reward": float(np.mean([run[0]["reward"] for run in runs])),
            "start_reward": mean_of("reward", slice(0, 3)), "end_reward": mean_of("reward", slice(-3, None)),
            "updates_to_half": [first_update_reaching(run, 0.5) for run in runs],
            "clip_fraction_mean": mean_of("clip_fraction"),
            "logprob_mismatch_max": float(max(h["logprob_mismatch"] for run in runs for h in run))}


def first_update_reaching(history, threshold: float) -> int | None:
    for h in history:
        if h["reward"] >= threshold:
            return h["update"]
    return None


def plot(results_by_setting, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results_by_setting), figsize=(6 * len(results_by_setting), 4))
    for ax, (setting, results) in zip(np.atleast_1d(axes), results_by_setting.items()):
        for recipe, runs in results.items():
            curves = np.array([[h["reward"] for h in run] for run in runs])
            mean = curves.mean(0)
            ax.plot(mean, label=f"{recipe} (n={len(runs)})")
            ax.fill_between(range(len(mean)), curves.min(0), curves.max(0), alpha=0.15)
        ax.set_title(f"{setting} reward")
        ax.set_xlabel("update")
        ax.set_ylabel("mean reward of the batch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparse-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--settings", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--k", type=int, default=3, help="digit tokens needed for a sparse success")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--out", type=Path, default=Path("experiments/out/rl_curves"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    all_results, summary = {}, {}
    for setting in args.settings:
        recipes = ["ppo_gae", "grpo", "entropic"] if setting == "dense" else ["grpo", "entropic"]
        seeds = args.seeds if setting == "dense" else args.sparse_seeds
        for temperature in args.temperatures:
            name = f"{setting} T={temperature}"
            results = run_setting(setting, recipes, seeds, args.updates, k=args.k, group_size=args.group_size,
                                  max_new_tokens=args.max_new_tokens, learning_rate=args.learning_rate,
                                  temperature=temperature)
            all_results[name] = results
            summary[name] = {recipe: summarise_runs(runs) for recipe, runs in results.items()}
    (args.out / "curves.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                      "summary": summary, "runs": all_results}, indent=1))
    plot(all_results, args.out / "curves.png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/curves.json and curves.png")


if __name__ == "__main__":
    main()
