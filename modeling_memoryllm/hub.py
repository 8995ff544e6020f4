"""Released checkpoints: loading them by name as they are, converting them into Hub-ready folders, uploading."""

import os
import pathlib
import shutil
import tempfile

import torch
from transformers import AutoTokenizer
from transformers.utils import logging

from .configuration_memoryllm import MemoryLLMConfig
from .modeling_memoryllm import MemoryLLMForCausalLM


logger = logging.get_logger(__name__)


CARD_TEMPLATE = """---
{metadata}
---

# {name}

A [MemoryLLM](https://arxiv.org/abs/2402.04624) (Wang et al., ICML 2024): a Llama whose every layer carries a
pool of {rows} memory rows. `model.inject(text)` writes {num_tokens} new rows per layer and drops as many old ones at
random, so the model absorbs new knowledge at constant cost, with no fine-tuning.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
state = model.new_memory_state()            # one memory per user or session
model.inject("Some new knowledge ...", memory=state)
ids = tokenizer("Question: ...", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, memory=state, max_new_tokens=32)[0]))
state.save("memory.safetensors")            # safetensors, apart from the weights
```

One memory takes {layers} x {rows} x {hidden} x {bytes} B = {size_mb:,.0f} MB in {dtype}. Memory rules:
`memory_variant: "{variant}"`. Converted with `memoryllm convert` from a checkpoint in the released layout.
"""


# The released checkpoints by short name: their Hub id and the revision to load. The revisions are not pinned: this
# project's machines have no network to look the commit hashes up; set them here once known (`None`: the newest).
RELEASED = {
    "memoryllm-8b": ("YuWangX/memoryllm-8b", None),
    "memoryllm-8b-chat": ("YuWangX/memoryllm-8b-chat", None),
    "memoryllm-7b": ("YuWangX/memoryllm-7b", None),
    "mplus-8b": ("YuWangX/mplus-8b", None),
}


def resolve(name: str) -> tuple[str, str | None]:
    """`(source, revision)` for a folder, a released short name (`"memoryllm-8b"`, ...) or a Hub id."""
    if os.path.isdir(name):
        return name, None
    if name in RELEASED:
        return RELEASED[name]
    return name, None


def released_config(source: str, revision: str | None = None) -> MemoryLLMConfig:
    """The config of a MemoryLLM folder or Hub id as released (`model_type: "llama"` or `"memoryllm"`, no
    `auto_map`), read as a `MemoryLLMConfig`; for M+, `ltm_initial_size` is taken from the checkpoint's tensors."""
    config = MemoryLLMConfig.from_pretrained(source, revision=revision)
    if config.memory_variant == "mplus" and os.path.isdir(source):
        rows = _tensor_rows(source, "ltm.0")
        if rows is not None:
            config.ltm_initial_size = rows
    return config


def _tensor_rows(folder: str, name: str) -> int | None:
    """The first dimension of tensor `name` in the folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():
                return int(handle.get_slice(name).get_shape()[0])
    return None


def load_released(name: str, **kwargs) -> MemoryLLMForCausalLM:
    """A MemoryLLM from a folder, a released short name or a Hub id, with the memory it was released with. A plain
    `AutoModelForCausalLM.from_pretrained` of a released MemoryLLM-8B or M+ repository builds a stock Llama and
    drops the memory (their `config.json` says `model_type: "llama"`, with no `auto_map`): this does not."""
    source, revision = resolve(name)
    if revision is None and name in RELEASED:
        logger.warning("Loading %s at its newest revision: no revision is pinned for it yet.", source)
    config = released_config(source, revision)
    return MemoryLLMForCausalLM.from_pretrained(source, config=config, revision=revision, **kwargs)


def convert(src: str, dst: str, dtype: torch.dtype | None = None) -> list[str]:
    """Write a Hub-ready copy of the checkpoint folder `src` into `dst` (built aside, then renamed into place)."""
    if not os.path.isdir(src):
        raise ValueError(f"{src} is not a checkpoint folder")
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"{dst} exists and is not empty")
    model = load_released(src, dtype=dtype or "auto")
    parent = pathlib.Path(dst).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        _copy_tokenizer(src, staging)
        (staging / "README.md").write_text(model_card(model, repo=pathlib.Path(dst).name), encoding="utf-8")
        if os.path.exists(dst):
            os.rmdir(dst)
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(os.listdir(dst))


def _copy_tokenizer(src: str, dst: pathlib.Path) -> None:
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError, TypeError):
        pass  # released folders may ship without tokenizer files: the card says where the tokenizer is


def model_card(model: MemoryLLMForCausalLM, repo: str) -> str:
    from huggingface_hub import ModelCardData

    config = model.config
    metadata = ModelCardData(
        license="other",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["memoryllm", "llama", "custom_code", "memory"],
    ).to_yaml()
    bytes_per_value = model.memory.element_size()
    return CARD_TEMPLATE.format(
        metadata=metadata,
        name=repo,
        repo=repo,
        rows=config.memory_rows,
        num_tokens=config.num_tokens,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        bytes=bytes_per_value,
        size_mb=config.num_hidden_layers * config.memory_rows * config.hidden_size * bytes_per_value / 1e6,
        dtype=str(model.memory.dtype).removeprefix("torch."),
        variant=config.memory_variant,
    )


def push(folder: str, repo_id: str, dry_run: bool = False, private: bool = False) -> list[str]:
    """Upload `folder` to the Hub model repo `repo_id`; with `dry_run`, only list what would be uploaded."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder")
    files = sorted(p for p in pathlib.Path(folder).rglob("*") if p.is_file() and ".git" not in p.parts)
    listing = [f"{p.relative_to(folder)}\t{p.stat().st_size:,} bytes" for p in files]
    if dry_run:
        return [f"would upload to {repo_id}:", *listing]
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model")
    return [*listing, f"uploaded: {commit}"]
