"""`RankedMemoryState`: a `MemoryState` whose rows carry a score each (`scores`, `[L, M]`), the rank of the row
within the text chunk that wrote it by the attention it received there (`variant_ranked.py`). A full memory drops
the lowest scores first. With `archive_rows` set, the state also keeps every chunk it wrote whole, on the CPU, in an
archive of that many rows per layer (the oldest chunks leave it first), from which a query restores the chunk it
reads. Files hold the scores and the archive next to the rows (same checks as `MemoryState`'s: format, SHA-256,
finite values, config fingerprint, atomic write); a plain `MemoryState` file loads with every score 0.5.
"""

import os

import torch
from safetensors import safe_open

from .memory_state import (
    FORMAT,
    MemoryState,
    MemoryUpdate,
    _check_against_config,
    _read_safetensors,
    _verify_checksum,
)


VARIANT = "training-free-ranked"
UNKNOWN_SCORE = 0.5  # rows whose score is not known (a plain memory file, a checkpoint's own rows)


class RankedMemoryState(MemoryState):
    """
    Attributes (besides `MemoryState`'s):
        scores (`[L, M]` float32, CPU): per row, its rank in `[0, 1]` among the rows of the chunk that wrote it, by
            the attention they received in that chunk (1: the most); 0 for rows never written.
        archive (`list` of `(injection, rows)`, oldest first): the chunks kept whole, each the `[L, n, d]` CPU rows
            that injection `injection` wrote, as it wrote them (never changed in place; states share them).
    """

    def __init__(self, memory, initialized=False, provenance=None, injections: int = 0, scores=None, archive=()):
        super().__init__(memory, initialized, provenance, injections)
        if scores is None:
            scores = torch.where(self.provenance < 0, 0.0, UNKNOWN_SCORE)
        if scores.shape != memory.shape[:2]:
            raise ValueError(f"scores must be {tuple(memory.shape[:2])}, got {tuple(scores.shape)}")
        self.scores = scores.to(device="cpu", dtype=torch.float32)
        self.archive = list(archive)

    @classmethod
    def bound_to(cls, memory, flag, like=None) -> "RankedMemoryState":
        state = super().bound_to(memory, flag, like)
        if isinstance(like, RankedMemoryState) and like.scores.shape == state.scores.shape:
            state.scores, state.archive = like.scores, list(like.archive)
        return state

    @property
    def nbytes(self) -> int:
        """Bytes of the memory rows and of the archive."""
        archived = sum(rows.numel() * rows.element_size() for _, rows in self.archive)
        return super().nbytes + archived

    def archived_chunk(self, injection: int) -> torch.Tensor | None:
        """The rows `[L, n, d]` that injection `injection` wrote, when the archive holds them."""
        return next((rows for number, rows in self.archive if number == injection), None)

    def archive_after(self, update: MemoryUpdate) -> list:
        """The archive after `update`: its delta joins (a CPU copy), and the oldest chunks leave while the archive
        holds more than `update.archive_rows` rows per layer; empty without an archive."""
        if update.archive_rows <= 0 or update.delta is None:
            return []
        rows = update.delta.detach().to("cpu", self.memory.dtype, copy=True)  # [L, n, d]
        archive = [*self.archive, (update.injection, rows)]
        while sum(chunk.shape[1] for _, chunk in archive) > update.archive_rows:
            archive.pop(0)
        return archive

    def scores_after(self, kept: torch.Tensor, delta_scores: torch.Tensor) -> torch.Tensor:
        """`[L, M]`: the scores of the rows at `kept` (`[keep]` or `[L, keep]`), then `delta_scores` `[L, n]`."""
        kept = kept.cpu()
        kept_scores = self.scores[:, kept] if kept.dim() == 1 else self.scores.gather(1, kept)
        return torch.cat([kept_scores, delta_scores.to("cpu", torch.float32)], dim=1)

    def updated(self, update: MemoryUpdate) -> "RankedMemoryState":
        """`MemoryState.updated`, with the scores the update carries. A new state."""
        base = super().updated(update)
        if isinstance(base, RankedMemoryState):
            return base
        archive = self.archive_after(update)
        scores = update.scores
        return RankedMemoryState(base.memory, base.initialized, base.provenance, base.injections, scores, archive)

    def update_(self, update: MemoryUpdate, source: "MemoryState | None" = None) -> None:
        """`MemoryState.update_` (in place, one pass over the memory), with the scores and archive of the update."""
        archive = (source if isinstance(source, RankedMemoryState) else self).archive_after(update)
        super().update_(update, source)
        if update.replacement is None:
            self.scores = update.scores.clone() if update.scores is not None else self._unknown_scores()
            self.archive = archive

    def take(self, other: "MemoryState") -> None:
        super().take(other)
        self.scores = other.scores.clone() if isinstance(other, RankedMemoryState) else self._unknown_scores()
        self.archive = list(other.archive) if isinstance(other, RankedMemoryState) else []

    def assign(self, memory: torch.Tensor, initialized: bool = True) -> None:
        super().assign(memory, initialized)
        self.scores = self._unknown_scores()
        self.archive = []

    def _unknown_scores(self) -> torch.Tensor:
        return torch.where(self.provenance < 0, 0.0, UNKNOWN_SCORE).float()

    def clone(self) -> "RankedMemoryState":
        return self.to()

    def to(self, device=None, dtype=None) -> "RankedMemoryState":
        return self.with_rows(self.memory.detach().to(device=device, dtype=dtype, copy=True))

    def with_rows(self, memory: torch.Tensor) -> "RankedMemoryState":
        """A new state holding `memory` `[L, M, w]`, with a copy of this state's provenance, count and scores, and its
        archive (the chunks shared: they never change)."""
        provenance, scores = self.provenance.clone(), self.scores.clone()
        return RankedMemoryState(memory, self.initialized, provenance, self.injections, scores, self.archive)

    # ------------------------------------------------------------------------------------------------- files
    def file_contents(self, config=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """`MemoryState`'s file (saved by its `save`), with the scores, the variant's name and any archive (its rows
        `[L, A, d]` in order, and `[2, C]` injection numbers and row counts of its chunks)."""
        tensors, metadata = super().file_contents(config)
        tensors["scores"] = self.scores.contiguous()
        metadata["variant"] = VARIANT
        if self.archive:
            tensors["archive"] = torch.cat([rows for _, rows in self.archive], dim=1).contiguous()
            chunks = [[number, rows.shape[1]] for number, rows in self.archive]
            tensors["archive_chunks"] = torch.tensor(chunks, dtype=torch.long).T.contiguous()
        return tensors, metadata

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None, dtype=None) -> "RankedMemoryState":
        """Load a file of `save`, or a plain `MemoryState` file (its rows' scores are unknown: 0.5)."""
        if not _has_scores(path):
            plain = MemoryState.load(path, config=config, device=device, dtype=dtype)
            return cls(plain.memory, plain.initialized, plain.provenance, plain.injections)
        tensors, metadata = _read_safetensors(path)
        scores = tensors["scores"]
        if metadata.get("format") != FORMAT or metadata.get("variant") != VARIANT:
            raise ValueError(f"{path}: not a ranked MemoryLLM memory file (format={metadata.get('format')!r}).")
        _verify_checksum(path, tensors, metadata)
        memory, provenance = tensors.get("memory"), tensors.get("provenance")
        if set(tensors) - ARCHIVE_TENSORS != {"memory", "provenance", "scores"} or memory.dim() != 3:
            raise ValueError(f"{path}: expected tensors memory, provenance and scores, found {sorted(tensors)}.")
        if provenance.shape != memory.shape[:2] or scores.shape != memory.shape[:2]:
            raise ValueError(f"{path}: inconsistent shapes {tuple(memory.shape)} / {tuple(scores.shape)}.")
        if config is not None:
            _check_against_config(path, memory, metadata, config)
        archive = _archive_of(path, tensors, memory)
        if not (torch.isfinite(memory).all() and torch.isfinite(scores).all()):
            raise ValueError(f"{path}: the memory holds NaN or Inf values.")
        memory = memory.to(device=device, dtype=dtype or memory.dtype)
        archive = [(number, rows.to(dtype=dtype or rows.dtype)) for number, rows in archive]
        injections = int(metadata.get("injections", 0))
        return cls(memory, metadata.get("initialized") == "1", provenance, injections, scores, archive)


ARCHIVE_TENSORS = {"archive", "archive_chunks"}


def _archive_of(path, tensors: dict[str, torch.Tensor], memory: torch.Tensor) -> list:
    """The archive of a file's tensors (`file_contents`): `[(injection, rows [L, n, d])]`, checked against `memory`."""
    if not ARCHIVE_TENSORS & set(tensors):
        return []
    rows, chunks = tensors.get("archive"), tensors.get("archive_chunks")
    layers_and_width = (memory.shape[0], memory.shape[2])
    if rows is None or chunks is None or rows.dim() != 3 or (rows.shape[0], rows.shape[2]) != layers_and_width:
        raise ValueError(f"{path}: an archive needs rows [L, A, d] like the memory's and its chunks [2, C].")
    counts = chunks[1] if chunks.dim() == 2 and chunks.shape[0] == 2 else None
    if counts is None or int(counts.sum()) != rows.shape[1] or bool((counts < 1).any()):
        raise ValueError(f"{path}: the archive's chunks do not add up to its {rows.shape[1]} rows.")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{path}: the archive holds NaN or Inf values.")
    parts = rows.split(chunks[1].tolist(), dim=1)
    return [(int(number), part.clone()) for number, part in zip(chunks[0].tolist(), parts)]


def _has_scores(path) -> bool:
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return "scores" in handle.keys()
    except Exception:  # not a safetensors file: `MemoryState.load` says what is wrong with it
        return False


__all__ = ["RankedMemoryState"]
