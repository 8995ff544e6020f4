"""The models the benchmark runs: the embedded default (full mode), a tiny random config (quick mode, soak)."""

import torch

from modeling_memoryllm import MemoryLLMConfig, MemoryLLMForCausalLM


def tiny_config(**overrides) -> MemoryLLMConfig:
    """A tiny training-free-mode config: 2 layers, d=64, 16 rows per injection, 64 memory rows."""
    options = dict(
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
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    options.update(overrides)
    return MemoryLLMConfig(**options)


def tiny_model(seed: int = 0, device=None, **overrides) -> MemoryLLMForCausalLM:
    """A random tiny MemoryLLM (`tiny_config`), every parameter random as in `tests/tiny.py`."""
    torch.manual_seed(seed)
    model = MemoryLLMForCausalLM(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name != "memory":
                param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if "lora" in name else 1.0) / 3)
    return model.to(device) if device is not None else model


def bench_model(quick: bool, device: torch.device, dtype: torch.dtype) -> tuple[MemoryLLMForCausalLM, str]:
    """The model under test and its name: the tiny config in quick mode, else the embedded default."""
    if quick:
        return tiny_model(device=device).to(dtype), "tiny random MemoryLLM (eval/bench/models.py)"
    from modeling_memoryllm.default import GGUF_NAME, load_default

    return load_default(dtype=dtype, device=device).eval(), f"default: {GGUF_NAME} (training-free MemoryLLM)"


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
