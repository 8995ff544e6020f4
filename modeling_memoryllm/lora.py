"""LoRA adapters in PEFT's state-dict layout; the active adapter is scoped by a context variable, not module state."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn


_ACTIVE_ADAPTER: ContextVar[str | None] = ContextVar("memoryllm_active_adapter", default=None)


@contextmanager
def active_adapter(name: str | None) -> Iterator[None]:
    """Run the enclosed calls with LoRA adapter `name` (thread- and task-local; restored on exit)."""
    token = _ACTIVE_ADAPTER.set(name)
    try:
        yield
    finally:
        _ACTIVE_ADAPTER.reset(token)


def keeping_adapter(checkpoint_function):
    """`checkpoint_function` (gradient checkpointing) that runs a layer under the adapter active when it was first
    called, also when the backward pass runs it again (outside the `active_adapter` block that chose it)."""

    def checkpointed(function, *args, **kwargs):
        name = _ACTIVE_ADAPTER.get()

        def under_adapter(*inner_args, **inner_kwargs):
            with active_adapter(name):
                return function(*inner_args, **inner_kwargs)

        return checkpoint_function(under_adapter, *args, **kwargs)

    return checkpointed


class LoraLinear(nn.Module):
    """
    A linear layer with named LoRA adapters, in PEFT's state-dict layout (`base_layer`, `lora_A.<name>`,
    `lora_B.<name>`): `y = base(x) + (alpha / r) * B(A(dropout(x)))` for the one active adapter.
    The active adapter is not module state: it comes from `active_adapter(...)`, else `default_adapter`.
    """

    def __init__(self, base_layer: nn.Linear, adapter_names: Sequence[str], lora_config: dict, default_adapter: str):
        super().__init__()
        rank = lora_config["r"]
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({name: self._linear(base_layer.in_features, rank, "A") for name in adapter_names})
        self.lora_B = nn.ModuleDict({name: self._linear(rank, base_layer.out_features, "B") for name in adapter_names})
        dropout = lora_config.get("lora_dropout", 0.0) or 0.0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_config["lora_alpha"] / rank
        self.default_adapter = default_adapter

    def _linear(self, in_features: int, out_features: int, role: str) -> nn.Linear:
        weight = self.base_layer.weight
        linear = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
        linear.lora_role = role  # read by `_init_weights`: B starts at zero so a fresh adapter changes nothing
        return linear

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def merged_weight(self, name: str) -> torch.Tensor:
        """The base weight with adapter `name` merged in: `W + (alpha / r) * B @ A` (`W` itself for another name)."""
        weight = self.base_layer.weight
        if name not in self.lora_A:
            return weight.detach().clone()
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
        return (weight.float() + self.scaling * delta).to(weight.dtype).detach()

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False, adapter_names=None):
        """What peft's `merge_and_unload` / `unload` make of this layer: itself, unchanged. Its adapters are part of
        the model, not peft's (`MemoryLLMForCausalLM.merged_reading_model` merges the reading one)."""
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(hidden)
        name = _ACTIVE_ADAPTER.get() or self.default_adapter
        if name in self.lora_A:
            lora_input = self.lora_dropout(hidden).to(self.lora_A[name].weight.dtype)
            output = output + (self.lora_B[name](self.lora_A[name](lora_input)) * self.scaling).to(output.dtype)
        return output


__all__ = ["LoraLinear", "active_adapter", "keeping_adapter"]
