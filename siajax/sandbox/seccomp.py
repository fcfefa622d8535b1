"""The jail's system-call filter, as a classic-BPF program the launcher installs before exec.

A deny-list of the kernel's riskiest surface for code that only needs to
compute: new namespaces (unshare, setns, clone with CLONE_NEW*), mounts,
keyrings (keyctl, add_key, request_key: no key read from, or planted in, a
keyring another process shares), io_uring, userfaultfd, bpf, perf_event_open,
ptrace and cross-process memory access, personality changes, execveat (memfd
execution), device nodes, file locks (flock, fcntl locks: no channel between
concurrent jails through a shared read-only file), kernel modules and kexec,
and sockets of any family but unix and IP (no netlink, packet, vsock, ...).
Without a network namespace (the Landlock-only fallback) every socket() is
denied. Denied calls fail with EPERM (clone3 with ENOSYS, so libc falls back
to clone, whose flags the filter can read); a foreign architecture or the
x32 ABI kills the process.

Built here by the parent (a pure function of the architecture, testable
without a kernel) and handed to the launcher as (code, jt, jf, k) tuples.
"""

from __future__ import annotations

import errno
import platform

# classic BPF
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
OFFSET_NR, OFFSET_ARCH = 0, 4
X32_SYSCALL_BIT = 0x40000000


def offset_arg(index: int) -> int:
    """The low 32 bits of argument ``index`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * index


AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {  # name -> number per architecture (x86_64, aarch64 / asm-generic); None: not on that arch
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "userfaultfd": (323, 282), "bpf": (321, 280), "perf_event_open": (298, 241),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "execveat": (322, 281), "mknod": (133, None), "mknodat": (259, 33), "flock": (73, 32),
    "kexec_load": (246, 104), "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "personality": (135, 92), "fcntl": (72, 25), "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198),
}
DENIED = ("unshare", "setns", "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig",
          "fsmount", "fspick", "mount_setattr", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
          "io_uring_register", "userfaultfd", "bpf", "perf_event_open", "ptrace", "process_vm_readv",
          "process_vm_writev", "execveat", "mknod", "mknodat", "flock", "kexec_load", "init_module", "finit_module",
          "delete_module")
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
FCNTL_LOCKS = (5, 6, 7, 36, 37, 38)  # F_GETLK, F_SETLK, F_SETLKW, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW
SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6 (inside a network namespace with a down loopback)
PERSONALITY_QUERY = 0xFFFFFFFF


def _deny(code: int = errno.EPERM) -> tuple:
    return (RET_K, 0, 0, SECCOMP_RET_ERRNO | code)


ALLOW = (RET_K, 0, 0, SECCOMP_RET_ALLOW)


def _on_syscall(number: int, block: list[tuple]) -> list[tuple]:
    """``block`` (which always returns) runs when the call is ``number``; otherwise skipped."""
    return [(LD_W_ABS, 0, 0, OFFSET_NR), (JEQ_K, 0, len(block), number), *block]


def _allow_if_arg_in(index: int, values: tuple) -> list[tuple]:
    block = [(LD_W_ABS, 0, 0, offset_arg(index))]
    for value in values:
        block += [(JEQ_K, 0, 1, value), ALLOW]
    return block + [_deny()]


def _deny_if_arg_in(index: int, values: tuple) -> list[tuple]:
    block = [(LD_W_ABS, 0, 0, offset_arg(index))]
    for value in values:
        block += [(JEQ_K, 0, 1, value), _deny()]
    return block + [ALLOW]


def machine() -> str:
    return platform.machine()


def syscall_numbers(arch: str | None = None) -> dict:
    """{name: number (None where the call does not exist)} for ``arch`` (default: this machine's)."""
    arch = arch or machine()
    if arch not in AUDIT_ARCH:
        raise ValueError(f"no system-call filter for architecture {arch!r}")
    return {name: numbers[0 if arch == "x86_64" else 1] for name, numbers in SYSCALLS.items()}


def program(arch: str | None = None, *, network_namespace: bool = True) -> list[tuple]:
    """The filter for ``arch`` (default: this machine's), as (code, jt, jf, k) instructions."""
    arch = arch or machine()
    number = syscall_numbers(arch)
    out = [(LD_W_ABS, 0, 0, OFFSET_ARCH), (JEQ_K, 1, 0, AUDIT_ARCH[arch]), (RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
           (LD_W_ABS, 0, 0, OFFSET_NR)]
    if arch == "x86_64":
        out += [(JGE_K, 0, 1, X32_SYSCALL_BIT), (RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    for name in DENIED:
        if number[name] is not None:
            out += [(JEQ_K, 0, 1, number[name]), _deny()]
    out += [(JEQ_K, 0, 1, number["clone3"]), _deny(errno.ENOSYS)]  # libc then uses clone(), whose flags we see
    out += _on_syscall(number["clone"], [(LD_W_ABS, 0, 0, offset_arg(0)), (JSET_K, 0, 1, CLONE_NAMESPACES),
                                         _deny(), ALLOW])
    out += _on_syscall(number["fcntl"], _deny_if_arg_in(1, FCNTL_LOCKS))
    out += _on_syscall(number["personality"], _allow_if_arg_in(0, (PERSONALITY_QUERY,)))
    out += _on_syscall(number["socket"], _allow_if_arg_in(0, SOCKET_FAMILIES if network_namespace else ()))
    return out + [ALLOW]


def evaluate(instructions: list[tuple], arch: int, nr: int, args: tuple = ()) -> int:
    """Runs the program on one system call (a reference interpreter for tests and for reading it):
    -> the action (SECCOMP_RET_* | data)."""
    data = {OFFSET_NR: nr & 0xFFFFFFFF, OFFSET_ARCH: arch}
    data.update({offset_arg(i): value & 0xFFFFFFFF for i, value in enumerate(args)})
    accumulator, pc = 0, 0
    while True:
        code, jt, jf, k = instructions[pc]
        if code == LD_W_ABS:
            accumulator, pc = data.get(k, 0), pc + 1
        elif code in (JEQ_K, JGE_K, JSET_K):
            taken = {JEQ_K: accumulator == k, JGE_K: accumulator >= k, JSET_K: bool(accumulator & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"unknown instruction {code:#x}")
