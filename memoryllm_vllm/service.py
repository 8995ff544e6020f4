"""
The memory service: injection stays in `modeling_memoryllm`; this writes named memories and publishes each new
version's prefix keys/values to the store that `MemoryLLMConnector` reads.

    service = MemoryService(model, MemoryStore("store"), export_dir="reading-model")
    manifest = service.inject("alice", "The lighthouse on Varden Island was built in 1887 ...")
    extra_body = manifest.request_fields()  # cache_salt, kv_transfer_params, chat_template_kwargs

One lock per memory name keeps concurrent injections into the same memory in order; different memories inject
concurrently.
"""

import os
import threading

import torch
from transformers.utils import logging

from modeling_memoryllm.export import export_prefix, read_export_info, reading_fingerprint
from modeling_memoryllm.memory_state import MemoryState

from .store import Manifest, MemoryStore, check_name


logger = logging.get_logger(__name__)


class MemoryService:
    """Injects into named memories of `model` and publishes them to `store`, for the reading model exported to
    `export_dir` (its fingerprint and head layout; refused when `model` is not the model it was exported from)."""

    def __init__(self, model, store: MemoryStore, export_dir: str | os.PathLike | None = None, head_dim=None):
        self.model, self.store = model.eval(), store
        info = read_export_info(export_dir) if export_dir is not None else None
        source_dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads
        exported_dim = info["head_dim"] if info else head_dim
        self.head_dim = exported_dim if exported_dim and exported_dim != source_dim else None
        self.fingerprint = reading_fingerprint(model, self.head_dim)
        if info is not None and info["fingerprint"] != self.fingerprint:
            raise ValueError(f"{export_dir} was exported from another model (or another head layout) than this one")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(check_name(name), threading.Lock())

    def state(self, name: str) -> MemoryState:
        """The memory `name` as the package holds it (a new empty one if it was never written)."""
        path = self.store.state_path(name)
        if path.exists():
            return self.model.load_memory_state(path)
        return self.model.new_memory_state()

    def publish(self, name: str, state: MemoryState) -> Manifest:
        """Save `state` as memory `name` and publish its prefix keys/values as the next version."""
        self.store.folder(name).mkdir(parents=True, exist_ok=True)
        state.save(self.store.state_path(name), config=self.model.config)
        export = export_prefix(self.model, state, self.head_dim, fingerprint=self.fingerprint)
        manifest = self.store.publish(name, export)
        logger.info("Published memory %r version %d (%d rows, %d bytes).", name, manifest.version, export.rows,
                    export.nbytes)  # fmt: skip
        return manifest

    def inject(self, name: str, inputs, generator: torch.Generator | None = None) -> Manifest:
        """Inject `inputs` (text, texts or token ids, as `model.inject`) into memory `name`; publish the result."""
        with self._lock(name):
            state = self.state(name)
            with torch.no_grad():
                self.model.inject(inputs, memory=state, generator=generator)
            return self.publish(name, state)

    def reset(self, name: str) -> Manifest:
        """Empty memory `name` (a new version with no rows: requests then read nothing)."""
        with self._lock(name):
            return self.publish(name, self.model.new_memory_state())


__all__ = ["MemoryService"]
