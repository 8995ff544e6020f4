"""
The memory prefix and the cache that holds it.

Every layer `l` reads `[bos_l, memory[l]]` as keys/values at positions `0..P-1`; the text follows. This module computes
those prefix keys/values (`prefix_key_values`), caches the reading prefix on the memory state once per memory version
(`reading_prefix`), puts it in front of a cache (`cache_with_prefix`), and gives the text its positions and key mask
(`text_positions`, `prefixed_mask`). `MemoryPrefixCache` is a `DynamicCache` whose first rows are the prefix: its
`prefix_length` and `prefix_written` say how many leading rows are memory and which of them attention may see.
"""

import threading
import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.models.llama.modeling_llama import rotate_half

from .lora import active_adapter


# Spare rows allocated after a prefix, so that a query and its generated tokens are written in place.
SPARE_ROWS = 512


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


class MemoryPrefixCache(DynamicCache):
    """
    A `DynamicCache` that starts with the memory prefix (`[bos, memory]` keys/values of every layer).

    Created empty (so `generate` sees no past tokens), it is filled by the model on the first forward with
    `attach_prefix`. `prefix_length` says how many leading rows belong to the memory: positions and attention
    masks of the text are offset by it; `prefix_written` (`[B, P]` bool, or `None` when every row is read) says
    which of them attention may see. Batch size 1 leases the prefix buffers of the memory version and writes its
    tokens after them in place; larger batches (or a buffer already leased) copy the prefix once.
    """

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = PrefixLayer
        self.prefix_length = 0
        self.prefix_written: torch.Tensor | None = None
        self.retrieval = None  # M+: fills the retrieved rows of each layer at the prefill (see variant_mplus)

    def attach_prefix(self, prefixes: list[SharedPrefix], batch_size: int) -> None:
        """Start every layer with the prefix of `prefixes[i]` in batch row `i` (one prefix: every row)."""
        rows = prefixes[0].key_buffers[0].shape[0]  # 1, or one per batch row (an injection's batched prefix)
        leased = len(prefixes) == 1 and batch_size == rows and prefixes[0].try_lease(self)
        self.layers = []
        for idx in range(len(prefixes[0].key_buffers)):
            layer = PrefixLayer()
            if leased:
                buffers = prefixes[0].key_buffers[idx], prefixes[0].value_buffers[idx]
                layer.attach(*buffers, prefixes[0].length, owner=(prefixes[0], idx))
            else:
                layer.attach(*_private_buffers([p.layer(idx) for p in prefixes], batch_size), prefixes[0].length)
            self.layers.append(layer)
        self.prefix_length = prefixes[0].length
        self.prefix_written = written_mask(prefixes, batch_size)


def written_mask(prefixes: list[SharedPrefix], batch_size: int) -> torch.Tensor | None:
    """`[B, P]` bool of the prefix rows each batch row may attend to, or `None` when it may attend to all."""
    if all(p.written is None for p in prefixes):
        return None
    rows = [p.written if p.written is not None else torch.ones(p.length, dtype=torch.bool) for p in prefixes]
    return torch.cat([row.view(-1, row.shape[-1]) for row in rows]).expand(batch_size, -1)


def _private_buffers(rows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Buffers `[B, Hkv, P + spare, hd]` holding one prefix per batch row (or the same prefix in every row)."""
    keys = torch.cat([k for k, _ in rows]).expand(batch_size, -1, -1, -1)
    values = torch.cat([v for _, v in rows]).expand(batch_size, -1, -1, -1)
    return _with_spare(keys, SPARE_ROWS), _with_spare(values, SPARE_ROWS)


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


def reading_prefix(model, state) -> SharedPrefix:
    """The prefix that forward/generate read, computed once per memory version (outside training) and cached on
    the state under a key of everything else it depends on."""
    weight = model.model.embed_tokens.weight
    adapter = model.config.generation_adapter
    key = (id(model), model.weights_version, weight.device, weight.dtype, adapter)
    cached = None if model.training else state.cached_prefix(key)
    if cached is not None:
        return cached
    with torch.set_grad_enabled(model.training and torch.is_grad_enabled()):
        keys, values = prefix_key_values(
            model, state.memory, slice(None), adapter, model.variant.prefix_slots(model.config)
        )
    prefix = SharedPrefix(keys, values, written=model.variant.prefix_written(state))
    if not model.training:
        state.keep_prefix(key, prefix)
    return prefix


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


def cache_with_prefix(model, cache: Cache | None, states, batch_size: int, attention_mask=None):
    """The cache to run with, holding the memory prefix when the memory is read; and the prefix length. A variant
    that retrieves per query (M+) gets a `MemoryPrefixCache` whose `retrieval` fills its slots layer by layer."""
    if cache is not None and cache.get_seq_length() > 0:  # continuing: the prefix is already inside
        return cache, prefix_of(cache, model, states, batch_size)[0]
    if not model.variant.reads(states[0]):
        return cache, 0
    prefixes = [reading_prefix(model, state) for state in states]
    if cache is None or isinstance(cache, MemoryPrefixCache):
        cache = cache if cache is not None else MemoryPrefixCache()
        cache.attach_prefix(prefixes, batch_size)
        cache.retrieval = model.variant.retrieval(model, states, attention_mask, batch_size)
        return cache, cache.prefix_length
    if model.variant.prefix_slots(model.config):
        raise ValueError(f"{model.config.memory_variant} retrieves per query: pass no cache or a MemoryPrefixCache.")
    for idx in range(model.config.num_hidden_layers):  # a cache of another type: fill it (one copy)
        keys = torch.cat([p.layer(idx)[0] for p in prefixes]).expand(batch_size, -1, -1, -1)
        values = torch.cat([p.layer(idx)[1] for p in prefixes]).expand(batch_size, -1, -1, -1)
        cache.update(keys, values, idx)
    return cache, prefixes[0].length


def prefix_of(cache: Cache | None, model, states, batch_size: int) -> tuple[int, torch.Tensor | None]:
    """The prefix length and `[B, P]` written mask of `cache`: a `MemoryPrefixCache` says them itself; for a cache
    of another type they follow from the memory that is read (the variant's prefix layout)."""
    if cache is None:
        return 0, None
    if isinstance(cache, MemoryPrefixCache):
        return cache.prefix_length, cache.prefix_written
    if not model.variant.reads(states[0]):
        return 0, None
    masks = [model.variant.prefix_written(state) for state in states]
    if all(mask is None for mask in masks):
        return model.config.prefix_length, None
    length = model.config.prefix_length
    rows = [mask if mask is not None else torch.ones(length, dtype=torch.bool) for mask in masks]
    return length, torch.stack(rows).expand(batch_size, -1)


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
    "MemoryPrefixCache",
    "PrefixLayer",
    "SharedPrefix",
    "cache_with_prefix",
    "injection_prefix",
    "layer_key_values",
    "prefix_key_values",
    "prefix_of",
    "prefixed_mask",
    "reading_prefix",
    "text_positions",
    "written_mask",
]
