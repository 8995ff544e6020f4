"""What every runner uses: the model under test, batched generation and scoring, seeds, outputs (the loop they
share is `benchmark.Benchmark.run`)."""

import argparse
import json
import os
import pathlib
import platform
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG

from ..paths import METRICS, RESULTS


DEFAULT_NAME = "smollm2-135m-memoryllm"
BASELINES = ("no_injection", "in_context", "texts_in_prompt")  # texts_in_prompt: retention only
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------------ arguments
def common_arguments(parser: argparse.ArgumentParser, default_batch: int = 4) -> None:
    parser.add_argument("--model", required=True, help="MemoryLLM folder, .gguf file, 'default', or a causal LM")
    parser.add_argument("--tokenizer", help="tokenizer folder when the model folder has none")
    parser.add_argument("--split", choices=("dev", "heldout"), default="dev", help="dev: part-a; heldout: part-b")
    parser.add_argument("--data-dir", help="data folder (default $MEMORYLLM_DATA, else $MEMORYLLM_SHARED/data)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=default_batch, help="samples (memories) per batch")
    parser.add_argument(
        "--baselines",
        default="no_injection,in_context",
        help="comma list, or 'none' (retention also has texts_in_prompt: the context and the k unrelated ones)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--out", help="result JSON path (a PNG plot is written beside it)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--memory-options",
        type=json.loads,
        help='memory variant options of the model under test, as JSON, e.g. \'{"memory_drop": "random"}\' '
        "(keys: memory_variant and the variant options; the memory size stays)",
    )


def baselines(args) -> list[str]:
    names = [] if args.baselines in ("", "none") else args.baselines.split(",")
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}: use {', '.join(BASELINES)} or none")
    return names


def int_list(text: str) -> list[int]:
    return sorted({int(item) for item in text.split(",") if item.strip()})


def setup(args) -> None:
    """Seed every generator; set the CPU thread count when asked."""
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)


def sample_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per sample, seeded by the sample's index: batched runs equal unbatched ones."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in indices]


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def progress(iterable, desc: str, args):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=args.no_progress, unit="batch")


# ---------------------------------------------------------------------------------------------------------- model
@dataclass
class Subject:
    """The model under test: a MemoryLLM (memory + baselines) or a plain causal LM (in-context baseline only)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    is_memory: bool
    _empty: object = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pad if pad is not None else 0

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def new_states(self, count: int) -> list:
        return [self.model.new_memory_state() for _ in range(count)]

    def empty_memory(self):
        """A shared uninitialised memory (not read): the backbone alone. `None` for a plain LM."""
        if self.is_memory and self._empty is None:
            self._empty = self.model.new_memory_state()
        return self._empty

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def memory_kwargs(self, memory) -> dict:
        if not self.is_memory:
            return {}
        return {"memory": memory if memory is not None else self.empty_memory()}

    def inject(self, ids: list[list[int]], states: list, generators: list[torch.Generator]) -> None:
        """Inject `ids[i]` into `states[i]`, all in one batched call."""
        with torch.no_grad():
            self.model.inject(ids, memory=states, generator=generators, show_progress=False)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, longest - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(subject: Subject, prompts: list[list[int]], memory, max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded `prompts`, reading `memory` (a state per row, or `None`: no memory)."""
    ids, mask = left_pad(prompts, subject.pad_id, subject.device)
    output = subject.model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=subject.pad_id,
        **subject.memory_kwargs(memory),
    )
    return [subject.decode(row[ids.shape[1] :]).strip() for row in output]


@torch.no_grad()
def continuation_scores(subject: Subject, prompts: list[list[int]], targets: list[list[int]], memory):
    """Per row, the teacher-forced log-probs of `targets[i]` after `prompts[i]`, and whether each was the argmax. The
    prompts run first and the targets behind their cache, as `generate` would read them: what a memory reads is
    chosen at the prompt's prefill (`memory_read="relevant"`), never from the target."""
    model, kwargs = subject.model, subject.memory_kwargs(memory)
    ids, mask = left_pad(prompts, subject.pad_id, subject.device)
    first = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)
    longest = max(len(target) for target in targets)
    target_ids = torch.full((len(targets), longest), subject.pad_id, dtype=torch.long)
    target_mask = torch.zeros(len(targets), longest, dtype=mask.dtype)
    for row, target in enumerate(targets):  # right-padded: nothing real reads the padding
        target_ids[row, : len(target)], target_mask[row, : len(target)] = torch.tensor(target), 1
    rest = model(
        target_ids.to(ids.device),
        attention_mask=torch.cat([mask, target_mask.to(mask.device)], dim=1),
        **{CACHE_KWARG: getattr(first, CACHE_KWARG)},
        **kwargs,
    ).logits
    logits = torch.cat([first.logits[:, -1:], rest[:, :-1]], dim=1)  # [B, longest, V]; position j predicts token j
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, target in enumerate(targets):
        wanted = torch.tensor(target, device=log_probs.device)
        token_lp = log_probs[row, torch.arange(len(target), device=log_probs.device), wanted]
        hits = log_probs[row, : len(target)].argmax(-1) == wanted
        scores.append((token_lp.tolist(), hits.tolist()))
    return scores


def load_subject(
    path: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32", memory_options=None
) -> Subject:
    """`default`, a `.gguf` file or a MemoryLLM folder (memory runs), or any causal LM folder (in-context only).
    `memory_options` (a dict) changes the memory variant or its options of a MemoryLLM (`with_memory_options`)."""
    subject = _load_subject(path, tokenizer, device, dtype)
    if memory_options:
        if not subject.is_memory:
            raise ValueError("--memory-options needs a MemoryLLM")
        with_memory_options(subject.model, memory_options)
    return subject


def with_memory_options(model, options: dict):
    """`model` with its config's memory variant and variant options replaced by `options` (what changes the size of
    the memory, `num_tokens` and `num_blocks`, cannot change here); the variant adapts the config again."""
    fixed = {"num_tokens", "num_blocks", "hidden_size", "num_hidden_layers"} & set(options)
    if fixed:
        raise ValueError(f"the memory size cannot change on a loaded model: {sorted(fixed)}")
    from modeling_memoryllm.variants import canonical_name, get_variant

    for key, value in options.items():
        setattr(model.config, key, canonical_name(value) if key == "memory_variant" else value)
    get_variant(model.config).adapt_config(model.config)
    return model


def _load_subject(path: str, tokenizer: str | None, device: str, dtype: str) -> Subject:
    torch_dtype = DTYPES[dtype]
    if path == "default":
        from modeling_memoryllm.default import load_default

        model = load_default(dtype=torch_dtype)
        return _subject(model, model.tokenizer, DEFAULT_NAME, path, True, device)
    from modeling_memoryllm import MemoryLLMForCausalLM

    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    name = model_name(path)
    if path.endswith(".gguf"):
        model = MemoryLLMForCausalLM.from_backbone(path, dtype=torch_dtype)
        return _subject(model, _tokenizer(tokenizer, model), name, path, True, device)
    if _is_memoryllm(path):
        model = MemoryLLMForCausalLM.from_pretrained(path, dtype=torch_dtype)
        return _subject(model, _tokenizer(tokenizer or path), name, path, True, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return _subject(model, _tokenizer(tokenizer or path), name, path, False, device)


def model_name(path: str) -> str:
    """A short name for file names: the folder name (its parent's for `.../checkpoint`), or the GGUF stem."""
    if path == "default":
        return DEFAULT_NAME
    resolved = pathlib.Path(path).resolve()
    name = resolved.parent.name if resolved.name == "checkpoint" else resolved.name.removesuffix(".gguf")
    return name or "model"


def _is_memoryllm(path: str) -> bool:
    config_file = pathlib.Path(path) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        return config.get("model_type") == "memoryllm" or "MemoryLLM" in config.get("architectures", [])
    return AutoConfig.from_pretrained(path).model_type == "memoryllm"


def _tokenizer(source, model=None):
    if source is None or not isinstance(source, str):
        tokenizer = getattr(model, "_tokenizer", None)
        if tokenizer is None:
            raise ValueError("the model has no tokenizer: pass --tokenizer")
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"no tokenizer in {source}: pass --tokenizer") from error


def _subject(model, tokenizer, name: str, source: str, is_memory: bool, device: str) -> Subject:
    model = model.to(device).eval()
    if is_memory:
        model.tokenizer = tokenizer
    return Subject(model, tokenizer, name, source, is_memory)


# --------------------------------------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_turn(tokenizer, content: str) -> str:
    """`content` as a user turn of the chat template, with the assistant's turn opened."""
    turn = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------------------- outputs
def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS / name))


def out_path(args, results: dict) -> pathlib.Path:
    if args.out:
        return pathlib.Path(args.out)
    return RESULTS / f"{results['benchmark']}-{results['config']['model_name']}-{args.split}.json"


def run_config(args, subject: Subject, **extra) -> dict:
    skip = ("no_progress", "out", "threads")
    config = {key: value for key, value in vars(args).items() if key not in skip}
    return {
        **config,
        "model_name": subject.name,
        "memory_model": subject.is_memory,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }


def write_results(path: pathlib.Path, results: dict) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, (torch.Tensor,)):
        return value.tolist()
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class Timer:
    """Wall-clock seconds per phase, written under `timings` (the only part of a result that varies run to run)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.start - sum(self.phases.values()), 3)

    def summary(self) -> dict:
        return {**self.phases, "total_s": round(time.perf_counter() - self.start, 3)}


def save_figure(figure, json_path: pathlib.Path) -> pathlib.Path:
    png = json_path.with_suffix(".png")
    figure.savefig(png, dpi=120, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(figure)
    return png


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str, path, ylim=None):
    """A bar chart with one group of bars per entry of `groups` and one bar per series (a condition) in each;
    `series[name][i]` is the height of that condition's bar in group `i`. Saved as PNG next to `path`."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for offset, (name, heights) in enumerate(series.items()):
        axis.bar([i + offset * width for i in range(len(groups))], heights, width, label=name)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    axis.set_ylabel(ylabel)
    if ylim is not None:
        axis.set_ylim(*ylim)
    axis.legend()
    axis.set_title(title)
    return save_figure(figure, path)
