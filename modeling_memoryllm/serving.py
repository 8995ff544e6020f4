"""One loading and answering layer for every front end (CLI, Space, eval): load a model by name, frame a question,
answer it (streamed or not), inject with progress, and describe a memory.

The front ends differ only in how they show things; what they compute comes from here, so a prompt, a dtype name
or a pad id means the same in all of them.
"""

import os
import threading
from collections.abc import Callable, Iterator

import torch
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils import logging

from .memory_state import EMPTY_ROWS, INITIAL_ROWS, MemoryState
from .modeling_memoryllm import MemoryLLMForCausalLM


logger = logging.get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_NAMES = (None, "", "default")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A dtype from its name (`"bfloat16"`), a dtype, or `None` (float32)."""
    if name is None or isinstance(name, torch.dtype):
        return name or torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos token, else 0 (an id of 0 is kept)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def load_model(source: str | None = None, dtype: str | torch.dtype | None = None, device=None):
    """
    A MemoryLLM by name: `None` / `"default"` (the embedded default), a `.gguf` file (a training-free MemoryLLM on
    it), a MemoryLLM folder, a released short name (`hub.RELEASED`) or a Hub id, loaded as released. The tokenizer
    is attached as `model.tokenizer` when one is found.
    """
    torch_dtype = resolve_dtype(dtype)
    if source in DEFAULT_NAMES:
        from .default import load_default

        model = load_default(dtype=torch_dtype)
    elif os.fspath(source).endswith(".gguf"):
        model = MemoryLLMForCausalLM.from_backbone(source, dtype=torch_dtype)
    else:  # a folder, a released short name ("memoryllm-8b", ...) or a Hub id, loaded as released
        from .hub import load_released, resolve

        model = load_released(source, dtype=torch_dtype)
        try:
            model.tokenizer = AutoTokenizer.from_pretrained(resolve(source)[0])
        except (OSError, ValueError):
            logger.warning("No tokenizer found for %s: token-id inputs still work.", source)
    model = model.to(device) if device is not None else model
    return model.eval()


def load_state(model, path: str | os.PathLike | None) -> MemoryState:
    """The memory saved at `path` if it exists (checked against the model), else a new empty one."""
    if path and os.path.exists(path):
        return model.load_memory_state(path)
    return model.new_memory_state()


def chat_prompt(tokenizer, question: str, answer_prefix: str = "Answer:") -> str:
    """The question as a chat turn with `answer_prefix` opening the assistant's reply, or, for a tokenizer without
    a chat template, the paper's prompt `"Questions: {question} Answer:"`."""
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) + answer_prefix
    return f"Questions: {question} Answer:"


class _StopOn(StoppingCriteria):
    """Stops every row once `event` is set (a visitor left, a user pressed stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_options(model, state: MemoryState | None, question: str, max_new_tokens: int, encode) -> tuple:
    """The prompt ids `[1, T]` and the `generate` options of a greedy answer reading `state` (or no memory)."""
    tokenizer = model.tokenizer
    prompt = encode(chat_prompt(tokenizer, question, answer_prefix=""), return_tensors="pt").to(model.device)
    options = dict(
        attention_mask=prompt.attention_mask,
        memory=state if state is not None else model.new_memory_state(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(tokenizer),
    )
    return prompt.input_ids, options


def answer(model, state: MemoryState | None, question: str, max_new_tokens: int = 48, streamer=None) -> str:
    """The greedy answer to `question`, reading `state` (`None`: an empty memory, i.e. the backbone alone)."""
    ids, options = _generate_options(model, state, question, max_new_tokens, model.tokenizer)
    with torch.no_grad():
        output = model.generate(ids, streamer=streamer, **options)
    return model.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def answer_stream(
    model,
    state: MemoryState | None,
    question: str,
    max_new_tokens: int = 48,
    encode: Callable | None = None,
) -> Iterator[str]:
    """The greedy answer to `question`, yielded as it grows. Generation stops when the caller stops iterating.
    `encode` replaces `model.tokenizer(...)` for the prompt (e.g. a locked call, for tokenizers shared by threads)."""
    tokenizer = model.tokenizer
    ids, options = _generate_options(model, state, question, max_new_tokens, encode or tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    ids, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOn(stop)]), **options
                )
        except Exception as error:  # re-raised in the caller's thread below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text.strip()
    finally:  # also when the caller stops early: stop generating
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


def token_chunks(model, text: str, encode: Callable | None = None) -> list[list[int]]:
    """`text` as the token-id chunks that `inject` writes one after another (at most `max_inject_length` each).
    `encode` replaces `model.tokenizer(...)`, as in `answer_stream`."""
    if not text or not text.strip():
        raise ValueError("Cannot inject empty or whitespace-only text.")
    ids = (encode or model.tokenizer)(text, add_special_tokens=False)["input_ids"]
    size = model.config.max_inject_length
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def inject_steps(
    model, state: MemoryState, chunks: list[list[int]], generator: torch.Generator | None = None
) -> Iterator[tuple[int, MemoryState | None]]:
    """Inject `chunks` one after another into a copy of `state`. Yields `(chunks done, None)` per chunk, then
    `(len(chunks), the new state)`: `state` itself never changes, so a reader may keep using it meanwhile."""
    work = state.clone()
    with torch.no_grad():
        for done, ids in enumerate(chunks, 1):
            model.inject(ids, memory=work, generator=generator, show_progress=False)
            yield done, None
    yield len(chunks), work


def memory_stats(state: MemoryState) -> dict:
    """What a front end shows of a memory: shape, bytes, dtype, injections, rows written, and rows per layer by
    source (`rows_by_source`: -1 never written, 0 initial rows, n injection n; a mean over the layers, since
    random drops differ between layers) and by injection only (`rows_by_injection`)."""
    layers, rows, width = state.memory.shape
    by_source = {k: v / layers for k, v in sorted(state.provenance_summary().items())}
    return {
        "layers": layers,
        "rows": rows,
        "width": width,
        "megabytes": state.nbytes / 1e6,
        "dtype": str(state.memory.dtype).removeprefix("torch."),
        "initialized": state.initialized,
        "injections": state.injections,
        "rows_written": rows - int(by_source.get(EMPTY_ROWS, 0)),  # never-written rows are the same in every layer
        "initial_rows": int(by_source.get(INITIAL_ROWS, 0)),
        "rows_by_source": by_source,
        "rows_by_injection": {k: v for k, v in by_source.items() if k > INITIAL_ROWS},
    }


__all__ = [
    "DTYPES",
    "answer",
    "answer_stream",
    "chat_prompt",
    "inject_steps",
    "load_model",
    "load_state",
    "memory_stats",
    "pad_token_id",
    "resolve_dtype",
    "token_chunks",
]
