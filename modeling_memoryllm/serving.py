"""One loading and answering layer for every front end (CLI, Space, eval): load a model by name, frame a text and
the question that reads it, answer (streamed or not), inject with progress, and describe a memory.

The front ends differ only in how they show things; what they compute comes from here, so a prompt, a dtype name
or a pad id means the same in all of them.

Framing (`Framing`, `framing_for`): how an injected text is written and how a later question reads it, one pair.
For a chat model (`"chat"`, the default when the tokenizer has a chat template) every injected text is written as
the opening of a user turn of the template under a context-QA system turn (`CONTEXT_QA_SYSTEM`, chosen on part-a),
`<system turn><user opener>Context: {text}`, and a question closes
the turn of the last text: `\n\nQuestion: {question}<end of turn><assistant opener>`. The memory then holds what
the model reads in a prompt with the context in front of the question (in the training-free mode the memory of a
text is, in effect, its key/value cache). Each framed text is self-contained (it opens its own conversation), so
several texts can be injected one after another, and a text longer than `max_inject_length` is simply cut into
chunks. `"raw"` injects the text as it is and asks with the plain chat prompt (or the paper's
`"Questions: {q} Answer:"` without a template). A question with no memory is asked as a plain chat turn.
"""

import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------------------------ framing
FRAMINGS = ("chat", "raw")
CONTEXT_LABEL = "Context: "  # opens an injected text inside the user turn
QUESTION_LABEL = "\n\nQuestion: "  # a question after an injected text, in the same turn
TEXT_SEPARATOR = "\n\n"  # before a later text that continues the user turn of the texts before it
# The system turn of a chat turn that holds an injected text (chosen on part-a: eval/framing_tuning.py).
CONTEXT_QA_SYSTEM = "You answer questions about a text. Answer briefly, using the text's own words."
_SLOT = "\x00memoryllm-slot\x00"  # stands for the content when a chat template is split around it


@dataclass(frozen=True)
class Framing:
    """
    How an injected text is written into the memory and how a question reads it afterwards: one pair, used by every
    front end and runner. An injected text is `text_head + text + text_tail`; a question after injected text is
    `question_head + question + question_tail`; a question with no memory is `plain_head + question + plain_tail`.
    An `answer_prefix` (e.g. "Answer:") opens the reply when `takes_answer_prefix` (the paper's prompt for models
    without a chat template already ends in "Answer:").
    """

    name: str
    text_head: str
    question_head: str
    question_tail: str
    plain_head: str
    plain_tail: str
    takes_answer_prefix: bool = True
    text_tail: str = ""
    later_text_head: str | None = None  # before a later text that continues the turn (see `framed_text`)

    def text(self, text: str, later: bool = False) -> str:
        """`text` as it is injected: the first text of a memory, or (`later`) one that continues the turn."""
        head = self.later_text_head if later and self.later_text_head is not None else self.text_head
        return head + text + self.text_tail

    def question(self, question: str, answer_prefix: str = "", after_text: bool = True) -> str:
        """The prompt of `question` after injected text (`after_text`), or with no memory."""
        head, tail = (self.question_head, self.question_tail) if after_text else (self.plain_head, self.plain_tail)
        return head + question + tail + (answer_prefix if self.takes_answer_prefix else "")


def _split_around_slot(prompt: str) -> tuple[str, str]:
    head, found, tail = prompt.partition(_SLOT)
    if not found:
        raise ValueError("The chat template does not show the message content as it is: use framing='raw'.")
    return head, tail


def user_turn_around(tokenizer, system: str | None = None) -> tuple[str, str]:
    """The prompt before and after a user message's content, `(<system turn><user opener>, <end of turn><assistant
    opener>)`, with `system` as the system turn (None: the template's own). A template that refuses a system turn
    keeps its own (logged)."""
    if system is None:
        return _split_around_slot(chat_prompt(tokenizer, _SLOT, answer_prefix=""))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _SLOT}]
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja's TemplateError from `raise_exception`, or any template's own
        logger.warning_once(f"The chat template refuses a system turn ({error}): the framing keeps the template's own.")
        return user_turn_around(tokenizer)
    return _split_around_slot(prompt)


def chat_framing(
    tokenizer,
    system: str | None = CONTEXT_QA_SYSTEM,
    context_label: str = CONTEXT_LABEL,
    question_label: str = QUESTION_LABEL,
    name: str = "chat",
) -> Framing:
    """A chat framing for `tokenizer`: a text opens a user turn, `<system turn><user opener>{context_label}{text}`,
    later texts continue it (`TEXT_SEPARATOR`), and a question closes it, `{question_label}{question}<end of turn>
    <assistant opener>`. `system` is the system turn of a turn with text (None: the template's own); a question
    with no memory is a plain chat turn (`chat_prompt`: the template's own system turn)."""
    head, tail = user_turn_around(tokenizer, system)
    plain_head, plain_tail = user_turn_around(tokenizer)
    return Framing(
        name, head + context_label, question_label, tail, plain_head, plain_tail, later_text_head=TEXT_SEPARATOR
    )


def framing_for(tokenizer, name: "str | Framing | None" = None) -> Framing:
    """
    The framing `name` for `tokenizer`: `"chat"` (the default when the tokenizer has a chat template, see
    `chat_framing`) writes a text as the opening of a user turn, `"<context-QA system turn><user opener>Context:
    {text}"`, and a question closes that turn, `"\n\nQuestion: {question}<end of turn><assistant opener>"`;
    `"raw"` injects the text as it is and asks with `chat_prompt`. A `Framing` is returned as it is.
    """
    if isinstance(name, Framing):
        return name
    has_template = bool(getattr(tokenizer, "chat_template", None))
    name = name or ("chat" if has_template else "raw")
    if name not in FRAMINGS:
        raise ValueError(f"framing must be one of {list(FRAMINGS)}, got {name!r}")
    if not has_template:
        if name == "chat":
            raise ValueError("framing='chat' needs a tokenizer with a chat template: use framing='raw'.")
        return Framing("raw", "", "Questions: ", " Answer:", "Questions: ", " Answer:", takes_answer_prefix=False)
    if name == "raw":
        head, tail = user_turn_around(tokenizer)
        return Framing("raw", "", head, tail, head, tail)
    return chat_framing(tokenizer)


def question_prompt(
    tokenizer, question: str, framing: "str | Framing | None" = None, answer_prefix: str = "", after_text: bool = True
) -> str:
    """The prompt of `question` that matches texts injected with `framing` (`after_text=False`: no memory)."""
    return framing_for(tokenizer, framing).question(question, answer_prefix, after_text)


def continues_turn(model, state: MemoryState | None) -> bool:
    """Whether a text injected now continues the user turn of the texts before it: the memory holds text, and the
    variant's injections read it (a variant that writes every text apart, `writes_texts_apart`, needs each text
    with its own opening)."""
    state = state if state is not None else model.memory_state
    return state.initialized and not getattr(model.variant, "writes_texts_apart", False)


def framed_text(model, state: MemoryState | None, text: str, framing: "str | Framing | None" = None) -> str:
    """`text` as `inject_framed` writes it into `state` (see `continues_turn`)."""
    return framing_for(model.tokenizer, framing).text(text, later=continues_turn(model, state))


def inject_framed(
    model, state: MemoryState | None, text: str | list[str], framing: "str | Framing | None" = None, **options
) -> MemoryState:
    """Inject `text` (or several texts, in order) framed by `framing` into `state` (default: the model's own
    memory): the first text of a memory opens a user turn, a later one continues it where the variant's injections
    read the texts before (`continues_turn`); `options` go to `model.inject` (`generator`, `show_progress`)."""
    frame = framing_for(model.tokenizer, framing)
    texts = [text] if isinstance(text, str) else list(text)
    for item in texts:
        if not isinstance(item, str) or not item.strip():
            raise ValueError("Cannot inject empty or whitespace-only text.")
    later = continues_turn(model, state)
    apart = getattr(model.variant, "writes_texts_apart", False)
    framed = [frame.text(item, later=later or (index > 0 and not apart)) for index, item in enumerate(texts)]
    return model.inject(framed, memory=state, **options)


# ------------------------------------------------------------------------------------------------------ answers
# The end of a sentence: . ! ? or … (and closing quotes or brackets), then the end of the text or a new sentence.
SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=$|\s+[\"'“‘(\[]*[A-Z0-9])")


def finished_answer(text: str, cut: bool, max_new_tokens: int) -> str:
    """An answer that ends at a sentence boundary: `text` as it is when generation stopped by itself; when it was cut
    at `max_new_tokens`, up to its last complete sentence, or, with none, `text` and a note that it was cut."""
    text = text.strip()
    if not cut or not text:
        return text
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else f"{text} … (cut at {max_new_tokens} tokens)"


def _was_cut(model, new_tokens: torch.Tensor, max_new_tokens: int) -> bool:
    """Whether generation stopped at the token limit rather than at an end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {model.tokenizer.eos_token_id}
    return len(new_tokens) >= max_new_tokens and not any(int(t) in eos for t in new_tokens)


class _StopOn(StoppingCriteria):
    """Stops every row once `event` is set (a visitor left, a user pressed stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_options(model, state, question: str, max_new_tokens: int, encode, framing=None) -> tuple:
    """The prompt ids `[1, T]` and the `generate` options of a greedy answer reading `state` (or no memory): the
    question framed to follow the injected text when the memory holds any, else as a plain chat turn."""
    tokenizer = model.tokenizer
    frame = framing_for(tokenizer, framing)
    after_text = state is not None and state.initialized
    special = not (after_text and frame.name == "chat")  # a question that continues a turn starts no new sequence
    prompt = encode(frame.question(question, "", after_text), return_tensors="pt", add_special_tokens=special)
    prompt = prompt.to(model.device)
    options = dict(
        attention_mask=prompt.attention_mask,
        memory=state if state is not None else model.new_memory_state(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(tokenizer),
    )
    return prompt.input_ids, options


def answer(
    model, state: MemoryState | None, question: str, max_new_tokens: int = 48, streamer=None, framing=None
) -> str:
    """The greedy answer to `question`, reading `state` (`None`: an empty memory, i.e. the backbone alone), ending at
    a sentence boundary or saying that it was cut (`finished_answer`). `framing`: how the memory's texts were
    injected (default: the model's, see `framing_for`)."""
    ids, options = _generate_options(model, state, question, max_new_tokens, model.tokenizer, framing)
    with torch.no_grad():
        output = model.generate(ids, streamer=streamer, **options)
    new_tokens = output[0, ids.shape[1] :]
    text = model.tokenizer.decode(new_tokens, skip_special_tokens=True)
    return finished_answer(text, _was_cut(model, new_tokens, max_new_tokens), max_new_tokens)


def answer_stream(
    model,
    state: MemoryState | None,
    question: str,
    max_new_tokens: int = 48,
    encode: Callable | None = None,
    framing=None,
) -> Iterator[str]:
    """The greedy answer to `question`, yielded as it grows; the last text yielded is `answer`'s (it ends at a
    sentence boundary or says that it was cut). Generation stops when the caller stops iterating. `encode`
    replaces `model.tokenizer(...)` for the prompt (e.g. a locked call, for tokenizers shared by threads)."""
    tokenizer = model.tokenizer
    ids, options = _generate_options(model, state, question, max_new_tokens, encode or tokenizer, framing)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors, outputs = threading.Event(), [], []

    def run() -> None:
        try:
            with torch.no_grad():
                criteria = StoppingCriteriaList([_StopOn(stop)])
                outputs.append(model.generate(ids, streamer=streamer, stopping_criteria=criteria, **options))
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
    final = finished_answer(text, _was_cut(model, outputs[0][0, ids.shape[1] :], max_new_tokens), max_new_tokens)
    if final != text.strip():
        yield final


def token_chunks(model, text: str, encode: Callable | None = None, framing=None, state=None) -> list[list[int]]:
    """`text`, framed by `framing` (default: the model's, see `framing_for`) for `state` (`framed_text`; `None`: an
    empty memory), as the token-id chunks that `inject_framed` writes one after another (at most
    `max_inject_length` each). `encode` replaces `model.tokenizer(...)`, as in `answer_stream`."""
    if not text or not text.strip():
        raise ValueError("Cannot inject empty or whitespace-only text.")
    later = state is not None and continues_turn(model, state)
    text = framing_for(model.tokenizer, framing).text(text, later=later)
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
    random drops differ between layers) and by injection only (`rows_by_injection`); the chunks an archive holds
    whole (`archived_chunks`, `archived_rows` per layer; `archive_rows`) and the bytes of it all (`megabytes`)."""
    layers, rows, width = state.memory.shape
    by_source = {k: v / layers for k, v in sorted(state.provenance_summary().items())}
    archive = getattr(state, "archive", [])
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
        "archived_chunks": len(archive),
        "archived_rows": sum(rows.shape[1] for _, rows in archive),
    }


__all__ = [
    "DTYPES",
    "FRAMINGS",
    "Framing",
    "answer",
    "answer_stream",
    "chat_framing",
    "chat_prompt",
    "continues_turn",
    "finished_answer",
    "framed_text",
    "framing_for",
    "inject_framed",
    "inject_steps",
    "load_model",
    "load_state",
    "memory_stats",
    "pad_token_id",
    "question_prompt",
    "resolve_dtype",
    "token_chunks",
    "user_turn_around",
]
