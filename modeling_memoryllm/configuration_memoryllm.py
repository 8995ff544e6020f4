"""Configuration of MemoryLLM: a Llama plus a fixed-size memory pool per layer."""

from transformers import LlamaConfig


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
        memory_variant (`str`, *optional*):
            The family member whose memory rules apply (see `variants.py`): `"memoryllm-8b"` (the released 8B /
            8B-chat: layer `l` stores its OUTPUT in layer `l`'s memory), `"training-free"` (layer `l` stores its own
            INPUT rows, so the memory is a compressed KV cache of the text that an untrained backbone reads),
            `"memoryllm-7b"` (the paper's 7B). The legacy `memory_write_rule` names `"output"` and `"input"` are
            read as `"memoryllm-8b"` and `"training-free"`. When absent, a released config is recognised by its
            keys (e.g. the 7B's `interpolate_position_ids`), else it is `"memoryllm-8b"`.
    """

    model_type = "memoryllm"

    num_tokens: int = 256
    num_blocks: int = 50
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = True
    add_decoder_lora: bool = True
    lora_config: dict | None = None
    max_inject_length: int = 512
    memory_variant: str | None = None

    def __post_init__(self, **kwargs):
        from .variants import canonical_name, get_variant, recognise_released

        # Stored by the released config but derived (num_tokens * num_blocks): never kept twice.
        kwargs.pop("num_memory_tokens", None)
        legacy_rule = kwargs.pop("memory_write_rule", None)
        raw = {**kwargs, "lora_config": self.lora_config}
        self.memory_variant = canonical_name(self.memory_variant or legacy_rule or recognise_released(raw))
        super().__post_init__(**kwargs)
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"num_tokens and num_blocks must be >= 1, got {self.num_tokens}, {self.num_blocks}")
        if self.max_inject_length < 1:
            raise ValueError(f"max_inject_length must be >= 1, got {self.max_inject_length}")
        get_variant(self).adapt_config(self)

    @property
    def variant(self):
        """The rules of `memory_variant` (a `variants.MemoryVariant` for this config)."""
        from .variants import get_variant

        return get_variant(self)

    @property
    def memory_rows(self) -> int:
        """Rows per layer in the memory that is read whole (`M = num_tokens * num_blocks` for MemoryLLM)."""
        return self.variant.memory_rows(self)

    @property
    def prefix_length(self) -> int:
        """Rows that the memory adds in front of every query: the bos row (if any) plus the memory."""
        return self.variant.prefix_length(self)

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
