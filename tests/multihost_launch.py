"""Launching one program as several JAX processes on this machine (jax.distributed over gloo), as on
several hosts: the helpers the multi-host tests share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int, **extra) -> dict:
    """This environment for a process with ``devices`` CPU devices, without the session's SIAJAX_ settings
    or compilation cache (each process compiles its own multi-process programs)."""
    unwanted = ("SIAJAX_", "JAX_COMPILATION_CACHE", "JAX_PERSISTENT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(unwanted)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def start_processes(command: list[str], processes: int, devices_each: int, **extra) -> list[subprocess.Popen]:
    """``command`` as ``processes`` processes of one job (SIAJAX_COORDINATOR on a free local port)."""
    port = free_port()
    return [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=process_env(devices_each, SIAJAX_COORDINATOR=f"127.0.0.1:{port}",
                                         SIAJAX_NUM_PROCESSES=str(processes), SIAJAX_PROCESS_ID=str(i), **extra))
        for i in range(processes)
    ]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Waits for every process (-> what each printed); on a hang, kills them all and fails with their output."""
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:  # each prints its threads' stacks (faulthandler, where registered), then dies
            proc.send_signal(signal.SIGUSR1)
        time.sleep(5)
        for proc in procs:
            proc.kill()
        printed = [proc.communicate()[0][-6000:] for proc in procs]
        pytest.fail(f"multi-process run hung after {timeout:.0f} s; it printed: {printed}")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return logs
