"""`MemoryState`: the memory pool of one user or session, as explicit state saved apart from the weights."""

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .configuration_memoryllm import MemoryLLMConfig


logger = logging.get_logger(__name__)

FORMAT = "memoryllm-memory-state"
# "2": the metadata holds a SHA-256 of the other metadata and of the tensors (`checksum`); "1" files had none.
FORMAT_VERSION = "2"
CHECKSUM_KEY = "sha256"
# Provenance id of rows that were in the memory before any injection into this state (e.g. a checkpoint's memory).
INITIAL_ROWS = 0
# Provenance id of rows never written. The training-free ("input") rule fills these first and never reads them.
EMPTY_ROWS = -1


def config_fingerprint(config: MemoryLLMConfig) -> dict[str, int]:
    """The config numbers that a memory must agree with to be read by a model."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "memory_rows": config.memory_rows,
        "hidden_size": config.hidden_size,
        "num_tokens": config.num_tokens,
        "num_blocks": config.num_blocks,
        "vocab_size": config.vocab_size,
    }


@dataclass(frozen=True)
class MemoryUpdate:
    """
    One injection's write into a memory, as data: applied as a new state (`MemoryState.updated`, differentiable) or
    in place (`MemoryState.update_`, the commit of `inject`, one pass over the memory).

    Attributes:
        delta (`torch.Tensor` of shape `[num_layers, n, hidden_size]`): the new rows, written after the kept ones.
        injection (`int`): the injection's number (the new rows' provenance and the state's new count).
        kept (`torch.Tensor`, *optional*): ascending indices of the surviving rows, shared `[keep]` or per layer
            `[num_layers, keep]`; `None`: the first write into an empty memory, which tiles `delta`.
        replacement (`MemoryState`, *optional*): a variant's own new state (M+), which the update becomes.
        scores (`torch.Tensor` of shape `[num_layers, memory_rows]`, *optional*): the rows' drop scores after the
            update, for states that keep them (`RankedMemoryState`); plain states ignore them.
        archive_rows (`int`): for states that keep an archive of whole chunks (`RankedMemoryState`), its size in rows
            per layer (the delta joins it; the oldest chunks leave it); 0: no archive. Plain states ignore it.
    """

    delta: torch.Tensor | None
    injection: int
    kept: torch.Tensor | None = None
    replacement: "MemoryState | None" = None
    scores: torch.Tensor | None = None
    archive_rows: int = 0


# A little over 200 lines: a state's data, its updates, its cached prefix and its files belong together.
class MemoryState:
    """
    The memory pool that a MemoryLLM reads and writes, kept apart from the model weights.

    Attributes:
        memory (`torch.Tensor` of shape `[num_layers, memory_rows, hidden_size]`): the memory rows.
        initialized (`bool`): whether anything was written (an uninitialised memory is not read).
        provenance (`torch.Tensor` of shape `[num_layers, memory_rows]`, int64, CPU): for every row, the number of
            the injection that wrote it (1 for the first injection into this state; 0 for rows it started with;
            -1 for rows never written).
        injections (`int`): how many injections this state has absorbed.
        version (`int`): changes whenever the memory changes; caches derived from the memory are keyed on it.

    One model can serve many states: pass `memory=state` to `inject`, `forward` and `generate`. A state is
    updated in place (its tensors keep their storage), so a state bound to a model's own `memory` parameter
    keeps that parameter current.
    """

    def __init__(
        self,
        memory: torch.Tensor,
        initialized: bool | torch.Tensor = False,
        provenance: torch.Tensor | None = None,
        injections: int = 0,
    ):
        if memory.dim() != 3:
            raise ValueError(f"memory must be [num_layers, memory_rows, hidden_size], got {tuple(memory.shape)}")
        self.memory = memory
        # A 0-dim uint8 flag; for a model's own state this is the model's `initialized` buffer itself.
        self._initialized_flag = (
            initialized
            if isinstance(initialized, torch.Tensor)
            else torch.tensor(int(initialized), dtype=torch.uint8, device=memory.device)
        )
        if provenance is None:  # an uninitialised memory has no written rows; an initialised one starts with its own
            start = INITIAL_ROWS if bool(self._initialized_flag.item()) else EMPTY_ROWS
            provenance = torch.full(memory.shape[:2], start, dtype=torch.long)
        if provenance.shape != memory.shape[:2]:
            raise ValueError(f"provenance must be {tuple(memory.shape[:2])}, got {tuple(provenance.shape)}")
        self.provenance = provenance.to(device="cpu", dtype=torch.long)
        self.injections = int(injections)
        self.version = 0
        self._prefix = None  # the reading prefix derived from this memory version: see `cached_prefix`
        self._derived = {}  # other values derived from this memory version: see `derived`

    @classmethod
    def bound_to(cls, memory: torch.Tensor, flag: torch.Tensor, like: "MemoryState | None" = None) -> "MemoryState":
        """A state whose rows and flag ARE `memory` `[L, M, d]` and the 0-dim uint8 `flag` (a model's own parameter
        and buffer), keeping the provenance summary and count of `like` when given."""
        provenance = like.provenance if like is not None and like.provenance.shape == memory.shape[:2] else None
        return cls(memory, flag, provenance, like.injections if like is not None else 0)

    def is_bound_to(self, memory: torch.Tensor, flag: torch.Tensor) -> bool:
        """Whether this state still uses `memory`'s storage and `flag` itself (see `bound_to`)."""
        same = self.memory.data_ptr() == memory.data_ptr() and self.memory.device == memory.device
        return same and self._initialized_flag is flag

    @classmethod
    def empty(cls, config: MemoryLLMConfig, device=None, dtype=torch.float32) -> "MemoryState":
        """An uninitialised memory of the shape that `config` asks for."""
        shape = (config.num_hidden_layers, config.memory_rows, config.hidden_size)
        return cls(torch.zeros(shape, device=device, dtype=dtype))

    def written_rows(self, rows: slice = slice(None)) -> torch.Tensor | None:
        """Which of `rows` hold something (`[R]` bool, the same for every layer); `None` when all do."""
        written = self.provenance[0, rows] != EMPTY_ROWS
        return None if bool(written.all()) else written

    @property
    def initialized(self) -> bool:
        return bool(self._initialized_flag.item())

    @property
    def shape(self) -> torch.Size:
        return self.memory.shape

    @property
    def nbytes(self) -> int:
        """Bytes of the memory rows (the provenance adds 8 bytes per row)."""
        return self.memory.numel() * self.memory.element_size()

    def __repr__(self) -> str:
        return (
            f"MemoryState(shape={tuple(self.memory.shape)}, dtype={self.memory.dtype}, device={self.memory.device}, "
            f"initialized={self.initialized}, injections={self.injections})"
        )

    def mark_changed(self) -> None:
        """Call after changing `memory` in place by hand, so that cached prefixes are recomputed."""
        self.version += 1
        self._prefix = None
        self._derived = {}

    # ---------------------------------------------------------------------------------------- derived prefix
    @property
    def prefix(self):
        """The reading prefix (a `SharedPrefix`) cached for the current memory version, or `None`."""
        return self._prefix

    def cached_prefix(self, key: tuple):
        """The reading prefix cached for `key`, or `None`. The key names everything the prefix depends on besides
        this memory version (the model, its weights' version, device, dtype, adapter), so it is never stale."""
        prefix = self._prefix
        return prefix if prefix is not None and prefix.key == (self.version, *key) else None

    def keep_prefix(self, key: tuple, prefix) -> None:
        """Cache `prefix` (with attribute `key`) for this memory version and `key`."""
        prefix.key = (self.version, *key)
        self._prefix = prefix

    def derived(self, key: tuple, compute):
        """`compute()`, computed once per memory version and `key` and kept until the memory changes. A variant
        keeps here what it reads from the memory on every query (e.g. a ranked read's candidate chunks); the key
        names everything else the value depends on (e.g. the device). Call it outside autograd only. (Only
        `mark_changed` changes the version, and it empties this store.)"""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    # ------------------------------------------------------------------------------------------------ updates
    def tiled(self, delta: torch.Tensor, injection: int) -> "MemoryState":
        """The first write into an empty memory: `delta` `[L, n, d]` repeated (then its last rows) to fill it,
        or its last `M` rows when it is that long. A new state."""
        num_layers, num_rows, _ = self.memory.shape
        delta = delta.to(device=self.memory.device, dtype=self.memory.dtype)
        new_rows = delta.shape[1]
        if new_rows >= num_rows:
            rows = delta[:, -num_rows:].clone()
        else:
            copies, remainder = divmod(num_rows, new_rows)
            rows = torch.cat([delta] * copies + ([delta[:, new_rows - remainder :]] if remainder else []), dim=1)
        provenance = torch.full((num_layers, num_rows), injection, dtype=torch.long)
        return MemoryState(rows, True, provenance, injection)

    def appended(self, kept: torch.Tensor, delta: torch.Tensor, injection: int) -> "MemoryState":
        """`[rows at kept (ascending); delta]`, with `kept` shared `[keep]` or per layer `[L, keep]`. A new state
        (differentiable in `delta` and the kept rows); `injection` numbers the new rows in the provenance."""
        memory = self.memory
        delta = delta.to(device=memory.device, dtype=memory.dtype)
        if torch.is_grad_enabled() and (memory.requires_grad or delta.requires_grad):
            layers = torch.arange(memory.shape[0], device=memory.device).unsqueeze(1)
            index = kept.to(memory.device)
            rows = torch.cat([memory[:, index] if index.dim() == 1 else memory[layers, index], delta], dim=1)
        else:  # written once, row block by row block, into a new buffer
            rows = memory.new_empty(memory.shape)
            _write_appended(rows, memory, kept, delta)
        return MemoryState(
            rows, True, _appended_provenance(self.provenance, kept, injection, delta.shape[1]), injection
        )

    def updated(self, update: MemoryUpdate) -> "MemoryState":
        """The state after `update` (planned from this state): a new state; this one is left alone."""
        if update.replacement is not None:
            return update.replacement
        if update.kept is None:
            return self.tiled(update.delta, update.injection)
        return self.appended(update.kept, update.delta, update.injection)

    def update_(self, update: MemoryUpdate, source: "MemoryState | None" = None) -> None:
        """
        Become `source` (default: this state) after `update` (planned from `source`), in place and with one pass
        over the memory: this state's tensors keep their storage (a state bound to a model's parameter keeps that
        parameter current). `inject` calls it only once every new row is computed, so an error before leaves the
        state as it was.
        """
        if update.replacement is not None:
            self.take(update.replacement)
            return
        source = self if source is None else source
        delta = update.delta.to(device=self.memory.device, dtype=self.memory.dtype)
        if update.kept is None:
            provenance = torch.full(self.provenance.shape, update.injection, dtype=torch.long)
        else:
            provenance = _appended_provenance(source.provenance, update.kept, update.injection, delta.shape[1])
        with torch.no_grad():
            if update.kept is None:
                _write_tiled(self.memory, delta)
            else:
                _write_appended(self.memory, source.memory, update.kept, delta)
            self._initialized_flag.fill_(1)
        self.provenance.copy_(provenance)
        self.injections = update.injection
        self.mark_changed()

    def take(self, other: "MemoryState") -> None:
        """Become `other` (an update computed from this state), in place: this state's own tensors keep their
        storage, so a state bound to a model's parameter keeps that parameter current."""
        with torch.no_grad():
            self.memory.copy_(other.memory)
            self._initialized_flag.fill_(int(other.initialized))
        self.provenance.copy_(other.provenance)
        self.injections = other.injections
        self.mark_changed()

    def assign(self, memory: torch.Tensor, initialized: bool = True) -> None:
        """Overwrite the memory rows (e.g. with a checkpoint's memory); provenance restarts."""
        if memory.shape != self.memory.shape:
            raise ValueError(f"memory must be {tuple(self.memory.shape)}, got {tuple(memory.shape)}")
        with torch.no_grad():
            self.memory.copy_(memory)
            self._initialized_flag.fill_(int(initialized))
        self.provenance.fill_(INITIAL_ROWS if initialized else EMPTY_ROWS)
        self.injections = 0
        self.mark_changed()

    def reset(self) -> None:
        """Forget everything: zero rows, never written, uninitialised, no injections."""
        self.assign(torch.zeros_like(self.memory), initialized=False)

    def __deepcopy__(self, memo) -> "MemoryState":
        """A deep copy of everything but the cached prefix and derived values (the copy computes its own)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        skip = {"_prefix": None, "_derived": {}}
        new.__dict__.update({k: skip[k] if k in skip else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def clone(self) -> "MemoryState":
        copy = MemoryState(self.memory.detach().clone(), self.initialized, self.provenance.clone(), self.injections)
        return copy

    def to(self, device=None, dtype=None) -> "MemoryState":
        """A copy on another device or dtype (e.g. CPU while the model is on GPU)."""
        memory = self.memory.detach().to(device=device, dtype=dtype, copy=True)
        return MemoryState(memory, self.initialized, self.provenance.clone(), self.injections)

    def provenance_summary(self) -> dict[int, int]:
        """Rows per injection number, over all layers: `{injection: rows}` (-1: never written, 0: initial rows)."""
        ids, counts = self.provenance.unique(return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    def save(self, path: str | os.PathLike, config: MemoryLLMConfig | None = None) -> None:
        """Save with safetensors, atomically: a temporary file in the same folder, then a rename."""
        tensors, metadata = self.file_contents(config)
        metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
        _write_atomically(tensors, metadata, os.fspath(path))

    def file_contents(self, config: MemoryLLMConfig | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata `save` writes (before the checksum); a subclass adds its own."""
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "initialized": str(int(self.initialized)),
            "injections": str(self.injections),
        }
        if config is not None:
            metadata["config"] = json.dumps(config_fingerprint(config), sort_keys=True)
        tensors = {"memory": self.memory.detach().contiguous().cpu(), "provenance": self.provenance.contiguous()}
        return tensors, metadata

    @classmethod
    def load(
        cls, path: str | os.PathLike, config: MemoryLLMConfig | None = None, device=None, dtype=None
    ) -> "MemoryState":
        """Load a state saved by `save`, checked against `config` when given. Never unpickles anything."""
        tensors, metadata = _read_safetensors(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a MemoryLLM memory file (format={metadata.get('format')!r}).")
        _verify_checksum(path, tensors, metadata)
        if set(tensors) != {"memory", "provenance"}:
            variant = f" of the {metadata['variant']!r} variant" if "variant" in metadata else ""
            raise ValueError(
                f"{path}: expected tensors 'memory' and 'provenance', found {sorted(tensors)}: a memory{variant}; "
                "load it with `model.load_memory_state(path)`, which picks the variant's state class."
            )
        memory, provenance = tensors["memory"], tensors["provenance"]
        if memory.dim() != 3 or provenance.shape != memory.shape[:2] or not memory.is_floating_point():
            raise ValueError(f"{path}: inconsistent shapes {tuple(memory.shape)} / {tuple(provenance.shape)}.")
        if config is not None:
            _check_against_config(path, memory, metadata, config)
        if not torch.isfinite(memory).all():
            raise ValueError(f"{path}: the memory holds NaN or Inf values.")
        try:
            initialized, injections = bool(int(metadata["initialized"])), int(metadata["injections"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: bad metadata {metadata!r}.") from error
        memory = memory.to(device=device, dtype=dtype or memory.dtype)
        return cls(memory, initialized, provenance, injections)


def _write_appended(out: torch.Tensor, memory: torch.Tensor, kept: torch.Tensor, delta: torch.Tensor) -> None:
    """`out[l] = [memory[l, kept(l)]; delta[l]]` for every layer, one layer at a time; `out` may be `memory` itself
    (ascending `kept`: each layer's rows go through one reused buffer of a layer's size, then back)."""
    keep = kept.shape[-1]
    index = kept.to(memory.device)
    in_place = out.data_ptr() == memory.data_ptr()
    buffer = memory.new_empty(keep, memory.shape[2]) if in_place else None
    for layer in range(memory.shape[0]):
        rows = index if index.dim() == 1 else index[layer]
        if in_place:
            torch.index_select(memory[layer], 0, rows, out=buffer)
            out[layer, :keep].copy_(buffer)
        else:
            torch.index_select(memory[layer], 0, rows, out=out[layer, :keep])
    out[:, keep:].copy_(delta)


def _write_tiled(out: torch.Tensor, delta: torch.Tensor) -> None:
    """`out` `[L, M, d]` filled as `MemoryState.tiled` fills a new memory: `delta` repeated, then its last rows."""
    num_rows, new_rows = out.shape[1], delta.shape[1]
    if new_rows >= num_rows:
        out.copy_(delta[:, -num_rows:])
        return
    copies, remainder = divmod(num_rows, new_rows)
    for block in range(copies):
        out[:, block * new_rows : (block + 1) * new_rows].copy_(delta)
    if remainder:
        out[:, copies * new_rows :].copy_(delta[:, new_rows - remainder :])


def _appended_provenance(provenance: torch.Tensor, kept: torch.Tensor, injection: int, new_rows: int) -> torch.Tensor:
    """The provenance `[L, M]` after an append: the kept rows' ids, then `injection` for the `new_rows` new ones."""
    kept_ids = provenance[:, kept] if kept.dim() == 1 else provenance.gather(1, kept)
    new_ids = torch.full((provenance.shape[0], new_rows), injection, dtype=torch.long)
    return torch.cat([kept_ids, new_ids], dim=1)


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (but the checksum itself) and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != CHECKSUM_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, any dtype (bf16 too)
    return digest.hexdigest()


def _verify_checksum(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuses a damaged file. Files of format version 1 (no checksum) load with a warning."""
    saved = metadata.get(CHECKSUM_KEY)
    if saved is None:
        if metadata.get("format_version", "1") != "1":
            raise ValueError(f"{path}: the checksum is missing (format version {metadata.get('format_version')!r}).")
        logger.warning("%s: a memory file without checksum (format version 1): damage cannot be detected.", path)
        return
    if saved != checksum(tensors, metadata):
        raise ValueError(f"{path}: checksum mismatch: the file is damaged (a flipped bit or a partial write).")


def _write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """A temporary file in the same folder, flushed to disk, then renamed over `path`: a crash at any point leaves
    either the previous file or the new one, never a mix."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, tmp_path = tempfile.mkstemp(prefix=".memory-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, tmp_path, metadata=metadata)
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync(folder)  # the rename itself


def _fsync(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders cannot be opened on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot sync folders
        pass
    finally:
        os.close(descriptor)


def _read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(os.fspath(path)), metadata
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises several types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error


def _check_against_config(path, memory: torch.Tensor, metadata: dict[str, str], config: MemoryLLMConfig) -> None:
    expected = (config.num_hidden_layers, config.memory_rows, config.hidden_size)
    if tuple(memory.shape) != expected:
        raise ValueError(
            f"{path}: memory of shape {tuple(memory.shape)} does not fit this model, which needs {expected} "
            "(layers, memory rows, hidden size): it was made for a different model."
        )
    saved = metadata.get("config")
    if saved is None:
        return
    try:
        fingerprint = json.loads(saved)
    except ValueError as error:
        raise ValueError(f"{path}: bad config metadata {saved!r} ({error}).") from error
    if not isinstance(fingerprint, dict):
        raise ValueError(f"{path}: bad config metadata {saved!r} (not a JSON object).")
    if fingerprint != config_fingerprint(config):
        differs = sorted(k for k, v in config_fingerprint(config).items() if fingerprint.get(k) != v)
        raise ValueError(f"{path}: made for a different model config ({', '.join(differs)} differ: {saved}).")


__all__ = ["EMPTY_ROWS", "INITIAL_ROWS", "MemoryState", "MemoryUpdate", "checksum", "config_fingerprint"]
