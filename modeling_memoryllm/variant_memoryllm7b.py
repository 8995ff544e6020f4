"""
The paper's MemoryLLM-7B (Llama-2-7B, `YuWangX/memoryllm-7b`; SEMANTICS-7B.md) as a memory variant.

It is the 8B rule with these differences:
- no adapters (plain `<module>.weight` everywhere; a released 7B config has no `lora_config`);
- one drop shared by all layers, whatever `drop_memory_per_layer` says;
- the first injection into an empty memory adds no `e` and aliases nothing;
- RoPE base 10000 whatever `rope_theta` says, and, with `interpolate_position_ids` and no `rope_scaling`, position
  interpolation `s = Lmax / max(Lmax, (K+1)·N)`, which is linear RoPE scaling with factor `1/s` (1.9375 for the
  real 7B). `rope_scaling` of type linear wins over the interpolation, as in the original.

Where the original crashes or refuses, this variant does what a user wants instead: GQA and sdpa/eager/flash all
run; masks cover the text only (the original wants `ones(M + T)` and crashes without it); `generate` works without
a mask and without bos.
"""

from typing import ClassVar

from .variants import MemoryLLM8B, register_variant


ROPE_BASE = 10000.0


@register_variant
class MemoryLLM7B(MemoryLLM8B):
    name = "memoryllm-7b"
    first_write_adds_embedding: ClassVar[bool] = False

    @classmethod
    def recognises(cls, raw: dict) -> bool:
        """The released 7B config: `interpolate_position_ids` present and no adapters."""
        return "interpolate_position_ids" in raw and raw.get("lora_config") is None

    @classmethod
    def drops_per_layer(cls, config) -> bool:
        return False

    @classmethod
    def adapt_config(cls, config) -> None:
        """RoPE base 10000, and the position interpolation as linear RoPE scaling."""
        rope = dict(config.rope_parameters or {})
        scaling = rope.get("rope_type", rope.get("type", "default"))
        if scaling == "default" and getattr(config, "interpolate_position_ids", False):
            span = (config.num_blocks + 1) * config.num_tokens
            factor = max(config.max_position_embeddings, span) / config.max_position_embeddings
            if factor > 1:
                rope.update(rope_type="linear", factor=factor)
        rope["rope_theta"] = ROPE_BASE
        config.rope_parameters = rope


__all__ = ["MemoryLLM7B"]
