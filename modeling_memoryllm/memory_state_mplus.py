"""`MPlusMemoryState`: the memory of M+ (SEMANTICS-MPLUS.md): a short-term memory (STM) read whole, plus a long-term
memory (LTM) per layer on the CPU that a retriever searches per query, and the buffer of dropped rows not yet merged.

Where each part lives: the STM (`memory`) wherever the user puts it (the model's device by default); everything else
on the CPU. Layers hold different numbers of LTM rows (ragged lists). Files are safetensors with the same integrity
checks as `MemoryState` (format, SHA-256, finite values, config fingerprint), written atomically; loading reads
tensor by tensor through `safe_open` (the file is memory-mapped, never read whole into a second buffer).
"""

import json
import os

import torch
from safetensors import safe_open

from .memory_state import (
    CHECKSUM_KEY,
    EMPTY_ROWS,
    FORMAT,
    FORMAT_VERSION,
    INITIAL_ROWS,
    MemoryState,
    _check_against_config,
    _verify_checksum,
    _write_atomically,
    checksum,
    config_fingerprint,
)


LTM_PARTS = ("ltm", "ltm_keys", "ltm_ages", "ltm_rf")  # per layer: rows [n, d], keys [n, s], ages [n], rf [n]
BUFFER_PARTS = ("buffer_rows", "buffer_keys", "buffer_ages")  # [L, c, d], [L, c, s], [L, c]


class MPlusMemoryState(MemoryState):
    """
    Attributes (besides `MemoryState`'s `memory` = the STM `[L, M, d]`, `provenance`, `injections`, `version`):
        stm_ages (`[L, M]` float64, CPU): age of every STM row (the age it arrived with; STM ages never grow).
        ltm, ltm_keys, ltm_ages, ltm_rf (lists of `L` CPU tensors `[n_l, d]`, `[n_l, s]`, `[n_l]`, `[n_l]`): the
            long-term rows, their retriever keys (state: never recomputed), ages and recall frequencies.
        buffer_rows, buffer_keys, buffer_ages (`[L, c, d]`, `[L, c, s]`, `[L, c]`, CPU): rows dropped from the STM
            since the last merge (searchable before they are merged).
        update_step (`int`): rows written since the last merge; a merge runs once it reaches `F * N`.
    An M+ memory is always initialised (the model has no first-injection rule).
    """

    def __init__(self, memory, stm_ages=None, ltm=None, buffer=None, update_step=0, provenance=None, injections=0):
        if provenance is None:
            provenance = torch.full(memory.shape[:2], INITIAL_ROWS, dtype=torch.long)
        super().__init__(memory, True, provenance, injections)
        layers, rows, width = memory.shape
        self.stm_ages = (torch.zeros(layers, rows) if stm_ages is None else stm_ages).to("cpu", torch.float64)
        parts = ltm if ltm is not None else {name: [torch.zeros(0)] * layers for name in LTM_PARTS}
        self.ltm, self.ltm_keys = list(parts["ltm"]), list(parts["ltm_keys"])
        self.ltm_ages = [a.to("cpu", torch.float64) for a in parts["ltm_ages"]]
        self.ltm_rf = [f.to("cpu", torch.float64) for f in parts["ltm_rf"]]
        key_dim = self.ltm_keys[0].shape[-1] if self.ltm_keys[0].dim() == 2 else 0
        empty = (torch.zeros(layers, 0, width), torch.zeros(layers, 0, key_dim), torch.zeros(layers, 0))
        self.buffer_rows, self.buffer_keys, self.buffer_ages = buffer if buffer is not None else empty
        self.buffer_ages = self.buffer_ages.to("cpu", torch.float64)
        self.update_step = int(update_step)

    @property
    def initialized(self) -> bool:
        return True

    @property
    def ltm_rows(self) -> list[int]:
        """LTM rows per layer (`n_l`)."""
        return [len(rows) for rows in self.ltm]

    def ltm_parts(self) -> dict[str, list[torch.Tensor]]:
        return {"ltm": self.ltm, "ltm_keys": self.ltm_keys, "ltm_ages": self.ltm_ages, "ltm_rf": self.ltm_rf}

    @property
    def nbytes(self) -> int:
        """Bytes of every part: STM, ages, LTM rows, keys, ages, recall frequencies, buffer."""
        tensors = [self.memory, self.stm_ages, *sum(self.ltm_parts().values(), []), *self.buffer()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.buffer_rows, self.buffer_keys, self.buffer_ages

    def __repr__(self) -> str:
        return (
            f"MPlusMemoryState(stm={tuple(self.memory.shape)}, ltm_rows={self.ltm_rows}, "
            f"buffer_rows={self.buffer_rows.shape[1]}, update_step={self.update_step}, injections={self.injections})"
        )

    def replaced(self, **parts) -> "MPlusMemoryState":
        """A new state with `parts` (constructor arguments) replaced and the rest shared."""
        current = dict(
            memory=self.memory,
            stm_ages=self.stm_ages,
            ltm=self.ltm_parts(),
            buffer=self.buffer(),
            update_step=self.update_step,
            provenance=self.provenance,
            injections=self.injections,
        )
        return MPlusMemoryState(**{**current, **parts})

    def take(self, other: "MPlusMemoryState") -> None:
        super().take(other)  # the STM in place (it may be a model's parameter)
        self.stm_ages = other.stm_ages.clone()
        self.ltm, self.ltm_keys, self.ltm_ages, self.ltm_rf = (list(v) for v in other.ltm_parts().values())
        self.buffer_rows, self.buffer_keys, self.buffer_ages = other.buffer()
        self.update_step = other.update_step

    def clone(self) -> "MPlusMemoryState":
        return self.to()

    def to(self, device=None, dtype=None) -> "MPlusMemoryState":
        """A copy; `device`/`dtype` apply to the STM (the LTM and buffer stay on the CPU)."""
        ltm = {name: [t.clone() for t in values] for name, values in self.ltm_parts().items()}
        memory = self.memory.detach().to(device=device, dtype=dtype, copy=True)
        buffer = tuple(t.clone() for t in self.buffer())
        parts = dict(memory=memory, stm_ages=self.stm_ages.clone(), ltm=ltm, buffer=buffer)
        return self.replaced(**parts, provenance=self.provenance.clone())

    @classmethod
    def empty(cls, config, device=None, dtype=torch.float32) -> "MPlusMemoryState":
        """A memory with nothing in it: STM rows never written (not read until written), an empty LTM."""
        shape = (config.num_hidden_layers, config.memory_rows, config.hidden_size)
        keys = config.selector_hidden_dim
        layers = config.num_hidden_layers
        ltm = {
            "ltm": [torch.zeros(0, config.hidden_size, dtype=dtype)] * layers,
            "ltm_keys": [torch.zeros(0, keys, dtype=dtype)] * layers,
            "ltm_ages": [torch.zeros(0, dtype=torch.float64)] * layers,
            "ltm_rf": [torch.zeros(0, dtype=torch.float64)] * layers,
        }
        buffer = (torch.zeros(layers, 0, shape[2], dtype=dtype), torch.zeros(layers, 0, keys, dtype=dtype))
        memory = torch.zeros(shape, device=device, dtype=dtype)
        provenance = torch.full(shape[:2], EMPTY_ROWS, dtype=torch.long)
        return cls(memory, ltm=ltm, buffer=(*buffer, torch.zeros(layers, 0)), provenance=provenance)

    # ---------------------------------------------------------------------------------------------- files
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every part as named contiguous CPU tensors (no copy for CPU parts)."""
        named = {"memory": self.memory.detach().contiguous().cpu(), "provenance": self.provenance.contiguous()}
        named["stm_ages"] = self.stm_ages.contiguous()
        for name, values in self.ltm_parts().items():
            named.update({f"{name}.{layer}": value.contiguous() for layer, value in enumerate(values)})
        named.update(dict(zip(BUFFER_PARTS, (t.contiguous() for t in self.buffer()))))
        return named

    def save(self, path: str | os.PathLike, config=None) -> None:
        """Save with safetensors, atomically (the tensors are written from their own storage: no second copy)."""
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "variant": "mplus",
            "initialized": "1",
            "injections": str(self.injections),
            "update_step": str(self.update_step),
        }
        if config is not None:
            metadata["config"] = json.dumps(config_fingerprint(config), sort_keys=True)
        tensors = self.tensors()
        metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
        _write_atomically(tensors, metadata, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None, dtype=None) -> "MPlusMemoryState":
        """Load a state saved by `save`: tensor by tensor from the memory-mapped file; checked like `MemoryState`."""
        tensors, metadata = _map_file(path)
        if metadata.get("format") != FORMAT or metadata.get("variant") != "mplus":
            raise ValueError(f"{path}: not an M+ memory file (format={metadata.get('format')!r}).")
        _verify_checksum(path, tensors, metadata)
        layers = tensors["memory"].shape[0]
        if config is not None:
            _check_against_config(path, tensors["memory"], metadata, config)
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            raise ValueError(f"{path}: the memory holds NaN or Inf values.")
        ltm = {name: [tensors[f"{name}.{layer}"] for layer in range(layers)] for name in LTM_PARTS}
        return cls(
            tensors["memory"].to(device=device, dtype=dtype or tensors["memory"].dtype),
            tensors["stm_ages"],
            ltm,
            tuple(tensors[name] for name in BUFFER_PARTS),
            int(metadata.get("update_step", "0")),
            tensors["provenance"],
            int(metadata.get("injections", "0")),
        )


def _map_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises several types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error


__all__ = ["MPlusMemoryState"]
