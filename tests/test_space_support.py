"""Helpers for the Space tests (no tests here): a byte tokenizer for golden A, launching the Space.

The Space is the package `memoryllm_space` in spaces_app/ (on the path through pyproject's pytest `pythonpath`)."""

import contextlib
import importlib.util
import os
import pathlib
import shutil
import socket

import torch
from transformers import BatchEncoding


ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def load_fresh(module: str, name: str):
    """A new copy of `module` (e.g. `memoryllm_space.gpu`) run again as module `name` in the same package, so that
    what it does at import time happens again; `sys.modules` is left as it was."""
    origin = importlib.util.find_spec(module).origin
    spec = importlib.util.spec_from_file_location(f"{module.rpartition('.')[0]}.{name}", origin)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258 (golden A has 512 ids; 0 bos, 511 eos). Ids above 258 decode as `[id]`."""

    chat_template = None
    pad_token_id = None
    bos_token_id, eos_token_id = 0, 511
    offset = 3

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None, **kwargs) -> BatchEncoding:
        ids = [b + self.offset for b in text.encode("utf-8")]
        if return_tensors == "pt":
            return BatchEncoding({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))})
        return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        ids = [ids] if isinstance(ids, int) else list(ids)  # one id, as `tokenizer.decode(5)` takes too
        pieces, raw = [], bytearray()
        for i in ids:
            if self.offset <= i < self.offset + 256:
                raw.append(i - self.offset)
                continue
            pieces.append(raw.decode("utf-8", errors="replace"))
            raw = bytearray()
            if not (skip_special_tokens and i in (self.bos_token_id, self.eos_token_id)):
                pieces.append(f"[{i}]")
        return "".join(pieces) + raw.decode("utf-8", errors="replace")


def golden_with_tokenizer():
    from tests.conftest import load_golden

    model = load_golden()
    model.tokenizer = ByteTokenizer()
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(model, **settings):
    """The Space on 127.0.0.1 (a free port) in a background thread; yields `(url, demo)`."""
    from memoryllm_space.layout import build_demo, launch_demo
    from memoryllm_space.settings import Settings

    demo = build_demo(model, Settings(**settings))
    _, url, _ = launch_demo(
        demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    try:
        yield url, demo
    finally:
        demo.close()
        demo.memory_space.store.close()
        shutil.rmtree(demo.memory_space.download_dir, ignore_errors=True)


def expected_answer(model, texts: list[str], question: str, max_new_tokens: int, dtype=torch.bfloat16) -> str:
    """The answer the Space should give after injecting `texts` into a fresh memory (greedy decoding)."""
    from modeling_memoryllm.serving import answer, inject_framed

    state = model.new_memory_state(device="cpu", dtype=dtype)
    for text in texts:
        inject_framed(model, state, text, show_progress=False)
    return answer(model, state if texts else None, question, max_new_tokens)
