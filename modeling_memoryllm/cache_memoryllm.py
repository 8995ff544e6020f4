"""A KV cache whose first rows are the memory prefix, computed once per memory version and never copied per call."""

import threading
import weakref

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


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
        key: tuple | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        spare: int = SPARE_ROWS,
        written: torch.Tensor | None = None,
    ):
        self.key = key
        self.length = keys[0].shape[-2]  # P
        self.written = written  # [P] bool: prefix rows that may be attended to; None: all of them
        self.key_buffers = [_with_spare(k, spare) for k in keys]  # each [1, Hkv, P + spare, hd]
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

    def attach(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Use these buffers; their first `length` rows are already filled."""
        self.dtype, self.device = key_buffer.dtype, key_buffer.device
        self._key_buffer, self._value_buffer, self._length = key_buffer, value_buffer, length
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        empty = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self.attach(empty, value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[3]), 0)

    def _grow(self, needed: int, batch_size: int) -> None:
        """Move to private buffers of at least `needed` rows (the only copy of the cached rows)."""
        capacity = max(needed + SPARE_ROWS, 2 * self._key_buffer.shape[2])
        shape = (batch_size, self._key_buffer.shape[1], capacity, self._key_buffer.shape[3])
        keys, values = self._key_buffer.new_empty(shape), self._value_buffer.new_empty(shape)
        keys[:, :, : self._length] = self.keys
        values[:, :, : self._length] = self.values
        self._key_buffer, self._value_buffer = keys, values

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
        if self.keys is None:
            self._key_buffer = self._value_buffer = None
            self._length = 0
        else:
            self._key_buffer, self._value_buffer, self._length = self.keys, self.values, self.keys.shape[2]

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
    `attach_prefix`. `memory_prefix_length` says how many leading rows belong to the memory: positions and
    attention masks of the text are offset by it. Batch size 1 leases the prefix buffers of the memory version and
    writes its tokens after them in place; larger batches (or a buffer already leased) copy the prefix once.
    """

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = PrefixLayer
        self.memory_prefix_length = 0
        self.memory_prefix_written: torch.Tensor | None = None  # [B, P] bool, or None when every row is read

    def attach_prefix(self, prefixes: list[SharedPrefix], batch_size: int) -> None:
        """Start every layer with the prefix of `prefixes[i]` in batch row `i` (one prefix: every row)."""
        leased = len(prefixes) == 1 and batch_size == 1 and prefixes[0].try_lease(self)
        self.layers = []
        for idx in range(len(prefixes[0].key_buffers)):
            layer = PrefixLayer()
            if leased:
                layer.attach(prefixes[0].key_buffers[idx], prefixes[0].value_buffers[idx], prefixes[0].length)
            else:
                layer.attach(*_private_buffers([p.layer(idx) for p in prefixes], batch_size), prefixes[0].length)
            self.layers.append(layer)
        self.memory_prefix_length = prefixes[0].length
        self.memory_prefix_written = written_mask(prefixes, batch_size)


def written_mask(prefixes: list[SharedPrefix], batch_size: int) -> torch.Tensor | None:
    """`[B, P]` bool of the prefix rows each batch row may attend to, or `None` when it may attend to all."""
    if all(p.written is None for p in prefixes):
        return None
    rows = [p.written if p.written is not None else torch.ones(p.length, dtype=torch.bool) for p in prefixes]
    return torch.stack(rows).expand(batch_size, -1)


def _private_buffers(rows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Buffers `[B, Hkv, P + spare, hd]` holding one prefix per batch row (or the same prefix in every row)."""
    keys = torch.cat([k for k, _ in rows]).expand(batch_size, -1, -1, -1)
    values = torch.cat([v for _, v in rows]).expand(batch_size, -1, -1, -1)
    return _with_spare(keys, SPARE_ROWS), _with_spare(values, SPARE_ROWS)


__all__ = ["MemoryPrefixCache", "PrefixLayer", "SharedPrefix", "written_mask"]
