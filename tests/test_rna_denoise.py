"""Denoising task: MCV metrics on hand-computed matrices, the split, baseline ranking, the verifier."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from siajax.tasks import resolve_task

TASK = resolve_task("rna_denoise")
sys.path.insert(0, str(TASK.root))
import mcv  # noqa: E402


def test_mse_on_log_normalised_counts_by_hand():
    pred = np.array([[1.0, 3.0], [2.0, 2.0]])
    test = np.array([[0.0, 4.0], [1.0, 1.0]])
    # rows scaled to 1e4 then log1p: pred -> [2500, 7500], [5000, 5000]; test -> [0, 10000], [5000, 5000]
    expected = ((math.log1p(2500) - 0) ** 2 + (math.log1p(7500) - math.log1p(10000)) ** 2) / 4
    assert mcv.mse(pred, test) == pytest.approx(expected, rel=1e-12)


def test_poisson_rescales_prediction_to_test_depth_by_hand():
    pred, train, test = np.array([[2.0, 0.0]]), np.array([[9.0, 9.0]]), np.array([[1.0, 1.0]])
    scaled = pred * 2.0 / 18.0  # [2/9, 0]
    expected = np.mean(scaled - test * np.log(scaled + 1e-6))
    assert mcv.poisson(pred, test, train) == pytest.approx(expected, rel=1e-12)
    assert mcv.normalised(0.5, baseline=1.0, best=0.0) == 0.5 and mcv.normalised(1.0, 1.0, 1.0) == 0.0


def test_binomial_split_conserves_counts_at_ninety_percent():
    counts, types = mcv.simulate_counts(n_cells=200, n_genes=300, seed=0)
    train, test = mcv.split_counts(counts, seed=1)
    assert (train + test == counts).all() and (train >= 0).all() and (test >= 0).all()
    assert train.sum() / counts.sum() == pytest.approx(0.9, abs=0.01)
    assert 0.5 < (counts == 0).mean() < 0.95 and len(set(types)) == 5  # sparse, several types
    np.testing.assert_array_equal(mcv.split_counts(counts, seed=1)[0], train)  # seeded


@pytest.mark.slow
def test_baselines_rank_sensibly_on_simulated_data():
    counts, _ = mcv.simulate_counts(seed=2)
    table = mcv.baseline_table(counts, seed=3)
    raw = table["no_denoising"]
    for name in ("library_size_smoothing", "knn_smoothing", "magic_diffusion", "low_rank"):
        assert table[name]["poisson"] < raw["poisson"], name  # every smoother predicts held-out counts better
        assert table[name + "_rounded"]["mse"] < table[name]["mse"], name  # integer outputs: the paper's fix
    assert min(t["mse"] for t in table.values()) < raw["mse"]


def score(source, seed=5):
    return TASK.verifier.score({"id": "t"}, source, source, seed=seed)


@pytest.mark.slow
def test_verifier_scores_baselines_where_they_belong():
    raw = score("def denoise(counts):\n    return counts")
    assert raw["failure"] is None and raw["reward"] == pytest.approx(0.0, abs=1e-9)
    best = score((TASK.root / "mcv.py").read_text() + "\ndef denoise(counts):\n"
                 "    return BASELINES['low_rank_rounded'](counts)\n")
    assert best["failure"] is None and best["reward"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("source,failure", [
    ("def denoise(counts):\n    return counts[:, :10]", "wrong_shape"),
    ("def denoise(counts):\n    return counts - 1.0", "negative_or_nan"),
    ("import numpy as np\ndef denoise(counts):\n    return counts * np.nan", "negative_or_nan"),
    ("def denoise(counts):\n    raise ValueError('no')", "crash"),
    ("def denoise(counts:\n    pass", "compile_error"),
    ("import mcv\ndef denoise(counts):\n    return counts", "crash"),  # the task's code is not in the jail
    # a FIFO the parent would block on: the system-call filter refuses to make one (and the parent opens no file)
    ("import os\ndef denoise(counts):\n    os.mkfifo('output.npy')\n    return 'output.npy'", "crash"),
])
def test_verifier_failure_kinds(source, failure):
    verdict = score(source)
    assert verdict["failure"] == failure, verdict
    assert verdict["reward"] == TASK.verifier.FAILURE_REWARD


def test_no_code_is_a_parse_error():
    assert score(None)["failure"] == "parse_error"


def test_a_valid_denoiser_worse_than_raw_still_beats_a_failure():
    rewards = [TASK.verifier.quality_reward(s) for s in (-1e6, -5.0, -0.5, 0.0, 0.3, 1.2)]
    assert rewards == sorted(rewards) and rewards[0] > TASK.verifier.FAILURE_REWARD
    assert rewards[3:] == [0.0, 0.3, 1.2]  # the paper's scale where it is non-negative


def test_a_verifier_fault_scores_the_failure_reward(monkeypatch):
    from siajax.agents.episodes import verify
    from siajax.harness import from_dict

    monkeypatch.setattr(TASK.verifier, "score", lambda *a, **k: 1 / 0)
    harness = TASK.default_harness()
    verdict = verify(TASK, harness, {"id": "t"}, "```python\ndef denoise(c):\n    return c\n```")
    assert verdict["reward"] == TASK.verifier.FAILURE_REWARD and verdict["failure"] == "verifier_error"
    del from_dict
