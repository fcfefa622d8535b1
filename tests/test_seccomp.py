"""The jail's system-call filter, read by a reference BPF interpreter (no kernel needed), and its
system-call numbers checked against the kernel headers where the machine has them."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from siajax.sandbox import seccomp
from siajax.sandbox.seccomp import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS, evaluate

EPERM, ENOSYS = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ERRNO | errno.ENOSYS
ARCHES = sorted(seccomp.AUDIT_ARCH)


def _number(arch: str, name: str) -> int:
    return seccomp.syscall_numbers(arch)[name]


def _action(arch: str, name_or_number, *args, network_namespace: bool = True) -> int:
    nr = _number(arch, name_or_number) if isinstance(name_or_number, str) else name_or_number
    return evaluate(seccomp.program(arch, network_namespace=network_namespace), seccomp.AUDIT_ARCH[arch], nr, args)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_denied_call_fails_with_eperm_and_ordinary_calls_pass(arch):
    for name in seccomp.DENIED:
        if _number(arch, name) is not None:
            assert _action(arch, name) == EPERM, name
    read, write, mmap = (0, 1, 9) if arch == "x86_64" else (63, 64, 222)
    for nr in (read, write, mmap):
        assert _action(arch, nr, 3, 0, 0) == SECCOMP_RET_ALLOW


@pytest.mark.parametrize("arch", ARCHES)
def test_clone_is_judged_by_its_flags_and_clone3_falls_back(arch):
    threads = 0x3D0F00  # CLONE_VM | FS | FILES | SIGHAND | THREAD | SYSVSEM | SETTLS | PARENT_SETTID | CHILD_CLEARTID
    assert _action(arch, "clone", threads) == SECCOMP_RET_ALLOW
    assert _action(arch, "clone", 17) == SECCOMP_RET_ALLOW  # fork: SIGCHLD
    for namespace in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80):
        assert _action(arch, "clone", 17 | namespace) == EPERM, hex(namespace)
    assert _action(arch, "clone3", 0, 0) == ENOSYS


@pytest.mark.parametrize("arch", ARCHES)
def test_sockets_locks_and_personality_by_argument(arch):
    for family in (1, 2, 10):
        assert _action(arch, "socket", family, 1, 0) == SECCOMP_RET_ALLOW
        assert _action(arch, "socket", family, 1, 0, network_namespace=False) == EPERM
    for family in (16, 17, 40, 38, 44):  # netlink, packet, vsock, alg, xdp
        assert _action(arch, "socket", family, 3, 0) == EPERM
    for command in seccomp.FCNTL_LOCKS:
        assert _action(arch, "fcntl", 3, command, 0) == EPERM
    for command in (0, 1, 2, 3, 4, 1030):  # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC
        assert _action(arch, "fcntl", 3, command, 0) == SECCOMP_RET_ALLOW
    assert _action(arch, "personality", 0xFFFFFFFF) == SECCOMP_RET_ALLOW
    assert _action(arch, "personality", 0x0008) == EPERM


def test_foreign_architectures_and_the_x32_abi_are_killed():
    program = seccomp.program("x86_64")
    assert evaluate(program, seccomp.AUDIT_ARCH["aarch64"], 0) == SECCOMP_RET_KILL_PROCESS
    assert evaluate(program, 0x40000003, 0) == SECCOMP_RET_KILL_PROCESS  # i386
    assert evaluate(program, seccomp.AUDIT_ARCH["x86_64"], 0x40000000 | 272) == SECCOMP_RET_KILL_PROCESS
    with pytest.raises(ValueError, match="no system-call filter"):
        seccomp.program("riscv64")


@pytest.mark.parametrize("arch", ARCHES)
def test_every_jump_lands_inside_the_program(arch):
    for network_namespace in (True, False):
        program = seccomp.program(arch, network_namespace=network_namespace)
        assert len(program) < 4096  # BPF_MAXINSNS
        for pc, (code, jt, jf, _) in enumerate(program):
            assert 0 <= jt <= 255 and 0 <= jf <= 255
            assert pc + 1 + max(jt, jf) < len(program) or code == seccomp.RET_K
        assert program[-1] == seccomp.ALLOW


HEADERS = {"x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
           "aarch64": Path("/usr/include/asm-generic/unistd.h")}


@pytest.mark.parametrize("arch", ARCHES)
def test_numbers_match_the_kernel_headers(arch):
    header = HEADERS[arch]
    if not header.exists():
        pytest.skip(f"{header} is not on this machine")
    text = header.read_text()
    defined = {name: int(value) for name, value in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
    for name in seccomp.SYSCALLS:
        expected = defined.get(name)
        assert _number(arch, name) == expected, (arch, name)
