"""
MemoryLLM (Wang et al., ICML 2024) on transformers' Llama classes.

Every layer `l` reads a memory pool `memory[l]` (`M` rows) as a KV-cache prefix `[bos_l, memory[l]]`, so eager,
sdpa and flash attention, padded batches and `generate` work unchanged. Injecting text runs the injection adapter
over `[bos_l, last N memory rows, text]` and writes `N` new rows per layer, dropping as many old ones at random.
"""

import inspect
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, initialization
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, rotate_half
from transformers.utils import logging

from .cache_memoryllm import MemoryPrefixCache, SharedPrefix, written_mask
from .configuration_memoryllm import MemoryLLMConfig
from .memory_state import MemoryState, MemoryUpdate, compute_update


logger = logging.get_logger(__name__)

# transformers >= 5.24 names the cache argument `cache`; earlier 5.x releases name it `past_key_values`.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
# Injected text shorter than this is allowed but disturbs the memory: the released models were trained on >= 16.
MIN_TRAINED_TOKENS = 16
# Progress bars are shown for injections of more chunks than this.
PROGRESS_MIN_CHUNKS = 4
REMOTE_CODE_FILES = (
    "configuration_memoryllm.py",
    "modeling_memoryllm.py",
    "memory_state.py",
    "cache_memoryllm.py",
)

# LoRA used by `from_backbone` unless told otherwise: rank 8 on the projections the released models adapt.
DEFAULT_LORA = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}
# Backbone config keys that do not carry over to a MemoryLLM config.
BACKBONE_ONLY_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}

_ACTIVE_ADAPTER: ContextVar[str | None] = ContextVar("memoryllm_active_adapter", default=None)


@contextmanager
def active_adapter(name: str | None) -> Iterator[None]:
    """Run the enclosed calls with LoRA adapter `name` (thread- and task-local; restored on exit)."""
    token = _ACTIVE_ADAPTER.set(name)
    try:
        yield
    finally:
        _ACTIVE_ADAPTER.reset(token)


class LoraLinear(nn.Module):
    """
    A linear layer with named LoRA adapters, in PEFT's state-dict layout (`base_layer`, `lora_A.<name>`,
    `lora_B.<name>`): `y = base(x) + (alpha / r) * B(A(dropout(x)))` for the one active adapter.
    The active adapter is not module state: it comes from `active_adapter(...)`, else `default_adapter`.
    """

    def __init__(self, base_layer: nn.Linear, adapter_names: Sequence[str], lora_config: dict, default_adapter: str):
        super().__init__()
        rank = lora_config["r"]
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({name: self._linear(base_layer.in_features, rank, "A") for name in adapter_names})
        self.lora_B = nn.ModuleDict({name: self._linear(rank, base_layer.out_features, "B") for name in adapter_names})
        dropout = lora_config.get("lora_dropout", 0.0) or 0.0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_config["lora_alpha"] / rank
        self.default_adapter = default_adapter

    def _linear(self, in_features: int, out_features: int, role: str) -> nn.Linear:
        weight = self.base_layer.weight
        linear = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        linear.lora_role = role  # read by `_init_weights`: B starts at zero so a fresh adapter changes nothing
        return linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(hidden)
        name = _ACTIVE_ADAPTER.get() or self.default_adapter
        if name in self.lora_A:
            lora_input = self.lora_dropout(hidden).to(self.lora_A[name].weight.dtype)
            output = output + (self.lora_B[name](self.lora_A[name](lora_input)) * self.scaling).to(output.dtype)
        return output


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


class MemoryLLMModel(MemoryLLMPreTrainedModel, LlamaModel):
    """`LlamaModel` whose LoRA target projections are `LoraLinear` modules (PEFT's names, so released weights load)."""

    config_class = MemoryLLMConfig

    def __init__(self, config: MemoryLLMConfig):
        super().__init__(config)
        if config.lora_config is not None:
            self._add_lora(config)
            self.post_init()

    def _add_lora(self, config: MemoryLLMConfig) -> None:
        targets = set(config.lora_config["target_modules"])
        for layer in self.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if name in targets and isinstance(child, nn.Linear):
                        lora = LoraLinear(child, config.adapter_names, config.lora_config, config.generation_adapter)
                        setattr(parent, name, lora)


def layer_key_values(layer: nn.Module, rows: torch.Tensor, rotary_emb: nn.Module):
    """
    Keys and values that decoder `layer` caches for prefix `rows` `[B, P, d]` at positions `0..P-1`:
    input norm, k/v projections (active adapter), RoPE on the keys. Returns two `[B, Hkv, P, hd]` tensors.
    """
    attention = layer.self_attn
    hidden = layer.input_layernorm(rows)
    shape = (*rows.shape[:2], -1, attention.head_dim)
    keys = attention.k_proj(hidden).view(shape).transpose(1, 2)
    values = attention.v_proj(hidden).view(shape).transpose(1, 2)
    positions = torch.arange(rows.shape[1], device=rows.device).unsqueeze(0)
    cos, sin = rotary_emb(hidden, positions)  # [1, P, hd]
    keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
    return keys, values


def text_positions(attention_mask, past_length: int, prefix_length: int, query_length: int, device) -> torch.Tensor:
    """Positions `[B or 1, q]` of the new text rows: after the prefix, counting only unpadded text tokens."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device).unsqueeze(0)
    counted = attention_mask.long().cumsum(-1) - 1  # [B, T_total]
    return prefix_length + counted[:, -query_length:].clamp(min=0)


def prefixed_mask(attention_mask, cache, batch_size: int, text_length: int):
    """
    The key mask `[B, P + T]` for a text mask `[B, T]` (or `None`: no padding) and a cache that may start with a
    memory prefix of `P` rows, some of which may be never-written rows that are not read. `None` when every key
    is visible (then the attention needs no explicit mask).
    """
    prefix_length = getattr(cache, "memory_prefix_length", 0) if cache is not None else 0
    written = getattr(cache, "memory_prefix_written", None) if cache is not None else None
    text_padded = attention_mask is not None and not bool(attention_mask.all())
    if written is None and not text_padded:
        return None
    device = attention_mask.device if attention_mask is not None else written.device
    text = attention_mask if attention_mask is not None else torch.ones(batch_size, text_length, device=device)
    prefix = written if written is not None else torch.ones(batch_size, prefix_length, dtype=torch.bool)
    return torch.cat([prefix.to(device=text.device, dtype=text.dtype).expand(batch_size, -1), text], dim=1)


def pop_cache_argument(kwargs: dict) -> Cache | None:
    """The cache, whichever name it was passed under (`cache` or `past_key_values`)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class MemoryLLMForCausalLM(MemoryLLMPreTrainedModel, LlamaForCausalLM):
    """
    A Llama causal LM with a memory pool per layer. `inject(text)` writes to the memory; `forward` and `generate`
    read it. Every call takes an optional `memory=` `MemoryState` (default: the model's own, `model.memory_state`).
    `AutoModel` maps to this class too, since the memory is only useful with a head that can generate.
    """

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
        self._prefix_epoch = 0  # bumped by train(): prefixes cached before training are stale
        self.post_init()

    # ----------------------------------------------------------------------------------------------- memory state
    @property
    def memory_state(self) -> MemoryState:
        """The model's own memory (the `memory` parameter and `initialized` buffer, updated in place)."""
        state = self._own_memory_state
        bound = (
            state is not None
            and state.memory.data_ptr() == self.memory.data_ptr()
            and state.memory.device == self.memory.device
            and state._initialized_flag is self.initialized
        )
        if not bound:
            provenance = state.provenance if state is not None else None
            injections = state.injections if state is not None else 0
            state = MemoryState(self.memory.data, self.initialized, provenance, injections)
            self._own_memory_state = state
        return state

    def new_memory_state(self, device=None, dtype=None) -> MemoryState:
        """An empty, uninitialised memory for this model (by default on the memory parameter's device and dtype)."""
        return MemoryState.empty(self.config, device=device or self.memory.device, dtype=dtype or self.memory.dtype)

    def load_memory_state(self, path: str | os.PathLike, device=None) -> MemoryState:
        """Load a memory saved with `MemoryState.save`, checked against this model's config."""
        return MemoryState.load(path, config=self.config, device=device or self.memory.device, dtype=self.memory.dtype)

    def train(self, mode: bool = True):
        self._prefix_epoch += 1
        return super().train(mode)

    def _states(self, memory, batch_size: int) -> list[MemoryState]:
        """One state for the whole batch, or one per row; all initialised or all not."""
        if memory is None:
            states = [self.memory_state]
        elif isinstance(memory, MemoryState):
            states = [memory]
        elif isinstance(memory, (list, tuple)) and all(isinstance(s, MemoryState) for s in memory):
            states = list(memory)
            if len(states) not in (1, batch_size):
                raise ValueError(f"Got {len(states)} memory states for a batch of {batch_size} rows.")
        else:
            raise ValueError(f"memory must be a MemoryState or a list of them, got {type(memory).__name__}.")
        for state in states:
            self._check_state(state)
        if len({s.initialized for s in states}) > 1:
            raise ValueError("Memory states in one batch must be all initialised or all uninitialised.")
        return states

    def _check_state(self, state: MemoryState) -> None:
        if not isinstance(state, MemoryState):
            raise ValueError(f"memory must be a MemoryState or a list of them, got {type(state).__name__}.")
        expected = (self.config.num_hidden_layers, self.config.memory_rows, self.config.hidden_size)
        if tuple(state.memory.shape) != expected:
            raise ValueError(f"A memory of shape {tuple(state.memory.shape)} does not fit this model {expected}.")

    # ------------------------------------------------------------------------------------------- prefix key/values
    def _prefix_key_values(self, memory: torch.Tensor, rows: slice, adapter: str | None):
        """Per layer, keys/values `[1, Hkv, P, hd]` of `[bos_l, memory[l, rows]]` at positions `0..P-1`."""
        keys, values = [], []
        with active_adapter(adapter):
            for idx, layer in enumerate(self.model.layers):
                weight = layer.input_layernorm.weight
                prefix = memory[idx, rows].to(device=weight.device, dtype=weight.dtype)  # [R, d]
                if self.bos_embedding is not None:
                    prefix = torch.cat([self.bos_embedding[idx].to(prefix.device, prefix.dtype), prefix])
                layer_keys, layer_values = layer_key_values(layer, prefix.unsqueeze(0), self.model.rotary_emb)
                keys.append(layer_keys)
                values.append(layer_values)
        return keys, values

    def _reading_prefix(self, state: MemoryState) -> SharedPrefix:
        """The prefix that forward/generate read, computed once per memory version (outside training)."""
        weight = self.model.embed_tokens.weight
        adapter = self.config.generation_adapter
        key = (id(self), self._prefix_epoch, state.version, weight.device, weight.dtype, adapter)
        cached = state._prefix_cache
        if not self.training and cached is not None and cached.key == key:
            return cached
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            keys, values = self._prefix_key_values(state.memory, slice(None), adapter)
        prefix = SharedPrefix(key, keys, values, written=self._written_prefix_rows(state, slice(None)))
        if not self.training:
            state._prefix_cache = prefix
        return prefix

    def _written_prefix_rows(self, state: MemoryState, rows: slice) -> torch.Tensor | None:
        """`[P]` bool: the bos row and the `rows` of memory that were written; `None` when all were."""
        written = state.written_rows(rows)
        if written is None or self.bos_embedding is None:
            return written
        return torch.cat([torch.ones(1, dtype=torch.bool), written])

    def _cache_with_prefix(self, cache, states: list[MemoryState], batch_size: int):
        """The cache to run with, holding the memory prefix when the memory is read; and the prefix length."""
        if cache is not None and cache.get_seq_length() > 0:
            return cache, getattr(cache, "memory_prefix_length", 0)  # continuing: the prefix is already inside
        if not states[0].initialized:
            return cache, 0
        prefixes = [self._reading_prefix(state) for state in states]
        if cache is None or isinstance(cache, MemoryPrefixCache):
            cache = cache if cache is not None else MemoryPrefixCache()
            cache.attach_prefix(prefixes, batch_size)
            return cache, cache.memory_prefix_length
        for idx in range(self.config.num_hidden_layers):  # a cache of another type: fill it (one copy)
            keys = torch.cat([p.layer(idx)[0] for p in prefixes]).expand(batch_size, -1, -1, -1)
            values = torch.cat([p.layer(idx)[1] for p in prefixes]).expand(batch_size, -1, -1, -1)
            cache.update(keys, values, idx)
        cache.memory_prefix_length = prefixes[0].length
        cache.memory_prefix_written = written_mask(prefixes, batch_size)
        return cache, prefixes[0].length

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
        states = self._states(memory, batch_size)
        with active_adapter(self.config.generation_adapter):
            cache, prefix_length = self._cache_with_prefix(cache, states, batch_size)
            past_length = cache.get_seq_length() if cache is not None else 0
            positions = text_positions(attention_mask, past_length, prefix_length, query_length, tokens.device)
            text_length = past_length - prefix_length + query_length
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=prefixed_mask(attention_mask, cache, batch_size, text_length),
                position_ids=positions,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=True if cache is not None else use_cache,
                logits_to_keep=logits_to_keep,
                **{CACHE_KWARG: cache},
                **kwargs,
            )
        if use_cache is False:
            setattr(outputs, CACHE_KWARG, None)
        return outputs

    def generate(self, inputs: torch.Tensor | None = None, memory=None, **kwargs):
        """`GenerationMixin.generate`, reading `memory` (default: the model's own) through a prefix cache."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            self._token_lists(ids)  # clear errors for float, out-of-vocabulary or meta-device ids
        if pop_cache_argument(dict(kwargs)) is None and kwargs.get("use_cache", True):
            kwargs[CACHE_KWARG] = MemoryPrefixCache()
        return super().generate(inputs, memory=memory, **kwargs)

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
        input_ids = self._check_ids(input_ids)
        states = self._states(memory, input_ids.shape[0])
        if attention_mask is not None and not bool(attention_mask.all()):
            if int(attention_mask.sum(-1).min()) < self.config.num_tokens:
                raise ValueError(f"Padded injection needs at least num_tokens={self.config.num_tokens} per row.")
        delta, hidden = self._injection_pass(input_ids, states, attention_mask)
        if output_logits:
            return delta, self.lm_head(self.model.norm(hidden)).float()
        return delta

    def _injection_pass(self, input_ids, states: list[MemoryState], attention_mask=None):
        """Delta `[B, L, n, d]` and the last layer's text rows `[B, T, d]` of one injection pass."""
        config, (batch_size, length) = self.config, input_ids.shape
        initialized = states[0].initialized
        # The released rule always writes N rows: with short text, the last memory rows act as queries too.
        # The training-free rule writes the text's own rows only.
        released = initialized and config.memory_write_rule == "output"
        num_new = config.num_tokens if released else min(config.num_tokens, length)
        memory_queries = max(config.num_tokens - length, 0) if released else 0
        cache, prefix_length = None, 0
        if initialized:
            rows = slice(config.memory_rows - config.num_tokens, config.memory_rows - memory_queries)
            prefixes = [self._injection_prefix(s, rows, memory_queries + length) for s in states]
            cache = MemoryPrefixCache()
            cache.attach_prefix(prefixes, batch_size)
            prefix_length = cache.memory_prefix_length
        hidden = self.model.embed_tokens(input_ids)  # [B, T, d]
        query_length = memory_queries + length
        positions = text_positions(attention_mask, prefix_length, prefix_length, query_length, hidden.device)
        placeholder = hidden.new_empty(batch_size, query_length, 0)
        mask = create_causal_mask(
            config=config,
            inputs_embeds=placeholder,
            attention_mask=prefixed_mask(attention_mask, cache, batch_size, query_length),
            position_ids=positions,
            **{CACHE_KWARG: cache},
        )
        position_embeddings = self.model.rotary_emb(hidden, positions)
        deltas = []
        with active_adapter(config.injection_adapter):
            for idx, layer in enumerate(self.model.layers):
                queries = self._injection_queries(hidden, states, idx, memory_queries, num_new)
                outputs = layer(
                    queries,
                    attention_mask=mask,
                    position_ids=positions,
                    position_embeddings=position_embeddings,
                    use_cache=True,
                    **{CACHE_KWARG: cache},
                )
                deltas.append(self._written_rows(queries, outputs, idx, num_new, initialized))
                hidden = outputs[:, -length:]
        return torch.stack(deltas, dim=1), hidden

    def _injection_prefix(self, state: MemoryState, rows: slice, spare: int) -> SharedPrefix:
        keys, values = self._prefix_key_values(state.memory, rows, self.config.injection_adapter)
        return SharedPrefix(None, keys, values, spare=spare, written=self._written_prefix_rows(state, rows))

    def _injection_queries(self, hidden, states, idx: int, memory_queries: int, num_new: int) -> torch.Tensor:
        """Layer `idx`'s query rows `[B, S_q, d]`: memory rows that act as queries (short text), then the text;
        the new-memory positional vector `e` is added to the last `num_new` rows."""
        if memory_queries:
            rows = [s.memory[idx, -memory_queries:].to(hidden.device, hidden.dtype) for s in states]
            memory_rows = torch.stack(rows).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([memory_rows, hidden], dim=1)
        e = self.new_memory_positional_emb.to(hidden.dtype)  # [1, 1, d]
        return torch.cat([hidden[:, :-num_new], hidden[:, -num_new:] + e], dim=1)

    def _written_rows(self, queries, outputs, idx: int, num_new: int, initialized: bool) -> torch.Tensor:
        """The rows that layer `idx` writes to its memory, `[B, n, d]`, by `config.memory_write_rule`."""
        if self.config.memory_write_rule == "input":
            return queries[:, -num_new:]
        rows = outputs[:, -num_new:]
        if not initialized and idx < self.config.num_hidden_layers - 1:
            # Released behaviour: the stored delta aliases the next layer's input, which gets `e` added in place.
            rows = rows + self.new_memory_positional_emb.to(rows.dtype)
        return rows

    def inject(
        self,
        inputs,
        memory: MemoryState | list[MemoryState] | None = None,
        *,
        generator: torch.Generator | None = None,
        show_progress: bool | None = None,
    ):
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
            updated = self._injected_states(inputs, states, multiple, generator, show_progress)
        for state, new in zip(states, updated):
            if new is not state:
                state.commit(MemoryUpdate(new.memory, new.provenance), new.injections)
        return states if multiple else states[0]

    def injected(
        self,
        inputs,
        memory: MemoryState | list[MemoryState] | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        """
        Like `inject`, but returns NEW states and leaves `memory` unchanged. Under autograd (training), the new
        rows stay connected to the graph, so a loss on a later read trains the injection (adapters, `e`, bos).
        """
        multiple = isinstance(memory, (list, tuple))
        states = list(memory) if multiple else [memory if memory is not None else self.memory_state]
        updated = self._injected_states(inputs, states, multiple, generator, show_progress=False)
        return updated if multiple else updated[0]

    def _injected_states(self, inputs, states, multiple: bool, generator, show_progress) -> list[MemoryState]:
        token_chunks = self._token_chunks(inputs)
        if multiple and len(token_chunks) != len(states):
            raise ValueError(f"Got {len(token_chunks)} inputs for {len(states)} memory states.")
        if len({id(state) for state in states}) != len(states):
            raise ValueError("memory lists the same MemoryState more than once: inject into it in one call instead.")
        if not multiple:
            token_chunks = [[chunk for chunks in token_chunks for chunk in chunks]]
        for state in states:
            self._check_state(state)
        return self._inject_chunks(token_chunks, states, generator, show_progress)

    def _inject_chunks(self, token_chunks, states, generator, show_progress) -> list[MemoryState]:
        """Inject chunk `r` of every input in round `r`; returns new (uncommitted) states."""
        working = list(states)
        rounds = max(len(chunks) for chunks in token_chunks)
        total = sum(len(chunks) for chunks in token_chunks)
        show = total > PROGRESS_MIN_CHUNKS if show_progress is None else show_progress
        with logging.tqdm(total=total, desc="Injecting", unit="chunk", disable=not show) as progress:
            for round_idx in range(rounds):
                items = [(i, chunks[round_idx]) for i, chunks in enumerate(token_chunks) if round_idx < len(chunks)]
                for group in self._batches(items, working):
                    self._inject_group(group, working, generator)
                    progress.update(len(group))
        return working

    def _batches(self, items: list[tuple[int, list[int]]], working) -> list[list[tuple[int, list[int]]]]:
        """Group items that can share one padded forward: same initialisation, and either >= N tokens or the
        same length (short text uses memory rows as queries, whose count depends on the length)."""
        groups: dict[tuple, list] = {}
        for index, ids in items:
            short = len(ids) < self.config.num_tokens
            key = (working[index].initialized, len(ids) if short else -1)
            groups.setdefault(key, []).append((index, ids))
        return list(groups.values())

    def _inject_group(self, group, working: list[MemoryState], generator) -> None:
        device = self.model.embed_tokens.weight.device
        longest = max(len(ids) for _, ids in group)
        input_ids = torch.zeros(len(group), longest, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(group):  # left padding
            input_ids[row, longest - len(ids) :] = torch.tensor(ids, device=device)
            attention_mask[row, longest - len(ids) :] = 1
        states = [working[index] for index, _ in group]
        padded = bool((attention_mask == 0).any())  # only rows of >= N tokens are grouped with padding
        delta, _ = self._injection_pass(input_ids, states, attention_mask if padded else None)
        for row, (index, _) in enumerate(group):
            state = working[index]
            update = compute_update(
                state.memory,
                state.provenance,
                state.initialized,
                delta[row],
                state.injections + 1,
                self.config,
                generator[index] if isinstance(generator, (list, tuple)) else generator,
            )
            working[index] = MemoryState(update.memory, True, update.provenance, state.injections + 1)

    # ------------------------------------------------------------------------------------------ input validation
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

    def _token_chunks(self, inputs) -> list[list[list[int]]]:
        """Validated token ids: per input, its chunks of at most `max_inject_length` tokens."""
        items = self._token_lists(inputs)
        size = self.config.max_inject_length
        chunked = [[ids[i : i + size] for i in range(0, len(ids), size)] for ids in items]
        if any(len(chunk) < MIN_TRAINED_TOKENS for chunks in chunked for chunk in chunks):
            logger.warning(
                "Injecting fewer than %d tokens: the model was trained on longer text, so this mostly disturbs "
                "the memory.",
                MIN_TRAINED_TOKENS,
            )
        return chunked

    def _token_lists(self, inputs) -> list[list[int]]:
        if isinstance(inputs, str):
            return [self._tokenize(inputs)]
        if isinstance(inputs, torch.Tensor):
            if inputs.device.type == "meta":
                raise ValueError("Token ids must hold data: got a tensor on the meta device.")
            if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
                raise ValueError(f"Token ids must be integers, got a {inputs.dtype} tensor.")
            if inputs.dim() not in (1, 2):
                raise ValueError(f"Token ids must be 1-D or 2-D, got shape {tuple(inputs.shape)}.")
            rows = inputs.unsqueeze(0) if inputs.dim() == 1 else inputs
            return [self._checked_ids(row.tolist()) for row in rows]
        if isinstance(inputs, (list, tuple)) and inputs:
            if all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
                return [self._checked_ids(list(inputs))]
            return [ids for item in inputs for ids in self._token_lists(item)]
        raise ValueError(
            "inject() takes a string, a list of strings, or token ids (list of ints or an integer tensor); "
            f"got {type(inputs).__name__} {'(empty)' if isinstance(inputs, (list, tuple)) else ''}".rstrip()
        )

    def _tokenize(self, text: str) -> list[int]:
        if not text.strip():
            raise ValueError("Cannot inject empty or whitespace-only text.")
        return self._checked_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _checked_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("Cannot inject an empty sequence of token ids.")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("Token ids must be integers.")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"Token ids must be in [0, {self.config.vocab_size}); got {min(ids)}..{max(ids)}.")
        return ids

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a non-empty [batch, length] tensor of token ids.")
        self._token_lists(input_ids)
        return input_ids.to(self.model.embed_tokens.weight.device)

    # -------------------------------------------------------------------------------------------------- backbones
    @classmethod
    def from_backbone(
        cls,
        backbone,
        *,
        num_tokens: int = 256,
        num_blocks: int = 8,
        memory_write_rule: str = "input",
        lora_config: dict | None = DEFAULT_LORA,
        tokenizer=None,
        dtype: torch.dtype | None = None,
        **memory_options,
    ) -> "MemoryLLMForCausalLM":
        """
        Turn a Llama-family causal LM into a MemoryLLM with an empty memory and fresh (no-op) LoRA adapters.

        `backbone`: a loaded model, a transformers folder or Hub id, or a `.gguf` file (dequantized on load).
        The default `memory_write_rule="input"` is the training-free mode; use `"output"` (the released rule)
        to train adapters. Each layer's `bos_embedding` starts as the backbone's hidden state of its BOS token
        at that layer, so the prefix `[bos, memory]` reads like a real KV cache that starts with BOS.
        Other keyword arguments are `MemoryLLMConfig` memory options (e.g. `max_inject_length`).
        """
        backbone, source = _load_backbone(backbone, dtype)
        options = {k: v for k, v in backbone.config.to_dict().items() if k not in BACKBONE_ONLY_KEYS}
        memory_options.setdefault("max_inject_length", num_tokens if memory_write_rule == "input" else 512)
        config = MemoryLLMConfig(
            **options,
            num_tokens=num_tokens,
            num_blocks=num_blocks,
            memory_write_rule=memory_write_rule,
            lora_config=lora_config,
            **memory_options,
        )
        model = cls(config).to(dtype=backbone.dtype, device=backbone.device)
        model._copy_backbone_weights(backbone)
        model.eval()
        if tokenizer is None and source is not None:
            tokenizer = _load_backbone_tokenizer(source)
        model.tokenizer = tokenizer
        return model

    @torch.no_grad()
    def _copy_backbone_weights(self, backbone: PreTrainedModel) -> None:
        own = self.state_dict()
        weights = {}
        for name, tensor in backbone.state_dict().items():
            lora_name = name.replace(".weight", ".base_layer.weight")
            target = name if name in own else lora_name if lora_name in own else None
            if target is None:
                raise ValueError(f"Backbone weight {name!r} has no place in a MemoryLLM: is it a Llama model?")
            weights[target] = tensor
        missing = [k for k in own if k not in weights and not _is_memory_parameter(k)]
        if missing and not (self.config.tie_word_embeddings and missing == ["lm_head.weight"]):
            raise ValueError(f"The backbone lacks weights: {missing[:5]}")
        self.load_state_dict(weights, strict=False)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        bos_id = self.config.bos_token_id if self.config.bos_token_id is not None else 0
        if self.bos_embedding is not None:
            hidden = backbone(torch.tensor([[bos_id]], device=backbone.device), output_hidden_states=True)
            self.bos_embedding.copy_(torch.stack([h[0] for h in hidden.hidden_states[:-1]]))  # inputs of layers
        self.memory_state.reset()

    # ---------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the remote-code files and an `auto_map` for `trust_remote_code`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_memoryllm.MemoryLLMConfig",
            "AutoModel": "modeling_memoryllm.MemoryLLMForCausalLM",
            "AutoModelForCausalLM": "modeling_memoryllm.MemoryLLMForCausalLM",
        }
        self.config.architectures = [type(self).__name__]
        result = super().save_pretrained(save_directory, *args, **kwargs)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))
        return result


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


__all__ = [
    "LoraLinear",
    "MemoryLLMForCausalLM",
    "MemoryLLMModel",
    "MemoryLLMPreTrainedModel",
    "active_adapter",
    "layer_key_values",
]
