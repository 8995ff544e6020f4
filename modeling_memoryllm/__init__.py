"""MemoryLLM for transformers: `MemoryLLMForCausalLM`, `MemoryLLMConfig` and `MemoryState`.

Importing the package registers the model with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`), so `from_pretrained` works on MemoryLLM folders without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_memoryllm import MemoryPrefixCache
from .configuration_memoryllm import MemoryLLMConfig
from .lora import active_adapter
from .memory_state import MemoryState
from .modeling_memoryllm import MemoryLLMForCausalLM


AutoConfig.register("memoryllm", MemoryLLMConfig, exist_ok=True)
AutoModel.register(MemoryLLMConfig, MemoryLLMForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(MemoryLLMConfig, MemoryLLMForCausalLM, exist_ok=True)

__all__ = ["MemoryLLMConfig", "MemoryLLMForCausalLM", "MemoryPrefixCache", "MemoryState", "active_adapter"]
__version__ = "0.1.0"
