"""Per-generation table and dev/test plot of a run (``siajax report RUN``)."""

from __future__ import annotations

from pathlib import Path

from siajax.rundir import read_ledger


def verdict(entry: dict) -> str:
    """What became of a generation's change: failed (nothing applied), rolled back, kept, or none tried."""
    if entry.get("failed"):
        return "failed"
    return "rolled back" if entry["rolled_back"] else ("kept" if entry["comparison"] else "-")


def ledger_rows(ledger: list[dict]) -> list[dict]:
    rows = []
    for e in ledger:
        spend = e.get("spend", {})
        rows.append({
            "generation": e["generation"], "lever": e["decision"]["lever"], "recipe": e["decision"]["recipe"] or "",
            "dev_before": e["before"]["dev"]["score"], "dev": e["after"]["dev"]["score"],
            "pass_at_1": e["after"]["dev"]["pass_at_1"], "test": e["after"]["test"]["score"],
            "test_pass_at_1": e["after"]["test"]["pass_at_1"],
            "verdict": verdict(e),
            "samples": spend.get("spent_samples", 0), "budget": spend.get("budget_samples"),
            "harness": e["next_harness"], "wall_s": e["wall_seconds"], "why": e["decision"]["rationale"],
        })
    return rows


def plot_scores(ledger: list[dict], path: Path) -> Path:
    """Dev and test score of the state leaving each generation (generation -1: the start), levers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ledger_rows(ledger)
    xs = [-1] + [r["generation"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for split, colour in (("dev", "tab:blue"), ("test", "tab:green")):
        start = ledger[0]["before"][split]["score"]
        ax.plot(xs, [start] + [r[split] for r in rows], color=colour, marker=".", label=f"{split} score")
    for r in rows:
        colour = "tab:orange" if r["lever"] == "weights" else "0.6"
        ax.axvspan(r["generation"] - 0.5, r["generation"] + 0.5, color=colour, alpha=0.12, lw=0)
        label = r["recipe"] or "harness"
        ax.annotate(label + (" (rolled back)" if r["verdict"] == "rolled back" else ""), (r["generation"], 0.02),
                    fontsize=7, rotation=90, va="bottom", ha="center")
    ax.set_xlabel("generation (-1 = start; shading: lever pulled, orange = weights)")
    ax.set_ylabel("score on held-out items")
    top = max([1.0] + [r["dev"] for r in rows] + [r["test"] for r in rows])
    ax.set_ylim(min(0.0, *(r["test"] for r in rows)) - 0.05, top + 0.05)
    ax.legend(loc="upper left")
    ax.set_title("SIA run: dev (decisions) and test (reported only) per generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dir: str | Path, console=None) -> Path:
    """Prints the table and writes ``score.png`` in the run directory; returns the PNG path."""
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(run_dir)
    ledger = read_ledger(run_dir)
    if not ledger:
        raise FileNotFoundError(f"{run_dir} has no finished generation (ledger.jsonl is empty or missing)")
    table = Table(title=f"siajax run {run_dir.name}: start dev {ledger[0]['before']['dev']['score']:.3f}, "
                        f"test {ledger[0]['before']['test']['score']:.3f}")
    for column in ("gen", "lever", "recipe", "dev", "pass@1", "test", "verdict", "samples", "harness", "wall s",
                   "why"):
        table.add_column(column)
    for r in ledger_rows(ledger):
        table.add_row(str(r["generation"]), r["lever"], r["recipe"], f"{r['dev_before']:.3f}->{r['dev']:.3f}",
                      f"{r['pass_at_1']:.3f}", f"{r['test']:.3f}", r["verdict"], str(r["samples"]), r["harness"],
                      f"{r['wall_s']:.1f}", r["why"][:50])
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 170)
    console.print(table)
    if any("time" in entry for entry in ledger):
        console.print(time_table(ledger))
    return plot_scores(ledger, run_dir / "score.png")


def time_table(ledger: list[dict]):
    """Where each generation's wall time went: seconds per phase (they add up to the wall), the
    compiles, and the sampler's and trainer's token rates."""
    from rich.table import Table

    from siajax.timing import PHASES

    table = Table(title="where the time went (seconds; phases add up to the wall time)")
    for column in ("gen", "wall", *PHASES, "compiles", "gen tok/s", "train tok/s"):
        table.add_column(column, justify="right")
    for entry in ledger:
        time = entry.get("time")
        if time is None:  # a ledger written before siajax.timing
            continue
        rates = [f"{time[name]:.0f}" if time[name] else "-" for name in ("generated_tokens_per_s", "train_tokens_per_s")]
        table.add_row(str(entry["generation"]), f"{time['wall']:.1f}", *(f"{time['phases'][p]:.1f}" for p in PHASES),
                      str(time["counts"]["compiles"]), *rates)
    return table
