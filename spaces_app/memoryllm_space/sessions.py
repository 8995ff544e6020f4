"""One memory per browser session, in RAM: `SessionStore` creates, hands out and drops them (idle, or too many)."""

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modeling_memoryllm import MemoryState


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
