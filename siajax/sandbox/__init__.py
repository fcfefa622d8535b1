"""Run agent-written Python where it can neither read what it must not nor outlive its limits.

Threat model: the code is adversarial (an RL policy learns whatever a verifier
lets through). It may use ctypes, raw syscalls, forks, threads, /proc, signals,
sockets, disk and output floods, and it may rewrite anything in its own process.
What it must not do: read the task's private data or code, the parent's
memory or environment, reach the network, touch other processes, outlive its
wall limit, or make the parent read, wait or allocate without bound.

The barrier is the kernel (``launcher.py``: namespaces, a minimal read-only
filesystem view, Landlock, a cgroup per jail bounding processes and memory,
rlimits, nobody/no capabilities, a fresh keyring, a system-call filter from
``seccomp.py``); the audit hook in ``runner.py`` only names attempts. Every
session records which layers held (:attr:`SandboxResult.layers`), and
``layers["contained"]`` whether every process of the jail was gone when it
ended. Data crosses in both directions only as framed messages on pipes (no
files the parent opens), bounded in size and written and read against the
wall-clock deadline, so the parent never blocks past it; stdout/stderr are
captured up to a cap; every call is timed by the parent, outside the agent's
process.

    with SandboxSession(source, limits=SandboxLimits(wall_seconds=60)) as session:
        reply = session.call("custom_kernel", arrays={"x": x, "mask": m, "weights/w": w})
        reply.status, reply.arrays["return"], reply.seconds
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from siajax.sandbox import cgroup as jail_cgroup
from siajax.sandbox import seccomp
from siajax.sandbox.runner import EXIT_FORBIDDEN, frame

HERE = Path(__file__).resolve().parent
STATUSES = ("ok", "compile_error", "runtime_error", "timeout", "oom", "forbidden")
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
GRACE_SECONDS = 2.0  # past the wall limit, the most a call takes to kill, reap and report
PR_SET_DUMPABLE = 4


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 30.0
    cpu_seconds: int = 60
    memory_bytes: int = 4 << 30
    file_bytes: int = 64 << 20
    scratch_bytes: int = 256 << 20  # the jail's whole writable /tmp (tmpfs)
    max_processes: int = 64
    max_open_files: int = 256
    output_bytes: int = 1 << 20  # stdout and stderr kept, each; the rest is read and dropped
    message_bytes: int = 64 << 20  # the largest reply accepted (arrays, in bytes); size it to the task's outputs


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """status in STATUSES; ``value`` / ``arrays`` are the entry's return value when ok;
    ``seconds`` is the call's wall time measured by the parent."""

    status: str
    value: object = None
    arrays: dict = dataclasses.field(default_factory=dict)
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    wall_seconds: float = 0.0
    seconds: float = 0.0
    layers: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def hide_parent_memory() -> None:
    """PR_SET_DUMPABLE=0: processes of the same uid can no longer ptrace this one or read its
    /proc/<pid>/mem or environ (API keys, private labels), should anything escape the jail."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


class _BoundedReader(threading.Thread):
    """Drains a pipe to EOF, keeping the first ``limit`` bytes (a flood costs the parent nothing)."""

    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream, self.limit, self.kept, self.dropped = stream, limit, bytearray(), 0
        self.start()

    def run(self):
        try:
            while chunk := self.stream.read1(1 << 16):
                room = self.limit - len(self.kept)
                self.kept += chunk[:max(room, 0)]
                self.dropped += max(len(chunk) - max(room, 0), 0)
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        note = f"\n[... {self.dropped} more bytes dropped]" if self.dropped else ""
        return self.kept.decode("utf-8", "replace") + note


@functools.lru_cache(maxsize=8)
def _interpreter_paths(python: str) -> tuple[str, ...]:
    """What the jail must see to run ``python``: its prefixes and its binary's directory."""
    if python == sys.executable:
        prefixes = [sys.prefix, sys.base_prefix]
    else:
        prefixes = subprocess.run([python, "-I", "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[:2]
    paths = {*prefixes, os.path.dirname(os.path.realpath(python))}
    return tuple(sorted(p for p in paths if p and not any(p.startswith(s + "/") for s in SYSTEM_PATHS)))


def _wait_until_ready(fd: int, deadline: float, *, write: bool = False) -> None:
    """Blocks until ``fd`` can be read (written), or raises TimeoutError at ``deadline``."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise TimeoutError


def _read_reply(fd: int, deadline: float, limit: int):
    """A framed reply from the runner, or None at the deadline (mid-frame included) / on a closed pipe."""
    from siajax.sandbox.runner import read_message

    try:
        return read_message(fd, limit, wait=lambda: _wait_until_ready(fd, deadline))
    except (TimeoutError, EOFError, OSError):
        return None
    except Exception as err:  # fail closed on any frame the runner would never write (nested JSON, shape 1e400)
        return {"status": "runtime_error",
                "error": f"malformed reply from the sandbox: {type(err).__name__}: {str(err)[:200]}"}, {}


def _send(fd: int, deadline: float, header: dict, arrays: dict | None = None) -> None:
    """Writes a message to the runner (``fd`` is non-blocking); TimeoutError when it stops reading."""
    for piece in frame(header, arrays):
        view = memoryview(piece)
        while view:
            _wait_until_ready(fd, deadline, write=True)
            try:
                view = view[os.write(fd, view[:1 << 16]):]
            except BlockingIOError:
                continue


class SandboxSession:
    """A running jail with the agent's code loaded; ``call`` it any number of times."""

    def __init__(self, source: str, *, limits: SandboxLimits = SandboxLimits(), readable_dirs=(), devices=(),
                 env: dict | None = None, threads: int = 1, namespaces: bool = True, tripwire: bool = True,
                 python: str | None = None):
        """``python``: the interpreter that runs the code (default: this one; it needs NumPy and whatever the
        code imports). Outside a mount namespace, root runs the code as nobody only when nobody can run
        ``python``, and refuses otherwise."""
        self.source, self.limits, self.tripwire = source, limits, tripwire
        self.python = python or sys.executable
        self.readable_dirs = [str(Path(p).resolve()) for p in readable_dirs]
        self.devices, self.env, self.threads, self.namespaces = list(devices), dict(env or {}), threads, namespaces
        self.layers: dict = {}
        self.status, self.error = "ok", ""
        self._process, self._cgroup, self._stopped, self._oom = None, None, False, False

    def _make_control_directory(self) -> dict:
        """The host side of the jail: the code (readable by nobody), a scratch directory nobody owns (the
        fallback's), and the jail's root mount point; -> the spec's paths."""
        self._control = Path(tempfile.mkdtemp(prefix="siajax-sbx-"))
        os.chmod(self._control, 0o711)
        sandbox, scratch, jail = self._control / "sandbox", self._control / "scratch", self._control / "jail"
        for directory in (sandbox, scratch, jail):
            directory.mkdir()
        files = {"runner.py": (HERE / "runner.py").read_text(), "agent.py": self.source}
        for name, text in files.items():
            (sandbox / name).write_text(text, encoding="utf-8")
        os.chmod(sandbox, 0o755)
        if os.geteuid() == 0:
            os.chown(scratch, 65534, 65534)  # the no-namespace fallback runs as nobody
        return {"jail_root": str(jail), "host_sandbox": str(sandbox), "host_scratch": str(scratch), "files": files}

    def _spec(self, paths: dict, fds: dict) -> dict:
        """What the launcher builds: layers, limits, views, filters and the pipes' descriptors."""
        rlimits = {"RLIMIT_AS": self.limits.memory_bytes, "RLIMIT_CPU": self.limits.cpu_seconds,
                   "RLIMIT_FSIZE": self.limits.file_bytes, "RLIMIT_NOFILE": self.limits.max_open_files,
                   "RLIMIT_CORE": 0}
        if os.geteuid() != 0:
            rlimits["RLIMIT_NPROC"] = self.limits.max_processes + _own_processes()
        numbers = seccomp.syscall_numbers()
        return {**paths, **fds, "namespaces": self.namespaces, "scratch_bytes": self.limits.scratch_bytes,
                "read_only": [p for p in SYSTEM_PATHS if os.path.exists(p)] + [*_interpreter_paths(self.python)]
                             + self.readable_dirs,
                "devices": [d for d in (*DEVICES, *self.devices) if os.path.exists(d)], "rlimits": rlimits,
                "max_processes": self.limits.max_processes, "python": self.python, "threads": self.threads,
                "env": self.env, "cgroup_procs": self._cgroup.procs_files if self._cgroup else [],
                "seccomp_jail": seccomp.program(), "seccomp_fallback": seccomp.program(network_namespace=False),
                "syscalls": {name: numbers[name] for name in ("keyctl", "pivot_root")}}

    def __enter__(self) -> SandboxSession:
        hide_parent_memory()
        paths = self._make_control_directory()
        request_read, self._request = os.pipe()
        self._response, response_write = os.pipe()
        self._done, done_write = os.pipe()
        os.set_blocking(self._request, False)
        self._cgroup = jail_cgroup.create(self._control.name, max_processes=self.limits.max_processes,
                                          memory_bytes=self.limits.memory_bytes)
        try:
            self._launch(paths, {"request_fd": request_read, "response_fd": response_write, "done_fd": done_write})
        except BaseException:  # nothing runs (e.g. the fork was refused): leave no cgroup, pipe or directory
            self._release()
            raise
        finally:
            for fd in (request_read, response_write, done_write):
                os.close(fd)
        self._stdout = _BoundedReader(self._process.stdout, self.limits.output_bytes)
        self._stderr = _BoundedReader(self._process.stderr, self.limits.output_bytes)
        report = _read_reply(self._response, self._deadline, 1 << 20)
        self.layers = {**((report[0].get("layers", {}) if report else {}) or {}), "cgroup": (
            f"v{self._cgroup.version}: {', '.join(self._cgroup.controllers)}" if self._cgroup else "off: not root, or none")}
        if "fatal" in self.layers or report is None:
            self._fail("runtime_error", f"the sandbox could not start: {self.layers.get('fatal', 'no report')}")
            return self
        try:
            _send(self._request, self._deadline, {"source": "agent.py", "tripwire": self.tripwire})
        except (TimeoutError, OSError):
            self._fail(*self._after_silence("while loading the code"))
            return self
        ready = _read_reply(self._response, self._deadline, 1 << 20)
        if ready is None:
            self._fail(*self._after_silence("while loading the code"))
        elif ready[0].get("status") != "ready":
            self._fail(ready[0].get("status", "runtime_error"), ready[0].get("error", ""),
                       ready[0].get("traceback", ""))
        return self

    def _launch(self, paths: dict, fds: dict) -> None:
        (self._control / "spec.json").write_text(json.dumps(self._spec(paths, fds)))
        self._started = time.monotonic()
        self._deadline = self._started + self.limits.wall_seconds
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(HERE / "launcher.py"), str(self._control / "spec.json")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
            pass_fds=tuple(fds.values()), start_new_session=True, cwd=str(self._control))

    def _release(self) -> None:
        """Removes what the session holds on the host once its processes are gone: cgroup, pipes, files."""
        if self._cgroup is not None and "cgroup_removed" not in self.layers:
            self.layers["cgroup_removed"] = jail_cgroup.remove(self._cgroup)
        for fd in (self._request, self._response, getattr(self, "_done", -1)):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._control, ignore_errors=True)

    def call(self, entry: str, kwargs: dict | None = None, arrays: dict | None = None) -> SandboxResult:
        """Calls ``entry(**kwargs, **arrays)`` in the jail; arrays named "a/b" arrive as nested dicts."""
        if self.status != "ok":
            return self.result()
        start = time.perf_counter()
        try:
            _send(self._request, self._deadline, {"op": "call", "entry": entry, "kwargs": kwargs or {}}, arrays)
        except (TimeoutError, OSError):
            self._fail(*self._after_silence("while sending the inputs"))
            return self.result()
        reply = _read_reply(self._response, self._deadline, self.limits.message_bytes)
        seconds = time.perf_counter() - start
        if reply is None:
            self._fail(*self._after_silence("during the call"))
            return self.result()
        header, out = reply
        if header.get("status") != "ok":
            self._fail(header.get("status", "runtime_error"), header.get("error", ""), header.get("traceback", ""))
            return self.result()
        return dataclasses.replace(self.result(), value=header.get("value"), arrays=out, seconds=seconds)

    def _fail(self, status: str, error: str, traceback: str = "") -> None:
        self.status = status if status in STATUSES else "runtime_error"
        self.error, self._traceback = error, traceback
        self._stop()

    def _after_silence(self, when: str) -> tuple[str, str]:
        """Why the runner went quiet: the deadline, a signal (memory, CPU), or an exit."""
        if time.monotonic() >= self._deadline:
            return "timeout", f"killed at the wall-clock limit ({self.limits.wall_seconds}s) {when}"
        try:  # the runner died or closed its pipe: let the launcher report how before stopping it
            self._process.wait(timeout=max(min(GRACE_SECONDS, self._deadline - time.monotonic()), 0))
        except subprocess.TimeoutExpired:
            pass
        self._stop()
        code = self._process.returncode
        if code == EXIT_FORBIDDEN:
            return "forbidden", "the tripwire fired"
        if self._oom:
            return "oom", f"killed by the kernel at the jail's memory limit ({self.limits.memory_bytes} bytes) {when}"
        if code in (128 + signal.SIGXCPU, -signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL):
            return "timeout", f"killed at the CPU-time limit {when}"
        if code in (128 + signal.SIGSEGV, 128 + signal.SIGABRT, -signal.SIGSEGV, -signal.SIGABRT) or any(
                marker in self._stderr.text() for marker in ("MemoryError", "std::bad_alloc", "RESOURCE_EXHAUSTED")):
            return "oom", f"died with code {code} under the memory limit {when}"
        return "runtime_error", f"the sandbox exited with code {code} {when}"

    def _stop(self) -> None:
        """Ends the jail and proves it gone before returning. The launcher, on SIGTERM, kills the jail's
        pid 1 (the kernel then kills its whole pid namespace) or, with no pid namespace, every
        descendant, reaps them and says "reaped"; with a cgroup, whatever is still in it is then killed
        and the empty cgroup removed (the launcher is not in it: killing the cgroup never kills the
        reaper, so nothing the kill leaves is orphaned to the host's init, whose reaping may lag
        seconds behind and keep the cgroup busy). ``layers["contained"]`` records the proof."""
        if self._process is None or self._stopped:
            return
        self._stopped = True
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        emptied = jail_cgroup.kill_all(self._cgroup) if self._cgroup is not None else True
        try:  # the launcher is outside the cgroup: let it reap what the kill left before it goes
            self._process.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        if self._cgroup is not None:
            self._oom = jail_cgroup.oom_killed(self._cgroup)
            contained = emptied and not jail_cgroup.members(self._cgroup)
            self.layers["cgroup_removed"] = jail_cgroup.remove(self._cgroup)
        else:
            contained = self._launcher_reaped()
        self.layers["contained"] = bool(contained)

    def _launcher_reaped(self) -> bool:
        """Whether the (exited) launcher wrote "reaped" on its own pipe, which the jail never holds."""
        os.set_blocking(self._done, False)
        try:
            return os.read(self._done, 16) == b"reaped"
        except BlockingIOError:
            return False

    def result(self) -> SandboxResult:
        return SandboxResult(self.status, error=self.error, stdout=self._stdout.text() if self._process else "",
                             stderr=(getattr(self, "_traceback", "") + self._stderr.text()) if self._process else "",
                             wall_seconds=time.monotonic() - self._started if self._process else 0.0,
                             layers=dict(self.layers))

    def __exit__(self, *exc) -> None:
        if self._process is not None and self._process.returncode is None and self.status == "ok":
            try:
                _send(self._request, min(self._deadline, time.monotonic() + GRACE_SECONDS), {"op": "close"})
                self._process.wait(timeout=GRACE_SECONDS)
            except (OSError, TimeoutError, subprocess.TimeoutExpired):
                pass
        self._stop()
        for reader in (self._stdout, self._stderr):
            reader.join(timeout=GRACE_SECONDS)
        self._release()


def _own_processes() -> int:
    """Processes and threads of this uid now (RLIMIT_NPROC counts them all, not just the jail's)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def run_sandboxed(source: str, *, entry: str = "main", kwargs: dict | None = None, arrays: dict | None = None,
                  limits: SandboxLimits = SandboxLimits(), readable_dirs=(), devices=(), env=None,
                  namespaces: bool = True, python: str | None = None) -> SandboxResult:
    """One call of ``entry`` from ``source`` in a fresh jail; never raises for the code's faults and
    returns within ``limits.wall_seconds`` plus a small grace."""
    with SandboxSession(source, limits=limits, readable_dirs=readable_dirs, devices=devices, env=env,
                        namespaces=namespaces, python=python) as session:
        result = session.call(entry, kwargs, arrays)
    final = session.result()
    result = dataclasses.replace(result, stdout=final.stdout, stderr=final.stderr, layers=final.layers)
    if result.ok and not final.layers.get("contained"):  # fail closed: a process may have outlived the call
        result = dataclasses.replace(result, status="forbidden", value=None, arrays={},
                                     error="a process of the jail could not be shown gone after the call")
    return result


COMPILE_FAULTS = ("SyntaxError", "IndentationError", "TabError", "NameError: the code must define")


def failure_kind(result: SandboxResult) -> str | None:
    """Maps a sandbox outcome to a task failure kind (None when the code ran): a refused action is
    a cheat; syntax errors are compile errors; anything else is a crash, timeout or oom."""
    if result.ok:
        return None
    last_line = (result.error.strip().splitlines() or [""])[-1]
    if result.status == "compile_error" or (result.status == "runtime_error" and last_line.startswith(COMPILE_FAULTS)):
        return "compile_error"
    return {"timeout": "timeout", "forbidden": "cheat", "oom": "oom"}.get(result.status, "crash")


__all__ = ["STATUSES", "SandboxLimits", "SandboxResult", "SandboxSession", "failure_kind", "hide_parent_memory",
           "run_sandboxed"]
