"""One cgroup per jail (root only), made, emptied and removed by the parent.

Why the parent: the launcher is pivoted into the jail's filesystem and can no
longer see /sys/fs/cgroup, so a cgroup it made would leak; and only a cgroup
bounds what the jail's processes use together (RLIMIT_AS is per process) and
kills all of them, whatever they did to escape their parent (setsid, a cleared
parent-death signal, a nested namespace). Works on cgroup v2 (pids, memory,
``cgroup.kill``) and on v1 hierarchies (pids, memory and freezer, each mounted
on its own); whatever a host lacks is simply not listed in ``controllers``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("pids", "memory", "freezer")


@dataclasses.dataclass(frozen=True)
class JailCgroup:
    """The jail's cgroup directories: one on v2, one per controller hierarchy on v1."""

    version: int
    directories: dict  # controller -> directory ("unified" on v2)

    @property
    def procs_files(self) -> list[str]:
        return sorted({os.path.join(d, "cgroup.procs") for d in self.directories.values()})

    @property
    def controllers(self) -> list[str]:
        return sorted(self.directories) if self.version == 1 else sorted(
            _read(os.path.join(self.directories["unified"], "cgroup.controllers")).split())


def _read(path: str) -> str:
    with open(path, encoding="ascii") as handle:
        return handle.read()


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(text)


def _own_cgroup(hierarchy: str) -> str:
    """This process's cgroup in ``hierarchy`` ("" on v2, else a v1 controller), from /proc/self/cgroup."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, names, path = line.split(":", 2)
        if (hierarchy == "" and names == "") or hierarchy in names.split(","):
            return path
    return "/"


def _parent_directory(mount: str, hierarchy: str) -> str:
    """Where to nest the jail's cgroup: under our own (so our limits still apply) when visible."""
    nested = os.path.join(mount, _own_cgroup(hierarchy).lstrip("/"))
    return nested if os.path.isdir(nested) and os.access(nested, os.W_OK) else mount


def create(name: str, *, max_processes: int, memory_bytes: int) -> JailCgroup | None:
    """A fresh cgroup with the jail's limits, or None where this process may make none."""
    if os.geteuid() != 0:
        return None
    if os.path.isfile(os.path.join(ROOT, "cgroup.controllers")):
        return _create_v2(name, max_processes, memory_bytes)
    directories = {}
    for controller in V1_CONTROLLERS:
        mount = os.path.join(ROOT, controller)
        if not os.path.isfile(os.path.join(mount, "cgroup.procs")):
            continue
        path = os.path.join(_parent_directory(mount, controller), name)
        try:
            os.mkdir(path)
            if controller == "pids":
                _write(os.path.join(path, "pids.max"), str(max_processes))
            elif controller == "memory":
                _write(os.path.join(path, "memory.limit_in_bytes"), str(memory_bytes))
                _bound_swap_v1(path, memory_bytes)
        except OSError:
            _remove_directory(path, time.monotonic() + 1.0)
            continue
        directories[controller] = path
    return JailCgroup(1, directories) if directories else None


def _bound_swap_v1(path: str, memory_bytes: int) -> None:
    """Keep the jail out of swap, or its RAM limit is no limit on a host with swap: memory+swap at the
    same bound where the kernel accounts swap (``memsw``), and swappiness 0 always, which in a v1 cgroup
    forbids swapping at its own limit (so the limit ends in an OOM kill, not in swap)."""
    if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
        _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(memory_bytes))
    try:
        _write(os.path.join(path, "memory.swappiness"), "0")
    except OSError:
        pass  # an old kernel that refuses it: memsw (where accounted) still bounds swap


def _create_v2(name: str, max_processes: int, memory_bytes: int) -> JailCgroup | None:
    parent = _parent_directory(ROOT, "")
    try:  # best effort: a parent that holds processes itself cannot hand controllers down
        _write(os.path.join(parent, "cgroup.subtree_control"), "+pids +memory")
    except OSError:
        pass
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except OSError:
        return None
    for file, value in (("pids.max", max_processes), ("memory.max", memory_bytes), ("memory.swap.max", 0)):
        try:
            _write(os.path.join(path, file), str(value))
        except OSError:
            pass  # the controller is not enabled here: listed as absent in ``controllers``
    return JailCgroup(2, {"unified": path})


def members(cgroup: JailCgroup) -> set[int]:
    pids = set()
    for procs in cgroup.procs_files:
        try:
            pids.update(int(pid) for pid in _read(procs).split())
        except OSError:
            continue
    return pids


def kill_all(cgroup: JailCgroup, timeout: float = 5.0) -> bool:
    """SIGKILL every process in the cgroup; -> whether it is empty within ``timeout`` seconds.
    v2: ``cgroup.kill`` (atomic, forks included). v1: freeze, kill, thaw, until nothing is left."""
    deadline = time.monotonic() + timeout
    kill_file = os.path.join(cgroup.directories.get("unified", ""), "cgroup.kill")
    freezer = cgroup.directories.get("freezer")
    while True:
        pids = members(cgroup)
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        if cgroup.version == 2 and os.path.exists(kill_file):
            _write(kill_file, "1")
        else:
            _freeze(freezer, "FROZEN", deadline)  # no fork can race the kills below
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _freeze(freezer, "THAWED", deadline)  # killed processes only die once thawed
        time.sleep(0.005)


def _freeze(freezer: str | None, state: str, deadline: float) -> None:
    if freezer is None:
        return
    try:
        _write(os.path.join(freezer, "freezer.state"), state)
        while state == "FROZEN" and _read(os.path.join(freezer, "freezer.state")).strip() != state:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
    except OSError:
        pass


def oom_killed(cgroup: JailCgroup) -> bool:
    """Whether the kernel killed a process of the jail for exceeding the cgroup's memory limit."""
    directory = cgroup.directories.get("memory") or cgroup.directories.get("unified")
    for file, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
        try:
            fields = dict(line.split() for line in _read(os.path.join(directory, file)).splitlines())
        except (OSError, ValueError, TypeError):
            continue
        if int(fields.get(key, 0)) > 0:
            return True
    return False


def remove(cgroup: JailCgroup, timeout: float = 5.0) -> bool:
    """Removes the (emptied) cgroup directories; -> whether none is left behind within ``timeout``
    seconds (a killed process leaves its cgroups only once it has exited, which under load or while
    its memory is freed takes a while)."""
    deadline = time.monotonic() + timeout
    return all([_remove_directory(path, deadline) for path in cgroup.directories.values()])


def _remove_directory(path: str, deadline: float) -> bool:
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
