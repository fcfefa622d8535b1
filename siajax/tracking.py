"""Metric writers (in the style of CLU's metric_writers): the ledger's rows as TensorBoard or W&B series.

A writer takes ``scalars(step, {name: value})`` and ``text(step, name, text)``.
The loop hands every finished generation's ledger row to :class:`Trackers`,
which writes its per-generation scalars (dev / test score, spend, kept) at the
generation's step, each weight update's metrics under ``train/`` at a global
update step, and the decision and accepted patch as text. The ledger
(``ledger.jsonl``) stays the record; trackers are views of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

class TensorBoardWriter:
    """TensorBoard event files under ``<run_dir>/tensorboard`` (tensorboardX's writer)."""

    def __init__(self, run_dir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError("trackers=tensorboard needs tensorboardX: pip install 'siajax[tracking]'") from None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Weights & Biases (offline unless WANDB_MODE says otherwise); the run directory is its dir."""

    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ValueError("trackers=wandb needs wandb: pip install wandb") from None
        if not hasattr(wandb, "init"):
            raise ValueError("the installed 'wandb' package is not Weights & Biases' client")
        self.run = wandb.init(dir=str(run_dir), config=config, mode=None, name=Path(run_dir).name, reinit=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "step": step})

    def text(self, step: int, name: str, text: str) -> None:
        self.run.log({name: text, "step": step})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


WRITERS = {"tensorboard": lambda run_dir, config: TensorBoardWriter(run_dir), "wandb": WandbWriter}
TRACKERS = tuple(WRITERS)


def check_tracker_names(names) -> None:
    unknown = set(names) - set(WRITERS)
    if unknown:
        raise ValueError(f"unknown trackers {sorted(unknown)}; choose from {TRACKERS}")


def generation_scalars(entry: dict) -> dict[str, float]:
    """A ledger row's per-generation series."""
    after, spend = entry["after"], entry["spend"]
    values = {f"{split}/{key}": after[split][key] for split in ("dev", "test")
              for key in ("score", "pass_at_1") if key in after[split]}
    values.update({f"{split}/failure_rate/{kind}": rate for split in ("dev", "test")
                   for kind, rate in after[split].get("failure_rates", {}).items()})
    values.update({f"spend/{key}": value for key, value in spend.items()})
    values.update({"generation/kept": float(bool(entry["kept"])), "generation/failed": float(bool(entry["failed"])),
                   "generation/wall_seconds": entry["wall_seconds"]})
    values.update(time_scalars(entry.get("time") or {}))
    return {name: float(value) for name, value in values.items() if _is_number(value)}


def time_scalars(time: dict) -> dict:
    """Where a generation's time went (the ledger's ``time``): seconds per phase and stage, compiles, rates."""
    values = {f"time/{phase}": seconds for phase, seconds in time.get("phases", {}).items()}
    values.update({f"time/stage/{stage}": seconds for stage, seconds in time.get("stages", {}).items()})
    values.update({f"time/{name}": count for name, count in time.get("counts", {}).items()})
    values.update({f"time/{rate}": time.get(rate) for rate in ("generated_tokens_per_s", "train_tokens_per_s")})
    return values


def update_scalars(entry: dict) -> list[dict[str, float]]:
    """Each weight update's metrics of a ledger row, prefixed ``train/``."""
    updates = (entry.get("train") or {}).get("updates", [])
    return [{f"train/{k}": float(v) for k, v in update.items() if k != "update" and _is_number(v)}
            for update in updates]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Trackers:
    """The writers a run asked for, fed one ledger row per finished generation."""

    def __init__(self, names, run_dir: Path, config: dict, updates_per_generation: int):
        check_tracker_names(names)
        self.writers = [WRITERS[name](Path(run_dir), config) for name in names]
        self.updates_per_generation = updates_per_generation

    def on_event(self, kind: str, payload: dict) -> None:
        if kind == "generation" and self.writers:
            self.log_generation(payload)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def log_generation(self, entry: dict) -> None:
        generation = entry["generation"]
        decision = entry["decision"]
        for writer in self.writers:
            writer.scalars(generation, generation_scalars(entry))
            for index, values in enumerate(update_scalars(entry)):
                writer.scalars(generation * self.updates_per_generation + index, values)
            writer.text(generation, "decision", f"{decision['lever']} {decision.get('recipe') or ''}: "
                                                f"{decision.get('rationale', '')}")
            if entry.get("accepted_patch"):
                writer.text(generation, "harness_patch", json.dumps(entry["accepted_patch"], ensure_ascii=False))
            writer.flush()
