"""
`python -m eval.bench.gpu_check`: the GPU measures in one short run (a few minutes on one H100/H200), needing no
download and nothing beyond torch and transformers:

1. 8 memories injected in one batch vs the same 8 injections one after another, at the default's shape (random
   weights: SmolLM2-135M, N = 256, K = 8, the released rule, LoRA on, 512-token chunks); target >= 4x throughput.
2. Measure 6: the 8B shape in bf16 (random weights, Llama-3-8B with 50 x 256 rows), a 2k-token query, peak GPU memory
   with the memory on the GPU and offloaded to CPU RAM, prefix cached; target < 18,000 MiB offloaded.

Writes `gpu_check.json` (with the card's name) to `--out` and prints a table. `--tiny` runs the same code on the CPU
with tiny shapes (what the tests run).
"""

import argparse
import gc
import json
import os
import sys

import torch

from ..paths import BENCH_RESULTS, COMMAND
from .floors import Shape
from .measures import Bench, gpu_8b, log
from .measures.injection import _batched_point
from .models import RELEASED, default_shape_model
from .report import write_json
from .timing import machine_info, synchronizer


TARGET_BATCHED = 4.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"{COMMAND}.bench.gpu_check", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default=str(BENCH_RESULTS), help="output folder (default: eval/bench/results)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (the tests)")
    parser.add_argument("--memories", type=int, default=8, help="memories injected in one batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--query-tokens", type=int, default=2048, help="query length of the 8B measure")
    parser.add_argument("--skip-8b", action="store_true")
    return parser.parse_args(argv)


def _states(model, count: int) -> list:
    """`count` full memories of random rows (as after many injections)."""
    generator = torch.Generator(device=model.device).manual_seed(0)
    states = []
    for _ in range(count):
        state = model.new_memory_state()
        rows = torch.randn(state.memory.shape, generator=generator, device=model.device, dtype=state.memory.dtype)
        state.assign(rows * model.config.initializer_range)
        states.append(state)
    return states


def batched_injection(device: torch.device, tiny: bool, memories: int, repeats: int) -> dict:
    """One batched injection into `memories` memories vs one after another, at the default's shape."""
    if tiny:
        from modeling_memoryllm.testing_utils import tiny_model

        model = tiny_model(preset="bench", device=device, memory_variant="memoryllm-8b")
    else:
        model = default_shape_model(device, torch.float32, RELEASED)
    sync = synchronizer(device)
    bench = Bench(
        model=model,
        sync=sync,
        repeats=repeats,
        warmup=1,
        query_tokens=16,
        decode_tokens=0,
        batch_sizes=(memories,),
        batch_repeats=repeats,
        context_repeats=0,
    )
    length = model.config.max_inject_length
    full = _states(model, 1)[0]
    _batched_point(bench, full, 1, length)  # warm-up: kernels, allocator
    point = _batched_point(bench, full, memories, length)
    shape = Shape.of(model)
    result = {
        "model": "tiny bench preset, released rule" if tiny else "default's shape, random weights, released, LoRA",
        "shape": {"layers": shape.layers, "hidden": shape.hidden, "memory_rows": model.config.memory_rows},
        "chunk_tokens": length,
        **point,
        "target": {"op": ">=", "threshold": TARGET_BATCHED, "met": point["batched_throughput_vs_sequential"] >= 4.0},
    }
    del model, bench, full
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def eight_b(device: torch.device, tiny: bool, repeats: int, query_tokens: int) -> dict:
    if tiny:
        from modeling_memoryllm.testing_utils import tiny_config

        config = tiny_config("bench", num_tokens=8, num_blocks=2)
        return gpu_8b.measure_8b(device, config=config, repeats=1, warmup=0, query_tokens=8)
    try:
        return gpu_8b.measure_8b(device, repeats=repeats, warmup=1, query_tokens=query_tokens)
    except torch.cuda.OutOfMemoryError as error:
        return gpu_8b.skipped(f"out of GPU memory: {error}")


def table(result: dict) -> str:
    batched, big = result["batched_injection"], result["eight_b"]
    lines = [
        f"GPU check on {result['machine']['device_name']} (torch {result['machine']['torch']}, "
        f"transformers {result['machine']['transformers']})",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| {batched['memories']} memories batched vs one after another, throughput "
        f"({batched['chunk_tokens']} tokens each) | {batched['batched_throughput_vs_sequential']:.2f}x | >= 4 |",
    ]
    if big.get("skipped"):
        lines.append(f"| 8B shape | skipped: {big['reason']} | < 18,000 MiB |")
    else:
        for key in ("memory_on_gpu", "memory_offloaded"):
            peak = big[key]["peak_allocated_mb"]
            text = "–" if peak is None else f"{peak:,.0f} MiB"
            lines.append(
                f"| 8B shape, {key.replace('_', ' ')}: peak, {big['query_tokens']}-token query | {text} | "
                f"{'< 18,000 MiB' if key == 'memory_offloaded' else 'paper 21,176'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("gpu_check needs a CUDA GPU (or --tiny for the CPU code path).")
    device = torch.device("cuda" if cuda else "cpu")
    os.makedirs(args.out, exist_ok=True)
    log(f"batched injection of {args.memories} memories")
    result = {"machine": machine_info(device)}
    result["batched_injection"] = batched_injection(device, args.tiny, args.memories, args.repeats)
    log("8B shape")
    skip = gpu_8b.skipped("--skip-8b")
    result["eight_b"] = skip if args.skip_8b else eight_b(device, args.tiny, args.repeats, args.query_tokens)
    write_json(result, os.path.join(args.out, "gpu_check.json"))
    text = table(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as handle:
        handle.write(text)
    print(text)
    print(json.dumps({"batched": result["batched_injection"]["batched_throughput_vs_sequential"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
