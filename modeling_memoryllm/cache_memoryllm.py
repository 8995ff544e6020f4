"""
The memory prefix and the cache that holds it.

Every layer `l` reads `[bos_l, memory[l]]` as keys/values at positions `0..P-1`; the text follows. This module computes
those prefix keys/values (`prefix_key_values`), caches the reading prefix on the memory state once per memory version
(`reading_prefix`), puts it in front of a cache (`cache_with_prefix`), and gives the text its positions and key mask
(`text_positions`, `prefixed_mask`). `MemoryPrefixCache` is a `DynamicCache` whose first rows are the prefix: its
`prefix_length` and `prefix_written` say how many leading rows are memory and which of them attention may see.

Any other transformers cache (`StaticCache`, an offloaded `DynamicCache`, ...) holds the prefix too: it is *adopted*
(`adopt_cache`: its class becomes the `MemoryCacheMixin` subclass of its own class), so that every cache holding a
prefix counts only text in `get_seq_length()`, which is what `generate` slices its inputs by when it continues a cache.
"""

import copy
import threading
import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache
from transformers.models.llama.modeling_llama import rotate_half

from .lora import active_adapter


# Spare rows allocated after a prefix, so that a query and its generated tokens are written in place.
SPARE_ROWS = 512
# Restored tail rows whose keys/values a prefix keeps (`tail_layers`; 11.8 MB each for a 256-row chunk of the default).
KEPT_TAILS = 8


class SharedPrefix:
    """
    The prefix keys/values of one memory version, per layer, in buffers with spare rows after the prefix.

    One cache at a time may lease the buffers and write its own tokens into the spare rows (the prefix rows are
    never written); every other cache gets a private copy. The lease ends when the leasing cache is collected.
    """

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        spare: int = SPARE_ROWS,
        written: torch.Tensor | None = None,
    ):
        self.key: tuple | None = None  # set when cached on a memory state (`MemoryState.keep_prefix`)
        self.length = keys[0].shape[-2]  # P
        self.written = written  # [P] (or [B, P]) bool: prefix rows that may be attended to; None: all of them
        self.key_buffers = [_with_spare(k, spare) for k in keys]  # each [1 (or B), Hkv, P + spare, hd]
        self.value_buffers = [_with_spare(v, spare) for v in values]
        self.tails: dict = {}  # the last tail rows' keys/values of this version (`tail_layers`), newest last
        self._lease = threading.Lock()

    def try_lease(self, owner) -> bool:
        if not self._lease.acquire(blocking=False):
            return False
        weakref.finalize(owner, self._lease.release)
        return True

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix rows of layer `idx`: keys and values `[1, Hkv, P, hd]`."""
        return self.key_buffers[idx][:, :, : self.length], self.value_buffers[idx][:, :, : self.length]

    def replace_layer(self, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Use larger buffers for layer `idx` (grown by the leasing cache; they start with the same prefix rows)."""
        self.key_buffers[idx], self.value_buffers[idx] = keys, values


def _with_spare(rows: torch.Tensor, spare: int) -> torch.Tensor:
    buffer = rows.new_empty(*rows.shape[:2], rows.shape[2] + spare, rows.shape[3])
    buffer[:, :, : rows.shape[2]] = rows
    return buffer


class PrefixLayer(DynamicLayer):
    """A dynamic cache layer that writes new rows in place into a preallocated buffer instead of concatenating."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None  # [B, Hkv, capacity, hd]
        self._value_buffer: torch.Tensor | None = None
        self._length = 0
        self._owner: tuple[SharedPrefix, int] | None = None  # the leased prefix and layer whose buffers these are

    def attach(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int, owner=None) -> None:
        """Use these buffers; their first `length` rows are already filled. `owner`: `(prefix, layer)` when they are
        a leased `SharedPrefix`'s, which then keeps the larger buffers if they have to grow."""
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self._key_buffer, self._value_buffer, self._length = key_buffer, value_buffer, length
        self._owner = owner
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        empty = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self.attach(empty, value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[3]), 0)

    def _grow(self, needed: int, batch_size: int) -> None:
        """Move to buffers of at least `needed` rows (one copy of the cached rows): `SPARE_ROWS` more, so a long
        prefix is not doubled (the 8B's 12,801 rows). Leased buffers of the same batch size stay the prefix's own
        (it keeps the larger ones and frees the old); others become private."""
        owner = self._owner if batch_size == self._key_buffer.shape[0] else None
        shape = (batch_size, self._key_buffer.shape[1], needed + SPARE_ROWS, self._key_buffer.shape[3])
        keys, values = self._key_buffer.new_empty(shape), self._value_buffer.new_empty(shape)
        keys[:, :, : self._length] = self.keys
        values[:, :, : self._length] = self.values
        self._key_buffer, self._value_buffer, self._owner = keys, values, owner
        self._refresh()
        if owner is not None:
            owner[0].replace_layer(owner[1], keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[2] or key_states.shape[0] != self._key_buffer.shape[0]:
            self._grow(end, key_states.shape[0])
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._refresh()
        return self.keys, self.values

    def _adopt(self) -> None:
        """After a parent method replaced `keys`/`values` with new tensors, make them the buffers."""
        self._owner = None
        if self.keys is None:
            self._key_buffer = self._value_buffer = None
            self._length = 0
        else:
            self._key_buffer, self._value_buffer, self._length = self.keys, self.values, self.keys.shape[2]

    def __deepcopy__(self, memo):
        """A copy with buffers of its own: it does not lease the prefix (`_owner` is not copied)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = {name: value for name, value in self.__dict__.items() if name != "_owner"}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._owner = None
        return new

    def write_rows(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite cached rows `start..start+R-1` of batch row `row` with keys/values `[Hkv, R, hd]`."""
        self._key_buffer[row, :, start : start + keys.shape[1]] = keys
        self._value_buffer[row, :, start : start + values.shape[1]] = values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._length = self.keys.shape[2] if self.keys is not None else 0

    def reset(self) -> None:
        super().reset()
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()


class ReadOnlyPrefixLayer(PrefixLayer):
    """A layer that reads the prefix but stores nothing: `update` returns `[prefix; new rows]` and leaves the layer as
    it was. Under gradient checkpointing a decoder layer runs twice (forward, then again in the backward pass), so a
    cache it may keep must read the same rows both times."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch_size = key_states.shape[0]
        keys = torch.cat([self.keys.expand(batch_size, -1, -1, -1), key_states], dim=-2)
        values = torch.cat([self.values.expand(batch_size, -1, -1, -1), value_states], dim=-2)
        return keys, values


class MemoryCacheMixin:
    """
    What a cache holding the memory prefix adds to its transformers class: the prefix rows are not text.

    `get_seq_length()` counts the cached TEXT tokens (`generate` slices its inputs and numbers its steps by it);
    `physical_length()` counts every cached row, and the attention mask's query offset is physical. `prefix_length`
    says how many leading rows are memory, `prefix_written` (`[B, P]` bool, or `None`: all) which of them attention
    may see; `retrieval` (M+) fills per-query rows at the prefill. A deep copy shares the retrieval (it holds memory
    states, which the copy does not need) and copies the rest.
    """

    prefix_length = 0
    prefix_written: torch.Tensor | None = None
    position_shift: torch.Tensor | None = None  # [B]: the unread rows after the last row a query reads (closed up)
    retrieval = None

    def physical_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx) - self.prefix_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.physical_length(layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers < 5.18: a positive value is the text length to keep
            tokens_to_remove += self.prefix_length
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self.prefix_length, self.prefix_written, self.position_shift = 0, None, None

    def attach_prefix(self, prefixes: list[SharedPrefix], batch_size: int) -> None:
        """Start every layer with the prefix of `prefixes[i]` in batch row `i` (one prefix: every row), written
        through the cache's own `update` (one copy)."""
        for idx in range(len(prefixes[0].key_buffers)):
            keys = torch.cat([p.layer(idx)[0] for p in prefixes]).expand(batch_size, -1, -1, -1)
            values = torch.cat([p.layer(idx)[1] for p in prefixes]).expand(batch_size, -1, -1, -1)
            self.update(keys, values, idx)
        self.prefix_length = prefixes[0].length
        self.prefix_written = written_mask(prefixes, batch_size)

    def __deepcopy__(self, memo):
        memo[id(self.retrieval)] = self.retrieval
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({name: copy.deepcopy(value, memo) for name, value in self.__dict__.items()})
        return new


class MemoryPrefixCache(MemoryCacheMixin, DynamicCache):
    """
    A `DynamicCache` that starts with the memory prefix (`[bos, memory]` keys/values of every layer).

    Created empty (so `generate` sees no past tokens), it is filled by the model on the first forward with
    `attach_prefix`. Without autograd, one prefix holding every batch row (batch size 1, or an injection's prefixes
    computed as one batch) is leased: its buffers take the tokens in place, and keep what they grow to; otherwise
    (or when a buffer is already leased) the prefix is copied once. An
    offloaded cache (`offloading=True`) keeps transformers' own layers and gets the prefix through `update`.
    `read_only=True` (gradient checkpointing) stores nothing after the prefix (see `ReadOnlyPrefixLayer`).
    """

    read_only = False

    def __init__(self, read_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not self.layers:
            self.layer_class_to_replicate = DynamicLayer if self.offloading else PrefixLayer
        self.read_only = read_only

    def attach_prefix(self, prefixes: list[SharedPrefix], batch_size: int, private: bool = False) -> None:
        """Start every layer with the prefix of `prefixes[i]` in batch row `i` (one prefix: every row); `private`: in
        a copy of its own, whose prefix rows may be written (`write_tail`)."""
        if self.offloading:
            return super().attach_prefix(prefixes, batch_size)
        # one prefix that holds every batch row: batch 1, or an injection's prefixes computed as one batch
        whole = len(prefixes) == 1 and batch_size == prefixes[0].key_buffers[0].shape[0] and not private
        leased = whole and not self.read_only and not torch.is_grad_enabled() and prefixes[0].try_lease(self)
        layer_class = ReadOnlyPrefixLayer if self.read_only else PrefixLayer
        self.layers = [
            self._prefix_layer(layer_class, prefixes, idx, batch_size, shared=leased or (whole and self.read_only))
            for idx in range(len(prefixes[0].key_buffers))
        ]
        self.layer_class_to_replicate = layer_class
        self.prefix_length = prefixes[0].length
        self.prefix_written = written_mask(prefixes, batch_size)

    def _prefix_layer(self, layer_class, prefixes: list[SharedPrefix], idx: int, batch_size: int, shared: bool):
        """Layer `idx` holding the prefix: the prefix's own buffers (`shared`: leased, whose growth the prefix keeps,
        or read-only, never written), or one private copy `[B, Hkv, P + spare, hd]`."""
        layer, length = layer_class(), prefixes[0].length
        if shared:
            owner = None if self.read_only else (prefixes[0], idx)
            layer.attach(prefixes[0].key_buffers[idx], prefixes[0].value_buffers[idx], length, owner=owner)
        else:
            spare = 0 if self.read_only else SPARE_ROWS
            layer.attach(*_private_buffers([p.layer(idx) for p in prefixes], batch_size, spare), length)
        return layer


class MemoryStaticCache(MemoryCacheMixin, StaticCache):
    """A `StaticCache` holding the memory prefix (`generate(cache_implementation="static")` sizes it for the prefix
    plus the text; one you create needs `max_cache_len` >= prefix rows + prompt + new tokens)."""


_MEMORY_CACHE_CLASSES: dict[type, type] = {DynamicCache: MemoryPrefixCache, StaticCache: MemoryStaticCache}


def memory_cache_class(cache_class: type) -> type:
    """The `MemoryCacheMixin` subclass of a transformers cache class (made on first use for classes other than
    `DynamicCache` and `StaticCache`)."""
    if issubclass(cache_class, MemoryCacheMixin):
        return cache_class
    if cache_class not in _MEMORY_CACHE_CLASSES:
        name = f"Memory{cache_class.__name__}"
        _MEMORY_CACHE_CLASSES[cache_class] = type(name, (MemoryCacheMixin, cache_class), {"__module__": __name__})
    return _MEMORY_CACHE_CLASSES[cache_class]


def adopt_cache(cache: Cache) -> MemoryCacheMixin:
    """`cache` itself, now of the memory-aware subclass of its class (see `MemoryCacheMixin`). Only an empty cache
    can be adopted: one that already holds rows was filled without the memory and cannot be continued with it."""
    if isinstance(cache, MemoryCacheMixin):
        return cache
    if not isinstance(cache, Cache):
        raise ValueError(f"The cache must be a transformers Cache, got {type(cache).__name__}.")
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"This {type(cache).__name__} already holds {int(cache.get_seq_length())} rows that were not computed by "
            "this MemoryLLM (they lack the memory prefix): pass an empty cache, or the cache a MemoryLLM call returned."
        )
    cache.__class__ = memory_cache_class(type(cache))
    if isinstance(cache, MemoryPrefixCache) and not cache.layers:
        cache.layer_class_to_replicate = DynamicLayer if cache.offloading else PrefixLayer
    return cache


def written_mask(prefixes: list[SharedPrefix], batch_size: int) -> torch.Tensor | None:
    """`[B, P]` bool of the prefix rows each batch row may attend to, or `None` when it may attend to all."""
    if all(p.written is None for p in prefixes):
        return None
    rows = [p.written if p.written is not None else torch.ones(p.length, dtype=torch.bool) for p in prefixes]
    return torch.cat([row.view(-1, row.shape[-1]) for row in rows]).expand(batch_size, -1)


def _private_buffers(rows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, spare: int = SPARE_ROWS):
    """Buffers `[B, Hkv, P + spare, hd]` holding one prefix per batch row (or the same prefix in every row)."""
    keys = torch.cat([k for k, _ in rows]).expand(batch_size, -1, -1, -1)
    values = torch.cat([v for _, v in rows]).expand(batch_size, -1, -1, -1)
    return _with_spare(keys, spare), _with_spare(values, spare)


# ----------------------------------------------------------------------------------------- computing prefixes
def layer_key_values(layer, rows: torch.Tensor, rotary_emb=None, start: int = 0, position_embeddings=None):
    """
    Keys and values that decoder `layer` caches for prefix `rows` `[B, P, d]` at positions `start..start+P-1` (or
    with the given `position_embeddings` `(cos, sin)`, each `[B or 1, P, hd]`): input norm, k/v projections (active
    adapter), RoPE on the keys. Returns two `[B, Hkv, P, hd]` tensors.
    """
    attention = layer.self_attn
    hidden = layer.input_layernorm(rows)
    shape = (*rows.shape[:2], -1, attention.head_dim)
    keys = attention.k_proj(hidden).view(shape).transpose(1, 2)
    values = attention.v_proj(hidden).view(shape).transpose(1, 2)
    if position_embeddings is None:
        positions = torch.arange(start, start + rows.shape[1], device=rows.device).unsqueeze(0)
        position_embeddings = rotary_emb(hidden, positions)  # [1, P, hd]
    cos, sin = position_embeddings
    keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
    return keys, values


def prefix_key_values(model, memory, rows: slice, adapter: str | None, slots: int = 0):
    """Per layer, keys/values `[B, Hkv, P, hd]` of `[bos_l, slots, memory[l, rows]]` at positions `0..P-1`; the
    `slots` rows (M+'s retrieved rows, filled per query) start as zeros. `memory`: one `[L, M, d]` (`B = 1`) or a
    list of them (one prefix per batch row, computed in one pass)."""
    memories = list(memory) if isinstance(memory, (list, tuple)) else [memory]
    keys, values = [], []
    with active_adapter(adapter):
        for idx, layer in enumerate(model.model.layers):
            weight = layer.input_layernorm.weight
            parts = [m[idx, rows].to(device=weight.device, dtype=weight.dtype) for m in memories]  # each [R, d]
            prefix = parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)  # [B, R, d]
            batch, hidden = prefix.shape[0], prefix.shape[-1]
            if slots:
                prefix = torch.cat([prefix.new_zeros(batch, slots, hidden), prefix], dim=1)
            if model.bos_embedding is not None:
                bos = model.bos_embedding[idx].to(prefix.device, prefix.dtype).expand(batch, 1, hidden)
                prefix = torch.cat([bos, prefix], dim=1)
            layer_keys, layer_values = layer_key_values(layer, prefix, model.model.rotary_emb)
            keys.append(layer_keys)
            values.append(layer_values)
    return keys, values


def weights_key(model) -> tuple:
    """What the reading prefix depends on in the weights, cheaply: the identity, storage and in-place version counter
    of every tensor of the modules that compute it (rotary embedding, bos rows, each layer's input norm and k/v
    projections with any adapters on them), and the adapter state of peft layers among them. Any change of those
    weights (`load_state_dict`, an in-place edit, `.to()`, peft's `disable_adapter`, merging, a new module) changes
    the key. `weights_version` (bumped by `train()`) covers anything else."""
    modules = [model.model.rotary_emb]
    for layer in model.model.layers:
        modules += [layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj]
    parts: list = [id(model), model.weights_version]
    if model.bos_embedding is not None:
        parts.append((model.bos_embedding.data_ptr(), model.bos_embedding._version))
    for module in modules:
        parts.append(id(module))
        parts += [(t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers())]
        parts += [_peft_state(sub) for sub in module.modules() if hasattr(sub, "merged_adapters")]
    return tuple(parts)


def _peft_state(layer) -> tuple:
    """A peft tuner layer's active, disabled and merged adapters."""
    return tuple(layer.active_adapters), bool(layer.disable_adapters), tuple(layer.merged_adapters)


def reading_prefix_key(model) -> tuple:
    """What a state's cached reading prefix depends on besides its rows: the weights, device, dtype and adapter."""
    weight = model.model.embed_tokens.weight
    return (weights_key(model), weight.device, weight.dtype, model.config.generation_adapter)


def reading_prefix(model, state) -> SharedPrefix:
    """The prefix that forward/generate read, computed once per memory version (outside training) and cached on
    the state under a key of everything else it depends on. A memory that is not read (uninitialised) in a batch
    with memories that are gets a prefix that attention never sees."""
    key = reading_prefix_key(model)
    cached = None if model.training else state.cached_prefix(key)
    if cached is not None:
        return cached
    if model.variant.reads(state):
        with torch.set_grad_enabled(model.training and torch.is_grad_enabled()):
            slots = model.variant.prefix_slots(model.config)
            keys, values = prefix_key_values(model, state.memory, slice(None), key[-1], slots)
        prefix = SharedPrefix(keys, values, written=model.variant.prefix_written(state))
    else:
        prefix = _unread_prefix(model, model.model.embed_tokens.weight)
    if not model.training:
        state.keep_prefix(key, prefix)
    return prefix


def _unread_prefix(model, weight: torch.Tensor) -> SharedPrefix:
    """A prefix of `P` zero rows, none of which attention may see."""
    config, attention = model.config, model.model.layers[0].self_attn
    shape = (1, config.num_key_value_heads, config.prefix_length, attention.head_dim)
    rows = [weight.new_zeros(shape) for _ in model.model.layers]
    return SharedPrefix(rows, [r.clone() for r in rows], written=torch.zeros(config.prefix_length, dtype=torch.bool))


def injection_prefix(model, states, rows: slice, spare: int) -> SharedPrefix:
    """The prefixes `[bos, memory rows]` that an injection of `states` (one per batch row) reads, computed in one
    pass, with `spare` rows for the queries; written mask `[B, P]` (or `None`)."""
    keys, values = prefix_key_values(model, [state.memory for state in states], rows, model.config.injection_adapter)
    masks = [model.variant.prefix_written(state, rows) for state in states]
    written = None
    if any(mask is not None for mask in masks):
        length = keys[0].shape[2]
        written = torch.stack([mask if mask is not None else torch.ones(length, dtype=torch.bool) for mask in masks])
    return SharedPrefix(keys, values, spare=spare, written=written)


def cache_with_prefix(
    model,
    cache: Cache | None,
    states,
    batch_size: int,
    attention_mask=None,
    read_only=False,
    use_cache=True,
    query: tuple = (None, None),
):
    """The cache to run with (`cache` adopted, or a new `MemoryPrefixCache`; `None` when no cache is asked for and no
    memory is read), holding the memory prefix when any memory is read; and the prefix length. A variant that
    retrieves per query (M+) gets a `MemoryPrefixCache` whose `retrieval` fills its slots layer by layer.
    `read_only` (gradient checkpointing): a new cache that stores nothing after the prefix (none without a prefix);
    a cache holding rows cannot be continued then. `query` (`input_ids`, `inputs_embeds`): the prefill's tokens, from
    which a variant may choose the prefix rows they read (`query_read`)."""
    reads = any(model.variant.reads(state) for state in states)
    if read_only:
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("Under gradient checkpointing in training a cache cannot be continued: pass no cache.")
        cache = MemoryPrefixCache(read_only=True) if reads else None
    elif cache is not None or reads or use_cache:
        cache = adopt_cache(cache) if cache is not None else MemoryPrefixCache()
    if cache is None or cache.physical_length() > 0 or not reads:  # continuing: the prefix (if any) is inside
        return cache, prefix_of(cache)[0]
    check_cache_fits(model, cache, model.config.prefix_length, text_rows=0)
    prefixes = [reading_prefix(model, state) for state in states]
    read = model.variant.query_read(model, states, *query, attention_mask)
    if read is not None and type(cache) is MemoryPrefixCache and not cache.offloading and not cache.read_only:
        attach_read_rows(model, cache, prefixes, read, batch_size)  # the default cache: only the rows read
    else:
        if isinstance(cache, MemoryPrefixCache):
            cache.attach_prefix(prefixes, batch_size, private=read is not None and read.tail_rows is not None)
        else:
            cache.attach_prefix(prefixes, batch_size)
        if read is not None:  # other caches: the whole prefix, masked to what the query reads
            apply_query_read(model, cache, read, prefixes)
    cache.retrieval = model.variant.retrieval(model, states, attention_mask, batch_size)
    return cache, cache.prefix_length


def attach_read_rows(model, cache: "MemoryPrefixCache", prefixes: list[SharedPrefix], read, batch_size: int) -> None:
    """Start `cache` with only the prefix rows the query reads (`QueryRead`), gathered into buffers of its own: per
    batch row its chosen written rows, or bos and its tail rows (`[L, n, d]`, whose keys/values at positions
    `P - n .. P - 1` come from `tail_layers`), each key at its own position; shorter rows are padded with unread
    slots. The text positions follow the last row read (`P` after a tail), as in `apply_query_read`, but attention
    and every decoding step only touch the rows read."""
    length, bos = prefixes[0].length, int(model.config.add_bos_embedding)
    written = written_mask(prefixes, batch_size)
    chosen = read.read.clone() if written is None else written.to(read.read.device) & read.read  # [B, P]
    tails = read.tail_rows or [None] * batch_size
    slots, starts = [], length - trailing_unread(chosen)  # [B] the first text position
    for row, tail in enumerate(tails):
        if tail is not None:
            chosen[row, bos:] = False  # bos only, of the prefix
            starts[row] = length
        slots.append(chosen[row].nonzero()[:, 0])
    counts = [len(taken) + (0 if tail is None else tail.shape[1]) for taken, tail in zip(slots, tails)]
    width = max(counts)
    row_prefixes = [prefixes[row if len(prefixes) > 1 else 0] for row in range(batch_size)]
    tail_kv = [tail_layers(model, prefix, read, row) for row, prefix in enumerate(row_prefixes)]
    layers = []
    for idx in range(len(prefixes[0].key_buffers)):
        keys, values = _read_rows(idx, row_prefixes, slots, [kv and kv[idx] for kv in tail_kv], width)
        layer = PrefixLayer()
        layer.attach(keys, values, width)
        layers.append(layer)
    cache.layers, cache.layer_class_to_replicate = layers, PrefixLayer
    cache.prefix_length = width
    cache.prefix_written = torch.arange(width)[None] < torch.tensor(counts)[:, None]  # [B, width]
    cache.position_shift = width - starts


def _read_rows(idx: int, row_prefixes: list[SharedPrefix], slots: list, tails: list, width: int):
    """Layer `idx`'s buffers `[B, Hkv, width + SPARE_ROWS, hd]` for `attach_read_rows`: per batch row, its prefix's
    keys/values at `slots[row]`, then the tail's `tails[row]` (`([Hkv, n, hd], [Hkv, n, hd])` or `None`), then unread
    zeros."""
    first_keys, _ = row_prefixes[0].layer(idx)
    shape = (len(slots), first_keys.shape[1], width + SPARE_ROWS, first_keys.shape[3])
    keys, values = first_keys.new_zeros(shape), first_keys.new_zeros(shape)
    for row, (prefix, taken, tail) in enumerate(zip(row_prefixes, slots, tails)):
        prefix_keys, prefix_values = prefix.layer(idx)  # [1, Hkv, P, hd]
        taken = taken.to(prefix_keys.device)
        keys[row, :, : len(taken)], values[row, :, : len(taken)] = prefix_keys[0, :, taken], prefix_values[0, :, taken]
        if tail is not None:
            end = len(taken) + tail[0].shape[1]
            keys[row, :, len(taken) : end], values[row, :, len(taken) : end] = tail
    return keys, values


def tail_layers(model, prefix: SharedPrefix, read, row: int) -> list | None:
    """Per layer, the keys/values `[Hkv, n, hd]` of batch row `row`'s tail rows (`QueryRead.tail_rows`) at the
    prefix's last `n` positions, or `None` without a tail. Kept on `prefix` (one memory version) under the tail's
    `tail_keys` entry, up to `KEPT_TAILS` of them, so that a chunk restored again costs no projection; computed
    afresh in training or without a key."""
    rows = read.tail_rows[row] if read.tail_rows is not None else None
    if rows is None:
        return None
    key = read.tail_keys[row] if read.tail_keys is not None else None
    if key is not None and key in prefix.tails and not model.training:
        prefix.tails[key] = prefix.tails.pop(key)  # the newest
        return prefix.tails[key]
    start = prefix.length - rows.shape[1]
    layers = [tail_key_values(model, idx, rows, start) for idx in range(len(model.model.layers))]
    if key is not None and not model.training:
        prefix.tails[key] = layers
        while len(prefix.tails) > KEPT_TAILS:
            prefix.tails.pop(next(iter(prefix.tails)))
    return layers


def apply_query_read(model, cache: "MemoryCacheMixin", read, prefixes: list[SharedPrefix]) -> None:
    """Narrow `cache`'s prefix to what the query reads (`QueryRead`): the written rows it chose (its tail rows
    whatever the memory held there), its positions closed up behind the last of them."""
    chosen = read.read.to(cache.prefix_written.device) if cache.prefix_written is not None else read.read
    prefix_read = chosen if cache.prefix_written is None else cache.prefix_written & chosen
    for row in range(len(chosen)):
        layers = tail_layers(model, prefixes[row if len(prefixes) > 1 else 0], read, row)
        if layers is not None:
            write_tail(cache, row, layers)
            prefix_read[row] = chosen[row]
    cache.prefix_written = prefix_read
    cache.position_shift = trailing_unread(chosen)


def write_tail(cache: "MemoryCacheMixin", row: int, layers: list) -> None:
    """Write the tail keys/values of every layer (`tail_layers`) into the last `n` prefix slots of batch row `row` of
    `cache` (a private copy of the prefix)."""
    for cached, (keys, values) in zip(cache.layers, layers):
        start = cache.prefix_length - keys.shape[1]
        cached.keys[row, :, start : cache.prefix_length] = keys.to(cached.keys.device, cached.keys.dtype)
        cached.values[row, :, start : cache.prefix_length] = values.to(cached.values.device, cached.values.dtype)


def tail_key_values(model, idx: int, rows: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `idx`'s keys and values `[Hkv, n, hd]` of memory rows `rows` `[L, n, d]` at positions `start..`."""
    layer = model.model.layers[idx]
    weight = layer.input_layernorm.weight
    layer_rows = rows[idx][None].to(weight.device, weight.dtype)  # [1, n, d]
    keys, values = layer_key_values(layer, layer_rows, model.model.rotary_emb, start)
    return keys[0], values[0]


def checkpointed(model, states=()) -> bool:
    """Whether the decoder layers run under gradient checkpointing now (training, with gradients): each layer then
    runs twice, so the caches they see must be read-only. Reading `states` whose rows carry a graph (`injected`)
    needs the non-reentrant checkpoint: the reentrant one runs a backward per layer through the shared graph."""
    layers = model.model.layers
    active = bool(layers[0].gradient_checkpointing and model.training and torch.is_grad_enabled())
    if active and getattr(model, "_reentrant_checkpointing", False) and any(s.memory.requires_grad for s in states):
        raise ValueError(
            "A gradient through an injected memory needs non-reentrant gradient checkpointing: enable it with "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' default)."
        )
    return active


def check_cache_fits(model, cache: Cache, prefix_rows: int, text_rows: int) -> None:
    """Raises `ValueError` when `cache` cannot hold `prefix_rows` of memory prefix plus `text_rows` of text, or cannot
    serve this variant (M+ fills its retrieved rows into a `MemoryPrefixCache` on the model's device)."""
    if model.variant.prefix_slots(model.config) and (type(cache) is not MemoryPrefixCache or cache.offloading):
        raise ValueError(
            f"{model.config.memory_variant} retrieves memory rows per query into the default cache: pass no cache "
            "(or an empty DynamicCache / MemoryPrefixCache) and no cache_implementation but 'dynamic'; got a "
            f"{type(cache).__name__}{' with offloading' if getattr(cache, 'offloading', False) else ''}."
        )
    capacity = cache.get_max_length() if cache.layers else -1
    needed = prefix_rows + text_rows
    if 0 <= capacity < needed:
        raise ValueError(
            f"This {type(cache).__name__} holds {capacity} rows, but the memory prefix takes {prefix_rows} and the "
            f"text up to {text_rows}: create it with max_cache_len >= {needed} (prefix + prompt + new tokens)."
        )


def trailing_unread(read: torch.Tensor) -> torch.Tensor:
    """`[B]` long: per row of `read` `[B, P]` (bool), the rows after its last `True` one. A query that reads chosen
    rows counts its positions from the last of them, so the rows it reads sit right before it, as a prompt would."""
    slots = torch.arange(1, read.shape[1] + 1, device=read.device)
    return read.shape[1] - (read.long() * slots).amax(dim=1)


def position_shift_of(cache: Cache | None) -> torch.Tensor | None:
    """The `[B]` shift of the text positions behind `cache`'s prefix (`trailing_unread`), or `None`."""
    return cache.position_shift if isinstance(cache, MemoryCacheMixin) else None


def prefix_of(cache: Cache | None) -> tuple[int, torch.Tensor | None]:
    """The prefix length and `[B, P]` written mask of `cache` (`0, None` for a cache without the memory)."""
    if isinstance(cache, MemoryCacheMixin):
        return cache.prefix_length, cache.prefix_written
    return 0, None


# ------------------------------------------------------------------------------------- positions and masks
def text_positions(attention_mask, past_length: int, prefix_length: int, query_length: int, device) -> torch.Tensor:
    """Positions `[B or 1, q]` of the new text rows: after the prefix, counting only unpadded text tokens."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device).unsqueeze(0)
    counted = attention_mask.long().cumsum(-1) - 1  # [B, T_total]
    return prefix_length + counted[:, -query_length:].clamp(min=0)


def prefixed_mask(attention_mask, prefix: tuple[int, torch.Tensor | None], batch_size: int, text_length: int):
    """
    The key mask `[B, P + T]` for a text mask `[B, T]` (or `None`: no padding) behind a memory prefix `(P, written)`
    whose never-written rows are not read. `None` when every key is visible (then attention needs no mask).
    """
    prefix_length, written = prefix
    text_padded = attention_mask is not None and not bool(attention_mask.all())
    if written is None and not text_padded:
        return None
    device = attention_mask.device if attention_mask is not None else written.device
    text = attention_mask if attention_mask is not None else torch.ones(batch_size, text_length, device=device)
    rows = written if written is not None else torch.ones(batch_size, prefix_length, dtype=torch.bool)
    return torch.cat([rows.to(device=text.device, dtype=text.dtype).expand(batch_size, -1), text], dim=1)


__all__ = [
    "MemoryCacheMixin",
    "MemoryPrefixCache",
    "MemoryStaticCache",
    "PrefixLayer",
    "ReadOnlyPrefixLayer",
    "SharedPrefix",
    "adopt_cache",
    "cache_with_prefix",
    "check_cache_fits",
    "checkpointed",
    "injection_prefix",
    "layer_key_values",
    "memory_cache_class",
    "prefix_key_values",
    "position_shift_of",
    "prefix_of",
    "prefixed_mask",
    "reading_prefix",
    "text_positions",
    "trailing_unread",
    "weights_key",
    "written_mask",
]
