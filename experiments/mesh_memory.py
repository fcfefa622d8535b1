"""Per-device memory of Qwen2.5-0.5B / 1.5B / 7B under each 8-device mesh, from the sharding rules.

Shapes come from each model's Hugging Face config.json (fields copied below);
every array's shard is sized by the same rules that place it at run time
(siajax.parallel.memory), so nothing is guessed. Base weights in bfloat16;
LoRA rank 16 on all seven projections in float32 with gradient and Adam
moments; KV cache in bfloat16 for 64 rows x 2048 positions.

    python experiments/mesh_memory.py [--batch 64] [--slots 2048] [--rank 16] [--out experiments/out/mesh_memory.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from siajax.models import LoRAConfig, config_from_hf  # noqa: E402
from siajax.parallel.memory import memory_budget  # noqa: E402

_QWEN25 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
               use_sliding_window=False)
# From Qwen/Qwen2.5-{0.5B,1.5B,7B}-Instruct config.json.
QWEN25_CONFIGS = {
    "Qwen2.5-0.5B": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(_QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "Qwen2.5-7B": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 4, 1), (2, 2, 2), (1, 4, 2)]
GIB, MIB = 2**30, 2**20


def memory_table(batch: int, slots: int, rank: int) -> str:
    lines = [
        f"| model | mesh (data, fsdp, tensor) | params (bf16) GiB | LoRA r={rank} state MiB | "
        f"KV cache {batch}x{slots} GiB | total GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, hf in QWEN25_CONFIGS.items():
        config = config_from_hf(hf, dtype="bfloat16")
        for mesh in MESHES:
            b = memory_budget(config, mesh, lora=LoRAConfig(rank=rank), batch=batch, slots=slots)
            lines.append(f"| {name} | {mesh} | {b.params / GIB:.3f} | {b.lora_state / MIB:.1f} | "
                         f"{b.kv_cache / GIB:.3f} | {b.total / GIB:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slots", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="experiments/out/mesh_memory.md")
    args = parser.parse_args(argv)
    table = memory_table(args.batch, args.slots, args.rank)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
