"""`python -m eval.bench`: what MemoryLLM costs, side by side in one run; writes `bench.json`, PNG plots and
`bench_table.md` (the README table) to `--out`.

Modes: the default runs measures 1-6 on the embedded default model (measure 6, the 8B shape, only on a GPU);
`--quick` runs measures 1-5 on a tiny random config in well under a minute (for CI: the schema, not the timings);
`--soak N` runs measure 7 alone: N injections into a tiny config, written to `soak.json` and `soak.png`.
The measures, their rows and their plots come from the registry `measures.MEASURES`, in its order.
"""

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

from ..paths import BENCH_RESULTS, COMMAND
from . import report
from .measures import COST_POINTS, Bench, Context, log, of
from .models import MODELS, bench_model, model_info
from .timing import load_average, machine_info, synchronizer


SCHEMA = "memoryllm-bench/1"
DEFAULT_OUT = str(BENCH_RESULTS)
# (full, quick) defaults.
DEFAULTS = {
    "repeats": (5, 3),
    "warmup": (1, 1),
    "batch_repeats": (2, 2),
    "context_repeats": (2, 2),
    "query_tokens": (64, 16),
    "decode_tokens": (32, 8),
    "batch_sizes": ("1,4,8,16", "1,2,4"),
    "sweep_query_tokens": ("16,256", "4"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"{COMMAND}.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random config, few repeats (CI)")
    parser.add_argument(
        "--model",
        default="default",
        choices=MODELS,
        help="default: the embedded default as it is (training-free); released: its weights and shape with the "
        "released write rule and LoRA adapters on (the workload the original code was timed on)",
    )
    parser.add_argument("--soak", type=int, metavar="N", help="only measure 7: N injections into a tiny config")
    parser.add_argument("--soak-memories", type=int, default=16, help="memories injected into at once in --soak")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: eval/bench/results)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all usable cores; 1 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up calls per variant")
    parser.add_argument("--batch-repeats", type=int, help="repeats of the batched-injection measure")
    parser.add_argument("--context-repeats", type=int, help="repeats of the in-context points of measure 2")
    parser.add_argument("--query-tokens", type=int, help="query length for TTFT and decode")
    parser.add_argument("--sweep-query-tokens", help="more query lengths for the TTFT ratios of measure 1, e.g. 16,256")
    parser.add_argument("--decode-tokens", type=int, help="decode steps timed in measure 4")
    parser.add_argument("--batch-sizes", help="independent memories for batched injection, e.g. 1,4,8,16")
    parser.add_argument(
        "--max-injected-tokens",
        type=int,
        help="inject for real up to this many tokens (default: 2,048 quick, 16,384 CPU, 1,048,576 GPU); "
        "larger points of the per-query cost curve are marked simulated",
    )
    parser.add_argument("--replot", action="store_true", help="only redraw plots and table from the JSON in --out")
    parser.add_argument("--skip-8b", action="store_true", help="skip measure 6 even on a GPU")
    parser.add_argument("--gpu-query-tokens", type=int, default=2048, help="query length of measure 6")
    parser.add_argument("--measures", help="only these measures of bench.json, by key (e.g. read,ttft; use --out)")
    args = parser.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_max_injected(args: argparse.Namespace, device: torch.device) -> int:
    if args.max_injected_tokens is not None:
        return args.max_injected_tokens
    if args.quick:
        return 2048
    return COST_POINTS[-1] if device.type == "cuda" else 16_384


# ------------------------------------------------------------------------------------------------------ bench
def make_bench(args: argparse.Namespace, model, device: torch.device) -> Bench:
    return Bench(
        model=model,
        sync=synchronizer(device),
        repeats=args.repeats,
        warmup=args.warmup,
        query_tokens=args.query_tokens,
        decode_tokens=args.decode_tokens,
        batch_sizes=tuple(int(n) for n in args.batch_sizes.split(",")),
        batch_repeats=args.batch_repeats,
        context_repeats=args.context_repeats,
        sweep_query_tokens=tuple(int(n) for n in args.sweep_query_tokens.split(",") if n),
    )


def run_bench(args: argparse.Namespace, device: torch.device) -> dict:
    """Every measure of `bench.json`, in the registry's order: those on the model under test first (on a memory
    grown once), then the others (the 8B shape) after that model is freed."""
    dtype = getattr(torch, args.dtype)
    machine = machine_info(device)
    log(f"loading the model on {machine['device_name']} ({torch.get_num_threads()} threads)")
    model, name = bench_model(args.quick, device, dtype, args.model)
    max_injected = default_max_injected(args, device)
    info = model_info(model, name)
    context = Context(args, device, args.out, bench=make_bench(args, model, device))
    chosen = selected(args)
    if any(m.grows for m in chosen if m.uses_model):
        context.grow(max_injected)
    results = run_measures(context, [m for m in chosen if m.uses_model])
    del model, context
    gc.collect()
    results |= run_measures(Context(args, device, args.out), [m for m in chosen if not m.uses_model])
    if args.quick:
        waive_targets(results, "quick mode (tiny config): the targets are for the default sizes")
    machine["load_average_end"] = load_average()
    settings = {key: getattr(args, key) for key in DEFAULTS} | {
        "device": str(device),
        "dtype": args.dtype,
        "model_choice": args.model,
        "max_injected_tokens": max_injected,
        "cost_points": list(COST_POINTS),
        "model": info,
    }
    return {
        "schema": SCHEMA,
        "mode": "quick" if args.quick else "full",
        "created": _now(),
        "machine": machine,
        "settings": settings,
        "measures": results,
        "targets": collect_targets(results),
    }


def selected(args: argparse.Namespace) -> list:
    """The measures of `bench.json` that `--measures` names (all of them without it), in the registry's order."""
    keys = [key for key in (args.measures or "").split(",") if key]
    unknown = set(keys) - {m.key for m in of("bench")}
    if unknown:
        raise SystemExit(f"unknown measures {sorted(unknown)}; choose from {', '.join(m.key for m in of('bench'))}")
    return [m for m in of("bench") if not keys or m.key in keys]


def run_measures(context: Context, selected: list) -> dict:
    """Run `selected` in order; the grown memories are dropped after the last measure that reads them."""
    last_state_user = max((i for i, m in enumerate(selected) if m.uses_states), default=-1)
    results = {}
    for index, measure in enumerate(selected):
        if measure.uses_model:
            log(f"measure {measure.number}: {measure.title}")
        results[measure.key] = measure.run(context)
        if index == last_state_user:
            context.states = None
    return results


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def waive_targets(results: dict, reason: str) -> None:
    """Keep the values but mark every target as not applying (e.g. to the tiny config of `--quick`)."""
    for measure in results.values():
        for item in measure.get("targets", []):
            item.update(applies=False, met=None, note=reason)


def collect_targets(results: dict) -> list[dict]:
    """Every target of every measure, flat, named by its measure."""
    return [{"measure": name, **t} for name, measure in results.items() for t in measure.get("targets", [])]


# ------------------------------------------------------------------------------------------------------ outputs
def write_bench(result: dict, out_dir: str) -> list[str]:
    path = os.path.join(out_dir, "bench.json")
    report.write_json(result, path)
    plots = report.plot_bench(result, out_dir)
    return [path, *plots, write_table(out_dir)]


def write_table(out_dir: str) -> str:
    """`bench_table.md` from `bench.json` (and `soak.json`, when there is one) in `out_dir`."""
    soak = (_read_json(os.path.join(out_dir, "soak.json")) or {}).get("soak")
    bench = _read_json(os.path.join(out_dir, "bench.json"))
    path = os.path.join(out_dir, "bench_table.md")
    text = report.table(bench, soak)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def replot(out_dir: str) -> list[str]:
    """Plots and table again from `bench.json` / `soak.json` (e.g. after changing the report code)."""
    bench, soak = _read_json(os.path.join(out_dir, "bench.json")), _read_json(os.path.join(out_dir, "soak.json"))
    if bench is None and soak is None:
        raise SystemExit(f"No bench.json or soak.json in {out_dir}.")
    paths = report.plot_bench(bench, out_dir) if bench is not None else []
    paths += report.plot_soak(soak["soak"], out_dir) if soak is not None else []
    return [*paths, write_table(out_dir)]


def run_soak(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The measures of `soak.json` (measure 7), on the CPU."""
    machine = machine_info(torch.device("cpu"))
    start = time.perf_counter()
    (measure,) = of("soak")
    soak = measure.run(Context(args, torch.device("cpu"), args.out))
    result = {
        "schema": SCHEMA,
        "mode": "soak",
        "created": _now(),
        "machine": machine | {"load_average_end": load_average()},
        "wall_s": time.perf_counter() - start,
        "soak": soak,
    }
    path = os.path.join(args.out, "soak.json")
    report.write_json(result, path)
    return [path, *report.plot_soak(soak, args.out), write_table(args.out)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or (1 if args.quick or args.soak is not None else usable))
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    device = resolve_device(args.device)
    if args.replot:
        paths = replot(args.out)
    elif args.soak is not None:
        paths = run_soak(args, device)
    else:
        paths = write_bench(run_bench(args, device), args.out)
    print(open(paths[-1]).read())
    log("wrote " + ", ".join(paths))
    return 0
