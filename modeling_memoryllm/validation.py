"""Input validation: token ids and memory states are checked before any work, with one clear `ValueError`."""

import torch
from transformers.utils import logging

from .memory_state import MemoryState
from .variants import get_variant


logger = logging.get_logger(__name__)

# Injected text shorter than this is allowed but disturbs the memory: the released models were trained on >= 16.
MIN_TRAINED_TOKENS = 16


def checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    """`ids` if they are a non-empty list of integers in `[0, vocab_size)`."""
    if not ids:
        raise ValueError("Cannot inject an empty sequence of token ids.")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("Token ids must be integers.")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"Token ids must be in [0, {vocab_size}); got {min(ids)}..{max(ids)}.")
    return ids


def tensor_token_lists(inputs: torch.Tensor, vocab_size: int) -> list[list[int]]:
    """The rows of a 1-D or 2-D integer tensor of token ids."""
    if inputs.device.type == "meta":
        raise ValueError("Token ids must hold data: got a tensor on the meta device.")
    if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool:
        raise ValueError(f"Token ids must be integers, got a {inputs.dtype} tensor.")
    if inputs.dim() not in (1, 2):
        raise ValueError(f"Token ids must be 1-D or 2-D, got shape {tuple(inputs.shape)}.")
    rows = inputs.unsqueeze(0) if inputs.dim() == 1 else inputs
    return [checked_ids(row.tolist(), vocab_size) for row in rows]


def token_lists(inputs, tokenize, vocab_size: int) -> list[list[int]]:
    """Validated token ids of `inputs`: a string (through `tokenize`), a list of them, a list of ints, nested lists,
    or a 1-D / 2-D integer tensor."""
    if isinstance(inputs, str):
        if not inputs.strip():
            raise ValueError("Cannot inject empty or whitespace-only text.")
        return [checked_ids(tokenize(inputs), vocab_size)]
    if isinstance(inputs, torch.Tensor):
        return tensor_token_lists(inputs, vocab_size)
    if isinstance(inputs, (list, tuple)) and inputs:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
            return [checked_ids(list(inputs), vocab_size)]
        return [ids for item in inputs for ids in token_lists(item, tokenize, vocab_size)]
    raise ValueError(
        "inject() takes a string, a list of strings, or token ids (list of ints or an integer tensor); "
        f"got {type(inputs).__name__} {'(empty)' if isinstance(inputs, (list, tuple)) else ''}".rstrip()
    )


def chunked(items: list[list[int]], size: int, warn_short: bool = True) -> list[list[list[int]]]:
    """Per input, its chunks of at most `size` tokens; warns about chunks too short for a trained memory
    (`warn_short`)."""
    chunks = [[ids[i : i + size] for i in range(0, len(ids), size)] for ids in items]
    if warn_short and any(len(chunk) < MIN_TRAINED_TOKENS for per_input in chunks for chunk in per_input):
        logger.warning(
            "Injecting fewer than %d tokens: the model was trained on longer text, so this mostly disturbs the memory.",
            MIN_TRAINED_TOKENS,
        )
    return chunks


def check_input_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty [batch, length] tensor of token ids.")
    tensor_token_lists(input_ids, vocab_size)


def check_text_mask(attention_mask, text_length: int) -> None:
    """A 2-D `attention_mask` covers the text only: past and new tokens, not the memory rows."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != text_length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} tokens but the text has {text_length}: the mask "
            "covers the text only (past and new tokens), not the memory rows."
        )


def check_state(state, config) -> None:
    """`state` is a memory state of the shape `config` asks for."""
    if not isinstance(state, MemoryState):
        raise ValueError(f"memory must be a MemoryState or a list of them, got {type(state).__name__}.")
    expected_class = get_variant(config).state_class
    if not isinstance(state, expected_class):
        raise ValueError(
            f"A {config.memory_variant} model reads a {expected_class.__name__}, got {type(state).__name__}."
        )
    expected = (config.num_hidden_layers, config.memory_rows, config.hidden_size)
    if tuple(state.memory.shape) != expected:
        raise ValueError(f"A memory of shape {tuple(state.memory.shape)} does not fit this model {expected}.")


def batch_states(memory, own_state, batch_size: int, config, mixed: bool = False) -> list[MemoryState]:
    """One state for the whole batch, or one per row (default: `own_state`); all initialised or all not, unless
    `mixed` (reading: a memory that is not read gets a prefix that attention never sees)."""
    if memory is None:
        states = [own_state]
    elif isinstance(memory, MemoryState):
        states = [memory]
    elif isinstance(memory, (list, tuple)) and all(isinstance(s, MemoryState) for s in memory):
        states = list(memory)
        if len(states) not in (1, batch_size):
            raise ValueError(f"Got {len(states)} memory states for a batch of {batch_size} rows.")
    else:
        raise ValueError(f"memory must be a MemoryState or a list of them, got {type(memory).__name__}.")
    for state in states:
        check_state(state, config)
    if not mixed and len({s.initialized for s in states}) > 1:
        raise ValueError("Memory states in one batch must be all initialised or all uninitialised.")
    return states


def injection_states(token_chunks: list, states: list[MemoryState], multiple: bool, config) -> list:
    """The chunks per state: input `i` into state `i` (`multiple`), or every input into the one state in order."""
    if multiple and len(token_chunks) != len(states):
        raise ValueError(f"Got {len(token_chunks)} inputs for {len(states)} memory states.")
    if len({id(state) for state in states}) != len(states):
        raise ValueError("memory lists the same MemoryState more than once: inject into it in one call instead.")
    for state in states:
        check_state(state, config)
    return token_chunks if multiple else [[chunk for chunks in token_chunks for chunk in chunks]]


__all__ = [
    "MIN_TRAINED_TOKENS",
    "batch_states",
    "check_input_ids",
    "check_state",
    "check_text_mask",
    "chunked",
    "token_lists",
]
