"""Measure 6 (GPU only): peak GPU memory and query latency of the 8B shape (Llama-3-8B, 50 x 256 memory rows, random
bf16 weights) for a 2k-token query, with the memory on the GPU and offloaded to CPU.

The paper reports 21,176 MB, and 17,967 MB with the memory offloaded; the aim is below 18,000 MB with the prefix
keys/values cached. Numbers are MiB from `torch.cuda.max_memory_allocated` (and `max_memory_reserved`, closer to
what `nvidia-smi` shows).
"""

import gc

import torch

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM, MemoryState

from ...paths import hub_configs_dir
from ..timing import interleaved, summary, synchronizer
from .base import Context, Measure, log, prefill, recompute_prefill, target
from .cells import fmt, ms, row


CONFIG_NAME = "memoryllm-8b"  # in the hub_configs folder ($MEMORYLLM_HUB_CONFIGS, default ./hub_configs)
PAPER_MB = {"memory_on_gpu": 21_176, "memory_offloaded": 17_967}
AIM_MB = 18_000
MIB = 2**20


def skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason, "paper_mb": PAPER_MB, "aim_mb": AIM_MB, "ratios": {}, "targets": []}


def eight_b_config() -> MemoryLLMConfig:
    folder = hub_configs_dir() / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no {CONFIG_NAME} at {folder}: run from the checkout or set MEMORYLLM_HUB_CONFIGS")
    return MemoryLLMConfig.from_pretrained(folder)


def build_model(config: MemoryLLMConfig, device: torch.device, dtype: torch.dtype) -> MemoryLLMForCausalLM:
    """Random weights of `config`'s shape, built directly on `device` in `dtype`; a random, full memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MemoryLLMForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    memory = torch.randn(model.memory.shape, generator=generator, device=device, dtype=dtype)
    model.memory_state.assign(memory * config.initializer_range)
    return model


def _memory_mib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_mb": None, "peak_reserved_mb": None}
    return {
        "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / MIB,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / MIB,
    }


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _placement(model, query, device, repeats: int, warmup: int) -> dict:
    """Peak memory over cached queries (the first computes the prefix), then cached vs recomputed TTFT."""
    state = model.memory_state
    _reset_peak(device)
    sync = synchronizer(device)
    for _ in range(max(warmup, 1)):
        prefill(model, query, state)
    sync()
    peak = _memory_mib(device)
    samples = interleaved(
        {"cached": lambda: prefill(model, query, state), "recompute": lambda: recompute_prefill(model, query, state)},
        repeats,
        warmup,
        sync,
    )
    return {"memory_device": str(state.memory.device), **peak, **{k: summary(s) for k, s in samples.items()}}


def measure_8b(
    device: torch.device,
    config: MemoryLLMConfig | None = None,
    repeats: int = 5,
    warmup: int = 1,
    query_tokens: int = 2048,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Both placements of the memory for one model of `config` (default: the 8B shape) on `device`."""
    config = config or eight_b_config()
    try:
        measured = _measure_model(build_model(config, device, dtype), device, repeats, warmup, query_tokens)
    finally:
        _reset_peak(device)
    return _result(config, device, query_tokens, *measured)


def _measure_model(model: MemoryLLMForCausalLM, device, repeats: int, warmup: int, query_tokens: int) -> tuple:
    config = model.config
    weights_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "memory") / MIB
    generator = torch.Generator().manual_seed(1)
    query = torch.randint(3, min(config.vocab_size, 32_000), (1, query_tokens), generator=generator).to(device)
    plain = MemoryState.empty(config, device="cpu", dtype=model.dtype)  # never read: no need to hold it on the GPU
    plain_samples = interleaved({"plain": lambda: prefill(model, query, plain)}, repeats, warmup, synchronizer(device))
    on_device = _placement(model, query, device, repeats, warmup)
    model.memory.data = model.memory.data.to("cpu")  # the model's own memory now lives in CPU RAM
    model.memory_state.mark_changed()
    offloaded = _placement(model, query, device, repeats, warmup)
    return weights_mb, summary(plain_samples["plain"]), on_device, offloaded


def _result(config, device, query_tokens, weights_mb, plain, on_device, offloaded) -> dict:
    plain_s = plain["median_s"]
    ratios = {
        "peak_offloaded_vs_aim": _div(offloaded["peak_allocated_mb"], AIM_MB),
        "peak_on_gpu_vs_paper": _div(on_device["peak_allocated_mb"], PAPER_MB["memory_on_gpu"]),
        "peak_offloaded_vs_paper": _div(offloaded["peak_allocated_mb"], PAPER_MB["memory_offloaded"]),
        "cached_on_gpu_vs_plain": _div(on_device["cached"]["median_s"], plain_s),
        "cached_offloaded_vs_plain": _div(offloaded["cached"]["median_s"], plain_s),
        "recompute_offloaded_vs_cached": _div(offloaded["recompute"]["median_s"], offloaded["cached"]["median_s"]),
    }
    peak = offloaded["peak_allocated_mb"]
    return {
        "skipped": False,
        "description": "random bf16 weights of the 8B shape; 2k-token query; memory on GPU vs offloaded to CPU",
        "device": str(device),
        "shape": {"layers": config.num_hidden_layers, "memory_rows": config.memory_rows, "hidden": config.hidden_size},
        "query_tokens": query_tokens,
        "weights_mb": weights_mb,
        "paper_mb": PAPER_MB,
        "aim_mb": AIM_MB,
        "plain": plain,
        "memory_on_gpu": on_device,
        "memory_offloaded": offloaded,
        "ratios": ratios,
        "targets": [
            target(
                "peak MiB, memory offloaded, prefix cached / 18,000", _div(peak, AIM_MB), "<=", 1.0, peak is not None
            )
        ],
    }


def _div(a, b):
    return a / b if a is not None and b else None


def run(context: Context) -> dict:
    """Measure 6 when it applies: a CUDA device, not `--quick` or `--skip-8b`, enough GPU memory."""
    args, device = context.args, context.device
    if device.type != "cuda":
        return skipped(f"needs a CUDA GPU; this run is on {device.type}")
    if args.quick or args.skip_8b:
        return skipped("--quick" if args.quick else "--skip-8b")
    log("measure 6: 8B shape on the GPU")
    try:
        return measure_8b(device, repeats=args.repeats, warmup=args.warmup, query_tokens=args.gpu_query_tokens)
    except torch.cuda.OutOfMemoryError as error:
        gc.collect()
        torch.cuda.empty_cache()
        return skipped(f"out of GPU memory: {error}")


def rows(gpu: dict) -> list[list[str]]:
    if gpu.get("skipped"):
        return [
            ["6", "8B shape on GPU: peak memory, 2k-token query", "skipped", "", "", "–", "< 18,000 MB", gpu["reason"]]
        ]
    off, on, t = gpu["memory_offloaded"], gpu["memory_on_gpu"], gpu["targets"][0]
    on_text = (
        f"8B shape, memory on GPU: peak MiB (paper {gpu['paper_mb']['memory_on_gpu']:,}); TTFT "
        f"{ms(on['cached']['median_s'])}"
    )
    off_text = (
        f"8B shape, memory offloaded: peak MiB vs 18,000 (paper {gpu['paper_mb']['memory_offloaded']:,}); TTFT "
        f"{ms(off['cached']['median_s'])}"
    )
    return [
        row(6, on_text, fmt(on["peak_allocated_mb"], 0), "", fmt(gpu["ratios"]["peak_on_gpu_vs_paper"])),
        row(6, off_text, fmt(off["peak_allocated_mb"], 0), "18,000", fmt(t["value"]), t),
    ]


# Runs after the model under test is freed; it logs itself (only when it runs).
MEASURE = Measure("gpu_8b", 6, "8B shape on the GPU", run, rows, uses_model=False)
