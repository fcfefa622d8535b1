"""Per-generation table and score plot of a run (``siajax report RUN``)."""

from __future__ import annotations

from pathlib import Path

from siajax.loop import read_ledger


def ledger_rows(ledger: list[dict]) -> list[dict]:
    return [{
        "generation": e["generation"], "score": e["score"], "lever": e["decision"]["lever"],
        "recipe": e["decision"]["recipe"] or "", "harness": e["harness_version"],
        "next_harness": e["next_harness"], "wall_s": e["wall_seconds"], "why": e["decision"]["rationale"],
    } for e in ledger]


def plot_scores(ledger: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ledger_rows(ledger)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["generation"] for r in rows], [r["score"] for r in rows], color="0.4", zorder=1)
    styles = {"harness": ("s", "tab:blue"), "weights": ("o", "tab:orange")}
    for lever, (marker, colour) in styles.items():
        chosen = [r for r in rows if r["lever"] == lever]
        ax.scatter([r["generation"] for r in chosen], [r["score"] for r in chosen], marker=marker, color=colour,
                   s=60, zorder=2, label=f"then {lever} lever")
    for r in rows:
        if r["recipe"]:
            ax.annotate(r["recipe"], (r["generation"], r["score"]), textcoords="offset points", xytext=(4, -12),
                        fontsize=8)
    ax.set_xlabel("generation")
    ax.set_ylabel("score (mean reward of the generation's rollouts)")
    ax.set_ylim(-0.05, 1.05 if max((r["score"] for r in rows), default=1) <= 1 else None)
    ax.legend()
    ax.set_title("SIA run: score per generation, lever chosen after it")
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
    table = Table(title=f"siajax run {run_dir.name}")
    for column in ("gen", "score", "lever", "recipe", "harness", "→ harness", "wall s", "why"):
        table.add_column(column)
    for r in ledger_rows(ledger):
        table.add_row(str(r["generation"]), f"{r['score']:.3f}", r["lever"], r["recipe"], r["harness"],
                      r["next_harness"], f"{r['wall_s']:.1f}", r["why"][:60])
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)
    console.print(table)
    return plot_scores(ledger, run_dir / "score.png")
