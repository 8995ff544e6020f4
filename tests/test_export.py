"""Export for serving: the reading model as a plain Llama (the reading adapter merged) and a memory version as its
prefix keys/values; a plain-Llama forward over the exported prefix equals the MemoryLLM forward."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from modeling_memoryllm import MemoryLLMForCausalLM, default
from modeling_memoryllm.export import (
    export_prefix,
    export_reading_model,
    load_prefix,
    prefix_cache,
    read_export_info,
    reading_every_row,
    reading_fingerprint,
    reading_model,
    save_prefix,
)
from modeling_memoryllm.lora import LoraLinear
from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG
from modeling_memoryllm.testing_utils import tiny_model
from tests.conftest import golden_path, load_golden


pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    return load_golden()


@pytest.fixture(scope="module")
def default_model():
    try:
        return default.load_default()
    except default.DefaultModelMissing as error:
        pytest.skip(str(error))


def training_free_tiny(chunks):
    """The bench preset (training-free, 64 rows) with `chunks` injected: a partly written memory."""
    model = tiny_model(0, "bench")
    state = model.new_memory_state()
    for chunk in chunks:
        model.inject(chunk, memory=state, generator=torch.Generator().manual_seed(1))
    return model, state


@torch.no_grad()
def greedy_over_prefix(llama, export, ids: torch.Tensor, steps: int):
    """Greedy tokens and step logits of a plain Llama continuing the exported prefix (text at positions R..)."""
    cache, tokens, logits = prefix_cache(export), ids, []
    for _ in range(steps):
        step = llama(tokens, **{CACHE_KWARG: cache}).logits[:, -1].float()
        logits.append(step)
        tokens = step.argmax(-1, keepdim=True)
    return torch.cat([t.argmax(-1) for t in logits]), torch.stack(logits, 1)


@torch.no_grad()
def assert_reads_alike(model, state, ids: torch.Tensor, head_dim=None, steps: int = 4, atol: float = ATOL):
    """A plain Llama over the exported prefix gives the package's logits (within `atol`) and greedy tokens."""
    export = export_prefix(model, state, head_dim)
    llama = reading_model(model, head_dim)
    with reading_every_row(model):  # what a static prefix serves (the default may choose rows per query)
        package = model(ids, memory=state).logits
        out = model.generate(
            ids, memory=state, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(llama(ids, **{CACHE_KWARG: prefix_cache(export)}).logits, package, atol=atol, rtol=0)
    generated = out.sequences[0, ids.shape[1] :].tolist()  # may stop early at an end-of-sequence token
    tokens, logits = greedy_over_prefix(llama, export, ids, len(generated))
    assert tokens.tolist() == generated
    torch.testing.assert_close(logits, torch.stack(out.logits, 1).float(), atol=atol, rtol=0)
    return export


def test_merge_is_w_plus_scaled_b_a(golden):
    llama = reading_model(golden)
    lora = golden.model.layers[1].mlp.down_proj
    assert isinstance(lora, LoraLinear) and golden.config.generation_adapter == "decoder_adapter"
    a, b = lora.lora_A["decoder_adapter"].weight, lora.lora_B["decoder_adapter"].weight
    expected = lora.base_layer.weight + (8 / 4) * b @ a  # lora_alpha / r of golden A
    torch.testing.assert_close(llama.model.layers[1].mlp.down_proj.weight, expected)
    assert not any("lora" in name for name, _ in llama.named_parameters())


def test_golden_a_plain_llama_over_exported_prefix(golden):
    ids = torch.tensor([[5, 17, 301, 42, 9, 77, 250]])
    export = assert_reads_alike(golden, golden.memory_state, ids)
    assert export.rows == export.prefix_length == golden.config.prefix_length == 33  # every row written


def test_golden_a_with_heads_padded_to_32(golden):
    """vLLM's CPU attention needs head sizes of 32 or more: padding to 32 changes nothing."""
    assert_reads_alike(golden, golden.memory_state, torch.tensor([[3, 99, 12, 400, 8]]), head_dim=32)


@pytest.mark.parametrize("chunks", [[list(range(5, 25))], [list(range(5, 37)), list(range(40, 51))]])
def test_training_free_exports_only_written_rows(chunks):
    """Never-written rows are left out; the keys move so that every query-key distance is the package's."""
    model, state = training_free_tiny(chunks)
    written = int((state.provenance[0] >= 0).sum())
    assert 0 < written < model.config.memory_rows
    export = assert_reads_alike(model, state, torch.tensor([[7, 8, 9, 200, 31]]))
    assert export.rows == 1 + written and export.prefix_length == 1 + model.config.memory_rows


def test_golden_c_memoryllm_7b_over_exported_prefix():
    """The paper's 7B rules (no adapters, linear RoPE scaling from the position interpolation) export alike."""
    model = MemoryLLMForCausalLM.from_pretrained(golden_path("C") / "checkpoint", dtype=torch.float32).eval()
    assert model.config.memory_variant == "memoryllm-7b"
    assert_reads_alike(model, model.memory_state, torch.tensor([[5, 17, 30, 42, 9]]))


def test_mplus_is_refused():
    """M+ retrieves memory rows per query: no static prefix to export."""
    model = MemoryLLMForCausalLM.from_pretrained(golden_path("E") / "checkpoint").eval()
    with pytest.raises(ValueError, match="retrieves memory rows per query"):
        export_prefix(model, model.memory_state)
    with pytest.raises(ValueError, match="retrieves memory rows per query"):
        reading_model(model)


def test_empty_memory_exports_no_rows():
    model = tiny_model(0, "bench")
    state = model.new_memory_state()
    export = export_prefix(model, state)
    assert export.rows == 0
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(reading_model(model)(ids).logits, model(ids, memory=state).logits, atol=ATOL, rtol=0)


def test_default_model_parity_and_export_folder(default_model, tmp_path):
    state = default_model.new_memory_state()
    default_model.inject(default.PASSAGE.read_text(), memory=state)
    tokenizer = default_model.tokenizer
    ids = tokenizer("Who built the lighthouse on Varden Island?", return_tensors="pt").input_ids
    # 30 layers in float32 over logits of magnitude ~20: about 2e-4 apart (a different summation order)
    export = assert_reads_alike(default_model, state, ids, steps=3, atol=1e-3)
    assert export.rows == 1 + int((state.provenance[0] >= 0).sum()) < default_model.config.prefix_length
    info = export_reading_model(default_model, tmp_path / "reading")
    assert read_export_info(tmp_path / "reading") == info
    assert info["fingerprint"] == reading_fingerprint(default_model)
    assert LlamaForCausalLM.from_pretrained(tmp_path / "reading").config.tie_word_embeddings
    exported = AutoTokenizer.from_pretrained(tmp_path / "reading")
    turn = [{"role": "user", "content": "Hi"}]
    opened = exported.apply_chat_template(turn, add_generation_prompt=True, memory_rows=5)
    plain = tokenizer.apply_chat_template(turn, add_generation_prompt=True)
    opened, plain = (ids if isinstance(ids, list) else ids["input_ids"] for ids in (opened, plain))
    assert opened == [info["placeholder_token_id"]] * 5 + plain
    assert exported.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) == (
        tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    )


def test_prefix_file_round_trip_and_refusals(tmp_path):
    model, state = training_free_tiny([list(range(5, 25))])
    export = export_prefix(model, state, fingerprint="f" * 64)
    path = tmp_path / "kv.safetensors"
    save_prefix(export, path)
    loaded = load_prefix(path, fingerprint="f" * 64)
    torch.testing.assert_close(loaded.keys, export.keys, atol=0, rtol=0)
    assert (loaded.rows, loaded.prefix_length, loaded.injections) == (export.rows, 65, 2)
    with pytest.raises(ValueError, match="another reading model"):
        load_prefix(path, fingerprint="0" * 64)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_prefix(path)
    (tmp_path / "junk").write_text(json.dumps({"no": "tensors"}))
    with pytest.raises(ValueError, match="not a readable prefix file"):
        load_prefix(tmp_path / "junk")


def test_fingerprint_follows_the_reading_weights():
    model = tiny_model(0)
    before = reading_fingerprint(model)
    assert reading_fingerprint(model, head_dim=16) != before
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["decoder_adapter"].weight.add_(0.1)
    assert reading_fingerprint(model) != before
