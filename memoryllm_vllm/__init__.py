"""
Serving MemoryLLM memories with vLLM (the optional extra `vllm`).

* `store`: the store of published memories (one prefix-K/V file per memory version, a manifest per memory) on
  local disk, and the fields a request sends to read one (`MemoryStore.request_fields`).
* `service`: injection stays in `modeling_memoryllm`; the service injects into a named memory, keeps its
  `MemoryState`, and publishes each new version's prefix K/V to the store.
* `connector`: `MemoryLLMConnector`, a vLLM `KVConnectorBase_V1` that loads a request's memory K/V into the
  placeholder tokens that open its prompt, so vLLM computes only the user's text.
* `plugin`: the `vllm.general_plugins` entry point that registers the connector by name.

Only `connector` and `plugin` import vLLM.
"""

from .store import Manifest, MemoryStore


__all__ = ["Manifest", "MemoryStore"]
