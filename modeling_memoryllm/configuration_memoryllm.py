"""Configuration of MemoryLLM: a Llama plus a fixed-size memory pool per layer."""

from transformers import LlamaConfig


WRITE_RULES = ("output", "input")


class MemoryLLMConfig(LlamaConfig):
    r"""
    Configuration of a [`MemoryLLMForCausalLM`]: every field of [`LlamaConfig`] plus the memory options.

    Args:
        num_tokens (`int`, defaults to 256):
            Rows written per layer by one injection (`N`).
        num_blocks (`int`, defaults to 50):
            The memory holds `num_blocks * num_tokens` rows per layer (`M = N * K`).
        add_bos_embedding (`bool`, defaults to `True`):
            Prepend one learned row per layer (`bos_embedding`) in front of the memory.
        drop_memory_per_layer (`bool`, defaults to `True`):
            Draw the rows to drop independently for every layer (else one draw shared by all layers).
        add_decoder_lora (`bool`, defaults to `True`):
            Use a second LoRA adapter (`decoder_adapter`) for reading; injection uses `default`.
        lora_config (`dict`, *optional*):
            `r`, `lora_alpha`, `lora_dropout`, `target_modules` of the adapters, as in PEFT. `None`: no adapters.
        max_inject_length (`int`, defaults to 512):
            Longer injected text is split into chunks of this many tokens, injected in order.
        memory_write_rule (`str`, defaults to `"output"`):
            `"output"` stores the OUTPUT of layer `l` in layer `l`'s memory, as the released checkpoints do.
            `"input"` stores layer `l`'s own INPUT, which makes the memory a compressed KV cache of the injected
            text that an untrained backbone can read (the training-free mode).
    """

    model_type = "memoryllm"

    num_tokens: int = 256
    num_blocks: int = 50
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = True
    add_decoder_lora: bool = True
    lora_config: dict | None = None
    max_inject_length: int = 512
    memory_write_rule: str = "output"

    def __post_init__(self, **kwargs):
        # Stored by the released config but derived (num_tokens * num_blocks): never kept twice.
        kwargs.pop("num_memory_tokens", None)
        super().__post_init__(**kwargs)
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"num_tokens and num_blocks must be >= 1, got {self.num_tokens}, {self.num_blocks}")
        if self.memory_write_rule not in WRITE_RULES:
            raise ValueError(f"memory_write_rule must be one of {WRITE_RULES}, got {self.memory_write_rule!r}")
        if self.max_inject_length < 1:
            raise ValueError(f"max_inject_length must be >= 1, got {self.max_inject_length}")

    @property
    def memory_rows(self) -> int:
        """Rows per layer in the memory pool, `M = num_tokens * num_blocks`."""
        return self.num_tokens * self.num_blocks

    @property
    def prefix_length(self) -> int:
        """Rows that the memory adds in front of every query: the bos row (if any) plus the memory."""
        return int(self.add_bos_embedding) + self.memory_rows

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """LoRA adapters of every target module: `default` (injection), plus `decoder_adapter` when enabled."""
        if self.lora_config is None:
            return ()
        return ("default", "decoder_adapter") if self.add_decoder_lora else ("default",)

    @property
    def injection_adapter(self) -> str | None:
        return "default" if self.lora_config is not None else None

    @property
    def generation_adapter(self) -> str | None:
        if self.lora_config is None:
            return None
        return "decoder_adapter" if self.add_decoder_lora else "default"


__all__ = ["MemoryLLMConfig"]
