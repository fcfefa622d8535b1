"""The paper's comparison: SIA-H (harness lever only) vs SIA-W+H (both levers), same seeds and budgets.

For every seed both arms run the SIA loop from the same start (same model,
harness v0, dev/test items and decoding keys); per generation the harness
lever may spend on dev evaluations of candidates what the weight lever spends
on training rollouts, so the arms differ only in which levers they may pull.
Writes, under ``--out/<task>/``: each run's directory, ``summary.json``, a
markdown table (test score per arm: mean and 95% CI over seeds, plus the
start, and the paired difference W+H - H with its paired-t 95% interval over
seeds), ``test_by_generation.png`` (both arms, mean with a band over seeds);
when a harness exposed a tool, the per-generation share of test episodes that call one, call it
well-formed and answer with its result; with ``--record`` it also appends the rows to
``experiments/paper/RESULTS.md``.

    python experiments/paper/compare_levers.py --config experiments/main_job.toml --seeds 0 1 2
    python experiments/paper/compare_levers.py --task digits --model siajax/assets/tiny-llama --generations 6

``--config`` takes the same TOML as ``siajax run --config`` (its ``levers`` and ``seed`` are
set per arm and seed); flags override it; the model defaults to the embedded default.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from siajax.config import RESUME_MAY_CHANGE, RunConfig, load_settings
from siajax.loop import run
from siajax.rundir import read_ledger
from siajax.stats import mean_confidence_interval

ARMS = {"SIA-H": "harness", "SIA-W+H": "both"}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def curve(ledger: list[dict], split: str) -> list[float]:
    """Score at the start and after every generation."""
    return [ledger[0]["before"][split]["score"]] + [entry["after"][split]["score"] for entry in ledger]


def kept_ledger(config: RunConfig, kept: Path) -> list[dict] | None:
    """A finished run's ledger kept under ``kept``, else None; refuses a kept run of another config
    (before anything runs, so a comparison never overwrites another one's results)."""
    if not (kept / "config.json").is_file():
        return None
    stored = RunConfig.from_dict(json.loads((kept / "config.json").read_text()))
    if dataclasses.replace(stored, **{name: getattr(config, name) for name in RESUME_MAY_CHANGE}) != config:
        raise ValueError(f"{kept} holds a run of another config; pass another --keep directory")
    ledger = read_ledger(kept)
    return ledger if len(ledger) == config.generations else None


def keep_ledger(run_dir: Path, kept: Path) -> None:
    """Copies a finished run's config.json and ledger.jsonl (kilobytes) where git keeps them, so a
    comparison that outlasts one machine resumes from the runs already finished."""
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "ledger.jsonl"):
        shutil.copyfile(run_dir / name, kept / name)
    (kept / "code.txt").write_text(code_version() + "\n")


def code_version() -> str:
    """The commit the comparison ran (with "+changes" when the checkout differed from it)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    return commit + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_arms(base: RunConfig, seeds, out: Path, keep: Path | None = None, log=print) -> dict:
    """-> {arm: [ledger per seed]}; every run writes its own directory under ``out/runs``; with
    ``keep``, finished runs found there are reused and new ones copied there."""
    # every arm runs all its generations (flags stay in the ledger): equal budgets, equal lengths
    configs = {(seed, arm): dataclasses.replace(base, levers=levers, seed=seed, halt_after_flagged=0)
               for seed in seeds for arm, levers in ARMS.items()}
    kept = {key: None if keep is None else kept_ledger(config, keep / f"{config.levers}-s{config.seed}")
            for key, config in configs.items()}
    results = {arm: [] for arm in ARMS}
    for (seed, arm), config in configs.items():
        start, name, ledger = time.perf_counter(), f"{config.levers}-s{seed}", kept[seed, arm]
        if ledger is None:
            ledger = run(config, out / "runs" / name)
            if keep is not None:
                keep_ledger(out / "runs" / name, keep / name)
        results[arm].append(ledger)
        log(f"{arm:8s} seed {seed}: test {curve(ledger, 'test')[0]:.3f} -> {curve(ledger, 'test')[-1]:.3f} "
            f"({time.perf_counter() - start:.0f}s)")
    return results


TOOL_RATES = ("episodes_calling", "calls_well_formed", "answers_with_result")


def tool_use_curve(ledger: list[dict], split: str = "test") -> list[dict]:
    """Per point of ``curve``: the split's tool-use rates (all 0 while the harness exposes no tool)."""
    points = [ledger[0]["before"][split]] + [entry["after"][split] for entry in ledger]
    return [{rate: float(point.get("tool_use", {}).get(rate, 0.0)) for rate in TOOL_RATES} for point in points]


def tool_use_table(results: dict, task: str, split: str = "test") -> str:
    """Per arm and generation, mean over seeds of the share of episodes calling a tool, of calls
    well-formed and of answers that are a tool's result ("" when no run ever exposed a tool)."""
    curves = {arm: [tool_use_curve(ledger, split) for ledger in ledgers] for arm, ledgers in results.items()}
    if not any(point[rate] for runs in curves.values() for run in runs for point in run for rate in TOOL_RATES):
        return ""
    lines = [f"| task | arm | generation | {split}: episodes calling a tool | calls well-formed | "
             "answers = a tool's result |", "|---|---|---:|---:|---:|---:|"]
    for arm, runs in curves.items():
        for point in range(len(runs[0])):
            means = [np.mean([run[point][rate] for run in runs]) for rate in TOOL_RATES]
            lines.append(f"| {task} | {arm} | {'start' if point == 0 else point - 1} | "
                         + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def summarise(results: dict) -> dict:
    summary = {}
    for arm, ledgers in results.items():
        finals = [curve(ledger, "test")[-1] for ledger in ledgers]
        starts = [curve(ledger, "test")[0] for ledger in ledgers]
        mean, low, high = mean_confidence_interval(finals)
        summary[arm] = {
            "test_start": float(np.mean(starts)), "test_final_mean": mean, "test_final_ci95": [low, high],
            "test_final_per_seed": finals, "dev_final_per_seed": [curve(ledger, "dev")[-1] for ledger in ledgers],
            "weights_generations": [sum(e["decision"]["lever"] == "weights" for e in ledger) for ledger in ledgers],
            # what each arm drew to propose and judge changes (the budget's unit; test evaluation apart)
            "samples_spent": [sum(e["spend"]["spent_samples"] for e in ledger) for ledger in ledgers],
            "budget_per_generation": [ledgers[0][0]["spend"]["budget_samples"]] if ledgers else [],
            "test_tool_use_by_generation": [tool_use_curve(ledger) for ledger in ledgers],
        }
    return summary


def paired_difference(summary: dict, treatment: str = "SIA-W+H", control: str = "SIA-H") -> dict:
    """Mean over seeds of (treatment - control) final test score, with a paired-t 95% interval over
    seeds (the seed is the unit: both arms share its start, items and keys)."""
    differences = [a - b for a, b in zip(summary[treatment]["test_final_per_seed"],
                                         summary[control]["test_final_per_seed"])]
    mean, low, high = mean_confidence_interval(differences)
    return {"per_seed": differences, "mean": mean, "ci95": [low, high],
            "excludes_zero": bool(low > 0 or high < 0)}


def table(summary: dict, task: str) -> str:
    lines = ["| task | arm | test at start | test after (mean) | 95% CI over seeds | per seed |",
             "|---|---|---:|---:|---|---|"]
    for arm, row in summary.items():
        low, high = row["test_final_ci95"]
        ci = "n/a (1 seed)" if np.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        seeds = ", ".join(f"{x:.3f}" for x in row["test_final_per_seed"])
        lines.append(f"| {task} | {arm} | {row['test_start']:.3f} | {row['test_final_mean']:.3f} | {ci} | {seeds} |")
    if set(ARMS) <= set(summary) and len(summary["SIA-H"]["test_final_per_seed"]) > 1:
        diff = paired_difference(summary)
        low, high = diff["ci95"]
        lines.append(f"| {task} | W+H - H (paired t over seeds) | | {diff['mean']:+.3f} | [{low:+.3f}, {high:+.3f}]"
                     f"{' (excludes 0)' if diff['excludes_zero'] else ' (includes 0)'} | "
                     + ", ".join(f"{x:+.3f}" for x in diff["per_seed"]) + " |")
    return "\n".join(lines)


def results_rows(summary: dict, task: str, model: str, generations: int) -> str:
    """RESULTS.md rows: each arm's final test score with its interval and per-seed spend, then the
    paired difference (paired t over seeds) and whether its interval excludes 0."""
    stamp, rows = datetime.date.today().isoformat(), []
    for arm, row in summary.items():
        low, high = row["test_final_ci95"]
        spent = ", ".join(str(x) for x in row["samples_spent"])
        rows.append(f"| {stamp} | {task} | {model} | {arm} | {len(row['test_final_per_seed'])} | {generations} | "
                    f"{row['test_start']:.3f} | {row['test_final_mean']:.3f} | [{low:.3f}, {high:.3f}] | {spent} |")
    if set(ARMS) <= set(summary):
        diff = paired_difference(summary)
        low, high = diff["ci95"]
        rows.append(f"| {stamp} | {task} | {model} | W+H - H (paired t) | {len(diff['per_seed'])} | {generations} | "
                    f"| {diff['mean']:+.3f} | [{low:+.3f}, {high:+.3f}] "
                    f"{'excludes 0' if diff['excludes_zero'] else 'includes 0'} | |")
    return "".join(row + "\n" for row in rows)


def plot(results: dict, path: Path, task: str) -> Path:
    """Test score by generation per arm (mean, band = min..max over seeds); when a harness exposed a
    tool, a second panel with the share of test episodes calling it and answering with its result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tools = bool(tool_use_table(results, task))
    fig, axes = plt.subplots(1, 2 if with_tools else 1, figsize=(12 if with_tools else 7, 4), squeeze=False)
    for (arm, ledgers), colour in zip(results.items(), ("tab:blue", "tab:orange")):
        curves = np.array([curve(ledger, "test") for ledger in ledgers])
        xs = np.arange(-1, curves.shape[1] - 1)
        axes[0, 0].plot(xs, curves.mean(0), color=colour, marker="o", label=f"{arm} (n={len(ledgers)} seeds)")
        axes[0, 0].fill_between(xs, curves.min(0), curves.max(0), color=colour, alpha=0.15, lw=0)
        if with_tools:
            uses = [tool_use_curve(ledger) for ledger in ledgers]
            for rate, style in (("episodes_calling", "--"), ("answers_with_result", "-")):
                means = np.mean([[point[rate] for point in run] for run in uses], axis=0)
                axes[0, 1].plot(xs, means, style, color=colour, marker="o", label=f"{arm}: {rate.replace('_', ' ')}")
    axes[0, 0].set_xlabel("generation (-1 = start)")
    axes[0, 0].set_ylabel("test score (held out; mean, band = min..max over seeds)")
    axes[0, 0].set_title(f"{task}: harness only vs harness + weights, equal budgets")
    axes[0, 0].legend()
    if with_tools:
        axes[0, 1].set_xlabel("generation (-1 = start)")
        axes[0, 1].set_ylabel("share of test episodes (mean over seeds)")
        axes[0, 1].set_title("tool use")
        axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="a run TOML (as for `siajax run --config`)")
    parser.add_argument("--task", default=None, help="default: the config's, else digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=None, help="default: the config's, else 6")
    parser.add_argument("--model", default=None, help="default: the config's, else the embedded default")
    parser.add_argument("--items-per-generation", type=int, default=None)
    parser.add_argument("--updates-per-generation", type=int, default=None)
    parser.add_argument("--dev-items", type=int, default=None)
    parser.add_argument("--test-items", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/paper"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="reuse finished runs' ledgers found under KEEP/<task>/ and copy new ones there "
                             "(e.g. experiments/paper/ledgers, kept in git)")
    parser.add_argument("--record", action="store_true", help="append the rows to experiments/paper/RESULTS.md")
    args = parser.parse_args(argv)

    settings = {} if args.config is None else load_settings(args.config)  # defaults: RunConfig's
    for name in ("task", "generations", "model", "items_per_generation", "updates_per_generation", "dev_items",
                 "test_items"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    base = RunConfig.from_dict(settings)
    args.task, args.generations = base.task, base.generations
    out = args.out / Path(args.task).name
    results = run_arms(base, args.seeds, out, None if args.keep is None else args.keep / Path(args.task).name)
    summary = summarise(results)
    rendered = table(summary, Path(args.task).name)
    tools = tool_use_table(results, Path(args.task).name)
    rendered += f"\n\n{tools}" if tools else ""
    (out / "summary.json").write_text(json.dumps({"config": base.to_dict(), "seeds": args.seeds,
                                                   "summary": summary}, indent=1))
    (out / "table.md").write_text(rendered + "\n")
    png = plot(results, out / "test_by_generation.png", Path(args.task).name)
    print(rendered)
    print(f"wrote {out}/summary.json, table.md and {png.name}")
    if args.record:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(results_rows(summary, Path(args.task).name, Path(base.model).name, args.generations))
    return summary


if __name__ == "__main__":
    main()
