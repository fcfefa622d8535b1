"""Agent-written code in the sandbox: each escape attempt is contained and classified."""

from __future__ import annotations

import textwrap

import pytest

from siajax.sandbox import SandboxLimits, run_sandboxed, unprivileged_uid

FAST = SandboxLimits(wall_seconds=10, cpu_seconds=10, memory_bytes=1 << 30)


@pytest.fixture
def task_dirs(tmp_path):
    public, private = tmp_path / "task" / "data" / "public", tmp_path / "task" / "data" / "private"
    public.mkdir(parents=True)
    private.mkdir(parents=True)
    (public / "inputs.txt").write_text("1 2 3")
    (private / "answers.txt").write_text("SECRET")
    return public, private


def run(code: str, dirs=None, **kwargs):
    public, private = dirs if dirs else (None, None)
    return run_sandboxed(
        textwrap.dedent(code), entry="main", limits=kwargs.pop("limits", FAST),
        readable_dirs=[public] if public else [], forbidden_dirs=[private] if private else [], **kwargs,
    )


def test_ok_code_returns_its_value_and_reads_public_data(task_dirs):
    public, _ = task_dirs
    result = run(f"""
        def main(scale):
            numbers = open({str(public / 'inputs.txt')!r}).read().split()
            open('notes.txt', 'w').write('scratch is writable')
            return sum(int(n) for n in numbers) * scale
    """, task_dirs, kwargs={"scale": 2})
    assert result.status == "ok" and result.value == 12, result


def test_syntax_error_is_a_compile_error():
    result = run("def main(:\n    return 1")
    assert result.status == "compile_error" and "SyntaxError" in result.error


def test_missing_entry_is_a_compile_error():
    assert run("def helper():\n    return 1").status == "compile_error"


def test_exception_is_a_runtime_error_with_traceback():
    result = run("def main():\n    return 1 / 0")
    assert result.status == "runtime_error" and "ZeroDivisionError" in result.error
    assert "agent_code.py" in result.stderr


def test_infinite_loop_times_out():
    result = run("def main():\n    while True:\n        pass", limits=SandboxLimits(wall_seconds=2, cpu_seconds=30))
    assert result.status == "timeout" and result.wall_seconds < 10


def test_sleeping_forever_times_out_on_wall_clock():
    result = run("import time\ndef main():\n    time.sleep(1000)", limits=SandboxLimits(wall_seconds=1.5))
    assert result.status == "timeout"


def test_huge_allocation_is_oom():
    result = run("def main():\n    block = bytearray(8 << 30)\n    return len(block)")
    assert result.status == "oom", result


def test_reading_private_data_is_forbidden(task_dirs):
    _, private = task_dirs
    result = run(f"def main():\n    return open({str(private / 'answers.txt')!r}).read()", task_dirs)
    assert result.status == "forbidden" and "SECRET" not in repr(result)
    listing = run(f"import os\ndef main():\n    return os.listdir({str(private)!r})", task_dirs)
    assert listing.status == "forbidden"


def test_catching_the_refusal_does_not_help(task_dirs):
    _, private = task_dirs
    result = run(f"""
        def main():
            try:
                return open({str(private / 'answers.txt')!r}).read()
            except BaseException:
                return "caught"
    """, task_dirs)
    assert result.status == "forbidden"


def test_opening_a_socket_is_forbidden():
    result = run("import socket\ndef main():\n    socket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert result.status == "forbidden" and "socket" in result.error


def test_writing_outside_scratch_is_forbidden(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run(f"def main():\n    open({str(target)!r}, 'w').write('x')")
    assert result.status == "forbidden" and not target.exists()
    result = run(f"import os\ndef main():\n    os.remove({str(tmp_path)!r})")
    assert result.status == "forbidden"


def test_fork_bomb_is_refused_and_contained():
    result = run("""
        import os
        def main():
            while True:
                os.fork()
    """)
    assert result.status == "forbidden"
    result = run("import subprocess\ndef main():\n    subprocess.run(['true'])")
    assert result.status == "forbidden"


@pytest.mark.skipif(unprivileged_uid() is None,
                    reason="the process-count limit binds only once the child drops root; here it cannot")
def test_native_fork_bomb_is_bounded_by_process_limit_and_killed():
    result = run("""
        import ctypes
        def main():
            libc = ctypes.CDLL(None)
            while True:
                libc.fork()
    """, limits=SandboxLimits(wall_seconds=3, cpu_seconds=10, max_processes=32))
    assert result.status in ("timeout", "runtime_error", "oom")
    assert result.wall_seconds < 30


def test_importing_a_forbidden_module_is_refused():
    result = run_sandboxed("def main():\n    import csv\n    return 1", entry="main", limits=FAST,
                           forbidden_modules=("csv",))
    assert result.status == "forbidden" and "csv" in result.error
