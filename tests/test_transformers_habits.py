"""
A transformers user's day with a memory: every everyday call, each compared with a reference computation.

The reference for generation is a plain loop of full forwards without a cache, reading the same memory: argmax at
each step (greedy), or the same seeded draws (sampling); tokens must be equal, scores within 1e-4. Combinations
that cannot work must raise one clear `ValueError` before any forward runs.
"""

import copy
import json

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast, StaticCache, pipeline
from transformers.generation.streamers import BaseStreamer

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.cache_memoryllm import MemoryCacheMixin
from modeling_memoryllm.memory_state import EMPTY_ROWS
from modeling_memoryllm.modeling_memoryllm import CACHE_KWARG
from tests.conftest import assert_close, golden_path, run_offline_script
from tests.tiny import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = torch.tensor([[3, 4, 5, 6]])
GREEDY = dict(do_sample=False, max_new_tokens=5)


def token(i: int) -> str:
    """The text of token `i` of the tiny tokenizer (one printable character)."""
    return chr(ord("!") + i - 3)


def tiny_tokenizer(vocab_size: int = 97) -> PreTrainedTokenizerFast:
    """A character-level tokenizer of the tiny vocabulary: `<pad>`, `<s>`, `</s>`, then `!` ... `~`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{token(i): i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


@pytest.fixture(scope="module")
def model():
    model = tiny_model()
    model.generation_config.eos_token_id = None  # the references run a fixed number of steps
    model.tokenizer = tiny_tokenizer()
    return model


@pytest.fixture
def state(model):
    return model.memory_state.clone()


def cache_of(output):
    return getattr(output, CACHE_KWARG)


@torch.no_grad()
def reference(model, ids, steps: int, memory, seed: int | None = None, attention_mask=None):
    """Full forwards without a cache: `(ids with the new tokens, [step logits])`; argmax, or seeded sampling."""
    if seed is not None:
        torch.manual_seed(seed)
    logits_per_step = []
    for _ in range(steps):
        logits = model(ids, memory=memory, attention_mask=attention_mask, use_cache=False).logits[:, -1].float()
        logits_per_step.append(logits)
        if seed is None:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        ids = torch.cat([ids, token], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(ids.shape[0], 1)], dim=1)
    return ids, logits_per_step


class RowCounter:
    """Counts the rows each call passes to decoder layer 0 (what a forward computes)."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.model.layers[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.rows.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------------------------- generate basics
def test_greedy_with_scores_and_logits(model, state):
    expected, step_logits = reference(model, PROMPT, 5, state)
    out = model.generate(
        PROMPT, memory=state, return_dict_in_generate=True, output_scores=True, output_logits=True, **GREEDY
    )
    assert torch.equal(out.sequences, expected)
    for scores, logits, want in zip(out.scores, out.logits, step_logits):
        assert_close(scores, want)
        assert_close(logits, want)


def test_sampling_with_a_seed(model, state):
    expected, _ = reference(model, PROMPT, 5, state, seed=7)
    torch.manual_seed(7)
    out = model.generate(PROMPT, memory=state, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=5)
    assert torch.equal(out, expected)


def test_use_cache_false_gives_the_same_text(model, state):
    expected, _ = reference(model, PROMPT, 5, state)
    assert torch.equal(model.generate(PROMPT, memory=state, use_cache=False, **GREEDY), expected)
    assert cache_of(model(PROMPT, memory=state, use_cache=False)) is None


def test_streamer_sees_every_token(model, state):
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.reshape(-1).tolist()

        def end(self):
            self.ended = True

    streamer = Collect()
    out = model.generate(PROMPT, memory=state, streamer=streamer, **GREEDY)
    assert streamer.ended and streamer.tokens == out[0].tolist() == reference(model, PROMPT, 5, state)[0][0].tolist()


def test_stop_strings(model, state):
    expected, _ = reference(model, PROMPT, 5, state)
    stop = int(expected[0, PROMPT.shape[1] + 1])  # the second new token
    first = PROMPT.shape[1] + expected[0, PROMPT.shape[1] :].tolist().index(stop)
    out = model.generate(PROMPT, memory=state, stop_strings=[token(stop)], tokenizer=model.tokenizer, **GREEDY)
    assert torch.equal(out, expected[:, : first + 1])


def test_left_padded_batch_with_one_memory_per_row(model, state):
    other = model.new_memory_state()
    model.inject(list(range(20, 40)), memory=other, generator=torch.Generator().manual_seed(0))
    rows = [[3, 4, 5, 6, 7], [8, 9]]
    batch = torch.tensor([rows[0], [0, 0, 0, *rows[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    out = model.generate(batch, attention_mask=mask, memory=[state, other], pad_token_id=0, **GREEDY)
    for row, memory, tokens in zip(out, [state, other], rows):
        alone, _ = reference(model, torch.tensor([tokens]), 5, memory)
        assert torch.equal(row[-len(alone[0]) :], alone[0])


# ------------------------------------------------------------------------------------------ beams, sequences
def test_beams_equal_uncached_beams(model, state):
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False, output_scores=True)
    cached = model.generate(PROMPT, memory=state, return_dict_in_generate=True, **options)
    uncached = model.generate(PROMPT, memory=state, return_dict_in_generate=True, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert_close(cached.sequences_scores, uncached.sequences_scores)


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_per_row_memories_with_beams_and_several_sequences(model, state, options):
    other = model.new_memory_state()
    model.inject(list(range(20, 40)), memory=other, generator=torch.Generator().manual_seed(0))
    together = model.generate(PROMPT.repeat(2, 1), memory=[state, other], max_new_tokens=4, **options)
    per_row = options.get("num_return_sequences", 1)
    for index, memory in enumerate([state, other]):
        alone = model.generate(PROMPT, memory=memory, max_new_tokens=4, **options)
        assert torch.equal(together[index * per_row : (index + 1) * per_row], alone)


# ------------------------------------------------------------------------------------------- caches, chat
def test_multi_turn_chat_computes_only_the_new_tokens(model, state, monkeypatch):
    from modeling_memoryllm import cache_memoryllm

    calls = []
    compute = cache_memoryllm.prefix_key_values
    monkeypatch.setattr(cache_memoryllm, "prefix_key_values", lambda *a, **k: calls.append(1) or compute(*a, **k))
    first = model.generate(PROMPT, memory=state, return_dict_in_generate=True, **GREEDY)
    turn = torch.cat([first.sequences, torch.tensor([[7, 8, 9]])], dim=1)
    with RowCounter(model) as counter:
        second = model.generate(
            turn, memory=state, return_dict_in_generate=True, **{CACHE_KWARG: cache_of(first)}, **GREEDY
        )
    assert counter.rows[0] == 3 + 1  # the new user turn (plus the last generated token, not yet cached)
    assert calls == [1]  # the prefix was computed once, for the first turn
    expected, _ = reference(model, turn, 5, state)
    assert torch.equal(second.sequences, expected)
    cache = cache_of(second)
    assert cache.get_seq_length() == expected.shape[1] - 1
    assert cache.physical_length() == cache.prefix_length + expected.shape[1] - 1


def test_prompt_cache_reuse_recipe(model, state):
    with torch.no_grad():
        prompt_cache = cache_of(model(PROMPT, memory=state, **{CACHE_KWARG: DynamicCache()}))
    assert isinstance(prompt_cache, MemoryCacheMixin) and prompt_cache.get_seq_length() == PROMPT.shape[1]
    for suffix in ([7, 8], [9, 10, 11]):
        ids = torch.cat([PROMPT, torch.tensor([suffix])], dim=1)
        with RowCounter(model) as counter:
            out = model.generate(ids, memory=state, **{CACHE_KWARG: copy.deepcopy(prompt_cache)}, **GREEDY)
        assert counter.rows[0] == len(suffix)
        assert torch.equal(out, reference(model, ids, 5, state)[0])
    assert prompt_cache.get_seq_length() == PROMPT.shape[1]  # the copies left it alone


@pytest.mark.parametrize("implementation", [None, "dynamic", "static"])
def test_cache_implementations(model, state, implementation):
    expected, _ = reference(model, PROMPT, 5, state)
    assert torch.equal(model.generate(PROMPT, memory=state, cache_implementation=implementation, **GREEDY), expected)
    config = copy.deepcopy(model.generation_config)
    config.cache_implementation = implementation
    assert torch.equal(model.generate(PROMPT, memory=state, generation_config=config, **GREEDY), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers' offloaded cache needs CUDA")
def test_offloaded_cache_on_cuda():
    model = tiny_model(device="cuda")
    state = model.memory_state.clone()
    ids = PROMPT.cuda()
    expected, _ = reference(model, ids, 5, state)
    assert torch.equal(model.generate(ids, memory=state, cache_implementation="offloaded", **GREEDY), expected)


def test_explicit_static_cache(model, state):
    expected, _ = reference(model, PROMPT, 5, state)
    size = model.config.prefix_length + PROMPT.shape[1] + 5 - 1  # the last new token is never fed back
    cache = StaticCache(config=model.config, max_cache_len=size)
    assert torch.equal(model.generate(PROMPT, memory=state, **{CACHE_KWARG: cache}, **GREEDY), expected)
    small = StaticCache(config=model.config, max_cache_len=size - 1)
    with RowCounter(model) as counter, pytest.raises(ValueError, match=f"max_cache_len >= {size}"):
        model.generate(PROMPT, memory=state, **{CACHE_KWARG: small}, **GREEDY)
    assert counter.rows == []


def test_a_cache_filled_elsewhere_is_refused(model, state):
    plain = LlamaForCausalLM(model.merged_reading_model().config).eval()
    with torch.no_grad():
        foreign = cache_of(plain(PROMPT, **{CACHE_KWARG: DynamicCache()}))
    with RowCounter(model) as counter, pytest.raises(ValueError, match="not computed by this MemoryLLM"):
        model(PROMPT, memory=state, **{CACHE_KWARG: foreign})
    assert counter.rows == []


def test_mplus_needs_its_own_cache():
    mplus = MemoryLLMForCausalLM.from_pretrained(golden_path("E") / "checkpoint").eval()
    state = mplus.memory_state.clone()
    ids = torch.tensor([[5, 6, 7, 8]])
    default = mplus.generate(ids, memory=state, max_new_tokens=3, do_sample=False)
    explicit = mplus.generate(ids, memory=state, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: DynamicCache()})
    assert torch.equal(default, explicit)
    with RowCounter(mplus) as counter, pytest.raises(ValueError, match="retrieves memory rows per query"):
        mplus.generate(ids, memory=state, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert counter.rows == []


# ----------------------------------------------------------------------------------------------- copies
def test_deep_copies_and_assisted_decoding(model, state):
    expected, _ = reference(model, PROMPT, 5, state)
    model(PROMPT, memory=state)  # a cached prefix inside the state
    twin = copy.deepcopy(state)
    assert twin.prefix is None and torch.equal(twin.memory, state.memory) and twin.memory is not state.memory
    assert torch.equal(model.generate(PROMPT, memory=twin, **GREEDY), expected)
    assert torch.equal(model.generate(PROMPT, memory=state, assistant_model=model, **GREEDY), expected)
    assert torch.equal(model.generate(PROMPT, memory=state, prompt_lookup_num_tokens=2, **GREEDY), expected)


# ------------------------------------------------------------------------------------------------- pipelines
def test_pipelines(model, state):
    empty = model.new_memory_state()
    generator = pipeline("text-generation", model=model, tokenizer=model.tokenizer)
    settings = dict(max_new_tokens=4, do_sample=False, return_tensors=True)
    text = "".join(token(i) for i in PROMPT[0].tolist())
    tokens = generator(text, memory=state, **settings)[0]["generated_token_ids"]
    assert tokens[-4:] == reference(model, PROMPT, 4, state)[0][0, -4:].tolist()
    texts, memories = [text, text[:2]], [state, empty]  # a batch whose second memory is empty
    for text, memory, result in zip(texts, memories, generator(texts, memory=memories, batch_size=2, **settings)):
        ids = torch.tensor([model.tokenizer(text).input_ids])
        assert result[0]["generated_token_ids"][-4:] == reference(model, ids, 4, memory)[0][0, -4:].tolist()


# ------------------------------------------------------------------------------------ precision, placement
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generate(dtype):
    model = tiny_model().to(dtype)
    model.generation_config.eos_token_id = None
    state = model.memory_state.clone()
    expected, step_logits = reference(model, PROMPT, 4, state)
    out = model.generate(
        PROMPT, memory=state, return_dict_in_generate=True, output_logits=True, do_sample=False, max_new_tokens=4
    )
    assert torch.equal(out.sequences, expected)
    for logits, want in zip(out.logits, step_logits):
        assert_close(logits, want, tol=2e-2)


def test_device_map_and_sharded_save(model, state, tmp_path):
    pytest.importorskip("accelerate")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = MemoryLLMForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    loaded.generation_config.eos_token_id = None
    assert torch.equal(loaded.memory, model.memory)
    assert torch.equal(loaded.generate(PROMPT, memory=state, **GREEDY), reference(model, PROMPT, 5, state)[0])


@torch.no_grad()
def test_torch_compile_of_a_forward(model, state):
    compiled = torch.compile(model, backend="eager")
    assert_close(compiled(PROMPT, memory=state).logits, model(PROMPT, memory=state).logits)


REMOTE_DAY = r"""
import sys
sys.modules["modeling_memoryllm"] = None  # the package itself must not be importable
import copy, json, torch
from transformers import AutoModelForCausalLM, DynamicCache
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
model.generation_config.eos_token_id = None
kwarg = model.cache_kwarg  # "cache" (transformers >= 5.24) or "past_key_values"
state = model.memory_state.clone()
prompt = torch.tensor([[3, 4, 5, 6]])
greedy = dict(do_sample=False, max_new_tokens=5)
first = model.generate(prompt, memory=state, return_dict_in_generate=True, **greedy)
turn = torch.cat([first.sequences, torch.tensor([[7, 8, 9]])], dim=1)
second = model.generate(turn, memory=state, **{kwarg: getattr(first, kwarg)}, **greedy)
print(json.dumps({
    "no_cache": model.generate(prompt, memory=state, use_cache=False, **greedy).tolist(),
    "static": model.generate(prompt, memory=state, cache_implementation="static", **greedy).tolist(),
    "second_turn": second.tolist(),
    "copy": model.generate(prompt, memory=copy.deepcopy(state), **greedy).tolist(),
}))
"""


def test_trust_remote_code_reload(model, state, tmp_path):
    model.save_pretrained(tmp_path / "folder")
    result = run_offline_script(REMOTE_DAY, str(tmp_path / "folder"), cwd=tmp_path)
    expected = reference(model, PROMPT, 5, state)[0].tolist()
    assert result["no_cache"] == result["static"] == result["copy"] == expected
    turn = torch.cat([torch.tensor(expected), torch.tensor([[7, 8, 9]])], dim=1)
    assert result["second_turn"] == reference(model, turn, 5, state)[0].tolist()


# ----------------------------------------------------------------------------------------- weights change
@torch.no_grad()
def test_the_cached_prefix_follows_weight_changes(state):
    model = tiny_model()
    model(PROMPT, memory=state)
    edited = {k: v + 0.05 if "k_proj" in k or "input_layernorm" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(edited)
    assert_close(model(PROMPT, memory=state).logits, model(PROMPT, memory=state.clone()).logits, tol=1e-6)
    model.model.layers[1].self_attn.v_proj.base_layer.weight.mul_(1.5)  # an in-place edit
    assert_close(model(PROMPT, memory=state).logits, model(PROMPT, memory=state.clone()).logits, tol=1e-6)
    model.bos_embedding.data.add_(0.1)  # an edit through .data, which no version counter sees: say so
    model.weights_version += 1
    assert_close(model(PROMPT, memory=state).logits, model(PROMPT, memory=state.clone()).logits, tol=1e-6)


# ------------------------------------------------------------------------------------------------- training
def _loss_and_grads(model, state, checkpointing: bool | None, inject: bool):
    """Loss and gradients of a read (after an injection when `inject`); `checkpointing`: `None` (off), or whether
    the checkpoint is reentrant."""
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if checkpointing is not None:
        enable({"use_reentrant": checkpointing})
    model.zero_grad()
    memory = (
        model.injected(list(range(10, 30)), memory=state, generator=torch.Generator().manual_seed(0))
        if inject
        else state
    )
    loss = model(PROMPT, memory=memory, labels=PROMPT).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    disable()
    model.eval()
    return loss.detach(), grads


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("memory", ["read", "inject-then-read", "unread"])
def test_gradient_checkpointing_keeps_the_memory(state, memory, reentrant):
    model, inject = tiny_model(), memory == "inject-then-read"
    state = model.new_memory_state() if memory == "unread" else state
    if inject and reentrant:
        with pytest.raises(ValueError, match="use_reentrant': False"):
            _loss_and_grads(model, state, checkpointing=reentrant, inject=inject)
        return
    loss, grads = _loss_and_grads(model, state, checkpointing=None, inject=inject)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, state, checkpointing=reentrant, inject=inject)
    assert_close(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys() and any("lora_A.default" in n for n in grads) == inject
    for name, grad in grads.items():
        assert_close(checkpointed_grads[name], grad)


def test_parameter_counts(tmp_path):
    model = tiny_model()
    trainable = model.num_parameters(only_trainable=True)
    assert trainable == model.num_parameters() - model.memory.numel()
    model.save_pretrained(tmp_path)
    loaded = MemoryLLMForCausalLM.from_pretrained(tmp_path)
    assert not loaded.memory.requires_grad and loaded.num_parameters(only_trainable=True) == trainable
    mplus = MemoryLLMForCausalLM.from_pretrained(golden_path("E") / "checkpoint")
    frozen = [n for n, p in mplus.named_parameters() if not p.requires_grad]
    assert "memory" in frozen and any(n.startswith("ltm.") for n in frozen)


@torch.no_grad()
def test_a_partly_filled_memory_survives_save_and_reload(tmp_path):
    model = tiny_model(memory_variant="training-free")
    model.memory_state.reset()
    model.inject(list(range(10, 22)))  # one chunk: 4 of 12 rows per layer written
    expected = model(PROMPT).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["memory_unwritten_rows"] == [[0, 8]]
    loaded = MemoryLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.memory_state.provenance[:, :8] == EMPTY_ROWS).all()
    assert_close(loaded(PROMPT).logits, expected)


# ----------------------------------------------------------------------------------------------------- peft
def test_peft_lora_on_top(state):
    peft = pytest.importorskip("peft")
    from modeling_memoryllm.peft_support import lora_config

    model = tiny_model()
    model.generation_config.eos_token_id = None
    before = model(PROMPT, memory=state).logits.detach()
    targets = ["q_proj", "k_proj", "o_proj"]  # q_proj and k_proj carry the built-in adapters
    peft_model = peft.get_peft_model(model, lora_config(r=2, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        tuned = peft_model(PROMPT, memory=state).logits
        assert not torch.allclose(tuned, before)
        with peft_model.disable_adapter():  # the prefix is recomputed without peft's k_proj adapter
            assert_close(peft_model(PROMPT, memory=state).logits, before, tol=1e-6)
        out = peft_model.generate(input_ids=PROMPT, memory=state, **GREEDY)
        assert torch.equal(out, reference(peft_model, PROMPT, 5, state)[0])
        merged = peft_model.merge_and_unload()
        assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear"
        assert_close(merged(PROMPT, memory=state).logits, tuned)


def test_plain_peft_config_where_there_are_no_built_in_adapters(state):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    with torch.no_grad():
        tuned = peft_model(PROMPT, memory=state).logits
        assert_close(peft_model.merge_and_unload()(PROMPT, memory=state).logits, tuned)


# ------------------------------------------------------------------------------------------ serving elsewhere
@torch.no_grad()
@pytest.mark.parametrize("variant", ["memoryllm-8b", "training-free"])
def test_merged_reading_model_reads_the_exported_prefix(variant):
    model = tiny_model(memory_variant=variant)
    state = model.memory_state.clone()
    if variant == "training-free":  # a partly written memory: its empty rows are masked out
        state = model.new_memory_state()
        model.inject(list(range(10, 26)), memory=state)
    llama = model.merged_reading_model()
    assert type(llama) is LlamaForCausalLM
    prefix = model.memory_prefix(state)
    mask = prefix.attention_mask(torch.ones(1, PROMPT.shape[1], dtype=torch.long))
    positions = torch.arange(prefix.length, prefix.length + PROMPT.shape[1]).unsqueeze(0)
    logits = llama(PROMPT, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: prefix.cache()}).logits
    assert_close(logits, model(PROMPT, memory=state).logits)
