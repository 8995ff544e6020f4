"""Saving and loading a large M+ memory (a few GB): time and RAM. `python -m eval.bench.mplus_io [--gigabytes G]`.

Builds an `MPlusMemoryState` whose long-term memory holds about `G` GB (bf16 rows, ragged layers), saves it,
loads it back, and samples the process's resident memory (anonymous and file-backed, from /proc) every 5 ms:
saving must not need a second copy in RAM (peak anonymous growth ~ 0), loading maps the file instead of reading it
into a second buffer. Writes `eval/bench/results/mplus_io.json`.
"""

import argparse
import json
import pathlib
import tempfile
import threading
import time

import torch

from modeling_memoryllm.memory_state_mplus import MPlusMemoryState


RESULTS = pathlib.Path(__file__).with_name("results")


def resident() -> dict[str, int]:
    """RssAnon and RssFile of this process, bytes (Linux)."""
    fields = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class Sampler:
    """The peak of RssAnon (and RssFile) while the `with` block runs."""

    def __enter__(self):
        self.start, self.peak, self._stop = resident(), resident(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            now = resident()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = resident()


def big_state(gigabytes: float, layers: int = 8, width: int = 4096, keys: int = 256) -> MPlusMemoryState:
    """An M+ state of `layers` layers whose LTM rows (bf16) total about `gigabytes` GB, ragged across layers."""
    per_layer = int(gigabytes * 1e9 / (layers * width * 2))
    counts = [max(1, per_layer + (i - layers // 2) * (per_layer // 16)) for i in range(layers)]  # ragged
    generator = torch.Generator().manual_seed(0)
    ltm = {
        "ltm": [torch.randn(n, width, generator=generator, dtype=torch.float32).to(torch.bfloat16) for n in counts],
        "ltm_keys": [torch.randn(n, keys, generator=generator).to(torch.bfloat16) for n in counts],
        "ltm_ages": [torch.arange(n, dtype=torch.float64) for n in counts],
        "ltm_rf": [torch.full((n,), 5.0, dtype=torch.float64) for n in counts],
    }
    memory = torch.randn(layers, 1024, width, generator=generator).to(torch.bfloat16)
    buffer = (torch.zeros(layers, 0, width, dtype=torch.bfloat16), torch.zeros(layers, 0, keys, dtype=torch.bfloat16))
    return MPlusMemoryState(memory, ltm=ltm, buffer=(*buffer, torch.zeros(layers, 0)))


def measure(gigabytes: float) -> dict:
    state = big_state(gigabytes)
    size = state.nbytes
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "mplus.safetensors"
        with Sampler() as saving:
            start = time.perf_counter()
            state.save(path)
            save_s = time.perf_counter() - start
        del state
        with Sampler() as loading:
            start = time.perf_counter()
            loaded = MPlusMemoryState.load(path)
            load_s = time.perf_counter() - start
        file_bytes = path.stat().st_size
        assert sum(rows.numel() for rows in loaded.ltm) > 0
    return {
        "state_bytes": size,
        "file_bytes": file_bytes,
        "save_seconds": round(save_s, 2),
        "save_peak_anon_growth_bytes": saving.peak["RssAnon"] - saving.start["RssAnon"],
        "load_seconds": round(load_s, 2),
        "load_anon_growth_bytes": loading.end["RssAnon"] - loading.start["RssAnon"],
        "load_file_backed_bytes": loading.end["RssFile"] - loading.start["RssFile"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=3.0)
    parser.add_argument("--out", default=str(RESULTS / "mplus_io.json"))
    args = parser.parse_args(argv)
    result = {"gigabytes_requested": args.gigabytes, **measure(args.gigabytes)}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
