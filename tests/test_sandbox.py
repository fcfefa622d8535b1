"""Agent-written code as an attacker: every attack class is contained and classified.

Each attack tries to read a secret (private data, the parent's environment or
memory), reach the network or other processes, or outlive and overload the
parent. Run under two setups: the full jail (namespaces + Landlock + cgroup +
nobody), and Landlock alone (the fallback where namespaces are refused).
Unprivileged-parent runs need an interpreter others can reach; where the
machine keeps it under a private home, they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import host_processes_named

from siajax.sandbox import SandboxLimits, SandboxSession, run_sandboxed

FAST = SandboxLimits(wall_seconds=15, cpu_seconds=15, memory_bytes=1 << 30)
SECRET = "SIAJAX-SECRET-7c41"
SETUPS = {"jail": True, "landlock_only": False}
REPO = Path(__file__).resolve().parents[1]
# An interpreter with NumPy that an unprivileged user can run (.ci/run makes one from the system Python).
UNPRIVILEGED_PYTHON = os.environ.get("SIAJAX_UNPRIVILEGED_PYTHON", "")


def _reachable_by_nobody(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split("/")
    return all(os.stat("/".join(parts[:depth]) or "/").st_mode & 0o001 for depth in range(1, len(parts))) and bool(
        os.stat(real).st_mode & 0o005)


def _fallback_python() -> str | None:
    """The interpreter for the Landlock-only fallback: as root it must be one nobody can run (the
    sandbox refuses to run agent code as root), e.g. .ci/run's SIAJAX_UNPRIVILEGED_PYTHON."""
    if os.geteuid() != 0 or _reachable_by_nobody(sys.executable):
        return sys.executable
    return UNPRIVILEGED_PYTHON if UNPRIVILEGED_PYTHON and _reachable_by_nobody(UNPRIVILEGED_PYTHON) else None


FALLBACK_PYTHON = _fallback_python()


@pytest.fixture(params=sorted(SETUPS))
def setup(request):
    if not SETUPS[request.param] and FALLBACK_PYTHON is None:
        pytest.skip("the Landlock-only fallback as root needs an interpreter nobody can run (SIAJAX_UNPRIVILEGED_PYTHON)")
    return SETUPS[request.param]


@pytest.fixture
def task_dirs():
    """A task directory nobody can reach (pytest's tmp_path is under a 0700 directory): in the fallback
    the code runs as nobody on the host's filesystem."""
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="siajax-task-"))
    yield from _task_dirs(tmp_path)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _task_dirs(tmp_path):
    public, private = tmp_path / "task" / "data" / "public", tmp_path / "task" / "data" / "private"
    public.mkdir(parents=True)
    private.mkdir(parents=True)
    (public / "inputs.txt").write_text("1 2 3")
    (private / "answers.txt").write_text(SECRET)
    (tmp_path / "task" / "verifier.py").write_text("def score():\n    return 0\n")
    for path in (tmp_path, tmp_path / "task", tmp_path / "task" / "data", public, public / "inputs.txt"):
        os.chmod(path, 0o755)
    yield tmp_path / "task"


def run(code: str, namespaces: bool = True, limits: SandboxLimits = FAST, **kwargs):
    python = None if namespaces else FALLBACK_PYTHON
    return run_sandboxed(textwrap.dedent(code), entry="main", limits=limits, namespaces=namespaces, python=python,
                         **kwargs)


def leaked(result) -> bool:
    return SECRET in repr(result.value) or SECRET in result.stdout or SECRET in result.stderr


def test_ok_code_returns_values_and_arrays_and_reads_public_data(task_dirs, setup):
    result = run(f"""
        import numpy as np
        def main(scale, x):
            numbers = open({str(task_dirs / 'data' / 'public' / 'inputs.txt')!r}).read().split()
            open('notes.txt', 'w').write('scratch is writable')
            return {{"total": np.float64(sum(int(n) for n in numbers) * scale), "doubled": 2 * x}}
    """, setup, kwargs={"scale": 2}, arrays={"x": np.arange(3.0)},
                 readable_dirs=[task_dirs / "data" / "public"])
    assert result.status == "ok", result
    assert float(result.arrays["total"]) == 12 and result.arrays["doubled"].tolist() == [0, 2, 4]
    assert result.layers["landlock"]["abi"] >= 1
    if setup:
        assert result.layers["namespaces"].startswith("mount") and result.layers["identity"].startswith("nobody")


@pytest.mark.parametrize("code,status", [
    ("def main(:\n    return 1", "compile_error"),
    ("def helper():\n    return 1", "compile_error"),
    ("def main():\n    return 1 / 0", "runtime_error"),
    ("def main():\n    return bytearray(8 << 30)", "oom"),
])
def test_faults_are_classified(code, status):
    result = run(code)
    assert result.status == status, result


# Each attack returns what it read; none may hold the secret. Paths are filled in per test.
READ_ATTACKS = {
    "ctypes libc open/read": """
        import ctypes
        def main(private):
            libc = ctypes.CDLL(None)
            fd = libc.open((private + '/answers.txt').encode(), 0)
            buf = ctypes.create_string_buffer(256)
            n = libc.read(fd, buf, 256)
            return buf.raw[:max(n, 0)].decode(errors='replace')
    """,
    "fork_exec of /bin/sh": """
        import _posixsubprocess, os
        def main(private):
            r, w = os.pipe()
            pid = _posixsubprocess.fork_exec(['/bin/sh', '-c', 'cat ' + private + '/answers.txt'],
                [b'/bin/sh'], True, (w,), None, None, -1, -1, -1, w, -1, -1, *(os.pipe()), False, False, -1,
                None, None, None, -1, None, False)
            os.close(w)
            return os.read(r, 256).decode(errors='replace')
    """,
    "tripwire disabled first": """
        import gc, sys
        def main(private):
            for obj in gc.get_objects():
                if isinstance(obj, set) and 'os.fork' in obj:
                    obj.clear()
            sys.setrecursionlimit(25)
            return open(private + '/answers.txt').read()
    """,
    "open with dir_fd": """
        import os
        def main(private):
            fd = os.open(private, os.O_RDONLY)
            return os.read(os.open('answers.txt', os.O_RDONLY, dir_fd=fd), 256).decode()
    """,
    "symlink swap race": """
        import os, threading
        def main(private):
            os.symlink('/tmp', 'link')
            def flip():
                for _ in range(2000):
                    try:
                        os.remove('link'); os.symlink(private, 'link')
                        os.remove('link'); os.symlink('/tmp', 'link')
                    except OSError:
                        pass
            threading.Thread(target=flip).start()
            for _ in range(2000):
                try:
                    return open('link/answers.txt').read()
                except OSError:
                    pass
            return ''
    """,
    "runpy on the task's own code": """
        import runpy
        def main(private):
            return repr(runpy.run_path(private + '/../../verifier.py').keys())
    """,
    "parent environment via /proc": """
        import os
        def main(private):
            found = []
            for pid in os.listdir('/proc'):
                if pid.isdigit():
                    try:
                        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))
                    except OSError:
                        pass
            return '|'.join(found)
    """,
    "parent memory via /proc": """
        import os, re
        def main(private):
            out = []
            ppid = os.getppid()
            for pid in {str(ppid), *[p for p in os.listdir('/proc') if p.isdigit()]}:
                try:
                    maps = open(f'/proc/{pid}/maps').read().splitlines()
                    mem = open(f'/proc/{pid}/mem', 'rb')
                    for line in maps[:200]:
                        start, end = (int(x, 16) for x in line.split()[0].split('-'))
                        if 'rw' in line.split()[1] and end - start < (64 << 20):
                            mem.seek(start)
                            out.append(mem.read(end - start))
                except (OSError, ValueError):
                    pass
            memory, found = b''.join(out), []
            start = memory.find(b'SIAJAX_TEST_TOKEN=')
            while start >= 0:  # whatever follows the parent's variable name, wherever it is
                found.append(memory[start:start + 60].decode(errors='replace'))
                start = memory.find(b'SIAJAX_TEST_TOKEN=', start + 1)
            return found
    """,
}


@pytest.mark.parametrize("name", sorted(READ_ATTACKS))
def test_secrets_stay_unread(name, task_dirs, setup, monkeypatch):
    monkeypatch.setenv("SIAJAX_TEST_TOKEN", SECRET)  # a parent secret in its environment
    result = run(READ_ATTACKS[name], setup, kwargs={"private": str(task_dirs / "data" / "private")},
                 readable_dirs=[task_dirs / "data" / "public"])
    assert not leaked(result), (name, result)
    assert result.status in ("ok", "runtime_error", "forbidden"), result


def test_task_code_cannot_be_rewritten(task_dirs, setup):
    verifier = task_dirs / "verifier.py"
    before = verifier.read_text()
    result = run(f"""
        def main():
            open({str(verifier)!r}, 'w').write('def score():\\n    return 1e9\\n')
            return 'written'
    """, setup, readable_dirs=[task_dirs])
    assert verifier.read_text() == before and result.status != "ok"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_processes_outside_cannot_be_signalled(setup):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result = run("""
            import ctypes, os, signal
            def main(pid):
                for sig_try in (lambda: os.kill(pid, signal.SIGKILL),
                                lambda: ctypes.CDLL(None).syscall(424, ctypes.CDLL(None).syscall(434, pid, 0), 9, 0, 0),
                                lambda: os.kill(-1, signal.SIGKILL)):
                    try:
                        sig_try()
                    except Exception:
                        pass
                return 'tried'
        """, setup, kwargs={"pid": victim.pid})
        time.sleep(0.2)
        assert _alive(victim.pid) and _alive(os.getpid()), result
    finally:
        victim.kill()
        victim.wait()


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_escaped_sessions_die_with_the_jail_and_the_wall_limit_holds(setup):
    limits = SandboxLimits(wall_seconds=2, cpu_seconds=30, memory_bytes=1 << 30)
    start = time.monotonic()
    result = run("""
        import os, time
        def main():
            if os.fork() == 0:
                os.setsid()
                os.execv('/bin/sleep', ['sleep', '31337'])
            time.sleep(1000)
    """, setup, limits=limits)
    elapsed = time.monotonic() - start
    assert result.status in ("timeout", "forbidden") and elapsed < limits.wall_seconds + 4, (result, elapsed)
    time.sleep(0.3)
    assert not _host_processes_with("31337"), "a process outlived the sandbox"


def test_a_process_bomb_is_capped_and_leaves_nothing(setup):
    limits = SandboxLimits(wall_seconds=8, cpu_seconds=30, max_processes=32)
    result = run("""
        import ctypes, os, time
        def main():
            libc, made = ctypes.CDLL(None), 0
            for _ in range(150):
                pid = libc.fork()
                if pid == 0:
                    libc.execv(b'/bin/sleep', (ctypes.c_char_p * 3)(b'sleep', b'31338', None))
                    libc._exit(0)
                made += pid > 0
            return made
    """, setup, limits=limits)
    if result.status == "ok":
        assert result.value <= limits.max_processes, result
    time.sleep(0.3)
    assert not _host_processes_with("31338")


def test_an_output_flood_is_capped(setup):
    start = time.monotonic()
    result = run("""
        import os
        def main():
            block = b'x' * (1 << 20)
            for _ in range(1024):
                os.write(1, block)
            return 'done'
    """, setup, limits=SandboxLimits(wall_seconds=20, cpu_seconds=30))
    assert len(result.stdout) <= (1 << 20) + 100 and "dropped" in result.stdout
    assert time.monotonic() - start < 25


def test_the_disk_cannot_be_filled(setup, tmp_path):
    result = run("""
        import os
        def main():
            written = 0
            try:
                for index in range(64):
                    with open(f'fill{index}', 'wb') as handle:
                        for _ in range(64):
                            handle.write(b'\\0' * (1 << 20))
                            written += 1 << 20
            except OSError:
                pass
            return written
    """, setup, limits=SandboxLimits(wall_seconds=30, cpu_seconds=30, scratch_bytes=64 << 20, file_bytes=32 << 20))
    written = result.value if result.status == "ok" else 0
    assert written <= (64 << 20) + (1 << 20) or not setup and written <= 64 * (32 << 20)


def test_the_network_is_unreachable(setup):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0siajax-sandbox-test")
    abstract.listen()
    abstract.settimeout(0.5)
    try:
        result = run("""
            import ctypes, socket, struct
            def main(port):
                reached = []
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.socket(2, 1, 0)
                address = struct.pack('<HH4s8x', 2, socket.htons(port), bytes([127, 0, 0, 1]))
                reached.append(libc.connect(fd, address, len(address)) == 0)
                unix = libc.socket(1, 1, 0)
                name = b'\\0siajax-sandbox-test'
                addr = struct.pack('<H', 1) + name
                reached.append(libc.connect(unix, addr, len(addr)) == 0)
                return reached
        """, setup, kwargs={"port": listener.getsockname()[1]})
        for server in (listener, abstract):
            with pytest.raises((socket.timeout, BlockingIOError)):
                server.accept()
        assert result.status != "ok" or not any(result.value), result
    finally:
        listener.close()
        abstract.close()


def test_setns_into_the_host_fails():
    result = run("""
        import ctypes, os
        def main():
            libc = ctypes.CDLL(None, use_errno=True)
            outcomes = []
            for path in ('/proc/1/ns/net', '/proc/1/ns/mnt'):
                try:
                    fd = os.open(path, os.O_RDONLY)
                    outcomes.append(libc.setns(fd, 0) == 0 and os.listdir('/') != [])
                except OSError:
                    outcomes.append(False)
            return outcomes
    """)
    assert result.status != "ok" or not any(result.value[:1]) or result.layers["identity"].startswith("nobody")


def test_timing_is_measured_by_the_parent_and_sessions_serve_many_calls():
    with SandboxSession(textwrap.dedent("""
        import time
        def work(x, seconds):
            time.sleep(seconds)
            return x + 1
    """), limits=FAST) as session:
        replies = [session.call("work", {"seconds": s}, {"x": np.zeros(2)}) for s in (0.05, 0.3)]
    assert all(r.ok for r in replies)
    assert 0.05 <= replies[0].seconds < replies[1].seconds and replies[1].seconds >= 0.3
    assert replies[1].arrays["return"].tolist() == [1.0, 1.0]


def test_a_reply_larger_than_allowed_is_refused():
    result = run("""
        import numpy as np
        def main():
            return np.zeros(1 << 22)
    """, limits=SandboxLimits(wall_seconds=10, message_bytes=1 << 20))
    assert result.status == "runtime_error" and "limit" in result.error


@pytest.mark.skipif(os.geteuid() != 0 or not UNPRIVILEGED_PYTHON or not _reachable_by_nobody(UNPRIVILEGED_PYTHON)
                    or not _reachable_by_nobody(str(REPO / "siajax" / "sandbox" / "launcher.py")),
                    reason="needs root to switch users, SIAJAX_UNPRIVILEGED_PYTHON (an interpreter with NumPy that "
                           "nobody can run) and a repository nobody can read")
def test_an_unprivileged_parent_gets_the_user_namespace_jail():
    """The sandbox started by an ordinary user (nobody): user + mount + pid + net namespaces, and the
    attacks that matter most still fail."""
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="siajax-unprivileged-"))  # pytest's tmp dirs are 0700
    try:
        _probe_as_nobody(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _probe_as_nobody(tmp_path: Path) -> None:
    marker = f"sxn{os.getpid() % 100000}"
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "answers.txt").write_text(SECRET)
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o755)
    os.chmod(secret / "answers.txt", 0o644)  # readable by nobody on the host: only the jail keeps it out
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, textwrap
        from siajax.sandbox import run_sandboxed
        attacks = {READ_ATTACKS!r}
        out = {{}}
        for name in ("ctypes libc open/read", "parent environment via /proc", "open with dir_fd"):
            r = run_sandboxed(textwrap.dedent(attacks[name]), kwargs={{"private": {str(secret)!r}}})
            out[name] = [r.status, repr(r.value)]
        r = run_sandboxed("def main():\\n    return 1")
        out["layers"] = r.layers
        from siajax.sandbox import SandboxLimits
        r = run_sandboxed(textwrap.dedent({ESCAPE.format(marker=marker)!r}),
                          limits=SandboxLimits(wall_seconds=3, cpu_seconds=60, memory_bytes=1 << 30))
        out["escape"] = [r.status, r.layers.get("contained")]
        print(json.dumps(out))
    """))
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", UNPRIVILEGED_PYTHON,
                           str(script)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SIAJAX_TEST_TOKEN": SECRET})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["layers"]["namespaces"] == "mount+pid+net+ipc+uts+user"
    assert report["layers"]["seccomp"].startswith("jail") and report["layers"]["keyring"].startswith("fresh")
    # without a cgroup: the launcher kills the jail's pid 1 and reaps it before the call returns
    assert report["escape"] == ["timeout", True] and not host_processes_named(marker)
    assert SECRET not in json.dumps({k: v for k, v in report.items() if k != "layers"})


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # nested past the JSON parser's recursion limit
    b'{"status": "ok", "arrays": [{"name": "a", "dtype": "<f4", "shape": [1e400]}]}',  # int(inf)
    b'{"status": "ok", "arrays": [{"name": "a", "dtype": "<f4", "shape": [4294967296, 4294967296, 4294967296]}]}',
    b'{"status": "ok", "arrays": [{"name": "a", "dtype": "<f4", "shape": [true]}]}',
    b'{"status": "ok", "arrays": [7]}',
])
def test_a_forged_reply_frame_is_an_error_status_not_an_exception(header):
    """Agent code can write to the reply pipe itself (its fd is in the runner's argv): whatever frame it
    forges, run_sandboxed answers an error status and never raises."""
    result = run(f"""
        import os, sys, time
        def main():
            body = {header!r}
            os.write(int(sys.argv[2]), len(body).to_bytes(8, 'little') + body)
            time.sleep(30)
    """)
    assert result.status == "runtime_error" and "malformed reply" in result.error, (result.status, result.error)


# Round 2: the jail dies with its call, the parent never blocks, memory and kernel surface are bounded.
ESCAPE = """
    import ctypes, os, time
    libc = ctypes.CDLL(None, use_errno=True)
    def burn(name):
        libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME: findable on the host
        while True:
            pass
    def main():
        libc.prctl(1, 0, 0, 0, 0)  # clear the parent-death signal
        libc.setsid()
        if libc.fork() == 0:  # a daemon: double fork, new session, no parent-death signal
            libc.setsid()
            if libc.fork() == 0:
                burn({marker!r})
            os._exit(0)
        if libc.fork() == 0:
            burn({marker!r})
        time.sleep(1000)
"""


def _removed(result) -> bool:
    """The call removed its own jail cgroup (or made none); conftest checks that no test leaves one."""
    return result.layers.get("cgroup_removed", not result.layers["cgroup"].startswith("v"))


def test_no_process_of_the_jail_outlives_its_call(setup):
    """Burners that cleared their parent-death signal, left the session and double-forked are all gone
    (killed and reaped) when the call returns, within the wall limit plus the grace."""
    from siajax.sandbox import GRACE_SECONDS

    marker = f"sxb{os.getpid() % 100000}{int(setup)}"
    limits = SandboxLimits(wall_seconds=3, cpu_seconds=60, memory_bytes=1 << 30)
    start = time.monotonic()
    result = run(ESCAPE.format(marker=marker), setup, limits=limits)
    elapsed = time.monotonic() - start
    assert not host_processes_named(marker), "a process of the jail outlived its call"
    assert result.status == "timeout" and elapsed < limits.wall_seconds + GRACE_SECONDS + 1, (result, elapsed)
    assert result.layers["contained"] is True
    assert _removed(result), "a jail's cgroup was left behind"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a cgroup per jail)")
def test_the_launcher_stays_outside_the_cgroup_it_kills(setup):
    """Killing the jail's cgroup never kills the jail's reaper: the launcher (subreaper of every process of
    the jail) is outside it and its children inside. Were it inside, the kill would orphan the jail's
    processes to the host's init, whose reaping can lag seconds (CI: a cgroup left behind)."""
    from siajax.sandbox import cgroup as jail_cgroup

    with SandboxSession("def main():\n    return 1\n", limits=FAST, namespaces=setup,
                        python=None if setup else FALLBACK_PYTHON) as session:
        assert session.call("main").value == 1
        members = jail_cgroup.members(session._cgroup)
        launcher = session._process.pid
        children = {int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _parent_of(entry) == launcher}
    assert members and launcher not in members and children and children <= members, (launcher, children, members)
    assert session.result().layers["cgroup_removed"] is True


def _parent_of(pid: str) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_verifier_refuses_to_score_when_a_process_may_have_survived(monkeypatch):
    """Fail closed: an ok call whose jail cannot be shown gone is not a result."""
    import siajax.sandbox as sandbox

    monkeypatch.setattr(sandbox.jail_cgroup, "members", lambda cgroup: {1})  # "something is still in it"
    monkeypatch.setattr(sandbox.jail_cgroup, "kill_all", lambda cgroup, timeout=5.0: False)
    monkeypatch.setattr(sandbox.SandboxSession, "_launcher_reaped", lambda self: False)
    result = run("def main():\n    return 1")
    assert result.status == "forbidden" and result.value is None and "gone" in result.error
    assert result.layers["contained"] is False


def test_the_parent_never_blocks_on_a_child_that_stops_reading(setup):
    """The runner stops reading (its loop patched by the agent); a call with 8 MiB of inputs returns at
    the wall limit instead of blocking the parent on a full pipe."""
    from siajax.sandbox import GRACE_SECONDS

    limits = SandboxLimits(wall_seconds=4, cpu_seconds=30, memory_bytes=1 << 30)
    start = time.monotonic()
    with SandboxSession(textwrap.dedent("""
        import __main__, time
        def deafen():
            __main__.read_message = lambda *args, **kwargs: time.sleep(3600)
            return 1
        def echo(x):
            return x
    """), limits=limits, namespaces=setup, python=None if setup else FALLBACK_PYTHON) as session:
        assert session.call("deafen").value == 1
        reply = session.call("echo", arrays={"x": np.zeros(1 << 20)})
    elapsed = time.monotonic() - start
    assert reply.status == "timeout" and elapsed < limits.wall_seconds + 2 * GRACE_SECONDS + 1, (reply, elapsed)


def test_a_reply_that_stalls_mid_frame_times_out():
    from siajax.sandbox import GRACE_SECONDS

    limits = SandboxLimits(wall_seconds=3, cpu_seconds=30)
    start = time.monotonic()
    result = run("""
        import os, sys, time
        def main():
            os.write(int(sys.argv[2]), (100).to_bytes(8, "little") + b'{"status": ')
            time.sleep(1000)
    """, limits=limits)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and elapsed < limits.wall_seconds + GRACE_SECONDS + 1, (result, elapsed)


def _memory_cgroup_available() -> bool:
    return os.geteuid() == 0 and (os.path.isfile("/sys/fs/cgroup/memory/cgroup.procs") or "memory" in (
        open("/sys/fs/cgroup/cgroup.controllers").read() if os.path.isfile("/sys/fs/cgroup/cgroup.controllers") else ""))


@pytest.mark.skipif(not _memory_cgroup_available(), reason="needs root and a memory cgroup controller")
def test_memory_is_bounded_for_the_jail_as_a_whole():
    """4 children x 400 MiB under a 1 GiB limit: RLIMIT_AS (per process) lets each one through; the jail's
    memory cgroup does not let more than two hold it at once. The kernel may kill a child that already
    touched its block to make room for the next one (CI saw 3 of 4 finish), so count the finished
    children still alive at the end, not the ones that ever finished."""
    result = run("""
        import ctypes, os, time
        libc = ctypes.CDLL(None, use_errno=True)
        def main():
            read, write = os.pipe()
            children = []
            for _ in range(4):
                pid = libc.fork()
                if pid == 0:
                    block = bytearray(400 << 20)
                    for i in range(0, len(block), 4096):
                        block[i] = 1
                    os.write(write, os.getpid().to_bytes(4, "little"))
                    time.sleep(1000)
                children.append(pid)
            os.close(write)
            time.sleep(6)
            os.set_blocking(read, False)
            try:
                finished = os.read(read, 64)
            except BlockingIOError:
                finished = b""
            pids = [int.from_bytes(finished[i:i + 4], "little") for i in range(0, len(finished), 4)]
            alive = [pid for pid in pids if os.waitpid(pid, os.WNOHANG) == (0, 0)]
            return [len(pids), len(alive)]
    """, limits=SandboxLimits(wall_seconds=20, cpu_seconds=60, memory_bytes=1 << 30))
    assert result.status == "oom" or (result.ok and result.value[1] <= 2), result
    assert _removed(result)


@pytest.mark.skipif(not _memory_cgroup_available(), reason="needs root and a memory cgroup controller")
def test_the_jail_cgroup_keeps_its_memory_out_of_swap():
    """On a host with swap, a RAM-only limit lets the jail page out and hold more than its bound (CI saw
    3 x 400 MiB under 1 GiB): the jail's cgroup must forbid swap (v1: swappiness 0, memsw where
    accounted; v2: swap.max 0)."""
    from siajax.sandbox import cgroup
    jail = cgroup.create(f"siajax-test-swap-{os.getpid()}", max_processes=8, memory_bytes=1 << 30)
    try:
        if jail.version == 2:
            assert open(os.path.join(jail.directories["unified"], "memory.swap.max")).read().strip() == "0"
        else:
            memory = jail.directories["memory"]
            assert open(os.path.join(memory, "memory.swappiness")).read().strip() == "0"
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            assert not os.path.exists(memsw) or int(open(memsw).read()) == 1 << 30
    finally:
        assert cgroup.remove(jail)


SURFACE = """
    import ctypes, errno, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    NR = {nr!r}
    def attempt(name, *args):
        ctypes.set_errno(0)
        result = libc.syscall(NR[name], *args)
        return [result, ctypes.get_errno()]
    def main():
        public = open("/etc/hostname" if os.path.exists("/etc/hostname") else sys.executable, "rb")
        lock = (ctypes.c_short * 16)()  # struct flock, F_RDLCK = 0 at offset 0
        params = (ctypes.c_byte * 120)()
        memfd = libc.syscall(NR["memfd_create"], b"x", 0)
        out = {{
            "unshare(CLONE_NEWUSER)": attempt("unshare", 0x10000000),
            "clone(CLONE_NEWUSER)": attempt("clone", 0x10000000 | 17, 0, 0, 0, 0),
            "clone3": attempt("clone3", 0, 0),
            "io_uring_setup": attempt("io_uring_setup", 1, ctypes.byref(params)),
            "keyctl(get session keyring)": attempt("keyctl", 0, -3, 0),
            "add_key(user keyring)": attempt("add_key", b"user", b"planted", b"x", 1, -4),
            "socket(AF_NETLINK)": attempt("socket", 16, 3, 0),
            "socket(AF_VSOCK)": attempt("socket", 40, 1, 0),
            "fcntl(F_OFD_SETLK)": attempt("fcntl", public.fileno(), 37, ctypes.byref(lock)),
            "flock(LOCK_SH)": attempt("flock", public.fileno(), 1),
            "personality(PER_LINUX32)": attempt("personality", 8),
            "ptrace(TRACEME)": attempt("ptrace", 0, 0, 0, 0),
            "mknodat(fifo)": attempt("mknodat", -100, b"/tmp/fifo" if os.path.isdir("/tmp") else b"fifo", 0o10600, 0),
            "execveat(memfd)": attempt("execveat", memfd, b"", 0, 0, 0x1000),
            "bpf": attempt("bpf", 0, 0, 0),
            "perf_event_open": attempt("perf_event_open", 0, 0, -1, -1, 0),
            "userfaultfd": attempt("userfaultfd", 0),
        }}
        allowed = {{"personality(query)": attempt("personality", 0xFFFFFFFF), "fcntl(F_GETFL)":
                    attempt("fcntl", public.fileno(), 3, 0)}}
        status = open("/proc/self/status").read()
        seccomp = [line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:")]
        return {{"denied": out, "allowed": allowed, "seccomp": seccomp}}
"""


def _syscall_numbers() -> dict:
    from siajax.sandbox import seccomp

    return {**seccomp.syscall_numbers(), "memfd_create": 319 if seccomp.machine() == "x86_64" else 279}


def test_the_kernel_surface_is_filtered(setup):
    """Calls that succeed for any process without the filter (new user namespaces, io_uring, keyrings,
    netlink/vsock sockets, file locks, personality, ptrace, fifos, memfd exec, bpf, perf) fail with
    EPERM (clone3 with ENOSYS, so libc falls back to clone) in the jail and in the fallback."""
    result = run(SURFACE.format(nr=_syscall_numbers()), setup, limits=SandboxLimits(wall_seconds=20, cpu_seconds=20))
    assert result.ok, result
    expected = {name: [-1, 38 if name == "clone3" else 1] for name in result.value["denied"]}
    assert result.value["denied"] == expected
    assert result.value["allowed"]["personality(query)"][0] >= 0 and result.value["allowed"]["fcntl(F_GETFL)"][0] >= 0
    assert result.value["seccomp"] == ["2"]  # SECCOMP_MODE_FILTER


def test_no_key_reaches_or_persists_across_jails():
    """A secret in the parent's session keyring is out of reach, and nothing one jail writes to a keyring
    is there for the next."""
    import ctypes

    nr = _syscall_numbers()
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall(nr["add_key"], b"user", b"siajax-test-secret", SECRET.encode(), len(SECRET), -3)
    assert key > 0, os.strerror(ctypes.get_errno())
    try:
        code = """
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            NR = {nr!r}
            def main():
                found = libc.syscall(NR["request_key"], b"user", b"siajax-test-secret", None, 0)
                buffer = ctypes.create_string_buffer(256)
                read = libc.syscall(NR["keyctl"], 11, found if found > 0 else {key}, buffer, 256)  # KEYCTL_READ
                planted = libc.syscall(NR["add_key"], b"user", b"siajax-planted", b"hello", 5, -4)
                later = libc.syscall(NR["request_key"], b"user", b"siajax-planted", None, 0)
                return {{"found": found, "read": buffer.raw[:max(read, 0)].decode("latin-1"), "planted": planted,
                         "later": later}}
        """.format(nr=nr, key=key)
        first, second = run(code), run(code)
        for result in (first, second):
            assert result.ok and not leaked(result), result
            assert result.value["found"] < 0 and result.value["planted"] < 0 and result.value["later"] < 0
    finally:
        libc.syscall(nr["keyctl"], 3, key)  # KEYCTL_REVOKE


def test_the_fallback_denies_every_socket_and_device_node():
    if FALLBACK_PYTHON is None:
        pytest.skip("the Landlock-only fallback as root needs an interpreter nobody can run (SIAJAX_UNPRIVILEGED_PYTHON)")
    result = run("""
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        def main():
            out = {}
            for name, family, kind in (("udp", socket.AF_INET, socket.SOCK_DGRAM), ("unix", socket.AF_UNIX,
                                       socket.SOCK_STREAM), ("tcp6", socket.AF_INET6, socket.SOCK_STREAM)):
                ctypes.set_errno(0)
                out[name] = [libc.socket(int(family), int(kind), 0), ctypes.get_errno()]  # the tripwire aside
            ctypes.set_errno(0)
            out["mknod"] = [libc.mknod(b"disk", 0o60600, os.makedev(8, 0)), ctypes.get_errno()]
            return out
    """, False, limits=SandboxLimits(wall_seconds=20, cpu_seconds=20))
    assert result.ok and result.value == {name: [-1, 1] for name in ("udp", "unix", "tcp6", "mknod")}, result
    assert result.layers["seccomp"].startswith("fallback")


def test_root_never_runs_agent_code_in_the_fallback():
    from siajax.sandbox.launcher import identity_plan

    assert identity_plan(0, True, False) == "nobody" and identity_plan(0, False, True) == "nobody"
    assert identity_plan(0, False, False) == "refuse" and identity_plan(1000, False, False) == "self"
    if os.geteuid() != 0 or _reachable_by_nobody(sys.executable):
        pytest.skip("here the interpreter is reachable by nobody (or we are not root): nothing to refuse")
    result = run_sandboxed("def main():\n    return 1", namespaces=False, limits=FAST)
    assert result.status == "runtime_error" and "refusing to run agent code as root" in result.error, result


def _runs_jax(python: str | None) -> bool:
    return bool(python) and subprocess.run([python, "-c", "import jax"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _runs_jax(FALLBACK_PYTHON), reason="no interpreter with JAX for the fallback")
def test_jnp_runs_in_the_fallback():
    """XLA's CPU backend reads its probes (/proc/cpuinfo, /sys/devices/system/cpu, ...) in the fallback."""
    result = run_sandboxed("import jax.numpy as jnp\ndef main():\n    return float(jnp.arange(4.0).sum())",
                           namespaces=False, python=FALLBACK_PYTHON, env={"JAX_PLATFORMS": "cpu"},
                           limits=SandboxLimits(wall_seconds=60, cpu_seconds=60, memory_bytes=4 << 30))
    assert result.ok and result.value == 6.0, result
