"""A tiny random MemoryLLM for fast tests of behaviour that golden A does not pin."""

import torch

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM


def tiny_config(**overrides) -> MemoryLLMConfig:
    options = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_tokens=4,
        num_blocks=3,
        max_inject_length=12,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        lora_config={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj"]},
        attn_implementation="sdpa",
    )
    options.update(overrides)
    return MemoryLLMConfig(**options)


def tiny_model(seed: int = 0, **overrides) -> MemoryLLMForCausalLM:
    """Every parameter random (LoRA B and `e` included), memory initialised."""
    torch.manual_seed(seed)
    model = MemoryLLMForCausalLM(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora" in name else 1.0) / 3)
        model.memory_state.assign(torch.randn(model.memory.shape, generator=generator))
    return model
