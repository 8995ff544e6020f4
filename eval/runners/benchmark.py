"""The protocol every benchmark runner follows, and the run it drives.

A runner is a `Benchmark` subclass (one module per table, registered by command name in `runners/__init__.py`)
that says what it loads (`add_arguments`, `load`), how it scores a batch (`run_memory`, `run_baselines`), what it
reports (`aggregate`, `public`, `config_extra`, `summary`, `card_entries`) and how it plots (`plot`). `Benchmark.run`
is the one loop they share: seed, load the model under test and the samples, score batch after batch with the
memory and with each baseline, aggregate; `Benchmark.main` parses, runs, writes the JSON and the PNG beside it and
prints a summary.
"""

import argparse
import contextlib
import pathlib
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from ..paths import COMMAND
from . import common


@dataclass
class Run:
    """One run of a benchmark: the model under test, the parsed arguments, the baselines asked for, and what
    `load` prepared once for every batch (`shared`, e.g. retention's unrelated contexts)."""

    subject: common.Subject
    args: argparse.Namespace
    baselines: list[str]
    shared: dict = field(default_factory=dict)

    def new_memories(self, batch: list[dict]) -> tuple[list, list]:
        """A fresh memory state per sample of `batch`, and a drop generator per sample seeded by its index (so a
        batched run equals an unbatched one)."""
        indices = [sample["index"] for sample in batch]
        return self.subject.new_states(len(batch)), common.sample_generators(self.args.seed, indices)

    @property
    def conditions(self) -> list[str]:
        """What each sample is scored under: the memory (MemoryLLMs only), then the baselines."""
        return (["memory"] if self.subject.is_memory else []) + self.baselines


class CardEntry(NamedTuple):
    """One model-index result of a model card: a metric of the memory model on one dataset. `fields` are more
    `huggingface_hub.EvalResult` fields (dataset type and name, metric arguments, ...)."""

    task_name: str
    metric_type: str
    metric_name: str
    value: float
    fields: dict


class Benchmark:
    """A benchmark runner; subclasses fill in the hooks below (the defaults do nothing)."""

    name = ""  # the command: `python -m eval <name>`
    default_batch = 4

    # ------------------------------------------------------------------------------------------ what it loads
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The benchmark's own options (the shared ones come from `common.common_arguments`)."""

    def benchmark_id(self, args) -> str:
        """The result's `benchmark` (e.g. `retention-squad`), which also names the default output file."""
        return self.name

    def load(self, run: Run) -> list[dict]:
        """The samples to score (dicts), in order; may fill `run.shared`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- how it scores
    def run_memory(self, run: Run, batch: list[dict]) -> None:
        """Score `batch` with the memory, writing each output into its sample (under `"memory"`)."""
        raise NotImplementedError

    def run_baselines(self, run: Run, batch: list[dict]) -> None:
        """Score `batch` under each of `run.baselines`, writing each output into its sample under that name."""
        raise NotImplementedError

    def scoring(self):
        """A context that holds while the batches are scored (e.g. to quiet a warning)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------ what it reports
    def aggregate(self, run: Run, samples: list[dict]) -> dict:
        """The result's `aggregates`: one entry per condition."""
        raise NotImplementedError

    def public(self, run: Run, sample: dict) -> dict:
        """What the result keeps of a sample (token ids are dropped)."""
        return sample

    def config_extra(self, run: Run) -> dict:
        """More entries for the result's `config`, after the arguments."""
        return {}

    def summary(self, results: dict) -> None:
        """Print the aggregates in a few lines."""

    def card_entries(self, results: dict, memory: dict) -> list[CardEntry]:
        """The memory model's numbers (`memory`: its aggregates) as model-card results."""
        return []

    def plot(self, results: dict, path: pathlib.Path, title: str) -> pathlib.Path:
        """Draw the aggregates into a PNG beside `path`; returns the PNG's path."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- shared
    def build_parser(self) -> argparse.ArgumentParser:
        description = (sys.modules[type(self).__module__].__doc__ or self.name).splitlines()[0]
        parser = argparse.ArgumentParser(prog=f"{COMMAND} {self.name}", description=description)
        self.add_arguments(parser)
        common.common_arguments(parser, default_batch=self.default_batch)
        return parser

    def score_batch(self, run: Run, batch: list[dict]) -> None:
        if run.subject.is_memory:
            self.run_memory(run, batch)
        self.run_baselines(run, batch)

    def run(self, args, subject: common.Subject | None = None) -> dict:
        """Seed, load, score every batch, aggregate: the result (`benchmark`, `config`, `aggregates`, `samples`,
        `timings`). `subject` replaces loading `args.model`."""
        common.setup(args)
        timer = common.Timer()
        subject = subject or common.load_subject(
            args.model, args.tokenizer, args.device, args.dtype, getattr(args, "memory_options", None)
        )
        run = Run(subject, args, common.baselines(args))
        samples = self.load(run)
        timer.mark("load_s")
        with self.scoring():
            for batch in common.progress(common.batches(samples, args.batch_size), self.name, args):
                self.score_batch(run, batch)
        timer.mark("evaluate_s")
        return {
            "benchmark": self.benchmark_id(args),
            "config": common.run_config(args, subject, **self.config_extra(run)),
            "aggregates": self.aggregate(run, samples),
            "samples": [self.public(run, sample) for sample in samples],
            "timings": timer.summary(),
        }

    def main(self, argv: list[str] | None = None, subject: common.Subject | None = None) -> int:
        """Parse, run, write the JSON and the PNG beside it, print a summary."""
        args = self.build_parser().parse_args(argv)
        results = self.run(args, subject)
        path, png = self.write(results, common.out_path(args, results))
        print(f"wrote {path} and {png}")
        return 0

    def write(self, results: dict, path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
        """`results` written to `path` with its plot beside it, and its summary printed: the JSON's and PNG's paths."""
        path = common.write_results(path, results)
        split = results["config"].get("split", "dev")
        png = self.plot(results, path, f"{results['benchmark']}: {results['config']['model_name']} ({split})")
        self.summary(results)
        return path, png
