"""
Export for serving: a MemoryLLM becomes a plain Llama checkpoint for reading, and a memory version its prefix K/V.

* `export_reading_model(model, folder)`: the reading adapter (`config.generation_adapter`) merged into the base
  weights, `W' = W + (alpha / r) * B @ A`, written as a `LlamaForCausalLM` checkpoint with the tokenizer. Its chat
  template starts with `memory_rows` placeholder tokens (a chat-template variable, 0 by default), and
  `memoryllm_export.json` says which token that is and the fingerprint that memories must carry.
* `export_prefix(model, state)`: per layer, the keys/values of `[bos_l, memory[l]]` that the package reads, ONLY the
  rows attention may see (never-written rows of a training-free memory are left out). The package reads the text
  at positions `P..` after a prefix of `P` rows; a server that puts the `R <= P` exported rows at `0..R-1` puts the
  text at `R..`. RoPE is relative, so the exported keys are rotated by `-(P - R)` positions: every query-key
  distance is then the package's, exactly.
* `save_prefix` / `load_prefix`: a safetensors file of one memory version (checksum, fingerprint, atomic write).
* `pad_head_dim`: zero-pad the heads to a size a serving backend supports (vLLM's CPU attention needs a multiple
  of 32): `rope_theta` is squared and the query scaled so that attention is unchanged.

A reading model with the exported prefix in a `DynamicCache` (`prefix_cache`) gives the package's logits.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import rotate_half
from transformers.utils import logging

from .cache_memoryllm import reading_prefix
from .lora import LoraLinear


logger = logging.get_logger(__name__)

EXPORT_INFO = "memoryllm_export.json"
PREFIX_FORMAT = "memoryllm-prefix-kv"
PREFIX_FORMAT_VERSION = "1"
# The chat-template variable that says how many placeholder tokens open the prompt.
ROWS_VARIABLE = "memory_rows"
# RoPE types whose rotation angle is linear in the position (so a key can be moved by rotating it).
LINEAR_ROPE = ("default", "linear", "llama3")


@dataclasses.dataclass
class PrefixExport:
    """The readable prefix of one memory version: `keys`/`values` `[L, Hkv, R, hd]`, to be placed at positions
    `0..R-1` in front of the text; `prefix_length` is the package's `P` (`R` plus the rows left out)."""

    keys: torch.Tensor
    values: torch.Tensor
    prefix_length: int
    fingerprint: str = ""
    injections: int = 0

    @property
    def rows(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


# ------------------------------------------------------------------------------------------ the reading model
def check_exportable(model) -> None:
    """Refuse what a static prefix cannot serve: a variant that chooses prefix rows per query (M+)."""
    if model.variant.prefix_slots(model.config):
        raise ValueError(
            f"{model.config.memory_variant} retrieves memory rows per query: its prefix is not static, so it cannot "
            "be exported as key/values (serve it with the package)."
        )


@contextlib.contextmanager
def reading_every_row(model):
    """Within it, `model` reads every row of a memory, as a static export serves it (where its variant would choose
    rows per query: `MemoryVariant.reading_every_row`)."""
    with model.variant.reading_every_row():
        yield model


def reading_config(model) -> LlamaConfig:
    """The Llama config of the reading model: every `LlamaConfig` field of the MemoryLLM config, no memory fields."""
    fields = set(LlamaConfig().to_dict())
    options = {k: v for k, v in model.config.to_dict().items() if k in fields}
    for key in ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map"):
        options.pop(key, None)
    config = LlamaConfig(**options)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _merged(module: LoraLinear, adapter: str | None) -> torch.Tensor:
    weight = module.base_layer.weight.detach()
    if adapter is None or adapter not in module.lora_A:
        return weight.clone()
    a = module.lora_A[adapter].weight.detach().float()
    b = module.lora_B[adapter].weight.detach().float()
    return (weight.float() + module.scaling * (b @ a)).to(weight.dtype)


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The Llama state dict of the reading model: the backbone's weights, the reading adapter merged into every
    LoRA target (`W + (alpha / r) * B @ A`); no memory, bos rows, `e` or other adapters."""
    adapter = model.config.generation_adapter
    merged = {}
    for name, module in model.model.named_modules():
        if isinstance(module, LoraLinear):
            merged[f"model.{name}.weight"] = _merged(module, adapter)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.") and ".lora_" not in name and ".base_layer." not in name:
            state[name] = tensor.detach()
    state.update(merged)
    state["lm_head.weight"] = model.lm_head.weight.detach()
    return state


def reading_model(model, head_dim: int | None = None) -> LlamaForCausalLM:
    """The reading model as a `LlamaForCausalLM` in memory (same dtype and device as `model`), optionally with
    heads padded to `head_dim` (`pad_head_dim`)."""
    check_exportable(model)
    config, state = reading_config(model), merged_state_dict(model)
    if head_dim is not None and head_dim != _head_dim(config):
        config, state = pad_head_dim(config, state, head_dim)
    config._attn_implementation = model.config._attn_implementation
    weight = model.model.embed_tokens.weight
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    llama.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        llama.tie_weights()
    missing = [n for n, p in llama.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the reading model lacks {missing[:3]}")
    llama.model.rotary_emb = type(llama.model.rotary_emb)(config=config)  # its buffers were on the meta device
    return llama.to(device=weight.device, dtype=weight.dtype).eval()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> dict:
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    parameters.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return parameters


# -------------------------------------------------------------------------------------------- head padding
def padded_dims(head_dim: int, new_dim: int) -> torch.Tensor:
    """Where each of a head's `head_dim` dims goes in a head of `new_dim`: the two RoPE halves stay paired
    (`i` with `i + head_dim/2` becomes `i` with `i + new_dim/2`)."""
    half, new_half = head_dim // 2, new_dim // 2
    return torch.cat([torch.arange(half), new_half + torch.arange(half)])


def _pad_rows(weight: torch.Tensor, heads: int, head_dim: int, new_dim: int, dims: torch.Tensor) -> torch.Tensor:
    """A q/k/v projection `[heads * head_dim, d]` as `[heads * new_dim, d]` with zero rows in the new dims."""
    rows = weight.view(heads, head_dim, -1)
    padded = rows.new_zeros(heads, new_dim, rows.shape[-1])
    padded[:, dims] = rows
    return padded.reshape(heads * new_dim, -1)


def pad_head_dim(config: LlamaConfig, state: dict, new_dim: int) -> tuple[LlamaConfig, dict]:
    """
    The same attention with heads of `new_dim` dims: q/k rows placed so that the RoPE pairs stay paired, zeros
    elsewhere, `rope_theta` squared when the dims double (so dim pair `j` keeps its frequency), the query scaled by
    `sqrt(new_dim / head_dim)` to keep the softmax scale; v rows and o columns padded at the end.
    """
    head_dim = _head_dim(config)
    rope = _rope_parameters(config)
    if new_dim != 2 * head_dim or rope.get("rope_type", "default") not in LINEAR_ROPE:
        raise ValueError(f"pad_head_dim supports doubling the head dim with RoPE types {LINEAR_ROPE}")
    dims, v_dims = padded_dims(head_dim, new_dim), torch.arange(head_dim)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = dict(state)
    for name in [n for n in state if n.endswith("self_attn.q_proj.weight")]:
        base = name[: -len("q_proj.weight")]
        scale = math.sqrt(new_dim / head_dim)
        state[name] = _pad_rows(state[name] * scale, heads, head_dim, new_dim, dims)
        state[base + "k_proj.weight"] = _pad_rows(state[base + "k_proj.weight"], kv_heads, head_dim, new_dim, dims)
        state[base + "v_proj.weight"] = _pad_rows(state[base + "v_proj.weight"], kv_heads, head_dim, new_dim, v_dims)
        out = state[base + "o_proj.weight"].view(-1, heads, head_dim)
        padded = out.new_zeros(out.shape[0], heads, new_dim)
        padded[:, :, v_dims] = out
        state[base + "o_proj.weight"] = padded.reshape(out.shape[0], -1)
    options = config.to_dict()
    options["head_dim"] = new_dim
    options["rope_parameters"] = {**rope, "rope_theta": rope["rope_theta"] ** 2}
    options.pop("rope_theta", None)
    return LlamaConfig(**{k: v for k, v in options.items() if k not in ("transformers_version",)}), state


def pad_prefix(export: PrefixExport, new_dim: int) -> PrefixExport:
    """The prefix of a head-padded reading model (`pad_head_dim`): keys in the paired dims, values at the front."""
    head_dim = export.keys.shape[-1]
    if new_dim == head_dim:
        return export
    keys = export.keys.new_zeros(*export.keys.shape[:-1], new_dim)
    values = export.values.new_zeros(*export.values.shape[:-1], new_dim)
    keys[..., padded_dims(head_dim, new_dim)] = export.keys
    values[..., :head_dim] = export.values
    return dataclasses.replace(export, keys=keys, values=values)


def reading_fingerprint(model, head_dim: int | None = None) -> str:
    """A SHA-256 of what the prefix keys/values depend on: the reading model's config and merged weights, and the
    head size they are laid out for. A memory exported for one fingerprint is refused by any other."""
    digest = hashlib.sha256()
    config = reading_config(model).to_dict()
    config.pop("transformers_version", None)
    config.pop("dtype", None)
    digest.update(json.dumps({"config": config, "head_dim": head_dim}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(merged_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- prefixes
def rotate_keys(keys: torch.Tensor, shift: int, rotary_emb) -> torch.Tensor:
    """Keys `[..., R, hd]` (RoPE applied) moved by `shift` positions: rotated by the angle of position `shift`."""
    if shift == 0:
        return keys
    probe = keys.new_zeros(1, 1, keys.shape[-1], dtype=torch.float32)
    positions = torch.tensor([[shift]], device=keys.device)
    cos, sin = rotary_emb(probe, positions)  # [1, 1, hd]
    moved = keys.float() * cos[0, 0] + rotate_half(keys.float()) * sin[0, 0]
    return moved.to(keys.dtype)


def export_prefix(model, state, head_dim: int | None = None, fingerprint: str = "") -> PrefixExport:
    """
    The prefix keys/values that `model` reads for `state`, `[L, Hkv, R, hd]`: only the rows attention may see, moved
    so that they sit at positions `0..R-1` with the text at `R..` (every query-key distance as in the package).
    An uninitialised memory is not read: `R = 0`.
    """
    check_exportable(model)
    config = model.config
    if model.variant.reads_per_query:
        logger.warning_once(
            f"{config.memory_variant} with memory_read={config.memory_read!r} chooses the rows a query reads; an "
            "exported prefix is static, so what serves it reads the whole memory (memory_read='all')."
        )
    if not model.variant.reads(state):
        kv_heads, dim = config.num_key_value_heads, _head_dim(config)
        empty = torch.zeros(config.num_hidden_layers, kv_heads, 0, dim, dtype=model.dtype)
        export = PrefixExport(empty, empty.clone(), 0, fingerprint, state.injections)
        return pad_prefix(export, head_dim) if head_dim else export
    with torch.no_grad():
        prefix = reading_prefix(model, state)
        length = prefix.length
        rows = prefix.written.nonzero().squeeze(1) if prefix.written is not None else torch.arange(length)
        rows = rows.to(prefix.key_buffers[0].device)
        keys, values = [], []
        for idx in range(config.num_hidden_layers):
            layer_keys, layer_values = prefix.layer(idx)  # [1, Hkv, P, hd]
            keys.append(rotate_keys(layer_keys[0][:, rows], len(rows) - length, model.model.rotary_emb).cpu())
            values.append(layer_values[0][:, rows].cpu())
    export = PrefixExport(torch.stack(keys), torch.stack(values), length, fingerprint, state.injections)
    return pad_prefix(export, head_dim) if head_dim else export


def prefix_cache(export: PrefixExport, device=None, dtype=None) -> DynamicCache:
    """A `DynamicCache` holding the exported prefix (batch size 1): a reading model continues it at position `R`."""
    cache = DynamicCache()
    for idx in range(export.keys.shape[0]):
        keys = export.keys[idx].unsqueeze(0).to(device=device, dtype=dtype)
        values = export.values[idx].unsqueeze(0).to(device=device, dtype=dtype)
        cache.update(keys, values, idx)
    return cache


# ------------------------------------------------------------------------------------------------- files
def _checksum(metadata: dict, keys: torch.Tensor, values: torch.Tensor) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for tensor in (keys, values):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_prefix(export: PrefixExport, path: str | os.PathLike) -> None:
    """Write the prefix as safetensors (`keys`, `values`) with its metadata and a SHA-256; atomic (temporary file,
    fsync, rename)."""
    keys, values = export.keys.detach().cpu().contiguous(), export.values.detach().cpu().contiguous()
    metadata = {
        "format": PREFIX_FORMAT,
        "format_version": PREFIX_FORMAT_VERSION,
        "rows": str(export.rows),
        "prefix_length": str(export.prefix_length),
        "fingerprint": export.fingerprint,
        "injections": str(export.injections),
    }
    metadata["sha256"] = _checksum(metadata, keys, values)
    path = pathlib.Path(path)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    os.chmod(staging, 0o644)  # a server running as another user reads the store
    try:
        save_file({"keys": keys, "values": values}, staging, metadata=metadata)
        with open(staging, "rb") as file:
            os.fsync(file.fileno())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def load_prefix(path: str | os.PathLike, fingerprint: str | None = None) -> PrefixExport:
    """Read a prefix written by `save_prefix`, checking its format, checksum and (when given) fingerprint."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            keys, values = handle.get_tensor("keys"), handle.get_tensor("values")
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path}: not a readable prefix file ({error})") from error
    if metadata.get("format") != PREFIX_FORMAT:
        raise ValueError(f"{path}: not a {PREFIX_FORMAT} file")
    expected = metadata.pop("sha256", None)
    if expected != _checksum(metadata, keys, values):
        raise ValueError(f"{path}: checksum mismatch: the file is damaged")
    if fingerprint is not None and metadata["fingerprint"] != fingerprint:
        raise ValueError(f"{path}: exported for another reading model (fingerprint {metadata['fingerprint'][:12]})")
    prefix_length, injections = int(metadata["prefix_length"]), int(metadata["injections"])
    return PrefixExport(keys, values, prefix_length, metadata["fingerprint"], injections)


# ------------------------------------------------------------------------------------------ the export folder
def placeholder_token(tokenizer) -> tuple[str, int]:
    """A special token of `tokenizer` that tokenizes to one id per copy however many stand in a row: the
    placeholder that opens a memory-reading prompt (its keys/values come from the memory, never computed)."""
    candidates = [tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token]
    candidates += list(getattr(tokenizer, "all_special_tokens", []))
    for token in candidates:
        if not token:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if tokenizer(token * 3, add_special_tokens=False)["input_ids"] == [token_id] * 3:
            return token, int(token_id)
    raise ValueError("the tokenizer has no special token that tokenizes one id per copy: pass placeholder_token_id")


def placeholder_template(template: str, token: str) -> str:
    """`template` opened by `memory_rows` copies of `token` (`memory_rows` is a chat-template variable, default 0)."""
    opening = (
        f"{{%- if {ROWS_VARIABLE} is defined and {ROWS_VARIABLE} > 0 %}}{{{{ {json.dumps(token)} * {ROWS_VARIABLE} }}}}"
    )
    return opening + "{%- endif %}" + template


def _export_tokenizer(model, folder: pathlib.Path, placeholder_id: int | None) -> tuple[str | None, int]:
    """Save the tokenizer with the placeholder-opened chat template; the placeholder (token, id)."""
    try:
        tokenizer = model.tokenizer
    except ValueError:
        tokenizer = None
    if tokenizer is None:
        token_id = placeholder_id if placeholder_id is not None else int(model.config.bos_token_id or 0)
        logger.warning("No tokenizer: the export has none; prompts are token ids, placeholder id %d.", token_id)
        return None, token_id
    token, token_id = placeholder_token(tokenizer)
    if placeholder_id is not None:
        token, token_id = tokenizer.convert_ids_to_tokens(placeholder_id), placeholder_id
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        tokenizer.chat_template = placeholder_template(template, token)
    else:
        logger.warning("The tokenizer has no single chat template: chat requests cannot open with the memory.")
    tokenizer.save_pretrained(folder)
    if isinstance(template, str):
        tokenizer.chat_template = template
    return token, token_id


def export_reading_model(
    model, folder: str | os.PathLike, *, head_dim: int | None = None, dtype=None, placeholder_token_id=None
) -> dict:
    """
    Write the reading model of `model` as a plain Llama checkpoint in `folder` (safetensors, config, generation
    config, tokenizer with the placeholder-opened chat template) and `memoryllm_export.json`; return that info.
    `head_dim` pads the heads (`pad_head_dim`); `dtype` casts the weights (default: the model's).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llama = reading_model(model, head_dim)
    if dtype is not None:
        llama = llama.to(dtype)
    if getattr(model, "generation_config", None) is not None:
        llama.generation_config = model.generation_config
    llama.save_pretrained(folder)
    token, token_id = _export_tokenizer(model, folder, placeholder_token_id)
    info = {
        "format": "memoryllm-reading-model",
        "fingerprint": reading_fingerprint(model, head_dim),
        "placeholder_token": token,
        "placeholder_token_id": token_id,
        "rows_variable": ROWS_VARIABLE,
        "prefix_length": model.config.prefix_length,
        "head_dim": head_dim or _head_dim(model.config),
        "source_head_dim": _head_dim(model.config),
        "memory_variant": model.config.memory_variant,
        "num_hidden_layers": model.config.num_hidden_layers,
        "num_key_value_heads": model.config.num_key_value_heads,
    }
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("Exported the reading model to %s (fingerprint %s).", folder, info["fingerprint"][:12])
    return info


def read_export_info(folder: str | os.PathLike) -> dict:
    """`memoryllm_export.json` of an exported reading model."""
    path = pathlib.Path(folder) / EXPORT_INFO
    if not path.exists():
        raise ValueError(f"{folder} is not an exported MemoryLLM reading model (no {EXPORT_INFO})")
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = [
    "EXPORT_INFO",
    "PrefixExport",
    "export_prefix",
    "export_reading_model",
    "load_prefix",
    "merged_state_dict",
    "pad_head_dim",
    "pad_prefix",
    "placeholder_template",
    "placeholder_token",
    "prefix_cache",
    "read_export_info",
    "reading_config",
    "reading_fingerprint",
    "reading_model",
    "rotate_keys",
    "save_prefix",
]
