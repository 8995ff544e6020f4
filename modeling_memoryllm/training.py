"""
Training MemoryLLM adapters with the paper's three objectives, on accelerate.

Trainable: the LoRA adapters (injection `default` and reading `decoder_adapter`), `bos_embedding` and the
new-memory positional vector `e`; the backbone is frozen and memory rows follow the model's own update rule.
Each step samples one objective (weights in `TrainConfig`):

1. `incorporate`: inject chunk x1, predict its continuation x2. With probability `grad_through_injection` the
   gradient flows through the injection (training the compression of x1), else the injection runs without it.
2. `continuous`: inject x1..xn in order, predict x(n+1).
3. `forget`: inject x1, then unrelated chunks from another book, predict x1's continuation.

Run `memoryllm train --help`, or `accelerate launch --num_processes N -m modeling_memoryllm.training --config
train.yaml` for data parallel on several GPUs or CPUs (`accelerate_configs/multi_gpu.yaml`; see `prepare`).
"""

import dataclasses
import gzip
import json
import math
import os
import pathlib
import random
import sys
import time

import torch
import yaml
from transformers import HfArgumentParser
from transformers.utils import logging

from .memory_state import MemoryState
from .modeling_memoryllm import MemoryLLMForCausalLM
from .variants import canonical_name


logger = logging.get_logger(__name__)

OBJECTIVES = ("incorporate", "continuous", "forget")
# Which parameters train: everything the paper trains, only the writing side (the injection adapter, bos rows and
# `e`: what the memory holds), or only the reading side (the decoder adapter: how the memory is used).
TRAINABLE = {
    "all": (".lora_A.", ".lora_B.", "bos_embedding", "new_memory_positional_emb"),
    "injection": (".lora_A.default.", ".lora_B.default.", "bos_embedding", "new_memory_positional_emb"),
    "reading": (".lora_A.decoder_adapter.", ".lora_B.decoder_adapter."),
}


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; from the command line (`HfArgumentParser`) or a YAML/JSON file."""

    backbone: str = dataclasses.field(default="default", metadata={"help": "folder, .gguf, or 'default'"})
    output_dir: str = "runs/memoryllm-train"
    corpus: str = "../shared/data/corpus/books-train.jsonl.gz"
    heldout: str = "../shared/data/corpus/books-heldout.jsonl.gz"
    memory_variant: str = "memoryllm-8b"  # or "training-free" (the legacy names "output" / "input" work too)
    num_tokens: int = 256
    num_blocks: int = 8
    lora_rank: int = 8
    trainable: str = dataclasses.field(default="all", metadata={"help": "all | injection | reading"})
    chunk_length: int = 256
    steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 1  # samples per optimizer step, over all processes (each process takes its share)
    gradient_accumulation_steps: int = 1  # multiplies the samples per step
    mixed_precision: str = "no"
    weight_incorporate: float = 1.0
    weight_continuous: float = 1.0
    weight_forget: float = 1.0
    grad_through_injection: float = 0.5
    max_context_chunks: int = 3
    max_unrelated_chunks: int = 3
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    seed: int = 0
    resume: bool = True
    save_gradients_at: int = 0  # write the averaged gradients of this step to `gradients.safetensors` (checks)


# ----------------------------------------------------------------------------------------------------------- data


class ChunkSampler:
    """Random runs of consecutive `chunk_length`-token chunks from tokenized books."""

    def __init__(self, books: list[list[int]], chunk_length: int, seed: int):
        self.books = [b for b in books if len(b) >= 8 * chunk_length]
        if not self.books:
            raise ValueError(f"No book holds 8 chunks of {chunk_length} tokens.")
        self.chunk_length = chunk_length
        self.random = random.Random(seed)

    def run(self, count: int, avoid: int | None = None) -> tuple[int, list[list[int]]]:
        """`count` consecutive chunks from one random book (not book `avoid`); returns (book index, chunks)."""
        choices = [i for i in range(len(self.books)) if i != avoid] or [0]
        index = self.random.choice(choices)
        book, span = self.books[index], count * self.chunk_length
        start = self.random.randrange(0, len(book) - span)
        chunks = [book[start + i * self.chunk_length : start + (i + 1) * self.chunk_length] for i in range(count)]
        return index, chunks


# ------------------------------------------------------------------------------------------------------ objectives
def prediction_loss(model, target: list[int], state: MemoryState) -> torch.Tensor:
    """Mean next-token cross-entropy of `target` read with `state`."""
    ids = torch.tensor([target], device=model.device)
    return model(ids, memory=state, labels=ids).loss


def inject_all(model, chunks: list[list[int]], state: MemoryState, grads: list[bool], generator) -> MemoryState:
    """Inject chunks in order into new states; chunk `i` carries gradient when `grads[i]`."""
    for chunk, grad in zip(chunks, grads, strict=True):
        with torch.set_grad_enabled(grad):
            state = model.injected([chunk], memory=state, generator=generator)
    return state


def objective_loss(model, name: str, sampler: ChunkSampler, config: TrainConfig, generator) -> torch.Tensor:
    """One sample of objective `name`, starting from an empty memory."""
    state = model.new_memory_state()
    rng = sampler.random
    grad_through = rng.random() < config.grad_through_injection
    if name == "incorporate":
        _, (context, continuation) = sampler.run(2)
        state = inject_all(model, [context], state, [grad_through], generator)
    elif name == "continuous":
        _, chunks = sampler.run(rng.randint(2, config.max_context_chunks) + 1)
        *context, continuation = chunks
        grads = [False] * (len(context) - 1) + [grad_through]  # the gradient reaches the last injection
        state = inject_all(model, context, state, grads, generator)
    elif name == "forget":
        book, (context, continuation) = sampler.run(2)
        _, unrelated = sampler.run(rng.randint(1, config.max_unrelated_chunks), avoid=book)
        # With gradient through x1's injection, the later updates keep it too, so surviving rows stay connected.
        grads = [grad_through] * (1 + len(unrelated))
        state = inject_all(model, [context, *unrelated], state, grads, generator)
    else:
        raise ValueError(f"Unknown objective {name!r}; choose from {OBJECTIVES}.")
    return prediction_loss(model, continuation, state)


def pick_objective(config: TrainConfig, rng: random.Random) -> str:
    weights = [config.weight_incorporate, config.weight_continuous, config.weight_forget]
    return rng.choices(OBJECTIVES, weights=weights)[0]


# ------------------------------------------------------------------------------------------------------ the model
def prepare_model(config: TrainConfig) -> MemoryLLMForCausalLM:
    """The backbone as a MemoryLLM with fresh adapters; only adapters, bos rows and `e` train."""
    lora = {"r": config.lora_rank, "lora_alpha": 2 * config.lora_rank, "lora_dropout": 0.0}
    lora["target_modules"] = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    options = dict(num_tokens=config.num_tokens, num_blocks=config.num_blocks, lora_config=lora)
    options.update(memory_variant=config.memory_variant, max_inject_length=config.chunk_length)
    if config.backbone == "default":
        from .default import default_gguf_path

        model = MemoryLLMForCausalLM.from_backbone(default_gguf_path(), **options)
    else:
        model = MemoryLLMForCausalLM.from_backbone(config.backbone, **options)
    freeze_backbone(model, config.trainable)
    return model


def freeze_backbone(model: MemoryLLMForCausalLM, trainable: str = "all") -> list[str]:
    """Leave only the `trainable` parameters (see `TRAINABLE`) with `requires_grad`; returns their names."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {sorted(TRAINABLE)}, got {trainable!r}")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in TRAINABLE[trainable]))
        if param.requires_grad:
            names.append(name)
    return names


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- checkpoints (no pickle)
def save_checkpoint(folder: pathlib.Path, model, optimizer, step: int, config: TrainConfig) -> None:
    from safetensors.torch import save_file

    staging = folder.with_name(folder.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    metadata = {"step": str(step), "memory_variant": canonical_name(config.memory_variant)}
    save_file(trainable_state(model), staging / "adapters.safetensors", metadata=metadata)
    save_file(optimizer_tensors(model, optimizer), staging / "optimizer.safetensors", metadata=metadata)
    if folder.exists():
        for old in folder.iterdir():
            old.unlink()
        folder.rmdir()
    os.replace(staging, folder)


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments by parameter name (safetensors, so checkpoints never need pickle)."""
    tensors = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"{name}::{key}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
    return tensors


def load_checkpoint(folder: pathlib.Path, model, optimizer) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "adapters.safetensors"), strict=False)
    moments = load_file(folder / "optimizer.safetensors")
    for name, param in model.named_parameters():
        keys = {k.split("::")[1]: v for k, v in moments.items() if k.split("::")[0] == name}
        if keys:
            optimizer.state[param] = {k: v.to(param.device) for k, v in keys.items()}
    with safe_open(folder / "adapters.safetensors", framework="pt") as handle:
        return int(handle.metadata()["step"])


# ------------------------------------------------------------------------------------------------------ the loop
def train(
    config: TrainConfig,
    model: MemoryLLMForCausalLM | None = None,
    books: list[list[int]] | None = None,
    sampler: ChunkSampler | None = None,
):
    """Train; returns the log (a list of dicts). Writes checkpoints, `train_log.jsonl` and `loss.png`.
    `model`, tokenized `books` or a ready `sampler` replace what `config` would load."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_seed(config.seed)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    model = model if model is not None else prepare_model(config)
    freeze_backbone(model, config.trainable)
    if sampler is None:
        books = books if books is not None else tokenize_books(model, config.corpus)
        sampler = ChunkSampler(books, config.chunk_length, config.seed)
    core = model.to(accelerator.device)
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    optimizer = prepare(accelerator, optimizer)
    output = pathlib.Path(config.output_dir)
    start = resume_step(output / "checkpoint", core, optimizer) if config.resume else 0
    heldout = None
    if config.eval_every and os.path.exists(config.heldout):
        heldout = ChunkSampler(tokenize_books(core, config.heldout), config.chunk_length, config.seed)
    log = run_steps(config, core, optimizer, accelerator, sampler, output, start, heldout)
    accelerator.end_training()  # destroys the process group: without it a gloo worker could abort at exit (CI, once)
    return log


def prepare(accelerator, optimizer):
    """The optimizer to step. Runs are plain data parallel (`accelerate launch --num_processes N`, CPU or GPU), not
    wrapped in DDP: injection runs outside `forward`, where DDP's hooks cannot see it, so every process computes its
    share of one global batch and the gradients are averaged explicitly (`average_gradients`). FSDP and DeepSpeed
    are refused: FSDP gathers its sharded parameters only inside the wrapped forward (injection calls the decoder
    layers directly), and DeepSpeed's engine steps at its own accumulation boundaries, which this loop does not
    drive. Only the adapters train, so every process holds the whole model (the 8B fits one 80 GB GPU in bf16)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"The trainer runs plain data parallel, not {accelerator.distributed_type.value}: launch with "
            "`accelerate launch --num_processes N` (see accelerate_configs/multi_gpu.yaml)."
        )
    return accelerator.prepare(optimizer)


def resume_step(folder: pathlib.Path, model, optimizer) -> int:
    if not (folder / "adapters.safetensors").exists():
        return 0
    step = load_checkpoint(folder, model, optimizer)
    logger.info("Resumed from %s at step %d.", folder, step)
    return step


def step_samples(config: TrainConfig, step: int) -> list[tuple[str, int]]:
    """The global batch of step `step`: `(objective, seed)` per sample, the same in every process."""
    rng = random.Random(config.seed * 1_000_003 + step)
    count = config.batch_size * config.gradient_accumulation_steps
    return [(pick_objective(config, rng), rng.randrange(2**62)) for _ in range(count)]


def batch_loss(model, samples: list[tuple[str, int]], sampler: ChunkSampler, config, accelerator) -> torch.Tensor:
    """Backpropagates this process's share of `samples`, each weighted 1 / len(samples); returns its loss sum."""
    total = torch.zeros((), device=accelerator.device)
    for objective, seed in samples[accelerator.process_index :: accelerator.num_processes]:
        sampler.random = random.Random(seed)  # a sample is the same whichever process computes it
        loss = objective_loss(model, objective, sampler, config, torch.Generator().manual_seed(seed)) / len(samples)
        accelerator.backward(loss)
        total = total + loss.detach()
    return total


def average_gradients(params: list[torch.Tensor], loss: torch.Tensor, accelerator) -> float:
    """Sum every process's gradients (each already weighted by 1 / global batch) and losses: the global mean."""
    if accelerator.num_processes > 1:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad = accelerator.reduce(param.grad, reduction="sum")
        loss = accelerator.reduce(loss, reduction="sum")
    return float(loss)


def run_steps(config, model, optimizer, accelerator, sampler, output, start: int, heldout=None) -> list[dict]:
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    log, started = [], time.perf_counter()
    model.train()
    for step in range(start, config.steps):
        samples = step_samples(config, step)
        loss = average_gradients(params, batch_loss(model, samples, sampler, config, accelerator), accelerator)
        if step + 1 == config.save_gradients_at and accelerator.is_main_process:
            save_gradients(output, model)
        optimizer.step()
        optimizer.zero_grad()
        names = ",".join(sorted({name for name, _ in samples}))
        record = {"step": step + 1, "objective": names, "loss": loss, "processes": accelerator.num_processes}
        record["seconds"] = time.perf_counter() - started
        log.append(record)
        if heldout is not None and (step + 1) % config.eval_every == 0:
            model.eval()
            record["heldout_ppl"] = heldout_perplexity(model, heldout, config.eval_batches, generator)
            model.train()
        if (step + 1) % config.log_every == 0:
            logger.info("step %d %s loss %.4f", step + 1, names, record["loss"])
        if accelerator.is_main_process and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
            save_checkpoint(output / "checkpoint", model, optimizer, step + 1, config)
    model.eval()
    if accelerator.is_main_process:
        write_log(output, log)
    return log


def save_gradients(output: pathlib.Path, model) -> None:
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    grads = {n: p.grad.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    save_file(grads, output / "gradients.safetensors")


def tokenize_books(model, path: str) -> list[list[int]]:
    """Token ids of every book: a record's `input_ids` when it has them (a pre-tokenized corpus), else its `text`."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r["input_ids"] if "input_ids" in r else _tokens(model, r["text"]) for r in records]


def _tokens(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def write_log(output: pathlib.Path, log: list[dict]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "train_log.jsonl", "a", encoding="utf-8") as handle:
        for record in log:
            handle.write(json.dumps(record) + "\n")
    plot_losses(log, output / "loss.png")


def plot_losses(log: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot.")
        return
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in (*OBJECTIVES, "mixed"):  # "mixed": a batch of several objectives
        points = [
            (r["step"], r["loss"]) for r in log if r["objective"] == name or name == "mixed" and "," in r["objective"]
        ]
        if points:
            axis.plot(*zip(*points), ".", alpha=0.4, label=name)
    axis.set(xlabel="step", ylabel="loss", title="MemoryLLM training loss per objective")
    axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


@torch.no_grad()
def heldout_perplexity(model, sampler: ChunkSampler, batches: int, generator) -> float:
    """Perplexity of continuations with their preceding chunk injected (the incorporate objective, no grad)."""
    losses = []
    for _ in range(batches):
        _, (context, continuation) = sampler.run(2)
        state = model.injected([context], memory=model.new_memory_state(), generator=generator)
        losses.append(float(prediction_loss(model, continuation, state)))
    return math.exp(sum(losses) / len(losses))


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Options from the command line; `--config FILE` (YAML or JSON) first, with any other option overriding it."""
    parser = HfArgumentParser(TrainConfig)
    argv = list(argv or [])
    if "--config" in argv:
        at = argv.index("--config")
        path = argv[at + 1]
        del argv[at : at + 2]
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) if path.endswith((".yaml", ".yml")) else json.load(handle)
        unknown = set(values) - {field.name for field in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"{path}: unknown options {sorted(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)[0]


def main(argv: list[str] | None = None) -> None:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    log = train(config)
    logger.warning("Trained %d steps; last loss %.4f; outputs in %s", len(log), log[-1]["loss"], config.output_dir)


if __name__ == "__main__":
    main()
