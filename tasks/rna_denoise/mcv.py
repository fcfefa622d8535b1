"""Molecular cross-validation (MCV) for count denoising, simulated data, real-data loaders, baselines.

As the OpenProblems v2 denoising task defines it:
  split    X_train = Binomial(X, 0.9), X_test = X - X_train (per count, seeded);
  mse      normalize_total(1e4) then log1p on the denoised matrix and on X_test, mean squared difference;
  poisson  pred' = pred * sum(X_test) / sum(X_train); mean(pred' - X_test * log(pred' + 1e-6));
  normalised score (pred) = (m(no denoising) - m(pred)) / (m(no denoising) - m(best baseline)):
           0 = no better than the raw counts, 1 = as good as the best classical method on this split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRAIN_FRACTION = 0.9
TARGET_SUM = 1e4


def simulate_counts(n_cells=400, n_genes=2000, n_types=5, seed=0, depth=1.0, dispersion=0.3, dropout_midpoint=0.0):
    """Splatter-style counts: Gamma gene means, 10% DE genes per latent type (log-normal fold changes),
    log-normal library sizes, Gamma-Poisson (negative binomial) sampling, logistic dropout on log mean.
    -> (counts [cells, genes] int64, cell types [cells])."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.3, 2.0, n_genes) * depth
    factors = np.ones((n_types, n_genes))
    for t in range(n_types):
        de = rng.random(n_genes) < 0.1
        factors[t, de] = rng.lognormal(0.0, 1.0, de.sum()) * rng.choice([0.5, 2.0], de.sum())
    types = rng.integers(0, n_types, n_cells)
    means = base[None] * factors[types] * rng.lognormal(0.0, 0.3, n_cells)[:, None]
    counts = rng.poisson(rng.gamma(1.0 / dispersion, means * dispersion))
    dropped = rng.random(counts.shape) < 1.0 / (1.0 + np.exp(np.log(means + 1e-12) - dropout_midpoint))
    return np.where(dropped, 0, counts).astype(np.int64), types


def load_scanpy_pbmc68k_reduced() -> np.ndarray:
    """Real UMI counts shipped in scanpy's wheel (700 cells x 765 genes): round(expm1(raw.X) * n_counts / 1e4).
    Needs ``pip install scanpy``; offline once installed."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    raw = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    return np.round(np.expm1(raw) * adata.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.int64)


def load_h5ad_counts(path: str | Path, layer: str = "counts") -> np.ndarray:
    """Raw counts from an OpenProblems / CELLxGENE ``.h5ad`` (download it first when online)."""
    import anndata

    adata = anndata.read_h5ad(path)
    matrix = adata.layers[layer] if layer in adata.layers else adata.X
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix).astype(np.int64)


def split_counts(counts: np.ndarray, seed: int, fraction: float = TRAIN_FRACTION):
    train = np.random.default_rng(seed).binomial(counts, fraction)
    return train, counts - train


def log_normalise(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12) * TARGET_SUM)


def mse(pred: np.ndarray, test: np.ndarray) -> float:
    return float(np.mean((log_normalise(pred) - log_normalise(test)) ** 2))


def poisson(pred: np.ndarray, test: np.ndarray, train: np.ndarray) -> float:
    scaled = pred * test.sum() / train.sum()
    return float(np.mean(scaled - test * np.log(scaled + 1e-6)))


def normalised(value: float, baseline: float, best: float) -> float:
    return (baseline - value) / (baseline - best) if baseline != best else 0.0


# Classical baselines: counts in, non-negative matrix on the counts' scale out. numpy/scipy/sklearn only.

def no_denoising(x):
    return x.astype(np.float64)


def library_size_smoothing(x, weight=0.5):
    """Shrink each cell towards the population profile scaled to its library size."""
    profile = x.sum(0) / x.sum()
    return weight * x + (1 - weight) * x.sum(1, keepdims=True) * profile[None]


def _to_library(log_values, x):
    expressed = np.expm1(np.maximum(log_values, 0.0))
    return expressed / np.maximum(expressed.sum(1, keepdims=True), 1e-12) * x.sum(1, keepdims=True)


def _neighbours(x, k, n_components=20):
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    pcs = PCA(n_components=min(n_components, min(x.shape) - 1), random_state=0).fit_transform(log_normalise(x))
    return NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs)


def knn_smoothing(x, k=10):
    """Mean expression profile of each cell's k nearest neighbours, at the cell's own library size."""
    _, index = _neighbours(x, k)
    fractions = x / np.maximum(x.sum(1, keepdims=True), 1)
    return fractions[index].mean(1) * x.sum(1, keepdims=True)


def magic_diffusion(x, k=10, t=3, decay_k=5):
    """MAGIC-style: adaptive Gaussian kNN affinities -> Markov matrix -> t diffusion steps on log data."""
    distances, index = _neighbours(x, k)
    sigma = distances[:, min(decay_k, k - 1)][:, None] + 1e-12
    affinity = np.zeros((x.shape[0], x.shape[0]))
    np.put_along_axis(affinity, index, np.exp(-((distances / sigma) ** 2)), axis=1)
    affinity = affinity + affinity.T
    smoothed = log_normalise(x)
    markov = affinity / affinity.sum(1, keepdims=True)
    for _ in range(t):
        smoothed = markov @ smoothed
    return _to_library(smoothed, x)


def low_rank(x, rank=15):
    """ALRA-style: rank-k truncated SVD of the log-normalised matrix, negatives clipped to 0."""
    from scipy.sparse.linalg import svds

    data = log_normalise(x)
    u, s, vt = svds(data, k=min(rank, min(data.shape) - 1))
    return _to_library((u * s) @ vt, x)


def as_integers(denoise):
    """The paper's decisive fix: clip and round the output to non-negative integer counts."""
    def rounded(x):
        return np.round(np.maximum(denoise(x), 0.0))
    rounded.__name__ = denoise.__name__ + "_rounded"
    return rounded


BASELINES = {f.__name__: f for f in (no_denoising, library_size_smoothing, knn_smoothing, magic_diffusion, low_rank)}
BASELINES.update({f"{name}_rounded": as_integers(f) for name, f in list(BASELINES.items()) if name != "no_denoising"})


def baseline_table(counts: np.ndarray, seed: int) -> dict:
    """mse and poisson of every baseline on one MCV split."""
    train, test = split_counts(counts, seed)
    table = {}
    for name, denoise in BASELINES.items():
        pred = np.asarray(denoise(train), np.float64)
        table[name] = {"mse": mse(pred, test), "poisson": poisson(pred, test, train)}
    return table
