"""
Serving a MemoryLLM elsewhere: a plain Llama with the reading adapter merged in, and the memory's prefix keys/values.

`merged_reading_model(model)` is a `LlamaForCausalLM` whose projections are `W + (alpha / r) * B @ A` of the
reading adapter (`decoder_adapter`, or `default` when there is one adapter); every other weight is the model's.
`memory_prefix(model, state)` is what that Llama must read in front of the text: per layer the keys (after RoPE) and
values of `[bos, memory]` at positions `0..P-1`, and which of those rows attention may see. With them in a
`DynamicCache`, the text at positions `P, P+1, ...` and the attention mask `[written, text mask]`, a plain Llama
forward gives the MemoryLLM's logits (`tests/test_transformers_habits.py`).
"""

import copy
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .cache_memoryllm import reading_prefix
from .lora import LoraLinear, active_adapter


@dataclass
class MemoryPrefix:
    """The reading prefix of one memory version, for a plain Llama (see the module docstring)."""

    keys: list[torch.Tensor]  # per layer [1, Hkv, P, hd], after RoPE at positions 0..P-1
    values: list[torch.Tensor]  # per layer [1, Hkv, P, hd]
    written: torch.Tensor  # [P] bool: the rows attention may see (never-written rows are not read)

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]

    def cache(self, batch_size: int = 1) -> DynamicCache:
        """A new `DynamicCache` holding the prefix in every one of `batch_size` rows."""
        cache = DynamicCache()
        for idx, (keys, values) in enumerate(zip(self.keys, self.values)):
            shape = (batch_size, -1, -1, -1)
            cache.update(keys.expand(*shape).clone(), values.expand(*shape).clone(), idx)
        return cache

    def attention_mask(self, text_mask: torch.Tensor) -> torch.Tensor:
        """The mask `[B, P + T]` of a text mask `[B, T]`: the written prefix rows, then the text."""
        rows = self.written.to(text_mask.device, text_mask.dtype).expand(text_mask.shape[0], -1)
        return torch.cat([rows, text_mask], dim=1)


def merged_reading_model(model) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` with the reading adapter merged into its base weights. The weights that need no merge are
    shared with `model` (no copy); the merged ones are new."""
    for name, module in model.named_modules():
        if hasattr(module, "merged_adapters"):
            raise ValueError(f"{name} carries a peft adapter: merge it first (peft's merge_and_unload).")
    keys = set(LlamaConfig().to_dict()) - {"architectures", "auto_map", "model_type", "transformers_version"}
    config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k in keys})
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    llama.load_state_dict(_merged_state_dict(model, llama), strict=True, assign=True)
    llama.model.rotary_emb = copy.deepcopy(model.model.rotary_emb)
    return llama.eval()


def _merged_state_dict(model, llama: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """`llama`'s weights from `model`: a `LoraLinear`'s merged weight, anything else under the same name."""
    own, modules, adapter = model.state_dict(), dict(model.named_modules()), model.config.generation_adapter
    merged = {}
    for key in llama.state_dict():
        module_name, _, leaf = key.rpartition(".")
        module = modules.get(module_name)
        if isinstance(module, LoraLinear):
            merged[key] = module.merged_weight(adapter) if leaf == "weight" else getattr(module, leaf).detach()
        else:
            merged[key] = own[key].detach()
    return merged


def memory_prefix(model, state=None) -> MemoryPrefix:
    """The prefix keys/values that `state` (default: the model's own memory) puts in front of every query (a copy),
    and its written rows."""
    state = state if state is not None else model.memory_state
    if model.variant.prefix_slots(model.config):
        raise ValueError(f"{model.config.memory_variant} retrieves rows per query: its prefix is not fixed.")
    if not model.variant.reads(state):
        raise ValueError("This memory is not read (it is uninitialised): a plain Llama needs no prefix for it.")
    with torch.no_grad(), active_adapter(model.config.generation_adapter):
        prefix = reading_prefix(model, state)
    layers = [prefix.layer(idx) for idx in range(len(prefix.key_buffers))]
    written = prefix.written if prefix.written is not None else torch.ones(prefix.length, dtype=torch.bool)
    return MemoryPrefix([k.clone() for k, _ in layers], [v.clone() for _, v in layers], written.clone())


__all__ = ["MemoryPrefix", "memory_prefix", "merged_reading_model"]
