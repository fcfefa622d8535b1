"""A run as one self-contained HTML page (``siajax report RUN --html``): nothing fetched from the
network, the score plot inlined, so the file can be mailed or attached to a paper's artefacts.

Sections: the run's settings; dev and test per generation (the plot); the
per-generation table with flags; then each generation in detail: the decision and
its rationale, the harness change as a JSON patch, the candidates with their dev
scores and verdicts, the weight lever's updates, dev failures by kind with one
example reply each, and where the time went.
"""

from __future__ import annotations

import base64
import collections
import html
import json
from pathlib import Path

from siajax.harness import HarnessStore
from siajax.report import ledger_rows, plot_scores
from siajax.rundir import load_config, read_jsonl, read_ledger

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap;max-height:22em}
details{margin:.4em 0 1em;border-left:3px solid #ddd;padding-left:.8em}summary{cursor:pointer;font-weight:600}
.flag{color:#a40000;font-weight:600}img{max-width:100%}"""


def write_html_report(run_dir: str | Path) -> Path:
    """Writes ``report.html`` in the run directory; -> its path."""
    run_dir = Path(run_dir)
    ledger = read_ledger(run_dir)
    if not ledger:
        raise FileNotFoundError(f"{run_dir} has no finished generation (ledger.jsonl is empty or missing)")
    config = load_config(run_dir).to_dict()
    plot = base64.b64encode(plot_scores(ledger, run_dir / "score.png").read_bytes()).decode()
    store = HarnessStore(run_dir / "harness")
    body = [f"<h1>siajax run {_e(run_dir.name)}</h1>", _settings(config, ledger),
            f'<h2>Scores</h2><img alt="dev and test score per generation" src="data:image/png;base64,{plot}">',
            "<h2>Generations</h2>", _generation_table(ledger)]
    body += [_generation_details(entry, store, run_dir) for entry in ledger]
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>siajax {_e(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{cell}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _settings(config: dict, ledger: list[dict]) -> str:
    start = ledger[0]["before"]
    shown = ("task", "model", "levers", "seed", "generations", "items_per_generation", "updates_per_generation",
             "dev_items", "test_items", "learning_rate", "feedback", "meta")
    rows = [[_e(name), _e(config.get(name))] for name in shown if name in config]
    rows.append(["start", f"dev {start['dev']['score']:.3f}, test {start['test']['score']:.3f}"])
    return "<h2>Settings</h2>" + _table(["setting", "value"], rows)


def _generation_table(ledger: list[dict]) -> str:
    rows = []
    for row, entry in zip(ledger_rows(ledger), ledger):
        flags = " ".join(f'<span class="flag">{_e(f)}</span>' for f in entry.get("flags", []))
        rows.append([row["generation"], _e(row["lever"]), _e(row["recipe"]),
                     f"{row['dev_before']:.3f} → {row['dev']:.3f}", f"{row['test']:.3f}", _e(row["verdict"]),
                     f"{row['samples']} / {row['budget']}", f"{row['wall_s']:.0f}", flags, _e(row["why"])])
    return _table(["gen", "lever", "recipe", "dev", "test", "verdict", "samples / budget", "wall s", "flags", "why"],
                  rows, numeric={0, 3, 4, 6, 7})


def _generation_details(entry: dict, store: HarnessStore, run_dir: Path) -> str:
    g = entry["generation"]
    parts = [f"<p>{_e(entry['decision']['rationale'])}</p>"]
    if entry.get("failed"):
        parts.append(f'<p class="flag">failed: {_e(entry["failed"])}</p>')
    if entry["next_harness"] != entry["harness_version"]:
        patch = store.diff(entry["harness_version"], entry["next_harness"])
        parts.append(f"<h4>Harness change {entry['harness_version']} → {entry['next_harness']}</h4>"
                     f"<pre>{_e(json.dumps(patch, indent=1, ensure_ascii=False))}</pre>")
    state_records = run_dir / entry.get("eval_records_from", f"gen_{g:03d}") / "eval_dev.jsonl"
    parts += [_candidates(entry), _updates(entry), _failures(state_records), _time(entry)]
    return (f"<details><summary>generation {g}: {_e(entry['decision']['lever'])} — dev "
            f"{entry['before']['dev']['score']:.3f} → {entry['after']['dev']['score']:.3f}</summary>"
            + "".join(parts) + "</details>")


def _candidates(entry: dict) -> str:
    if not entry.get("candidates"):
        return ""
    rows = []
    for c in entry["candidates"]:
        comparison = c.get("comparison") or {}
        interval = f"{comparison['lower']:+.3f} … {comparison['upper']:+.3f}" if "lower" in comparison else ""
        rows.append([_e(c["kind"]), _e(c.get("why", "")), f"{c.get('dev_score', float('nan')):.3f}",
                     f"{comparison.get('mean_difference', float('nan')):+.3f}", interval,
                     f"{comparison.get('p_not_better', float('nan')):.3f}", _e(c.get("kept_by") or "—")])
    return "<h4>Candidates on dev</h4>" + _table(
        ["edit", "why", "dev", "Δ vs entering", "interval", "p (not better)", "kept by"], rows, numeric={2, 3, 5})


def _updates(entry: dict) -> str:
    train = entry.get("train") or {}
    if not train.get("updates"):
        return ""
    names = ("reward", "informative_groups", "loss", "approx_kl", "entropy", "grad_norm", "logprob_mismatch",
             "applied_steps")
    rows = [[u["update"]] + [f"{u[n]:.4g}" if isinstance(u.get(n), (int, float)) else "" for n in names]
            for u in train["updates"]]
    return (f"<h4>Weight updates ({_e(train.get('recipe'))})</h4>"
            + _table(["update", *names], rows, numeric=set(range(len(names) + 1))))


def _failures(records_path: Path, examples: int = 1) -> str:
    """Dev outcomes of the state a generation left, by kind, each with an example reply."""
    records = read_jsonl(records_path)
    by_kind = collections.defaultdict(list)
    for record in records:
        by_kind[record.get("failure") or "success"].append(record)
    if not records:
        return ""
    rows = [[_e(kind), len(group), f"{len(group) / len(records):.0%}",
             "".join(f"<pre>{_e(r['item'])}: {_e(str(r.get('text', ''))[:600])}</pre>" for r in group[:examples])]
            for kind, group in sorted(by_kind.items(), key=lambda kv: -len(kv[1]))]
    return "<h4>Dev outcomes by kind</h4>" + _table(["outcome", "replies", "share", "example"], rows, numeric={1, 2})


def _time(entry: dict) -> str:
    time = entry.get("time")
    if not time:
        return ""
    rows = [[_e(phase), f"{seconds:.1f}"] for phase, seconds in time["phases"].items() if seconds]
    return f"<h4>Where the time went ({time['wall']:.0f} s)</h4>" + _table(["phase", "seconds"], rows, numeric={1})
