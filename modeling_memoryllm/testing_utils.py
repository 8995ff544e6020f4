"""Tiny random MemoryLLMs for tests and benchmarks, from named presets: one place for their sizes and rules.

* `"tests"` (the default; `tests/tiny.py`): 2 layers, d=32, 4 rows per injection, 12 memory rows, random LoRA
  adapters, the released ("output") write rule; every parameter random, the memory too.
* `"bench"` (`python -m eval bench --quick`): 2 layers, d=64, 16 rows per injection, 64 memory rows, no adapters,
  the training-free ("input") write rule; every parameter random but the memory (left uninitialised).
* `"soak"` (`python -m eval bench --soak N`): the bench preset with `SOAK_OVERRIDES`: the released write rule, so
  that new rows depend on the memory they attend to, random LoRA adapters as in the tests preset; 4 rows per
  injection, 12 memory rows, texts of up to 16 tokens (the shortest the released models were trained on).

Tests and recorded benchmark results depend on these sizes and on the order in which the random values are drawn:
change them only together with those.
"""

import copy
from dataclasses import dataclass, field

import torch

from .configuration_memoryllm import MemoryLLMConfig
from .modeling_memoryllm import MemoryLLMForCausalLM


TINY_LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj"]}
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Preset:
    """The config options of a tiny model, and whether `tiny_model` also fills the memory with random values."""

    options: dict = field(default_factory=dict)
    random_memory: bool = True


# The smallest shape: 2 layers of width 32, 4 rows per injection, 12 memory rows (the tests' and the soak's).
TINY_SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_tokens=4,
    num_blocks=3,
)
TESTS = Preset(
    dict(
        **TINY_SHAPE,
        max_inject_length=12,
        **SPECIAL_IDS,
        lora_config=TINY_LORA,
        attn_implementation="sdpa",
    ),
    random_memory=True,
)
BENCH = Preset(
    dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_tokens=16,
        num_blocks=4,
        max_inject_length=16,
        memory_variant="training-free",
        lora_config=None,
        **SPECIAL_IDS,
        attn_implementation="sdpa",
    ),
    random_memory=False,
)
# What the soak changes on the bench preset (the soak reports these, less `lora_config`, as its config).
SOAK_OVERRIDES = dict(
    **TINY_SHAPE,
    max_inject_length=16,
    memory_variant="memoryllm-8b",
    lora_config=TINY_LORA,
)
SOAK = Preset({**BENCH.options, **SOAK_OVERRIDES}, random_memory=False)
PRESETS = {"tests": TESTS, "bench": BENCH, "soak": SOAK}


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


def tiny_config(preset: str | Preset = "tests", **overrides) -> MemoryLLMConfig:
    """The preset's config, with `overrides` (any `MemoryLLMConfig` option) on top."""
    options = copy.deepcopy(_preset(preset).options)  # a fresh `lora_config` per config, as a literal would give
    options.update(overrides)
    return MemoryLLMConfig(**options)


def tiny_model(seed: int = 0, preset: str | Preset = "tests", device=None, **overrides) -> MemoryLLMForCausalLM:
    """A tiny MemoryLLM of `tiny_config(preset, **overrides)` in eval mode, every parameter random (LoRA B and `e`
    included) from `seed`; the memory too (and initialised) when the preset says so. Moved to `device` if given."""
    random_memory = _preset(preset).random_memory
    torch.manual_seed(seed)
    model = MemoryLLMForCausalLM(tiny_config(preset, **overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if random_memory or name != "memory":
                param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora" in name else 1.0) / 3)
        if random_memory:
            model.memory_state.assign(torch.randn(model.memory.shape, generator=generator))
    return model.to(device) if device is not None else model
