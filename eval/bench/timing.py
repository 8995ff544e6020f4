"""Timing and machine-info helpers: warm-up, then medians of interleaved repeats, all in one process."""

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued work on `device` (a no-op on CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call of `fn`, queued device work included; a function that times itself (returns a float,
    e.g. a decode loop after an untimed prefill) gives its own number."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    elapsed = time.perf_counter() - start
    return result if isinstance(result, float) else elapsed


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Samples (seconds) of every function, run round-robin so that machine noise hits all of them alike. Every
    round starts at a different function (a rotation), so no variant always runs first after another."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_idx in range(repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_call(fns[name], sync))
    return samples


def summary(samples: list[float]) -> dict:
    """Median (the number used in every ratio), spread and raw samples."""
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": len(samples),
        "samples_s": [round(s, 6) for s in samples],
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def rss_bytes() -> int:
    """Resident set size of this process now (Linux `/proc`; else the peak from `resource`)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU, cores, RAM, library versions, the accelerator's name."""
    import transformers

    cuda = device.type == "cuda"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "ram_bytes": total_ram_bytes(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({cpu_model()})",
        "cuda": torch.version.cuda if cuda else None,
        "load_average_start": load_average(),
    }
