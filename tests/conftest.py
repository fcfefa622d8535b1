"""Shared fixtures: tiny random HF checkpoints written by transformers (PyTorch, imported only by
the tests that use them: the JAX-only tests run without torch, ``SIAJAX_HIDE_TORCH=1`` proves it)."""

from __future__ import annotations

import os
import sys

HIDE_TORCH = os.environ.get("SIAJAX_HIDE_TORCH") == "1"
if HIDE_TORCH:  # as if torch were not installed: `import torch` fails,
    sys.modules["torch"] = None  # and find_spec (transformers' availability check) returns None

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in the tests (nor in the CLI runs they start): with one shared by
# the session, two CI-equivalent runs segfaulted inside JAX's cache (a write on a server thread, then
# a read on the main thread), never a file run alone. The CLI's own cache has its own test, in a
# fresh directory.
os.environ.setdefault("SIAJAX_COMPILE_CACHE", "0")
# Eight host devices for the mesh tests; read when JAX's backend starts, so set before any test imports jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
BASE = dict(
    vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def make_hf_checkpoint(directory, family: str, seed: int = 0, **overrides):
    """Writes a random-initialised HF checkpoint; returns the eval-mode torch model."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    import transformers

    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**BASE, **overrides})).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory with a per-session cache: (family, seed, overrides) -> (torch_model, dir)."""
    cache = {}

    def build(family="llama", seed=0, **overrides):
        key = (family, seed, repr(sorted(overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-ckpt")
            cache[key] = (make_hf_checkpoint(directory, family, seed, **overrides), directory)
        return cache[key]

    return build


def left_padded_batch(rng: np.random.RandomState, lengths, vocab: int, pad: int = 0):
    """Token ids [B, max(lengths)] and mask, right-aligned; real ids avoid the pad id."""
    width = max(lengths)
    ids = np.full((len(lengths), width), pad, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = rng.randint(3, vocab, n)
        mask[row, width - n:] = 1
    return ids, mask


_skipped_without_torch: list[str] = []


def pytest_collectreport(report):
    if HIDE_TORCH and report.skipped:
        _skipped_without_torch.append(report.nodeid)


def pytest_runtest_logreport(report):
    if HIDE_TORCH and report.skipped:
        _skipped_without_torch.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """With torch hidden, a skip is a failure: the JAX-only tests must run, not skip, without torch."""
    if _skipped_without_torch:
        print(f"\nskipped with SIAJAX_HIDE_TORCH=1 (these must run without torch): {_skipped_without_torch}")
        session.exitstatus = 1


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. A full run compiles thousands; three
    CI-equivalent runs then segfaulted inside XLA (compile, serialize, deserialize) at about the same
    point of the suite, never a file alone: a per-process resource running out, we think."""
    yield
    import jax

    jax.clear_caches()


def _jail_cgroups() -> set[str]:
    import glob

    return set(glob.glob("/sys/fs/cgroup/**/siajax-sbx-*", recursive=True))


@pytest.fixture(autouse=True)
def no_jail_cgroup_outlives_its_test():
    """Every sandbox call removes its cgroup. A test that leaves one fails here, under its own name; a
    later test's check would blame the wrong test (CI once saw three sandbox tests fail for one leak)."""
    before = _jail_cgroups()
    yield
    left = _jail_cgroups() - before
    assert not left, f"jail cgroups left behind: {sorted(left)}"


def host_processes_named(name: str) -> list[int]:
    """Processes anywhere on the host whose name (comm) is ``name``: an escaped jail process sets one."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and open(f"/proc/{pid}/comm").read().strip() == name:
                found.append(int(pid))
        except OSError:
            pass
    return found
