"""The models the benchmark runs: the embedded default (full mode), the tiny `"bench"` preset of
`modeling_memoryllm.testing_utils` (quick mode; the soak uses its `"soak"` preset)."""

import torch

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.testing_utils import tiny_model


def bench_model(quick: bool, device: torch.device, dtype: torch.dtype) -> tuple[MemoryLLMForCausalLM, str]:
    """The model under test and its name: the tiny config in quick mode, else the embedded default."""
    if quick:
        return tiny_model(preset="bench", device=device).to(dtype), "tiny random MemoryLLM (eval/bench/models.py)"
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
