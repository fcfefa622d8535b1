"""The command line around the happy path: one-line errors, nothing half-made, config files, tokenizers
without a pad token and with several end-of-turn ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from siajax.cli import main
from siajax.rundir import TIMING_FIELDS, read_ledger
from siajax.models import BUNDLED_TINY_MODEL, decoding_ids, from_pretrained
from siajax.sampling import generate


def cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize("argv,message", [
    (["run", "--task", "nope"], "no task named 'nope'"),
    (["run", "--mesh", "bad=3"], "unknown mesh axes"),
    (["run", "--model", "/nonexistent/model"], "no checkpoint directory"),
    (["run", "--recipe", "entropic", "--samples-per-prompt", "2"], "at least 3 samples"),
    (["run", "--generations", "0"], "generations must be >= 1"),
    (["run", "--retire-finished-rows", "8", "--mesh", "data=1"], "runs on one device (no mesh)"),
    (["run", "--items-per-generation", "3", "--samples-per-prompt", "3", "--levers", "weights"], "do not split"),
])
def test_bad_run_inputs_are_one_line_and_leave_nothing_behind(capsys, tmp_path, argv, message):
    run_dir = tmp_path / "run"
    code, err = cli(capsys, *argv, "--run-dir", str(run_dir))
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err, err
    assert not run_dir.exists()


def test_missing_runs_and_generations_are_one_line(capsys, tmp_path):
    for argv in (["resume", str(tmp_path / "none")], ["report", str(tmp_path / "none")],
                 ["eval", str(tmp_path / "none")]):
        code, err = cli(capsys, *argv)
        assert code == 2 and "not a siajax run directory" in err and "\n" not in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(Exception, match="no task named"):
        main(["--debug", "run", "--task", "nope", "--run-dir", str(tmp_path / "run")])


def test_a_toml_config_file_with_flags_on_top(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'task = "digits"\nmodel = "{BUNDLED_TINY_MODEL}"\nlevers = "harness"\ngenerations = 1\n'
                      'seed = 1\nitems_per_generation = 4\ndev_items = 4\ntest_items = 4\n\n'
                      '[acceptance_rule]\nalpha = 0.2\n')
    code, err = cli(capsys, "run", "--config", str(config), "--seed", "5", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["seed"] == 5 and saved["generations"] == 1 and saved["acceptance_rule"]["alpha"] == 0.2
    broken = tmp_path / "broken.toml"
    broken.write_text("task = \n")
    assert cli(capsys, "run", "--config", str(broken), "--run-dir", str(tmp_path / "r2"))[0] == 2
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("tasks = 'digits'\n")
    code, err = cli(capsys, "run", "--config", str(unknown), "--run-dir", str(tmp_path / "r3"))
    assert code == 2 and "unknown run settings ['tasks']" in err and not (tmp_path / "r3").exists()


@pytest.mark.parametrize("setting,message", [
    ('generations = "2"', "config.generations: expected int, got str '2'"),
    ("dev_items = 2.5", "config.dev_items: expected int, got float 2.5"),
    ("lora_rank = true", "config.lora_rank: expected int, got bool True"),
    ('temperature = "hot"', "config.temperature: expected float, got str 'hot'"),
    ("[acceptance_rule]\nalpha = \"high\"", "acceptance_rule.alpha: expected float, got str 'high'"),
    ("[edit_grid]\nfew_shot_k = [1, 2.5]", "edit_grid.few_shot_k: expected int, got float 2.5"),
    ("generations = ", "bad.toml: not valid TOML"),
])
def test_a_toml_value_of_the_wrong_type_is_one_line_naming_the_field_and_file(capsys, tmp_path, setting, message):
    config = tmp_path / "bad.toml"
    config.write_text(f'task = "digits"\n{setting}\n')
    code, err = cli(capsys, "run", "--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_run_help_groups_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for group in ("weight lever:", "harness and evaluation:", "feedback agent:", "meta agent:"):
        assert group in text
    for flag in ("--recipe", "--temperature", "--samples-per-prompt", "--epochs", "--dev-items", "--lr-schedule",
                 "--config"):
        assert flag in text


def test_a_llama3_style_tokenizer_without_pad_and_with_several_stop_ids(tmp_path):
    directory = tmp_path / "llama3ish"
    shutil.copytree(BUNDLED_TINY_MODEL, directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model, tokenizer = from_pretrained(directory)
    assert tokenizer.pad_token_id is None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count the cells."}],
                                           add_generation_prompt=True)["input_ids"]
    free = generate(model, [prompt], key=jax.random.key(0), max_new_tokens=12, temperature=0.0, pad_token_id=0)
    end_of_turn = int(free.tokens[0, 2])  # a token greedy decoding emits third plays <|eot_id|>
    generation = {"eos_token_id": [tokenizer.eos_token_id, end_of_turn]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    ids = decoding_ids(tokenizer)
    assert ids.stop_token_ids == (tokenizer.eos_token_id, end_of_turn) and ids.pad_token_id == tokenizer.eos_token_id
    stopped = generate(model, [prompt], key=jax.random.key(0), max_new_tokens=12, temperature=0.0,
                       stop_token_ids=ids.stop_token_ids, pad_token_id=ids.pad_token_id)
    first = [int(t) for t in free.tokens[0]].index(end_of_turn)
    assert int(stopped.lengths[0]) == first + 1
    with pytest.raises(ValueError, match="pad_token_id is None"):
        generate(model, [prompt], key=jax.random.key(0), max_new_tokens=4, pad_token_id=None)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [prompt], key=jax.random.key(0), max_new_tokens=4, top_p=0.0)


def test_a_second_run_of_the_same_config_loads_its_programs_from_the_compilation_cache(tmp_path):
    """`siajax run` turns JAX's persistent compilation cache on under $SIAJAX_CACHE: the second run of a
    config reads its programs back (the ledger counts the cache hits) and computes the same ledger."""
    unwanted = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT", "SIAJAX_COMPILE_CACHE")  # the suite turns it off
    env = {k: v for k, v in os.environ.items() if not k.startswith(unwanted)}
    env["SIAJAX_CACHE"] = str(tmp_path / "cache")
    argv = [sys.executable, "-m", "siajax", "run", "--task", "digits", "--model", str(BUNDLED_TINY_MODEL),
            "--levers", "harness", "--generations", "1", "--dev-items", "4", "--test-items", "4"]
    ledgers = []
    for name in ("first", "second"):
        done = subprocess.run([*argv, "--run-dir", str(tmp_path / name)], env=env, cwd=Path(__file__).parent.parent,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        ledgers.append(read_ledger(tmp_path / name))
    hits = [ledger[0]["time"]["counts"]["cache_hits"] for ledger in ledgers]
    assert hits[1] > hits[0] and any((tmp_path / "cache" / "xla").iterdir()), hits
    assert [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in ledgers[0]] == \
        [{k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in ledgers[1]]


@pytest.mark.parametrize("signal_name, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_and_sigterm_end_a_run_with_the_resume_command(tmp_path, signal_name, code, said):
    """The real command, stopped once its run directory exists: the shell's exit code, the resume
    line last, and no segfault in the interpreter's teardown (it was 139 in 3 of 6 Ctrl-C tries)."""
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "SIAJAX_COMPILE_CACHE": "0"}
    process = subprocess.Popen([sys.executable, "-m", "siajax", "run", "--task", "digits", "--model",
                                str(BUNDLED_TINY_MODEL), "--levers", "harness", "--generations", "3", "--dev-items",
                                "4", "--test-items", "4", "--run-dir", str(run_dir)], env=env,
                               cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "initial").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(getattr(signal, signal_name))
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == f"{said}; continue with: siajax resume {run_dir}"


def _limit_file_size(limit: int):
    """A child whose files may not grow past ``limit`` bytes: a full disk's refusal (EFBIG), as a
    user without root can make it."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_and_the_run_resumes_when_there_is_room(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "SIAJAX_COMPILE_CACHE": "0"}
    argv = [sys.executable, "-m", "siajax"]
    full = subprocess.run([*argv, "run", "--task", "digits", "--model", str(BUNDLED_TINY_MODEL), "--levers", "harness",
                           "--generations", "1", "--dev-items", "4", "--test-items", "4", "--run-dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(4096))
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 74 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert lines[-1].startswith(f"siajax run: error: {run_dir}") and "File too large (the run so far is kept" in lines[-1]
    assert lines[-1].endswith(f"continue with: siajax resume {run_dir})")
    assert not list(run_dir.rglob("*.tmp"))  # no partial file left behind
    resumed = subprocess.run([*argv, "resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_ledger(run_dir)) == 1


def test_a_checkpoint_the_disk_refuses_is_one_oserror_without_orbax_noise(tmp_path):
    script = (
        "import errno, numpy as np, jax.numpy as jnp\n"
        "from siajax.train.checkpoint import save_pytree\n"
        f"target = {str(tmp_path / 'ckpt')!r}\n"
        "try:\n"
        "    save_pytree(target, {'w': jnp.asarray(np.random.rand(100_000))})\n"
        "except OSError as err:\n"
        "    print(err.errno == errno.EFBIG, err.filename == target)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(64 * 1024))
    assert done.stdout.split() == ["True", "True"], done.stdout + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "absl" not in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.glob("ckpt*"))  # orbax's temp dir removed


def test_a_read_only_run_directory_is_one_line(tmp_path):
    """Writes denied by the kernel (Landlock: the whole filesystem read-only but a scratch dir, as a
    read-only mount would be, for root too): exit 74 and one line naming the file."""
    from siajax.sandbox import launcher

    if launcher.landlock_abi() < 1:
        pytest.skip("Landlock is not available in this kernel")
    scratch, locked = tmp_path / "scratch", tmp_path / "locked"
    scratch.mkdir()
    locked.mkdir()
    env = {**os.environ, "SIAJAX_COMPILE_CACHE": "0", "HOME": str(scratch), "TMPDIR": str(scratch),
           "MPLCONFIGDIR": str(scratch), "SIAJAX_CACHE": str(scratch / "cache")}
    done = subprocess.run([sys.executable, "-m", "siajax", "run", "--task", "digits", "--model", str(BUNDLED_TINY_MODEL),
                           "--levers", "harness", "--generations", "1", "--run-dir", str(locked / "run")], env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: launcher.landlock(["/"], [str(scratch), "/dev"]))
    assert done.returncode == 74, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [f"siajax run: error: {locked / 'run'}: Permission denied"]
