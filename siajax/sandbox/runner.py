"""In-jail runner: loads the agent's code and answers calls over a pipe (standard library + NumPy).

The parent sends framed messages on one pipe and reads framed replies on
another; nothing crosses through files, so no link, FIFO or oversized file an
agent leaves behind is ever opened by the parent. A message is an 8-byte
little-endian length, a JSON header, then the raw bytes of the arrays the
header lists (name, dtype, shape) — never pickles.

Nothing here is trusted by the parent: the agent runs in this process and may
rewrite any of it. The parent checks every output itself and times every call
from outside. The audit hook below is a tripwire that names an attempt
(sockets, subprocesses, forks) as ``forbidden``; the kernel layers around this
process are the barrier.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

EXIT_FORBIDDEN = 86
ARRAY_LIMIT = 1 << 31  # bytes a single message may carry


def read_exact(fd: int, size: int, wait=None) -> bytearray:
    """``size`` bytes into one buffer (no second copy); ``wait()`` is called before each read (the
    parent's deadline: it raises TimeoutError when the time is up)."""
    buffer = bytearray(size)
    view, filled = memoryview(buffer), 0
    while filled < size:
        if wait is not None:
            wait()
        count = os.readv(fd, [view[filled:filled + (1 << 20)]])
        if not count:
            raise EOFError("pipe closed mid-message")
        filled += count
    return buffer


def read_message(fd: int, limit: int = ARRAY_LIMIT, wait=None) -> tuple[dict, dict]:
    """-> (header, {name: ndarray}); raises ValueError on a malformed or oversized message (before
    reading its arrays)."""
    import numpy as np

    size = int.from_bytes(read_exact(fd, 8, wait), "little")
    if size > 1 << 24:
        raise ValueError(f"header of {size} bytes")
    header = json.loads(read_exact(fd, size, wait))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    specs, total = header.pop("arrays", []), 0
    if not isinstance(specs, list):
        raise ValueError("arrays is not a list")
    for spec in specs:
        dtype, shape = np.dtype(spec["dtype"]), spec["shape"]
        if not isinstance(shape, list) or len(shape) > 32 or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"array shape {str(shape)[:80]} is not a list of up to 32 sizes >= 0")
        if dtype.hasobject:
            raise ValueError("object arrays are not accepted")
        total += math.prod(shape) * dtype.itemsize  # exact: no int64 wrap-around
        if total > limit:
            raise ValueError(f"arrays of {total} bytes exceed the {limit}-byte limit")
    arrays = {}
    for spec in specs:
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        arrays[str(spec["name"])] = np.frombuffer(read_exact(fd, math.prod(shape) * dtype.itemsize, wait),
                                                  dtype).reshape(shape)
    return header, arrays


def frame(header: dict, arrays: dict | None = None) -> list:
    """A message as the buffers to write in order: length + JSON header, then each array's bytes."""
    import numpy as np

    arrays = {name: np.asarray(value, order="C") for name, value in (arrays or {}).items()}  # keeps 0-d
    header = {**header, "arrays": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()]}
    body = json.dumps(header, default=repr).encode()
    return [len(body).to_bytes(8, "little") + body, *(memoryview(a.reshape(-1).view(np.uint8)) for a in arrays.values())]


def write_message(fd: int, header: dict, arrays: dict | None = None) -> None:
    for piece in frame(header, arrays):
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


def nest(arrays: dict) -> dict:
    """{"weights/norm": a, "x": b} -> {"weights": {"norm": a}, "x": b}."""
    out = {}
    for name, value in arrays.items():
        *parents, leaf = name.split("/")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def split_result(value) -> tuple[object, dict]:
    """An entry's return value as (JSON part, arrays): arrays and dicts of arrays go as arrays."""
    import numpy as np

    if hasattr(value, "__array__"):
        return None, {"return": np.asarray(value)}
    if isinstance(value, dict) and value and all(hasattr(v, "__array__") for v in value.values()):
        return None, {str(k): np.asarray(v) for k, v in value.items()}
    return value, {}


def install_tripwire(response_fd: int) -> None:
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "os.fork", "os.forkpty", "os.system",
               "os.posix_spawn", "os.exec", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn"}

    def hook(event, args):
        if event in blocked:
            try:
                write_message(response_fd, {"status": "forbidden", "error": f"{event} is not allowed in the sandbox"})
            finally:
                os._exit(EXIT_FORBIDDEN)

    sys.addaudithook(hook)


def main() -> None:
    request_fd, response_fd, sandbox = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    setup, _ = read_message(request_fd)
    os.chdir(os.environ.get("TMPDIR", "/tmp"))
    source = open(os.path.join(sandbox, setup["source"]), encoding="utf-8").read()
    try:
        code = compile(source, "agent_code.py", "exec")
    except (SyntaxError, ValueError) as err:
        write_message(response_fd, {"status": "compile_error", "error": f"{type(err).__name__}: {err}"})
        return
    if setup.get("tripwire", True):
        install_tripwire(response_fd)
    namespace = {"__name__": "agent_code"}
    try:
        exec(code, namespace)
    except MemoryError:
        write_message(response_fd, {"status": "oom", "error": "MemoryError while loading the code"})
        return
    except BaseException as err:  # the agent's import-time fault
        write_message(response_fd, {"status": "runtime_error", "error": _describe(err),
                                    "traceback": traceback.format_exc(limit=8)})
        return
    write_message(response_fd, {"status": "ready"})
    while True:
        request, arrays = read_message(request_fd)
        if request.get("op") == "close":
            return
        entry = namespace.get(request["entry"])
        if not callable(entry):
            write_message(response_fd, {"status": "compile_error",
                                        "error": f"no callable named {request['entry']!r} in the code"})
            return
        try:
            value, out = split_result(entry(**request.get("kwargs", {}), **nest(arrays)))
            json.dumps(value)
            write_message(response_fd, {"status": "ok", "value": value}, out)
        except MemoryError:
            write_message(response_fd, {"status": "oom", "error": "MemoryError"})
            return
        except SystemExit:
            write_message(response_fd, {"status": "runtime_error", "error": "the code called exit()"})
            return
        except BaseException as err:
            write_message(response_fd, {"status": "runtime_error", "error": _describe(err),
                                        "traceback": traceback.format_exc(limit=8)})
            return


def _describe(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip()


if __name__ == "__main__":
    main()
