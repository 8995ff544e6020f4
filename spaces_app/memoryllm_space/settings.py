"""What an operator can set: `Settings`, each from an environment variable `MEMORYLLM_<NAME>`."""

import os
from dataclasses import dataclass, fields

import torch

from modeling_memoryllm.serving import DTYPES, FRAMINGS


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
    framing: str | None = None  # how texts are injected and questions asked: chat (default for chat models) or raw

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
        if self.framing not in (None, *FRAMINGS):
            raise ValueError(f"MEMORYLLM_FRAMING must be one of {list(FRAMINGS)}")


def pick_device(settings: Settings) -> str:
    if settings.device:
        return settings.device
    return "cuda" if torch.cuda.is_available() or os.environ.get("SPACES_ZERO_GPU") else "cpu"
