"""Sandbox launcher: builds the jail in the kernel, then runs the in-jail runner in it.

Run by the parent as ``python -I launcher.py SPEC_JSON`` (standard library only;
this file is never imported inside the jail). Layers, each recorded in the
``layers`` report the launcher writes first on the response pipe:

  namespaces  mount + pid + net + ipc + uts (+ user when not root): the runner is
              pid 1's only child world; it sees a tmpfs root holding read-only
              binds of the system runtime, the interpreter and venv, the readable
              dirs (a task's data/public) and a size-limited tmpfs /tmp - nothing
              else (no data/private, no task code, no $HOME, /run or host /tmp); a
              fresh /proc shows only the jail's processes; the network has only a
              down loopback; everything in the jail dies with its pid 1.
  landlock    the same view again as a Landlock ruleset (read-only paths, /tmp
              writable), TCP bind/connect denied (ABI >= 4), signals and abstract
              unix sockets scoped to the jail (ABI >= 6). The whole layer when
              namespaces are unavailable (e.g. unprivileged user namespaces off).
  cgroup      (root) the parent's cgroup for this jail, joined by the jail's pid 1 before anything
              else: pids.max and memory limits on the jail as a whole; the parent kills and
              removes it. The launcher stays outside, so that killing the cgroup never kills
              the reaper: whatever the kill leaves as zombies, the launcher reaps.
  keyring     a fresh anonymous session keyring (no key of the parent's session reachable).
  seccomp     the parent's system-call filter (``seccomp.py``), installed just before exec.
  identity    as root: setgroups([]) + setuid/setgid(nobody) after setup, which
              drops every capability; otherwise the user namespace's creator
              capabilities end at execve (uid != 0 inside).
  rlimits     address space, CPU seconds, file size, open files, processes, no core.
  no_new_privs, parent-death SIGKILL, and a minimal environment.

On SIGTERM from the parent the launcher kills the jail (its pid 1, which takes
the whole pid namespace with it; without one, every descendant, which come back
to the launcher as their subreaper), reaps it, and only then writes "reaped" on
its own pipe (never inherited by the jail), so the parent knows nothing is left.

A layer the kernel refuses is recorded as off, with the reason, and the launch
goes on with the rest, so a verifier always knows what held.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 4, 38, 36
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
NOBODY = 65534
# what XLA's CPU backend probes (cores, caches, memory); read-only, outside a mount namespace only
FALLBACK_PROBES = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/sys/devices/system/cpu", "/sys/fs/cgroup")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source, target, fstype, flags: int, data=None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {source} -> {target}")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


# Landlock (ctypes; x86-64/arm64 numbers)
FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir
FS_WRITE_ALL = ((1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
                | (1 << 11) | (1 << 12))  # write, remove dir/file, make char/dir/reg/sock/fifo/block/sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    return _libc.syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))


def landlock(read_only: list[str], writable: list[str]) -> dict:
    """Restricts this process (and what it execs) to ``read_only`` / ``writable`` paths,
    no TCP, and (ABI >= 6) signals and abstract sockets only within its own domain."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError(ctypes.get_errno(), "Landlock is not available in this kernel")
    handled = FS_READ | FS_WRITE_ALL | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (
        FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    file_rights = (1 << 0) | (1 << 1) | (1 << 2) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    for paths, access in ((read_only, FS_READ), (writable, handled)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a path this machine lacks grants nothing
            rights = access if os.path.isdir(path) else access & file_rights  # files take file rights only
            rule = _PathBeneath(rights & handled, fd)
            _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0), f"landlock rule {path}")
            os.close(fd)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return {"abi": abi, "tcp_denied": abi >= 4, "scoped_signals_and_abstract_sockets": abi >= 6}


# the jail's filesystem
def _ensure(path: str, directory: bool) -> None:
    if directory:
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            open(path, "w").close()


def bind(source: str, root: str, *, writable: bool = False, device: bool = False) -> None:
    """Bind ``source`` at the same path under ``root``, read-only unless ``writable``."""
    target = root + source
    _ensure(target, os.path.isdir(source))
    mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (0 if device else MS_NODEV) | (0 if writable else MS_RDONLY)
    mount(None, target, None, flags)


def pivot_into(root: str, pivot_root: int) -> None:
    old = os.path.join(root, ".oldroot")
    os.makedirs(old, exist_ok=True)
    _check(_libc.syscall(pivot_root, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.oldroot", MNT_DETACH), "umount old root")
    os.rmdir("/.oldroot")


def build_jail(spec: dict) -> None:
    """In a fresh mount namespace (we are pid 1 of a fresh pid namespace): a tmpfs root with
    read-only binds, a fresh /proc, a minimal /dev and a size-limited /tmp; then pivot into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = spec["jail_root"]
    mount("siajax-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    os.makedirs(root + "/tmp")  # scratch first: read-only binds under /tmp (e.g. a task's data) go on top
    mount("siajax-scratch", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={spec['scratch_bytes']},mode=1777")
    for path in spec["read_only"]:
        if os.path.exists(path):
            bind(path, root)
    for path in spec["devices"]:
        if os.path.exists(path):
            bind(path, root, writable=True, device=True)
    sandbox = root + "/sandbox"
    os.makedirs(sandbox)
    for name, text in spec["files"].items():
        with open(os.path.join(sandbox, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    pivot_into(root, spec["syscalls"]["pivot_root"])
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


# launch
def _reachable_by_others(path: str) -> bool:
    """Whether an unprivileged user can reach and run ``path`` (every parent searchable)."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for depth in range(1, len(parts)):
        directory = "/".join(parts[:depth]) or "/"
        if not os.stat(directory).st_mode & 0o001:
            return False
    return bool(os.stat(real).st_mode & 0o001)


def set_limits(limits: dict) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def join_cgroup(procs_files: list[str]) -> None:
    """(root) Moves this process (the jail's pid 1, before any fork) into the cgroup the parent made."""
    try:
        for procs in procs_files:
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))
    except OSError as err:
        raise OSError(f"could not join the jail's cgroup: {err}") from None


def join_fresh_session_keyring(keyctl: int) -> None:
    """KEYCTL_JOIN_SESSION_KEYRING with no name: a new anonymous session keyring for the jail."""
    _check(_libc.syscall(keyctl, 1, None), "keyctl(JOIN_SESSION_KEYRING)")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install_seccomp(instructions: list) -> None:
    """PR_SET_SECCOMP with the parent's filter (no_new_privs is already set)."""
    table = (_SockFilter * len(instructions))(*[_SockFilter(*map(int, row)) for row in instructions])
    program = _SockFprog(len(instructions), table)
    _check(_libc.prctl(22, 2, ctypes.byref(program), 0, 0), "prctl(PR_SET_SECCOMP)")  # SECCOMP_MODE_FILTER


def _write_report(fd: int, report: dict) -> None:
    body = json.dumps(report).encode()
    os.write(fd, len(body).to_bytes(8, "little") + body)


def enter_namespaces(spec: dict) -> dict:
    """unshare() the namespaces the spec asks for; -> what took effect."""
    if not spec["namespaces"]:
        return {"namespaces": "off: disabled by the caller"}
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    try:
        unshare(flags)
    except OSError as err:
        return {"namespaces": f"off: {err}"}
    if not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    return {"namespaces": "mount+pid+net+ipc+uts" + ("" if root else "+user")}


def child(spec: dict, layers: dict, report_fd: int) -> None:
    """The jail's pid 1: filesystem, Landlock, limits, identity, keyring, system-call filter, then
    exec the runner."""
    join_cgroup(spec["cgroup_procs"])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.close(spec["done_fd"])  # only the launcher may say the jail is gone
    jailed = layers["namespaces"].startswith("mount")
    if jailed:
        try:
            build_jail(spec)
        except OSError as err:  # e.g. Ubuntu's restricted user namespaces: no mounts; Landlock draws the view
            jailed, layers["mount"] = False, f"off: {err}"
    if jailed:
        read_only, writable = ["/"], ["/tmp", "/dev/null"]
    else:  # Landlock alone draws the same view on the host's filesystem; of /proc only our own process
        read_only = spec["read_only"] + spec["devices"] + [spec["host_sandbox"], f"/proc/{os.getpid()}",
                                                            *FALLBACK_PROBES]
        writable = [spec["host_scratch"], "/dev/null"]
        os.chdir(spec["host_scratch"])
    try:
        layers["landlock"] = landlock(read_only, writable)
    except OSError as err:
        layers["landlock"] = f"off: {err}"
        if not jailed:
            layers["fatal"] = "neither a mount namespace nor Landlock is available; refusing to run agent code"
    set_limits(spec["rlimits"])
    layers["rlimits"] = sorted(spec["rlimits"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    try:
        join_fresh_session_keyring(spec["syscalls"]["keyctl"])
        layers["keyring"] = "fresh anonymous session keyring"
    except OSError as err:
        layers["keyring"] = f"off: {err}"
    identity = identity_plan(os.geteuid(), jailed, _reachable_by_others(spec["python"]))
    if identity == "nobody":
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers["identity"] = "nobody (65534), no capabilities"
    elif identity == "refuse":
        layers["fatal"] = ("the interpreter is not reachable by nobody outside a mount namespace; refusing to run "
                           "agent code as root (install Python where every user can run it)")
    else:
        layers["identity"] = f"uid {os.getuid()} (capabilities end at exec)"
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # credentials changed: set it again
    filter_name = "seccomp_jail" if layers["namespaces"].startswith("mount") else "seccomp_fallback"
    try:
        install_seccomp(spec[filter_name])
        layers["seccomp"] = f"{filter_name.split('_')[1]} deny-list ({len(spec[filter_name])} instructions)"
    except OSError as err:
        layers["seccomp"] = f"off: {err}"
    _write_report(report_fd, {"layers": layers})
    if "fatal" in layers:
        os._exit(3)
    sandbox = "/sandbox" if jailed else spec["host_sandbox"]
    scratch = "/tmp" if jailed else spec["host_scratch"]
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(spec["threads"]), **spec["env"]}
    os.execve(spec["python"], [spec["python"], "-I", os.path.join(sandbox, "runner.py"), str(spec["request_fd"]),
                               str(spec["response_fd"]), sandbox], env)


def identity_plan(euid: int, jailed: bool, interpreter_reachable: bool) -> str:
    """Who runs the agent's code: "nobody" (root drops to it), "self" (an ordinary user), or "refuse"
    (root outside a mount namespace where nobody cannot run the interpreter: never run it as root)."""
    if euid != 0:
        return "self"
    return "nobody" if jailed or interpreter_reachable else "refuse"


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    report_fd = spec["response_fd"]
    layers = enter_namespaces(spec)
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans (setsid, double forks) come back to us and die with us
    pid = os.fork()
    if pid == 0:
        try:
            child(spec, layers, report_fd)
        except BaseException as err:  # a jail that cannot be built must not run anything
            try:
                _write_report(report_fd, {"layers": {**layers, "fatal": f"{type(err).__name__}: {err}"}})
            finally:
                os._exit(3)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))  # pid 1: its namespace dies with it
    _, status = os.waitpid(pid, 0)
    if _kill_descendants():  # without a pid namespace: whatever came back to us
        os.write(spec["done_fd"], b"reaped")
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _kill_descendants() -> bool:
    """SIGKILL and reap every process reparented to us (we are their subreaper) until none is left;
    -> whether none is. (Inside a pid namespace there are none: they die with its pid 1.)"""
    me = str(os.getpid())
    for _ in range(200):
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        if handle.read().rsplit(")", 1)[1].split()[1] == me:
                            children.append(int(entry))
                except (OSError, IndexError):
                    continue
        if not children:
            return True
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return False


if __name__ == "__main__":
    main()
