"""Chat-aware injection (`serving.framing_for`, `inject_framed`, `question_prompt`) and answers that end at a sentence
boundary (`serving.finished_answer`), on a ChatML template and on golden A (no template: raw)."""

import pytest
import torch

from modeling_memoryllm import serving
from tests.test_serving import reference_answer
from tests.test_space_support import golden_with_tokenizer


SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHATML = (  # SmolLM2-135M-Instruct's template, as shipped
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTokenizer:
    """Only what the framing reads of a tokenizer: a chat template and `apply_chat_template`."""

    chat_template = CHATML

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        from jinja2 import Template

        return Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def golden():
    return golden_with_tokenizer()


QA_SYSTEM = f"<|im_start|>system\n{serving.CONTEXT_QA_SYSTEM}<|im_end|>\n"


def test_chat_framing_opens_a_user_turn_that_the_question_closes():
    frame = serving.framing_for(ChatTokenizer())
    assert frame.name == "chat"
    assert frame.text("The museum was founded in 1902.") == (
        QA_SYSTEM + "<|im_start|>user\nContext: The museum was founded in 1902."
    )
    assert frame.question("Who founded it?", "Answer:") == (
        "\n\nQuestion: Who founded it?<|im_end|>\n<|im_start|>assistant\nAnswer:"
    )
    # The memory then holds what the model reads with the context in its prompt, in the same framing.
    turn = [
        {"role": "system", "content": serving.CONTEXT_QA_SYSTEM},
        {"role": "user", "content": "Context: C.\n\nQuestion: Q?"},
    ]
    in_prompt = ChatTokenizer().apply_chat_template(turn, add_generation_prompt=True)
    assert frame.text("C.") + frame.question("Q?") == in_prompt
    # With no memory the question is a plain chat turn, under the template's own system turn.
    assert frame.question("Q?", after_text=False) == serving.chat_prompt(ChatTokenizer(), "Q?", answer_prefix="")
    assert frame.question("Q?", after_text=False).startswith(SYSTEM)
    assert serving.question_prompt(ChatTokenizer(), "Q?") == frame.question("Q?")
    assert serving.chat_framing(ChatTokenizer(), system=None).text("C.") == SYSTEM + "<|im_start|>user\nContext: C."


class NoSystemTokenizer(ChatTokenizer):
    """A template that refuses a system turn (as some Mistral and Gemma templates do)."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        if messages[0]["role"] == "system":
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return super().apply_chat_template(messages, add_generation_prompt, tokenize)


def test_a_template_that_refuses_a_system_turn_keeps_its_own(caplog):
    tokenizer = NoSystemTokenizer()
    with caplog.at_level("WARNING"):
        frame = serving.framing_for(tokenizer)
    assert "refuses a system turn" in caplog.text
    assert frame.text("C.") == SYSTEM + "<|im_start|>user\nContext: C."
    assert frame.text("C.") + frame.question("Q?") == serving.chat_prompt(
        tokenizer, "Context: C.\n\nQuestion: Q?", answer_prefix=""
    )


def test_raw_framing_keeps_the_text_and_the_earlier_prompts():
    chat_raw = serving.framing_for(ChatTokenizer(), "raw")
    assert chat_raw.text("Some text.") == "Some text."
    assert chat_raw.question("Q?", "Answer:") == serving.chat_prompt(ChatTokenizer(), "Q?")
    plain = serving.framing_for(golden_with_tokenizer().tokenizer)  # no chat template: raw, the paper's prompt
    assert plain.name == "raw" and plain.question("Q?", "Answer:") == "Questions: Q? Answer:"
    assert plain.question("Q?", after_text=False) == "Questions: Q? Answer:"
    assert serving.framing_for(ChatTokenizer(), plain) is plain
    with pytest.raises(ValueError, match="chat template"):
        serving.framing_for(golden_with_tokenizer().tokenizer, "chat")
    with pytest.raises(ValueError, match="framing must be one of"):
        serving.framing_for(ChatTokenizer(), "xml")


@torch.no_grad()
def test_inject_framed_writes_each_framed_text_in_order(golden):
    frame = serving.Framing("test", "<<", "?", "!", "", "", text_tail=">>")
    state = golden.new_memory_state()
    serving.inject_framed(golden, state, ["one text", "another"], frame, generator=torch.Generator().manual_seed(0))
    reference = golden.new_memory_state()
    golden.inject(["<<one text>>", "<<another>>"], memory=reference, generator=torch.Generator().manual_seed(0))
    assert state.injections == reference.injections == 2 and torch.equal(state.memory, reference.memory)
    assert serving.token_chunks(golden, "one text", framing=frame) == [golden.tokenizer("<<one text>>")["input_ids"]]
    with pytest.raises(ValueError, match="empty"):
        serving.inject_framed(golden, state, ["fine", "  "], frame)
    assert state.injections == 2  # nothing written


@pytest.mark.parametrize(
    ("text", "cut", "expected"),
    [
        ("Ilse Varga founded it in 1902. The museum then", True, "Ilse Varga founded it in 1902."),
        ("A bell (from the Aurora!) and a log", True, "A bell (from the Aurora!) and a log … (cut at 8 tokens)"),
        ('He said "go." Then he', True, 'He said "go."'),
        ("It costs 3.5 kroner and", True, "It costs 3.5 kroner and … (cut at 8 tokens)"),
        ("An answer that stopped by itself", False, "An answer that stopped by itself"),
        ("  ", True, ""),
    ],
)  # fmt: skip
def test_finished_answers_end_at_a_sentence_or_say_they_were_cut(text, cut, expected):
    assert serving.finished_answer(text, cut, 8) == expected


@torch.no_grad()
@pytest.mark.parametrize("max_new_tokens", [3, 12, 40])
def test_answer_is_the_finished_greedy_answer(golden, max_new_tokens):
    state = golden.new_memory_state()
    serving.inject_framed(golden, state, "Marta keeps three blue herons in a glass barn.", show_progress=False)
    text, cut = reference_answer(golden, state, "Where are the herons?", max_new_tokens)
    expected = serving.finished_answer(text, cut, max_new_tokens)
    assert serving.answer(golden, state, "Where are the herons?", max_new_tokens) == expected
    streamed = list(serving.answer_stream(golden, state, "Where are the herons?", max_new_tokens))
    assert streamed[-1] == expected


@torch.no_grad()
def test_later_texts_continue_the_turn_unless_the_variant_writes_texts_apart(golden):
    frame = serving.Framing("test", "<<", "?", "!", "", "", text_tail=">>", later_text_head="&")
    assert serving.framing_for(ChatTokenizer()).text("B", later=True) == "\n\nB"
    state = golden.new_memory_state()
    serving.inject_framed(golden, state, ["one", "two"], frame, generator=torch.Generator().manual_seed(0))
    serving.inject_framed(golden, state, "three", frame, generator=torch.Generator().manual_seed(1))
    reference = golden.new_memory_state()
    golden.inject(["<<one>>", "&two>>"], memory=reference, generator=torch.Generator().manual_seed(0))
    golden.inject("&three>>", memory=reference, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state.memory, reference.memory)
    expected = [golden.tokenizer("&four>>")["input_ids"]]
    assert serving.token_chunks(golden, "four", framing=frame, state=state) == expected
    from tests.tiny import tiny_model

    apart = tiny_model(0, memory_variant="training-free-ranked", text_context="own", num_tokens=4, num_blocks=3)
    apart.tokenizer = golden.tokenizer
    assert serving.framed_text(apart, apart.new_memory_state(), "x", frame) == "<<x>>"
    written = apart.new_memory_state()
    apart.inject([5, 6, 7], memory=written)
    assert not serving.continues_turn(apart, written) and serving.continues_turn(golden, state)
    assert serving.framed_text(apart, written, "x", frame) == "<<x>>"  # each text keeps its opening
    calls = []
    apart.inject = lambda texts, memory=None, **options: calls.append(texts)
    serving.inject_framed(apart, written, ["a", "b"], frame)
    assert calls == [["<<a>>", "<<b>>"]]


def test_the_tuning_candidates_are_chat_framings_and_system_is_the_shipped_one():
    from eval.framing_tuning import CANDIDATES, candidate_framing

    tokenizer = ChatTokenizer()
    assert candidate_framing(tokenizer, CANDIDATES["system"]) == serving.framing_for(tokenizer)
    assert candidate_framing(tokenizer, CANDIDATES["template"]).text("C.") == SYSTEM + "<|im_start|>user\nContext: C."
    sysbare = candidate_framing(tokenizer, CANDIDATES["sysbare"])
    turn = [{"role": "system", "content": serving.CONTEXT_QA_SYSTEM}, {"role": "user", "content": "C.\n\nQ?"}]
    assert sysbare.text("C.") + sysbare.question("Q?") == tokenizer.apply_chat_template(turn, True, False)
    assert not sysbare.text("C.").startswith(SYSTEM)
    assert sysbare.question("Q?", after_text=False) == serving.chat_prompt(tokenizer, "Q?", answer_prefix="")
