"""
`MemoryLLMConnector`: a vLLM KV connector (`KVConnectorBase_V1`) that serves MemoryLLM memories.

A request that reads memory `name` opens its prompt with `R` placeholder tokens (the exported chat template writes
them for `chat_template_kwargs={"memory_rows": R}`), names the memory in `kv_transfer_params`
(`{"memoryllm_memory": name, "memoryllm_version": v}`) and sets `cache_salt` to the version's salt
(`Manifest.request_fields()` gives all three). The scheduler side claims those `R` tokens as externally computed;
the worker side writes the memory's prefix keys/values into their KV-cache slots through the attention backend's
own `do_kv_cache_update` (so the backend's layout is kept), and vLLM computes only the text after them. With
prefix caching, the placeholder blocks stay cached under the salt, and later requests load only what is not.

A request whose memory, version, salt, fingerprint or placeholders do not match is failed (its blocks are
reported as load errors; `kv_load_failure_policy="fail"`, vLLM's default), never served from the wrong rows.

`kv_connector_extra_config`: `store` (the store's root, required), `cache_bytes` (prefix K/V kept in RAM per
worker, default 4 GiB), `placeholder_token_id` (default: the export's).
"""

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from modeling_memoryllm.export import PrefixExport, read_export_info

from .store import MEMORY_KEY, VERSION_KEY, Manifest, MemoryStore


logger = init_logger(__name__)


@dataclasses.dataclass
class Plan:
    """What the scheduler decided for one request: load `rows` placeholder slots of (`name`, `version`), or fail."""

    name: str
    version: int
    rows: int
    error: str | None = None


@dataclasses.dataclass
class Load:
    """One load of a step: tokens `start..end-1` of the memory into the request's blocks (or a failure to report)."""

    request_id: str
    name: str
    version: int
    start: int
    end: int
    block_ids: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class MemoryLLMConnectorMetadata(KVConnectorMetadata):
    loads: list[Load] = dataclasses.field(default_factory=list)


def check_request(manifest: Manifest | None, plan: Plan, prompt: list[int], salt, placeholder: int) -> str | None:
    """Why a request may not read `manifest` (`None`: it may)."""
    if manifest is None:
        return f"memory {plan.name!r} version {plan.version} is not in the store"
    if salt != manifest.salt:
        return f"cache_salt must be {manifest.salt!r} for memory {plan.name!r} version {manifest.version}"
    rows = manifest.rows
    if len(prompt) <= rows or any(token != placeholder for token in prompt[:rows]):
        return f"the prompt must open with {rows} placeholder tokens (id {placeholder}) and then text"
    if prompt[rows] == placeholder:
        return f"the prompt opens with more than {rows} placeholder tokens"
    return None


class PrefixCache:
    """The prefix keys/values of recently read memory versions, kept in RAM up to `budget` bytes (LRU)."""

    def __init__(self, store: MemoryStore, fingerprint: str, budget: int):
        self.store, self.fingerprint, self.budget = store, fingerprint, budget
        self._entries: OrderedDict[tuple[str, int], PrefixExport] = OrderedDict()

    def get(self, name: str, version: int) -> PrefixExport:
        key = (name, version)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        export = self.store.load(name, version, fingerprint=self.fingerprint)
        self._entries[key] = export
        while len(self._entries) > 1 and sum(e.nbytes for e in self._entries.values()) > self.budget:
            self._entries.popitem(last=False)
        return export


def slot_mapping(block_ids: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """The KV-cache slots of tokens `start..end-1` of a request whose blocks are `block_ids`."""
    positions = torch.arange(start, end)
    blocks = torch.tensor(block_ids, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def blocks_of(load: Load, block_size: int) -> set[int]:
    return set(load.block_ids[load.start // block_size : (load.end - 1) // block_size + 1])


class MemoryLLMConnector(KVConnectorBase_V1):
    """Loads each request's memory prefix keys/values from the store into its placeholder tokens (see the module)."""

    _cache_hit_source = CacheHitSource.DISK

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if "store" not in extra:
            raise ValueError('MemoryLLMConnector needs kv_connector_extra_config={"store": "<store root>"}')
        self.store = MemoryStore(extra["store"])
        info = read_export_info(vllm_config.model_config.model)
        self.fingerprint = info["fingerprint"]
        self.placeholder = int(extra.get("placeholder_token_id", info["placeholder_token_id"]))
        self.block_size = vllm_config.cache_config.block_size
        self.dtype = vllm_config.model_config.dtype  # what the backend takes as new keys/values (it may quantize)
        self._plans: dict[str, Plan] = {}  # scheduler: per request, until it finishes
        self._pending: dict[str, Load] = {}  # scheduler: loads of the step being built
        self._prefixes = PrefixCache(self.store, self.fingerprint, int(extra.get("cache_bytes", 4 << 30)))
        self._failed_blocks: set[int] = set()  # worker: blocks that could not be loaded this step
        logger.info("MemoryLLMConnector (%s): store %s, placeholder id %d", role.name, extra["store"], self.placeholder)

    # ------------------------------------------------------------------------------------------ scheduler side
    def _plan(self, request) -> Plan | None:
        """The request's plan (made once per request): `None` when it names no memory."""
        if request.request_id in self._plans:
            return self._plans[request.request_id]
        params = request.kv_transfer_params or {}
        name = params.get(MEMORY_KEY)
        if name is None:
            return None
        version = params.get(VERSION_KEY)
        try:
            manifest = self.store.manifest(name, version)
        except ValueError as error:  # a bad name
            manifest, plan = None, Plan(str(name), -1, 0, str(error))
        else:
            plan = Plan(name, manifest.version if manifest else int(version or -1), manifest.rows if manifest else 0)
        prompt = list(request.prompt_token_ids or [])
        plan.error = plan.error or check_request(manifest, plan, prompt, request.cache_salt, self.placeholder)
        if manifest is not None and manifest.fingerprint != self.fingerprint:
            plan.error = f"memory {name!r} was exported for another reading model than the one served"
        if plan.error:
            logger.error("Request %s cannot read its memory: %s", request.request_id, plan.error)
            leading = next((i for i, token in enumerate(prompt) if token != self.placeholder), len(prompt))
            plan.rows = max(1, min(leading, len(prompt) - 1))  # claimed, then reported as failed
        self._plans[request.request_id] = plan
        return plan

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        plan = self._plan(request)
        if plan is None or plan.rows <= num_computed_tokens:
            return 0, False
        return plan.rows - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        plan = self._plans.get(request.request_id)
        if plan is None or num_external_tokens <= 0:
            return
        start = plan.rows - num_external_tokens
        self._pending[request.request_id] = Load(
            request.request_id, plan.name, plan.version, start, plan.rows, error=plan.error
        )

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = MemoryLLMConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._pending:
                load = self._pending.pop(new.req_id)
                load.block_ids = list(new.block_ids[0])
                meta.loads.append(load)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in self._pending and req_id in cached.resumed_req_ids and cached.new_block_ids[i]:
                load = self._pending.pop(req_id)
                load.block_ids = list(cached.new_block_ids[i][0])
                meta.loads.append(load)
        if self._pending:
            logger.warning("Loads allocated but not scheduled: %s", sorted(self._pending))
            self._pending.clear()
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        return False, None

    # --------------------------------------------------------------------------------------------- worker side
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, MemoryLLMConnectorMetadata) or not metadata.loads:
            return
        layers = attention_layers(forward_context)
        for load in metadata.loads:
            try:
                if load.error:
                    raise ValueError(load.error)
                export = self._prefixes.get(load.name, load.version)
                if export.rows < load.end:
                    raise ValueError(f"memory {load.name!r} version {load.version} has only {export.rows} rows")
            except ValueError as error:
                logger.error("Request %s: memory not loaded: %s", load.request_id, error)
                self._failed_blocks |= blocks_of(load, self.block_size)
                continue
            self._write(load, export, layers)

    def _write(self, load: Load, export: PrefixExport, layers: dict) -> None:
        """Write tokens `load.start..load.end-1` of `export` into every attention layer's KV cache."""
        slots = slot_mapping(load.block_ids, load.start, load.end, self.block_size)
        for name, layer in layers.items():
            index = extract_layer_index(name)
            kv_cache = layer.kv_cache
            slots = slots.to(kv_cache.device)
            keys = export.keys[index, :, load.start : load.end].transpose(0, 1)  # [n, Hkv, hd]
            values = export.values[index, :, load.start : load.end].transpose(0, 1)
            keys = keys.to(device=kv_cache.device, dtype=self.dtype).contiguous()
            values = values.to(device=kv_cache.device, dtype=self.dtype).contiguous()
            layer.impl.do_kv_cache_update(layer, keys, values, kv_cache, slots)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed


def attention_layers(forward_context) -> dict:
    """The attention layers of the model that have a KV cache, by name."""
    layers = {}
    for name, layer in forward_context.no_compile_layers.items():
        kv_cache = getattr(layer, "kv_cache", None)
        impl = getattr(layer, "impl", None)
        if isinstance(kv_cache, torch.Tensor) and kv_cache.numel() and hasattr(impl, "do_kv_cache_update"):
            layers[name] = layer
    return layers


__all__ = ["MemoryLLMConnector", "MemoryLLMConnectorMetadata", "check_request", "slot_mapping"]
