"""
peft LoRA on a projection that already carries MemoryLLM's built-in adapters (a `LoraLinear`).

peft wraps `torch.nn.Linear` layers; a `LoraLinear` (the released adapters, in peft's own state-dict layout) is not
one, so `get_peft_model` refuses it. `lora_config(...)` is peft's `LoraConfig` that also accepts them: peft's LoRA
runs around the `LoraLinear` (its built-in adapter first, peft's added on top), `merge_adapter` / `merge_and_unload`
merge peft's update into the base weight and give the `LoraLinear` back with its built-in adapters. Projections
without built-in adapters need none of this: a plain `LoraConfig` works there. Not a remote-code file (it imports
peft): `pip install peft` and import it from the installed package.

    from peft import get_peft_model
    from modeling_memoryllm.peft_support import lora_config

    peft_model = get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))
"""

from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear

from .lora import LoraLinear


class PeftOnLoraLinear(PeftLinear):
    """peft's LoRA layer around a `LoraLinear`: unloading gives back the `LoraLinear` (peft's own layer would give
    back the innermost linear layer and so drop the built-in adapters)."""

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.base_layer


def lora_config(**kwargs) -> LoraConfig:
    """`peft.LoraConfig(**kwargs)` that can also target projections carrying built-in adapters. Pass it as
    `config=` to `PeftModel.from_pretrained` too: a saved adapter config does not remember it."""
    config = LoraConfig(**kwargs)
    config._register_custom_module({LoraLinear: PeftOnLoraLinear})
    return config


__all__ = ["PeftOnLoraLinear", "lora_config"]
