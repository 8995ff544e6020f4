"""
`generate` with a memory: the few `GenerationMixin` hooks where the memory prefix matters.

- `_prepare_cache_for_generation`: the cache `generate` makes (`cache_implementation` unset, "dynamic", "offloaded",
  "static", ..., as an argument or in the generation config) or is given is adopted (`adopt_cache`), so that it holds
  the prefix and counts only text; a static one is sized for prefix + text. What cannot work raises before any work.
- `_expand_inputs_for_generation`: `num_beams` / `num_return_sequences` repeat every batch row; a per-row `memory`
  list is repeated with them.
- `create_masks_for_generate`: for a compileable (static) cache `generate` builds a 4-D mask before the prefix is in
  the cache; `forward` builds its mask itself from the 2-D text mask instead.
"""

import torch

from .cache_memoryllm import adopt_cache, check_cache_fits
from .validation import batch_states, tensor_token_lists


class MemoryGenerationMixin:
    """Mixed into `MemoryLLMForCausalLM` before `GenerationMixin` (see the module docstring)."""

    def generate(self, inputs: torch.Tensor | None = None, memory=None, **kwargs):
        """`GenerationMixin.generate`, reading `memory` (default: the model's own) through a prefix cache."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            tensor_token_lists(ids, self.config.vocab_size)  # clear errors for bad ids
        return super().generate(inputs, memory=memory, **kwargs)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ):
        """transformers' cache preparation with room for the memory prefix; the cache it makes or is given is adopted
        and checked (capacity, what the variant needs) before any forward."""
        memory = model_kwargs.get("memory")
        rows = len(memory) if isinstance(memory, (list, tuple)) else 1
        states = batch_states(memory, self.memory_state, rows, self.config, mixed=True)
        prefix_rows = self.config.prefix_length if any(self.variant.reads(s) for s in states) else 0
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length + prefix_rows
        )
        cache = model_kwargs.get(self.cache_kwarg)
        if cache is not None:
            cache = model_kwargs[self.cache_kwarg] = adopt_cache(cache)
            continuing = cache.physical_length() > 0
            check_cache_fits(self, cache, cache.prefix_length if continuing else prefix_rows, max_cache_length)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, **model_kwargs):
        """Every batch row repeated `expand_size` times (beams, several return sequences); so is a per-row memory."""
        memory = model_kwargs.get("memory")
        if expand_size > 1 and isinstance(memory, (list, tuple)) and len(memory) > 1:
            model_kwargs["memory"] = [state for state in memory for _ in range(expand_size)]
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, **model_kwargs
        )

    def create_masks_for_generate(self, *args, attention_mask=None, **kwargs):
        """The 2-D text mask as it is: `forward` puts the memory prefix in front of it (see the module docstring)."""
        return attention_mask


__all__ = ["MemoryGenerationMixin"]
