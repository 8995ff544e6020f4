"""Training on several processes: `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo) gives the
gradients and the loss of a single-process run on the same global batch; the ZeRO-2 config is valid for DeepSpeed."""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT


pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama backbone folder and a pre-tokenized corpus of three books."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder / "backbone")
    rng = random.Random(0)
    books = [{"input_ids": [rng.randrange(3, 97) for _ in range(200)]} for _ in range(3)]
    (folder / "books.jsonl").write_text("".join(json.dumps(book) + "\n" for book in books))
    return folder


def run(workspace, name: str, launcher: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One training step of a global batch of 4 samples (each objective), with `launcher`; its log and gradients."""
    output = workspace / name
    shutil.rmtree(output, ignore_errors=True)
    settings = dict(
        backbone=str(workspace / "backbone"), corpus=str(workspace / "books.jsonl"), heldout="none",
        output_dir=str(output), num_tokens=4, num_blocks=4, lora_rank=2, chunk_length=8, steps=2, batch_size=4,
        save_gradients_at=1, eval_every=0, save_every=2, learning_rate=0.01, resume=False, grad_through_injection=1.0,
    )  # fmt: skip
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    command = [*launcher, "-m", "modeling_memoryllm.training", "--config", str(path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return log, load_file(output / "gradients.safetensors")


def test_two_processes_equal_one_on_the_same_global_batch(workspace):
    single_log, single = run(workspace, "single", [sys.executable])
    accelerate = str(pathlib.Path(sys.executable).with_name("accelerate"))  # the console script of this venv
    # `--cpu` alone runs one process (accelerate's multi-CPU launcher is mpirun); torchrun's launcher with
    # ACCELERATE_USE_CPU gives 2 gloo processes
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    double_log, double = run(workspace, "double", [*launch, "--mixed_precision", "no", "--dynamo_backend", "no"])
    assert [r["processes"] for r in single_log] == [1, 1] and [r["processes"] for r in double_log] == [2, 2]
    assert sorted(single) == sorted(double) and len(single) > 10
    # every trainable part but the LoRA A matrices got a gradient (A's is zero while the fresh B is zero)
    assert all(single[name].abs().sum() > 0 for name in single if ".lora_A." not in name)
    for name in single:
        torch.testing.assert_close(double[name], single[name], atol=1e-6, rtol=1e-5)
    for one, two in zip(single_log, double_log):  # the loss of the step, and of the next (after the update)
        assert one["objective"] == two["objective"]
        assert abs(one["loss"] - two["loss"]) < 1e-5


def test_deepspeed_zero2_config_is_valid_for_deepspeed():
    deepspeed_config = pytest.importorskip("deepspeed.runtime.config")
    from accelerate.utils import DeepSpeedPlugin

    shipped = yaml.safe_load((ROOT / "accelerate_configs" / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=shipped["zero_stage"],
        gradient_accumulation_steps=shipped["gradient_accumulation_steps"],
        gradient_clipping=shipped["gradient_clipping"],
        offload_optimizer_device=shipped["offload_optimizer_device"],
        offload_param_device=shipped["offload_param_device"],
    )
    settings = dict(plugin.deepspeed_config)
    settings.update(train_micro_batch_size_per_gpu=1)  # DeepSpeed checks the batch sizes for this one process
    settings["train_batch_size"] = settings["gradient_accumulation_steps"]
    config = deepspeed_config.DeepSpeedConfig(settings)
    assert config.zero_optimization_stage == 2 and config.gradient_clipping == 1.0
