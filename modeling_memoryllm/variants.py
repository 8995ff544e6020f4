"""
Memory variants: the rules that differ between the members of the MemoryLLM family, one registered piece each.

A variant says, for its family member,
- how an injection forms its queries and which rows it writes (`injection_plan`, `written_rows`);
- how the memory is updated: the first write into an empty memory and the drop-and-append (`update`);
- how the memory is read: how many prefix rows there are and which of them attention may see;
- what its config means (`adapt_config`, `memory_rows`) and how a released config without a variant name is
  recognised (`recognises`).

The model, the injection pass and the cache call these methods; no shared code tests a variant's name. A new
variant is a subclass registered with `@register_variant` in its own file, imported at the end of this one.
"""

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from .memory_state import EMPTY_ROWS, MemoryState, MemoryUpdate


MEMORY_VARIANTS: dict[str, type["MemoryVariant"]] = {}
_ALIASES: dict[str, str] = {}


def register_variant(cls: type["MemoryVariant"]) -> type["MemoryVariant"]:
    """Class decorator: make `cls` available under `cls.name` and its `aliases` (e.g. the legacy rule names)."""
    MEMORY_VARIANTS[cls.name] = cls
    for alias in cls.__dict__.get("aliases", ()):  # a subclass does not inherit its parent's aliases
        _ALIASES[alias] = cls.name
    return cls


def canonical_name(name: str) -> str:
    """The registered name of `name` (itself, or the variant it is an alias of)."""
    name = _ALIASES.get(name, name)
    if name not in MEMORY_VARIANTS:
        known = sorted(MEMORY_VARIANTS) + sorted(_ALIASES)
        raise ValueError(f"Unknown memory variant {name!r}: expected one of {known}")
    return name


def recognise_released(raw: dict) -> str:
    """The variant of a released config that names none: the first registered variant that recognises it."""
    for cls in MEMORY_VARIANTS.values():
        if cls.recognises(raw):
            return cls.name
    return MemoryLLM8B.name


def get_variant(config) -> "MemoryVariant":
    return MEMORY_VARIANTS[canonical_name(config.memory_variant)](config)


@dataclass(frozen=True)
class QueryRead:
    """What a new query reads of the prefix, chosen at its prefill (`MemoryVariant.query_read`).

    Attributes:
        read (`torch.Tensor` of shape `[B, P]`, bool): the prefix rows each batch row may read.
        tail_rows (`list`, *optional*): per batch row, `None` or memory rows `[L, n, d]` that this query's cache
            holds in the prefix's last `n` slots instead of the memory's own (`read` covers those slots); the
            prefix cached on the state is left alone.
        tail_keys (`list`, *optional*): per batch row, `None` or what names its tail rows within one memory version
            (e.g. the chunks they hold), so that their keys/values are computed once per memory version
            (`SharedPrefix.tails`); without one they are computed per query.
    """

    read: torch.Tensor
    tail_rows: list | None = None
    tail_keys: list | None = None


@dataclass(frozen=True)
class InjectionPlan:
    """How one injection pass of `length` text tokens is laid out."""

    num_new: int  # rows written per layer
    memory_queries: int  # last memory rows that run as queries before the text (short text, released rule)
    reads_memory: bool  # whether the pass reads the prefix `[bos, last N memory rows]`
    add_new_memory_embedding: bool  # whether `e` is added to the last `num_new` query rows of every layer


class MemoryVariant:
    """The rules of one family member; `config` is the model's `MemoryLLMConfig`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    state_class: ClassVar[type] = MemoryState
    trained_on_long_texts: ClassVar[bool] = True  # a chunk much shorter than training's disturbs the memory: warn

    def __init__(self, config):
        self.config = config

    # ------------------------------------------------------------------------------------------------- config
    @classmethod
    def recognises(cls, raw: dict) -> bool:
        """Whether a released config (its keys as given, without `memory_variant`) is this variant's."""
        return False

    @classmethod
    def adapt_config(cls, config) -> None:
        """Variant-specific meaning of config fields (called at the end of `MemoryLLMConfig.__post_init__`)."""

    @classmethod
    def memory_rows(cls, config) -> int:
        """Rows per layer of the memory that is read as a whole (`M`)."""
        return config.num_tokens * config.num_blocks

    @classmethod
    def prefix_length(cls, config) -> int:
        """Rows in front of every query: the bos row (if any) and the memory."""
        return int(config.add_bos_embedding) + cls.memory_rows(config)

    @classmethod
    def drops_per_layer(cls, config) -> bool:
        return bool(config.drop_memory_per_layer)

    @classmethod
    def prefix_slots(cls, config) -> int:
        """Prefix rows between bos and the memory that are chosen per query (M+'s retrieved rows); 0 here."""
        return 0

    def build(self, model) -> None:
        """Add the variant's own modules and parameters to a new `MemoryLLMForCausalLM` (before `post_init`)."""

    def bind_state(self, model, like=None) -> MemoryState:
        """The model's own memory state, bound to its `memory` parameter and `initialized` buffer."""
        return self.state_class.bound_to(model.memory.data, model.initialized, like=like)

    def retrieval(self, model, states, attention_mask, batch_size: int):
        """What fills the per-query prefix rows at a prefill (`None`: there are none)."""
        return None

    @property
    def reads_per_query(self) -> bool:
        """Whether `query_read` may choose rows (a static export of the prefix then serves the whole memory)."""
        return False

    def query_read(self, model, states, input_ids, inputs_embeds, attention_mask) -> QueryRead | None:
        """What a new query (its `input_ids` or `inputs_embeds` `[B, T(, d)]`) reads of the prefix, chosen at its
        prefill from its own tokens (`QueryRead`); `None`: all of it (here, always)."""
        return None

    @contextlib.contextmanager
    def reading_every_row(self):
        """Within it, every query reads the whole memory (`query_read` chooses nothing); nothing to do here."""
        yield

    # ---------------------------------------------------------------------------------------------- injection
    def injection_plan(self, initialized: bool, length: int) -> InjectionPlan:
        raise NotImplementedError

    def written_rows(self, queries, outputs, layer: int, plan: InjectionPlan, initialized: bool, e) -> torch.Tensor:
        """The rows layer `layer` writes, `[B, num_new, d]`, from its query rows and outputs `[B, S_q, d]`; `e` is
        the new-memory positional vector `[1, 1, d]`."""
        raise NotImplementedError

    def output_rows_read(self, plan: InjectionPlan) -> int:
        """How many trailing rows of a layer's outputs `written_rows` reads (0: none, when it writes inputs): the
        last layer of an injection computes only these (its other rows feed nothing)."""
        return plan.num_new

    # ------------------------------------------------------------------------------------------------- update
    def update(
        self, state: MemoryState, delta: torch.Tensor, injection: int, generator=None, model=None
    ) -> MemoryState:
        """The state after writing `delta` `[L, n, d]` as injection number `injection` (a new state). `model` is
        for variants whose update needs the weights (M+'s retriever keys)."""
        return state.updated(self.planned_update(state, delta, injection, generator, model=model))

    def planned_update(
        self, state: MemoryState, delta: torch.Tensor, injection: int, generator=None, model=None
    ) -> MemoryUpdate:
        """What writing `delta` does to `state`, as data: the rows kept and the rows written (`MemoryUpdate`),
        applied as a new state by `update` and in place by `inject` at its commit."""
        if not state.initialized:
            return MemoryUpdate(delta, injection)
        new_rows, num_rows = delta.shape[1], state.memory.shape[1]
        if new_rows > num_rows:
            raise ValueError(f"A delta of {new_rows} rows does not fit a memory of {num_rows} rows per layer.")
        keep = num_rows - self.drop_count(new_rows)
        return MemoryUpdate(delta, injection, kept=self.kept_rows(num_rows, keep, generator))

    def drop_count(self, new_rows: int) -> int:
        """Rows dropped by an update of `new_rows` rows into an initialised memory (the released rule)."""
        if new_rows == self.config.num_tokens:
            return int(self.memory_rows(self.config) * (1 / self.config.num_blocks))
        return new_rows

    def kept_rows(self, num_rows: int, keep: int, generator) -> torch.Tensor:
        """Ascending indices of the surviving rows: `[L, keep]` drawn per layer, or `[keep]` shared."""
        per_layer = self.drops_per_layer(self.config)
        layers = self.config.num_hidden_layers if per_layer else 1
        draws = [
            torch.randperm(num_rows, generator=generator)[:keep].sort().values
            for _ in range(layers if per_layer else 1)
        ]
        return torch.stack(draws) if per_layer else draws[0]

    # ------------------------------------------------------------------------------------------------ reading
    def reads(self, state: MemoryState) -> bool:
        """Whether a forward reads `state` as a prefix (an uninitialised memory is not read)."""
        return state.initialized

    def prefix_written(self, state: MemoryState, rows: slice = slice(None)) -> torch.Tensor | None:
        """`[P]` bool: the bos row and the `rows` of memory that attention may see; `None` when all of them."""
        written = state.written_rows(rows)
        if written is None or not self.config.add_bos_embedding:
            return written
        return torch.cat([torch.ones(1, dtype=torch.bool), written])


@register_variant
class MemoryLLM8B(MemoryVariant):
    """
    The released MemoryLLM-8B / 8B-chat rule (SEMANTICS.md): layer `l` stores its OUTPUT rows in its own memory;
    short text makes the last memory rows queries; the first write tiles the delta and aliases `e` into it.
    """

    name = "memoryllm-8b"
    aliases = ("output",)
    first_write_adds_embedding: ClassVar[bool] = True  # `e` on the first write into an empty memory

    def injection_plan(self, initialized: bool, length: int) -> InjectionPlan:
        num_tokens = self.config.num_tokens
        if initialized:  # always N rows: with short text, the last memory rows act as queries too
            return InjectionPlan(num_tokens, max(num_tokens - length, 0), True, True)
        return InjectionPlan(min(num_tokens, length), 0, False, self.first_write_adds_embedding)

    def written_rows(self, queries, outputs, layer: int, plan: InjectionPlan, initialized: bool, e) -> torch.Tensor:
        rows = outputs[:, -plan.num_new :]
        if not initialized and self.first_write_adds_embedding and layer < self.config.num_hidden_layers - 1:
            # The released code's delta aliases the next layer's input, which gets `e` added in place.
            rows = rows + e.to(rows.dtype)
        return rows


@register_variant
class TrainingFree(MemoryVariant):
    """
    The training-free rule: layer `l` stores its own INPUT rows of the text, so the memory is a compressed KV cache
    of the text that an untrained backbone reads. Never-written rows are filled first and masked out of attention;
    once the memory is full, random old rows go as in the released rule.
    """

    name = "training-free"
    aliases = ("input",)
    trained_on_long_texts = False  # a short text's rows are its own KV cache, as good as a long one's

    def injection_plan(self, initialized: bool, length: int) -> InjectionPlan:
        return InjectionPlan(min(self.config.num_tokens, length), 0, initialized, True)

    def written_rows(self, queries, outputs, layer: int, plan: InjectionPlan, initialized: bool, e) -> torch.Tensor:
        return queries[:, -plan.num_new :]

    def output_rows_read(self, plan: InjectionPlan) -> int:
        return 0  # the rows written are each layer's inputs: the last layer's outputs feed nothing

    def planned_update(
        self, state: MemoryState, delta: torch.Tensor, injection: int, generator=None, model=None
    ) -> MemoryUpdate:
        """New rows replace never-written rows first (the first ones, the same in every layer, so which rows are empty
        never depends on the layer); once the memory is full, random old rows go. Rows keep their order."""
        delta = delta[:, -min(delta.shape[1], state.memory.shape[1]) :]
        written, keep_written, kept = self.rows_with_room(state, delta.shape[1])
        if kept is not None:
            return MemoryUpdate(delta, injection, kept=kept)
        picks = self.kept_rows(len(written), keep_written, generator)  # indices into `written`
        return MemoryUpdate(delta, injection, kept=written[picks])

    @staticmethod
    def rows_with_room(state: MemoryState, new: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """For `new` rows: the written rows `[w]`, how many of them stay, and the rows kept `[M - new]` where
        never-written rows make room enough (the written ones and the last never-written ones, in order), else None."""
        num_rows = state.memory.shape[1]
        empty = (state.provenance[0] == EMPTY_ROWS).nonzero().squeeze(1)
        written = (state.provenance[0] != EMPTY_ROWS).nonzero().squeeze(1)
        keep_written = min(len(written), num_rows - new)
        if keep_written < len(written):
            return written, keep_written, None
        keep_empty = num_rows - new - keep_written  # room enough: only never-written rows go
        return written, keep_written, torch.cat([written, empty[len(empty) - keep_empty :]]).sort().values


# Each import registers a variant; they stand at the end because they import this file.
from .variant_memoryllm7b import MemoryLLM7B  # noqa: E402, F401
from .variant_mplus import MPlus  # noqa: E402, F401
from .variant_ranked import TrainingFreeRanked  # noqa: E402, F401


__all__ = [
    "MEMORY_VARIANTS",
    "InjectionPlan",
    "MemoryLLM8B",
    "MemoryVariant",
    "QueryRead",
    "TrainingFree",
    "canonical_name",
    "get_variant",
    "recognise_released",
    "register_variant",
]
