"""
MemoryLLM (Wang et al., ICML 2024) on transformers' Llama classes.

Every layer `l` reads a memory pool `memory[l]` (`M` rows) as a KV-cache prefix `[bos_l, memory[l]]`, so eager,
sdpa and flash attention, padded batches and `generate` work unchanged. Injecting text runs the injection adapter
over `[bos_l, last N memory rows, text]` and writes `N` new rows per layer, dropping as many old ones at random.

This file is the model's shape only. The pieces it delegates to:
`variants.py` (the rules of each family member), `injection.py` (the injection pass, chunking, batching),
`cache_memoryllm.py` (prefix key/values, the cache that holds them, positions and masks), `memory_state.py`
(the memory as explicit state), `validation.py` (input checks), `backbone.py` (`from_backbone`), `lora.py`.
"""

import inspect
import os
import shutil

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, initialization
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .attention_memoryllm import use_prefix_attention
from .backbone import from_backbone
from .cache_memoryllm import (
    cache_with_prefix,
    checkpointed,
    position_shift_of,
    prefix_of,
    prefixed_mask,
    text_positions,
)
from .configuration_memoryllm import MemoryLLMConfig
from .export_memoryllm import memory_prefix, merged_reading_model
from .generation_memoryllm import MemoryGenerationMixin
from .injection import PendingState, inject_chunks, injection_pass
from .lora import LoraLinear, active_adapter, keeping_adapter
from .memory_state import EMPTY_ROWS, MemoryState
from .validation import batch_states, check_input_ids, check_text_mask, chunked, injection_states, token_lists
from .variants import get_variant


# transformers >= 5.24 names the cache argument `cache`; earlier 5.x releases name it `past_key_values`.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# The package's files that a `trust_remote_code` folder needs (`save_pretrained` copies them).
REMOTE_CODE_FILES = (
    "configuration_memoryllm.py",
    "modeling_memoryllm.py",
    "memory_state.py",
    "cache_memoryllm.py",
    "generation_memoryllm.py",
    "export_memoryllm.py",
    "variants.py",
    "variant_memoryllm7b.py",
    "variant_mplus.py",
    "memory_state_mplus.py",
    "variant_ranked.py",
    "memory_state_ranked.py",
    "injection.py",
    "attention_memoryllm.py",
    "validation.py",
    "backbone.py",
    "lora.py",
)


class MemoryLLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MemoryLLMConfig
    config: MemoryLLMConfig
    _can_compile_fullgraph = False
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        role = getattr(module, "lora_role", None)
        if role == "B":  # before the generic Linear init, which would mark the weight initialised
            initialization.zeros_(module.weight)
        elif role == "A":
            initialization.kaiming_uniform_(module.weight, a=5**0.5)
        else:
            super()._init_weights(module)
        if isinstance(module, MemoryLLMForCausalLM):
            std = self.config.initializer_range
            initialization.normal_(module.memory, mean=0.0, std=std)
            initialization.zeros_(module.new_memory_positional_emb)
            if module.bos_embedding is not None:
                initialization.normal_(module.bos_embedding, mean=0.0, std=std)
            initialization.zeros_(module.initialized)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        """transformers' switch, with a checkpoint function that recomputes a layer under the adapter it ran with."""
        self._reentrant_checkpointing = bool(getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"))
        super()._set_gradient_checkpointing(enable, keeping_adapter(gradient_checkpointing_func), **kwargs)


class MemoryLLMModel(MemoryLLMPreTrainedModel, LlamaModel):
    """`LlamaModel` whose LoRA target projections are `LoraLinear` modules (PEFT's names, so released weights load)."""

    config_class = MemoryLLMConfig

    def __init__(self, config: MemoryLLMConfig):
        super().__init__(config)
        use_prefix_attention(self)
        if config.lora_config is not None:
            self._add_lora(config)
            self.post_init()
        for layer in self.layers:  # under gradient checkpointing the model passes only read-only prefix caches
            layer._can_checkpoint_with_cache = True

    def _add_lora(self, config: MemoryLLMConfig) -> None:
        targets = set(config.lora_config["target_modules"])
        for layer in self.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if name in targets and isinstance(child, nn.Linear):
                        lora = LoraLinear(child, config.adapter_names, config.lora_config, config.generation_adapter)
                        setattr(parent, name, lora)


# Config key of the rows of the model's own memory never written (`[[start, stop], ...]`, the same in every layer).
UNWRITTEN_ROWS = "memory_unwritten_rows"


def unwritten_ranges(state: MemoryState) -> list[list[int]] | None:
    """`[[start, stop], ...]`: the runs of rows of `state` never written (`None`: every row holds something)."""
    written = state.written_rows()
    if written is None or not state.initialized:
        return None
    flags = [False, *(not w for w in written.tolist()), False]
    edges = [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]]
    return [[edges[i] - 1, edges[i + 1] - 1] for i in range(0, len(edges), 2)]


def mark_unwritten(state: MemoryState, ranges: list[list[int]] | None) -> None:
    """Mark the rows in `ranges` (see `unwritten_ranges`) of an initialised `state` as never written."""
    if state.initialized:
        for start, stop in ranges or ():
            state.provenance[:, start:stop] = EMPTY_ROWS


def pop_cache_argument(kwargs: dict):
    """The cache, whichever name it was passed under (`cache` or `past_key_values`)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


# A little over 200 lines: it is the whole public API (reading, injection, tokenizer, saving), each method a thin
# call into injection.py, cache_memoryllm.py, validation.py or backbone.py.
class MemoryLLMForCausalLM(MemoryGenerationMixin, MemoryLLMPreTrainedModel, LlamaForCausalLM):
    """
    A Llama causal LM with a memory pool per layer. `inject(text)` writes to the memory; `forward` and `generate`
    read it. Every call takes an optional `memory=` `MemoryState` (default: the model's own, `model.memory_state`).
    `AutoModel` maps to this class too, since the memory is only useful with a head that can generate.
    """

    cache_kwarg = CACHE_KWARG

    def __init__(self, config: MemoryLLMConfig):
        MemoryLLMPreTrainedModel.__init__(self, config)
        self.model = MemoryLLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        shape = (config.num_hidden_layers, config.memory_rows, config.hidden_size)
        self.memory = nn.Parameter(torch.zeros(shape), requires_grad=False)  # [L, M, d]
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, config.hidden_size))  # e, [1, 1, d]
        bos = torch.zeros(config.num_hidden_layers, 1, config.hidden_size) if config.add_bos_embedding else None
        self.bos_embedding = nn.Parameter(bos) if bos is not None else None  # [L, 1, d]
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8), persistent=True)
        self._own_memory_state: MemoryState | None = None
        self._tokenizer = None
        self.weights_version = 0  # bumped by train(): prefixes cached before training are stale
        self.variant.build(self)
        self._frozen_parameters = {name for name, param in self.named_parameters() if not param.requires_grad}
        self.post_init()

    @property
    def variant(self):
        """The memory rules of this model (`config.memory_variant`), from this file's own package (a remote-code
        config may come from another copy of it)."""
        return get_variant(self.config)

    # ----------------------------------------------------------------------------------------------- memory state
    @property
    def memory_state(self) -> MemoryState:
        """The model's own memory (the `memory` parameter and `initialized` buffer, updated in place)."""
        state = self._own_memory_state
        if state is None or not state.is_bound_to(self.memory, self.initialized):
            fresh = state is None
            state = self.variant.bind_state(self, like=state)
            if fresh:  # rows never written before `save_pretrained` (see there)
                mark_unwritten(state, getattr(self.config, UNWRITTEN_ROWS, None))
            self._own_memory_state = state
        return state

    def new_memory_state(self, device=None, dtype=None) -> MemoryState:
        """An empty, uninitialised memory for this model (by default on the memory parameter's device and dtype)."""
        state_class = self.variant.state_class
        return state_class.empty(self.config, device=device or self.memory.device, dtype=dtype or self.memory.dtype)

    def load_memory_state(self, path: str | os.PathLike, device=None) -> MemoryState:
        """Load a memory saved with `MemoryState.save`, checked against this model's config."""
        state_class = self.variant.state_class
        return state_class.load(path, config=self.config, device=device or self.memory.device, dtype=self.memory.dtype)

    def train(self, mode: bool = True):
        self.weights_version += 1
        return super().train(mode)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; the memory (and M+'s long-term memory) stays out of training, as in a
        model built with `from_backbone` (loading makes every floating-point parameter trainable)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for name, param in model.named_parameters():
            param.requires_grad_(param.requires_grad and name not in model._frozen_parameters)
        return loaded

    # ---------------------------------------------------------------------------------------------------- reading
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        memory: MemoryState | list[MemoryState] | None = None,
        **kwargs,
    ):
        r"""
        A Llama forward that reads the memory as a KV prefix `[bos, memory]` (positions `0..P-1`; the text follows).

        `attention_mask` covers the text tokens only (left padding is supported). `position_ids` are recomputed
        from the mask and the prefix, as in the released model. `memory`: a `MemoryState` for every row, or one
        per row; default `model.memory_state`. An uninitialised memory is not read (plain Llama + read adapter).
        """
        cache = pop_cache_argument(kwargs)
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch_size, query_length = tokens.shape[:2]
        states = batch_states(memory, self.memory_state, batch_size, self.config, mixed=True)
        read_only = checkpointed(self, states)
        with active_adapter(self.config.generation_adapter):
            cache, prefix_length = cache_with_prefix(
                self,
                cache,
                states,
                batch_size,
                attention_mask,
                read_only,
                use_cache is not False,
                query=(input_ids, inputs_embeds),
            )
            past_length = cache.physical_length() if cache is not None else 0
            positions = text_positions(attention_mask, past_length, prefix_length, query_length, tokens.device)
            shift = position_shift_of(cache)
            if shift is not None:  # the rows the query chose sit right before it
                positions = positions - shift.to(positions.device)[:, None]
            text_length = past_length - prefix_length + query_length
            check_text_mask(attention_mask, text_length)
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=prefixed_mask(attention_mask, prefix_of(cache), batch_size, text_length),
                position_ids=positions,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=cache is not None and not read_only,
                logits_to_keep=logits_to_keep,
                **{CACHE_KWARG: cache},
                **kwargs,
            )
        if use_cache is False or read_only:  # no cache in the output (not even a key that is None)
            outputs = type(outputs)(**{key: value for key, value in outputs.items() if key != CACHE_KWARG})
        return outputs

    # -------------------------------------------------------------------------------------------------- injection
    def compute_delta(
        self,
        input_ids: torch.LongTensor,
        memory: MemoryState | list[MemoryState] | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        output_logits: bool = False,
    ):
        """
        The rows an injection of `input_ids` `[B, T]` would write, `[B, L, n, d]` (`n = N`, or `min(N, T)` into an
        uninitialised memory), without updating anything. With `output_logits`, also the LM logits `[B, T, V]` of
        the injection pass. `attention_mask` allows left padding when every row has at least `N` tokens.
        """
        check_input_ids(input_ids, self.config.vocab_size)
        input_ids = input_ids.to(self.model.embed_tokens.weight.device)
        states = batch_states(memory, self.memory_state, input_ids.shape[0], self.config)
        if attention_mask is not None and not bool(attention_mask.all()):
            if int(attention_mask.sum(-1).min()) < self.config.num_tokens:
                raise ValueError(f"Padded injection needs at least num_tokens={self.config.num_tokens} per row.")
        delta, hidden = injection_pass(self, input_ids, states, attention_mask, text_rows=output_logits)
        if output_logits:
            return delta, self.lm_head(self.model.norm(hidden)).float()
        return delta

    def inject(self, inputs, memory=None, *, generator: torch.Generator | None = None, show_progress=None):
        """
        Write `inputs` into the memory and return the updated state (a list of states for a list of `memory`).

        `inputs`: a string, a list of strings, or token ids (`list[int]`, `list[list[int]]`, 1-D or 2-D tensor).
        Strings use `model.tokenizer` (no special tokens). Text longer than `config.max_inject_length` tokens is
        injected chunk by chunk, in order. With one state, several inputs are injected one after the other; with
        `memory=[s1, s2, ...]`, input `i` goes into state `i` and the inputs run batched. `generator` drives the
        random drop (default: torch's global generator); a list gives one generator per state, which makes a
        batched injection equal to injecting each input alone. On any error no state changes.
        """
        multiple = isinstance(memory, (list, tuple))
        states = list(memory) if multiple else [memory if memory is not None else self.memory_state]
        with torch.no_grad():
            pending = self._injected_states(inputs, states, multiple, generator, show_progress)
            for result in pending:  # the commit: every new row is computed by now
                result.commit()
        return states if multiple else states[0]

    def injected(self, inputs, memory=None, *, generator: torch.Generator | None = None):
        """
        Like `inject`, but returns NEW states and leaves `memory` unchanged. Under autograd (training), the new
        rows stay connected to the graph, so a loss on a later read trains the injection (adapters, `e`, bos).
        """
        multiple = isinstance(memory, (list, tuple))
        states = list(memory) if multiple else [memory if memory is not None else self.memory_state]
        updated = [result.result() for result in self._injected_states(inputs, states, multiple, generator, False)]
        return updated if multiple else updated[0]

    def _injected_states(self, inputs, states, multiple: bool, generator, show_progress) -> list[PendingState]:
        items = token_lists(inputs, self._tokenize, self.config.vocab_size)
        chunks = chunked(items, self.config.max_inject_length, self.variant.trained_on_long_texts)
        chunks = injection_states(chunks, states, multiple, self.config)
        return inject_chunks(self, chunks, states, generator, show_progress)

    # ----------------------------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        """The tokenizer for string inputs: loaded from the checkpoint on first use, or set by the user."""
        if self._tokenizer is None:
            source = self.config._name_or_path or getattr(self, "name_or_path", "")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"No tokenizer found for {source!r}: set `model.tokenizer = ...` or pass token ids."
                ) from error
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------------------------- backbones, saving, export
    from_backbone = classmethod(from_backbone)

    merged_reading_model = merged_reading_model  # a plain Llama with the reading adapter merged (export_memoryllm.py)
    memory_prefix = memory_prefix  # the prefix keys/values a memory puts in front of every query, for that Llama

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the remote-code files and an `auto_map` for `trust_remote_code`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_memoryllm.MemoryLLMConfig",
            "AutoModel": "modeling_memoryllm.MemoryLLMForCausalLM",
            "AutoModelForCausalLM": "modeling_memoryllm.MemoryLLMForCausalLM",
        }
        self.config.architectures = [type(self).__name__]
        if self._own_memory_state is not None:  # the model's own never-written rows, which the weights cannot say
            setattr(self.config, UNWRITTEN_ROWS, unwritten_ranges(self._own_memory_state))
        result = super().save_pretrained(save_directory, *args, **kwargs)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
        return result


__all__ = ["MemoryLLMForCausalLM", "MemoryLLMModel", "MemoryLLMPreTrainedModel"]
