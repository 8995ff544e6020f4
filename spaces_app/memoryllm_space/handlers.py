"""The Space's event handlers (`MemorySpace`): one model, one `SessionStore`, limits from `Settings`."""

import atexit
import hashlib
import os
import pathlib
import shutil
import tempfile
import time

import gradio as gr

from modeling_memoryllm import MemoryLLMForCausalLM, MemoryState
from modeling_memoryllm.default import PASSAGE
from modeling_memoryllm.serving import resolve_dtype, token_chunks

from . import gpu
from .sessions import Session, SessionStore
from .settings import Settings
from .views import chat_message, memory_view


EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples"  # beside app.py, in the Space as here
EXAMPLES = {  # name: (text file, a question it answers)
    "Varden Island lighthouse (fiction)": (PASSAGE, "What was the name of the first keeper of the lighthouse?"),
    "The Halloran Glassworks (fiction)": (
        EXAMPLE_DIR / "halloran_glassworks.txt",
        "Who founded the Halloran Glassworks?",
    ),
    "Gettysburg Address (Lincoln, 1863)": (
        EXAMPLE_DIR / "gettysburg_address.txt",
        "What did the speaker say the world can never forget?",
    ),
}
EMPTY_ANSWER = "*(the model answered nothing)*"


def checked_text(text: str | None, limit: int) -> str:
    """`text`, if it is something to inject of at most `limit` characters; else a `gr.Error` that says why."""
    if text is None or not text.strip():
        raise gr.Error("Nothing to inject: paste some text, upload a .txt or .md file, or pick an example.")
    if len(text) > limit:
        raise gr.Error(
            f"This text has {len(text):,} characters; this Space injects at most {limit:,} at a time. "
            "Split it and inject the parts one after another."
        )
    return text


def checked_question(question: str | None, limit: int) -> str:
    """`question` stripped, if it is a question of at most `limit` characters; else a `gr.Error`."""
    if question is None or not question.strip():
        raise gr.Error("Type a question first.")
    if len(question) > limit:
        raise gr.Error(f"This question has {len(question):,} characters; the limit is {limit:,}.")
    return question.strip()


def load_example(name: str | None) -> tuple:
    """The example's text, a question about it, and a hint."""
    if name not in EXAMPLES:
        return gr.skip(), gr.skip(), gr.skip()
    path, question = EXAMPLES[name]
    hint = f"Inject the example, then ask: *{question}* (tick **Compare** to see the answer without it)."
    return pathlib.Path(path).read_text(encoding="utf-8"), question, hint


class MemorySpace:
    """The Space's event handlers: one model, one `SessionStore`, limits from `Settings`."""

    def __init__(self, model: MemoryLLMForCausalLM, settings: Settings):
        self.model, self.settings = model, settings
        self.memory_dtype = resolve_dtype(settings.memory_dtype)
        self.key = gpu.register_model(model, self.memory_dtype)
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

    # ------------------------------------------------------------------------------------------------ memory
    def show(self, request: gr.Request) -> tuple:
        return memory_view(self.session(request).state)

    def inject(self, text: str | None, request: gr.Request, progress=gr.Progress()) -> tuple:  # noqa: B008 (Gradio's idiom)
        text = checked_text(text, self.settings.max_inject_chars)
        session = self.session(request)
        start = time.perf_counter()
        with session.lock:
            encode, framing = gpu.locked(self.model.tokenizer), self.settings.framing
            chunks = token_chunks(self.model, text, encode=encode, framing=framing, state=session.state)
            new_state = None
            progress((0, len(chunks)), desc="Injecting", unit="chunks")
            try:
                for done, result in gpu.injection_steps(self.key, session.state, chunks, session.generator):
                    progress((done, len(chunks)), desc="Injecting", unit="chunks")
                    new_state = result if result is not None else new_state
            except ValueError as error:
                raise gr.Error(f"Could not inject this text: {error}") from error
            session.state = new_state
        seconds, plural = time.perf_counter() - start, "s" if len(chunks) > 1 else ""
        status = (
            f"Injected {len(text):,} characters ({sum(map(len, chunks)):,} tokens, {len(chunks)} chunk{plural} of at "
            f"most {self.model.config.max_inject_length} tokens, one injection each) in {seconds:.1f} s."
        )
        return status, *memory_view(new_state)

    def reset(self, request: gr.Request) -> tuple:
        session = self.session(request)
        with session.lock:
            session.state = self.new_state()
        return "Memory reset: it is empty again.", *memory_view(session.state)

    def download(self, request: gr.Request) -> str:
        state = self.session(request).state
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
            state_class = self.model.variant.state_class  # e.g. a ranked memory keeps its rows' scores
            state = state_class.load(path, config=self.model.config, device="cpu", dtype=self.memory_dtype)
        except (ValueError, OSError) as error:
            message = str(error).replace(str(path), name)
            raise gr.Error(f"Could not load this memory: {message}") from error
        with session.lock:
            session.state = state
        return f"Loaded {name}: {state.injections} injections.", *memory_view(state)

    def read_text_file(self, path: str | None) -> str:
        if not path:
            return gr.skip()
        name, limit = pathlib.Path(path).name, self.settings.max_inject_chars
        if os.path.getsize(path) > 4 * limit + 4:  # utf-8: at most 4 bytes a character
            raise gr.Error(f"{name} is too large: this Space injects at most {limit:,} characters at a time.")
        try:
            text = pathlib.Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise gr.Error(f"{name} is not UTF-8 text: upload a .txt or .md file.") from error
        return checked_text(text, limit)

    # -------------------------------------------------------------------------------------------------- chat
    def ask(self, question: str | None, compare: bool, history: list | None, plain: list | None, request: gr.Request):
        """Stream the answer reading this session's memory; with `compare`, then the answer without it."""
        question = checked_question(question, self.settings.max_question_chars)
        state = self.session(request).state  # writers swap states, so this one stays as it is
        if not state.initialized:
            gr.Info("Your memory is empty: inject a text first to see what the memory changes.")
        history = [*(history or []), chat_message("user", question), chat_message("assistant", "")]
        plain = list(plain or [])
        yield history, plain, ""
        yield from self._stream_into(history, plain, state, question, history)
        if compare:
            plain += [chat_message("user", question), chat_message("assistant", "")]
            yield from self._stream_into(history, plain, None, question, plain)

    def _stream_into(self, history: list, plain: list, state, question: str, target: list):
        text = ""
        settings = self.settings
        for text in gpu.answer_stream(self.key, state, question, settings.max_new_tokens, settings.framing):
            target[-1] = chat_message("assistant", text)
            yield history, plain, ""
        target[-1] = chat_message("assistant", text or EMPTY_ANSWER)
        yield history, plain, ""
