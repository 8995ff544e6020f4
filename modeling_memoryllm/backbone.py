"""Backbone conversion: any Llama-family causal LM (loaded, folder, Hub id or `.gguf`) becomes a MemoryLLM."""

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .configuration_memoryllm import MemoryLLMConfig
from .variants import TrainingFree, canonical_name


logger = logging.get_logger(__name__)

# LoRA used by `from_backbone` unless told otherwise: rank 8 on the projections the released models adapt.
DEFAULT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}
# Backbone config keys that do not carry over to a MemoryLLM config.
BACKBONE_ONLY_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}


def from_backbone(
    cls,
    backbone,
    *,
    num_tokens: int = 256,
    num_blocks: int = 8,
    memory_variant: str = "training-free",
    lora_config: dict | None = DEFAULT_LORA,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    **memory_options,
) -> PreTrainedModel:
    """
    Turn a Llama-family causal LM into a MemoryLLM with an empty memory and fresh (no-op) LoRA adapters.

    `backbone`: a loaded model, a transformers folder or Hub id, or a `.gguf` file (dequantized on load).
    The default `memory_variant="training-free"` needs no training; use `"memoryllm-8b"` (the released rule) to
    train adapters. Each layer's `bos_embedding` starts as the backbone's hidden state of its BOS token
    at that layer, so the prefix `[bos, memory]` reads like a real KV cache that starts with BOS.
    Other keyword arguments are `MemoryLLMConfig` memory options (e.g. `max_inject_length`).
    """
    backbone, source = _load_backbone(backbone, dtype)
    _warn_if_released_memoryllm(backbone)
    explicit = {"num_tokens", "num_blocks", "memory_variant", "memory_write_rule", "lora_config", *memory_options}
    options = {k: v for k, v in backbone.config.to_dict().items() if k not in BACKBONE_ONLY_KEYS | explicit}
    variant = canonical_name(memory_options.pop("memory_write_rule", None) or memory_variant)  # legacy name first
    memory_options.setdefault("max_inject_length", num_tokens if variant == TrainingFree.name else 512)
    config = MemoryLLMConfig(
        **options,
        num_tokens=num_tokens,
        num_blocks=num_blocks,
        memory_variant=variant,
        lora_config=lora_config,
        **memory_options,
    )
    model = cls(config).to(dtype=backbone.dtype, device=backbone.device)
    copy_backbone_weights(model, backbone)
    model.eval()
    if tokenizer is None and source is not None:
        tokenizer = _load_backbone_tokenizer(source)
    model.tokenizer = tokenizer
    return model


@torch.no_grad()
def copy_backbone_weights(model, backbone: PreTrainedModel) -> None:
    """Copy `backbone`'s weights into the MemoryLLM `model`; bos rows from the backbone's BOS hidden states."""
    own = model.state_dict()
    weights = {}
    for name, tensor in backbone.state_dict().items():
        lora_name = name.replace(".weight", ".base_layer.weight")
        target = name if name in own else lora_name if lora_name in own else None
        if target is None:
            raise ValueError(f"Backbone weight {name!r} has no place in a MemoryLLM: is it a Llama model?")
        weights[target] = tensor
    missing = [k for k in own if k not in weights and not _is_memory_parameter(k)]
    if missing and not (model.config.tie_word_embeddings and missing == ["lm_head.weight"]):
        raise ValueError(f"The backbone lacks weights: {missing[:5]}")
    model.load_state_dict(weights, strict=False)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    bos_id = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    if model.bos_embedding is not None:
        hidden = backbone(torch.tensor([[bos_id]], device=backbone.device), output_hidden_states=True)
        model.bos_embedding.copy_(torch.stack([h[0] for h in hidden.hidden_states[:-1]]))  # inputs of layers
    model.memory_state.reset()


def _warn_if_released_memoryllm(backbone) -> None:
    """A released MemoryLLM-8B or M+ repository says `model_type: "llama"`: `AutoModelForCausalLM` builds a stock
    Llama from it and drops the memory. Wrapping that in a new memory is almost never what the user wants."""
    config = backbone.config
    released = {"MemoryLLM", "MPlus"} & set(config.architectures or ())
    if released or hasattr(config, "num_ltm_blocks") or hasattr(config, "num_blocks"):
        logger.warning(
            "This backbone is a released MemoryLLM checkpoint loaded as a plain Llama, so its trained memory and "
            "adapters were dropped. Load it with MemoryLLMForCausalLM.from_pretrained(path) or "
            "modeling_memoryllm.hub.load_released(name) instead."
        )


def _is_memory_parameter(name: str) -> bool:
    """Parameters a backbone does not have: memory, bos rows, `e`, the flag, and LoRA adapters."""
    top = name in ("memory", "bos_embedding", "new_memory_positional_emb", "initialized")
    return top or ".lora_A." in name or ".lora_B." in name


def _load_backbone(backbone, dtype):
    """A loaded backbone and where it came from (for its tokenizer)."""
    if isinstance(backbone, PreTrainedModel):
        return (backbone.to(dtype) if dtype else backbone), backbone.name_or_path or None
    source = os.fspath(backbone)
    kwargs = {"dtype": dtype} if dtype else {}
    if source.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(source))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model.eval(), source


def _load_backbone_tokenizer(source: str):
    try:
        if source.endswith(".gguf"):
            folder, name = os.path.split(os.path.abspath(source))
            return AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        logger.warning("No tokenizer found for %s: set `model.tokenizer` before injecting strings.", source)
        return None


__all__ = ["DEFAULT_LORA", "copy_backbone_weights", "from_backbone"]
