"""Training on a tiny config: every objective gives finite gradients for exactly the trainable parameters."""

import json
import math
import pathlib
import random

import pytest
import torch

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.training import (
    OBJECTIVES,
    ChunkSampler,
    TrainConfig,
    freeze_backbone,
    objective_loss,
    parse_config,
    prediction_loss,
    train,
)
from tests.tiny import tiny_config, tiny_model


pytest.importorskip("accelerate")


def fresh_model(rule: str = "output") -> MemoryLLMForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(memory_variant=rule, max_inject_length=8, num_tokens=4, num_blocks=4)
    return MemoryLLMForCausalLM(config)


def random_books(count: int = 3, length: int = 200, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 97) for _ in range(length)] for _ in range(count)]


def config(**overrides) -> TrainConfig:
    options = dict(chunk_length=8, steps=4, log_every=1, eval_every=0, save_every=2, learning_rate=1e-2)
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.parametrize("rule", ["output", "input", "training-free-ranked"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_gives_finite_gradients_for_exactly_the_trainable_parameters(objective, rule):
    model = fresh_model(rule).train()
    trainable = set(freeze_backbone(model))
    assert trainable and all(".lora_" in n or "bos_embedding" in n or "positional" in n for n in trainable)
    sampler = ChunkSampler(random_books(), 8, seed=1)
    settings = config(grad_through_injection=1.0)  # gradient through the injection: every trainable part is used
    loss = objective_loss(model, objective, sampler, settings, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if name in trainable:
            last_layer = f"layers.{model.config.num_hidden_layers - 1}."
            if rule != "output" and last_layer in name and ".default." in name:
                assert param.grad is None, name  # the input rule writes layer inputs: the last layer's
                continue  # injection adapter never matters
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name


class RepeatedPassage(ChunkSampler):
    """Always the same passage: x1 then its continuation x2."""

    def __init__(self, passage: list[int], chunk_length: int):
        self.random, self.chunk_length, self.passage = random.Random(0), chunk_length, passage

    def run(self, count, avoid=None):
        return 0, [self.passage[i * self.chunk_length : (i + 1) * self.chunk_length] for i in range(count)]


def test_overfit_on_a_repeated_passage_uses_the_memory(tmp_path):
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]}
    model = tiny_model(0, num_tokens=8, num_blocks=2, max_inject_length=8, lora_config=lora)
    model.memory_state.reset()
    context, continuation = random_books(2, 8, seed=5)
    sampler = RepeatedPassage(context + continuation, 8)
    settings = config(
        steps=40, output_dir=str(tmp_path), save_every=40, learning_rate=3e-2, trainable="injection",
        grad_through_injection=1.0, weight_continuous=0, weight_forget=0,
    )  # fmt: skip
    log = train(settings, model=model, sampler=sampler)
    assert len(log) == 40
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        injected = model.injected([context], memory=model.new_memory_state(), generator=generator)
        with_memory = float(prediction_loss(model, continuation, injected))
        without = float(prediction_loss(model, continuation, model.new_memory_state()))
    # Only the writing side trains, so the loss without the passage cannot move: the gain comes from the memory.
    assert with_memory < without - 1.0, (with_memory, without)  # at least e-fold lower perplexity
    assert (tmp_path / "checkpoint" / "adapters.safetensors").exists()
    assert (tmp_path / "loss.png").exists()
    lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 40 and set(json.loads(lines[0])) >= {"step", "objective", "loss"}


def test_resume_continues_from_the_checkpoint(tmp_path):
    books = random_books()
    train(config(steps=2, output_dir=str(tmp_path)), model=fresh_model(), books=books)
    log = train(config(steps=4, output_dir=str(tmp_path)), model=fresh_model(), books=books)
    assert [r["step"] for r in log] == [3, 4]


def test_config_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 7\nmemory_variant: training-free\nlearning_rate: 0.001\n")
    assert parse_config(["--config", str(path)]).steps == 7
    parsed = parse_config(["--steps", "3", "--weight_forget", "0"])
    assert parsed.steps == 3 and parsed.weight_forget == 0


def test_shipped_accelerate_and_training_configs_parse():

    yaml = pytest.importorskip("yaml")
    folder = pathlib.Path(__file__).resolve().parents[1] / "accelerate_configs"
    zero2 = yaml.safe_load((folder / "deepspeed_zero2.yaml").read_text())
    assert zero2["distributed_type"] == "DEEPSPEED" and zero2["deepspeed_config"]["zero_stage"] == 2
    multi = yaml.safe_load((folder / "multi_gpu.yaml").read_text())  # FSDP cannot shard around the injection
    assert multi["distributed_type"] == "MULTI_GPU" and multi["num_processes"] > 1
    for name in ("train_smollm2.yaml", "train_smollm2_ranked.yaml", "train_8b.yaml"):
        parsed = parse_config(["--config", str(folder / name)])
        assert parsed.steps > 0 and parsed.memory_variant in ("memoryllm-8b", "training-free", "training-free-ranked")


@pytest.mark.parametrize("name", ["train_smollm2.yaml", "train_smollm2_ranked.yaml"])
def test_the_defaults_training_configs_run_a_tiny_cpu_run(name, tmp_path):
    """The shipped GPU configs of the default, as they are, with only the sizes cut and a tiny Llama as backbone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shape)).save_pretrained(tmp_path / "backbone")
    corpus = tmp_path / "books.jsonl"
    corpus.write_text("".join(json.dumps({"input_ids": book}) + "\n" for book in random_books(3, 120)))
    folder = pathlib.Path(__file__).resolve().parents[1] / "accelerate_configs"
    sizes = dict(steps=2, chunk_length=8, num_tokens=8, num_blocks=2, eval_every=2, eval_batches=1, save_every=2)
    paths = dict(backbone=tmp_path / "backbone", corpus=corpus, heldout=corpus, output_dir=tmp_path / "run")
    overrides = [f"--{key}={value}" for key, value in {**sizes, **paths, "mixed_precision": "no"}.items()]
    config = parse_config(["--config", str(folder / name), *overrides])
    assert config.memory_variant == yaml_rule(folder / name)
    log = train(config)
    assert [record["step"] for record in log] == [1, 2] and all(math.isfinite(record["loss"]) for record in log)
    assert (tmp_path / "run" / "checkpoint" / "adapters.safetensors").exists()


def yaml_rule(path: pathlib.Path) -> str:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())["memory_variant"]
