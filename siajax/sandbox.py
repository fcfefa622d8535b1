"""Run agent-written Python in a contained subprocess and classify what happened.

Layers, outermost first (set up by the child's runner before any agent code,
not in a pre-exec hook, which is unsafe in a threaded JAX process):
  * process: new session (the whole group is killed on timeout), rlimits on
    address space, CPU seconds, file size, open files, and processes;
  * identity (when started as root): a fresh network namespace, then the
    child drops to ``nobody`` if it can still run the interpreter, so file
    permissions and RLIMIT_NPROC bind;
  * interpreter: audit hooks installed before the agent's code runs refuse
    sockets, subprocesses and forks, writes outside the scratch dir, and any
    access under the forbidden paths (a task's ``data/private``). A refusal
    ends the child at once with status ``forbidden``; the code can't catch it.

The child runs ``entry(**kwargs)`` from the given source with the scratch dir as
its working directory and returns a JSON-serialisable value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

STATUSES = ("ok", "compile_error", "runtime_error", "timeout", "oom", "forbidden")
_EXIT_FORBIDDEN = 86
_EXIT_OOM = 87


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 30.0
    cpu_seconds: int = 60
    memory_bytes: int = 4 << 30
    file_bytes: int = 64 << 20
    max_processes: int = 64
    max_open_files: int = 256


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """status in STATUSES; value is entry's return value when status is ok."""

    status: str
    value: object = None
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_RUNNER = textwrap.dedent('''
    import json, os, resource, sys, traceback
    spec = json.load(open(sys.argv[1]))
    result_file = open(spec["result_path"], "w")
    if os.geteuid() == 0:
        try:  # a private, empty network namespace
            import ctypes
            ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
        except Exception:
            pass
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["uid"])
        os.setuid(spec["uid"])

    def report(status, **fields):
        result_file.write(json.dumps({"status": status, **fields}, default=repr))
        result_file.flush()

    scratch = os.path.realpath(spec["scratch"])
    forbidden = [os.path.realpath(p) for p in spec["forbidden"]]
    writable = [scratch, "/dev/null"]

    def inside(path, roots):
        try:
            real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
        except Exception:
            return False
        return any(real == r or real.startswith(r + os.sep) for r in roots)

    def deny(what):
        report("forbidden", error=what)
        os._exit(%(forbidden)d)

    BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork",
               "os.forkpty", "os.system", "os.posix_spawn", "os.exec", "os.spawn", "subprocess.Popen",
               "os.kill", "os.killpg", "pty.spawn"}
    WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                    "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"}

    forbidden_modules = tuple(spec["forbidden_modules"])

    def hook(event, args):
        if event == "import" and args and isinstance(args[0], str) and forbidden_modules:
            if any(args[0] == m or args[0].startswith(m + ".") for m in forbidden_modules):
                deny(f"importing {args[0]} is not allowed")
        if event in BLOCKED:
            deny(f"{event} is not allowed in the sandbox")
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode = args[0], args[1] if len(args) > 1 else "r"
            if inside(path, forbidden):
                deny(f"reading {os.fsdecode(path)} is not allowed")
            flags = args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and not inside(path, writable):
                deny(f"writing {os.fsdecode(path)} (outside the scratch dir) is not allowed")
        if event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            for target in args[:2]:
                if isinstance(target, (str, bytes, os.PathLike)) and not inside(target, writable):
                    deny(f"{event} on {os.fsdecode(target)} (outside the scratch dir) is not allowed")
        if event in ("os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            if inside(args[0], forbidden):
                deny(f"listing {os.fsdecode(args[0])} is not allowed")

    source = open(spec["source_path"], encoding="utf-8").read()
    try:
        code = compile(source, "agent_code.py", "exec")
    except (SyntaxError, ValueError) as err:
        report("compile_error", error=f"{type(err).__name__}: {err}")
        sys.exit(0)
    os.chdir(scratch)
    sys.addaudithook(hook)
    try:
        namespace = {"__name__": "agent_code"}
        exec(code, namespace)
        entry = namespace.get(spec["entry"])
        if not callable(entry):
            report("compile_error", error=f"no callable named {spec['entry']!r} in the code")
            os._exit(0)
        value = entry(**spec["kwargs"])
        report("ok", value=value)
    except MemoryError:
        report("oom", error="MemoryError")
        os._exit(%(oom)d)
    except SystemExit:
        report("runtime_error", error="the code called exit()")
    except BaseException as err:
        report("runtime_error", error="".join(traceback.format_exception_only(type(err), err)).strip(),
               traceback=traceback.format_exc(limit=8))
''') % {"forbidden": _EXIT_FORBIDDEN, "oom": _EXIT_OOM}


def _reachable_by_others(path: str) -> bool:
    """Whether an unprivileged user can reach and run ``path`` (every parent searchable)."""
    import stat

    real = Path(os.path.realpath(path))
    for directory in real.parents:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(real).st_mode & stat.S_IXOTH)


def unprivileged_uid(python: str = sys.executable) -> int | None:
    """The uid the child drops to: ``nobody`` when we are root and it can run ``python``."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        uid = pwd.getpwnam("nobody").pw_uid
    except (KeyError, ImportError):
        return None
    prefix_ok = all(_reachable_by_others(p) for p in (python, sys.base_prefix + "/lib", sys.prefix + "/lib"))
    return uid if prefix_ok else None


def run_sandboxed(source: str, *, entry: str = "main", kwargs: dict | None = None,
                  limits: SandboxLimits = SandboxLimits(), readable_dirs: list[str | os.PathLike] = (),
                  forbidden_dirs: list[str | os.PathLike] = (), scratch_dir: str | os.PathLike | None = None,
                  forbidden_modules: tuple[str, ...] = (), python: str = sys.executable) -> SandboxResult:
    """Runs ``entry(**kwargs)`` from ``source`` in the sandbox; never raises for the code's faults.

    readable_dirs: extra directories the child needs (a task's ``data/public``);
    forbidden_dirs: directories it must never read (a task's ``data/private``);
    forbidden_modules: module names (and their submodules) it must not import.
    """
    with tempfile.TemporaryDirectory(prefix="siajax-sbx-") as control:
        control_dir = Path(control)
        scratch = Path(scratch_dir) if scratch_dir else control_dir / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        result_path = control_dir / "result.json"
        (control_dir / "agent_code.py").write_text(source, encoding="utf-8")
        (control_dir / "runner.py").write_text(_RUNNER, encoding="utf-8")
        uid = unprivileged_uid(python)
        rlimits = {"RLIMIT_AS": limits.memory_bytes, "RLIMIT_CPU": limits.cpu_seconds,
                   "RLIMIT_FSIZE": limits.file_bytes, "RLIMIT_NOFILE": limits.max_open_files,
                   "RLIMIT_NPROC": limits.max_processes, "RLIMIT_CORE": 0}
        spec = {"source_path": str(control_dir / "agent_code.py"), "entry": entry, "kwargs": kwargs or {},
                "scratch": str(scratch), "forbidden": [str(p) for p in forbidden_dirs],
                "result_path": str(result_path), "rlimits": rlimits, "uid": uid,
                "forbidden_modules": list(forbidden_modules)}
        (control_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        result_path.touch()
        if uid is not None:
            os.chmod(control_dir, 0o755)
            for path in (scratch, result_path):
                os.chown(path, uid, -1)
            for directory in readable_dirs:
                if not os.access(directory, os.R_OK):
                    raise PermissionError(f"readable dir {directory} is not readable")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(scratch), "PYTHONHASHSEED": "0",
               "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        process = subprocess.Popen(
            [python, "-I", str(control_dir / "runner.py"), str(control_dir / "spec.json")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(scratch),
            start_new_session=True,  # its own process group, killed whole on timeout
        )
        try:
            stdout, stderr = process.communicate(timeout=limits.wall_seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            timed_out = True
        wall = time.perf_counter() - start
        report = _read_report(result_path)
        return _classify(report, process.returncode, timed_out, stdout, stderr, wall)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_report(path: Path) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, json.JSONDecodeError):
        return None


def _classify(report, returncode, timed_out, stdout: bytes, stderr: bytes, wall: float) -> SandboxResult:
    out = stdout.decode("utf-8", "replace")[-20_000:]
    err = stderr.decode("utf-8", "replace")[-20_000:]
    common = dict(stdout=out, stderr=err, wall_seconds=wall)
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL) and report is None:
        reason = "wall-clock limit" if timed_out else "CPU-time limit"
        return SandboxResult("timeout", error=f"killed at the {reason}", **common)
    if report is not None:
        status = report["status"]
        detail = report.get("error", "")
        if report.get("traceback"):
            err = report["traceback"] + err
            common["stderr"] = err
        return SandboxResult(status, value=report.get("value"), error=detail, **common)
    if returncode in (-signal.SIGSEGV, -signal.SIGABRT) or "MemoryError" in err or "std::bad_alloc" in err:
        return SandboxResult("oom", error=f"died with code {returncode} under the memory limit", **common)
    return SandboxResult("runtime_error", error=f"exited with code {returncode} and no report", **common)


COMPILE_FAULTS = ("SyntaxError", "IndentationError", "TabError", "NameError: the code must define")


def failure_kind(result: SandboxResult) -> str | None:
    """Maps a sandbox outcome to a task failure kind (None when the code ran).

    Syntax errors raised while a trusted wrapper compiles the agent's code count
    as compile errors; a refused action is a cheat; anything else is a crash.
    """
    if result.ok:
        return None
    last_line = (result.error.strip().splitlines() or [""])[-1]
    if result.status == "compile_error" or (result.status == "runtime_error" and last_line.startswith(COMPILE_FAULTS)):
        return "compile_error"
    return {"timeout": "timeout", "forbidden": "cheat"}.get(result.status, "crash")
