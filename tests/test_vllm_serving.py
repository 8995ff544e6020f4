"""
`vllm serve` with the memory connector on the embedded default (SmolLM2-135M, training-free): chat completions that
read a named memory give the package's greedy tokens and logprobs. Runs in the vLLM venv only (skipped elsewhere):

    /work/vllm-venv/bin/python -m pytest tests/test_vllm_serving.py tests/test_vllm_golden.py

One server for the whole module (its start takes about 1-2 minutes on 2 CPU cores).
"""

import concurrent.futures

import pytest
import torch


pytest.importorskip("vllm")

from memoryllm_vllm.server import ServerProcess  # noqa: E402
from memoryllm_vllm.service import MemoryService  # noqa: E402
from memoryllm_vllm.store import MemoryStore  # noqa: E402
from modeling_memoryllm import default  # noqa: E402
from modeling_memoryllm.export import export_reading_model  # noqa: E402
from tests.vllm_support import chat_ids, package_greedy, reply_tokens, squad_contexts  # noqa: E402


TOKENS = 12
LOGPROB_ATOL = 1e-3  # 30 float32 layers, vLLM's CPU kernels against torch's sdpa
QUESTION = [{"role": "user", "content": "Who built the lighthouse on Varden Island, and when?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    try:
        model = default.load_default()
    except default.DefaultModelMissing as error:
        pytest.skip(str(error))
    folder = tmp_path_factory.mktemp("serve")
    export_reading_model(model, folder / "reading")
    service = MemoryService(model, MemoryStore(folder / "store"), export_dir=folder / "reading")
    service.inject("alice", default.PASSAGE.read_text(), generator=torch.Generator().manual_seed(0))  # 308 rows
    full = [default.PASSAGE.read_text(), *squad_contexts(14)]
    service.inject("carol", full, generator=torch.Generator().manual_seed(0))  # full: all 2,048 rows and bos
    options = ["--enforce-eager", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "8"]
    with ServerProcess(folder / "reading", folder / "store", extra=options, log_path=folder / "server.log") as server:
        yield server, service, model


def ask(server, name, messages=QUESTION, **options):
    return server.chat(name, messages, max_tokens=TOKENS, logprobs=True, return_token_ids=True, **options)


def assert_like_package(reply: dict, model, state, messages=QUESTION) -> float:
    """vLLM's greedy tokens equal the package's and their logprobs agree; returns the largest logprob difference."""
    tokens, logprobs = reply_tokens(reply)
    expected, expected_logprobs = package_greedy(model, state, chat_ids(model.tokenizer, messages), TOKENS)
    assert tokens == expected
    difference = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs))
    assert difference < LOGPROB_ATOL
    return difference


def test_chat_reads_a_partly_written_memory_like_generate(served):
    server, service, model = served
    manifest = service.store.manifest("alice")
    assert manifest.rows == 308 < manifest.prefix_length == 2049  # only written rows are exported
    first = ask(server, "alice")
    assert first["usage"]["prompt_tokens"] == manifest.rows + len(chat_ids(model.tokenizer, QUESTION))
    assert_like_package(first, model, service.state("alice"))
    again = ask(server, "alice")  # now from vLLM's prefix cache (salted blocks) plus the connector's tail
    assert reply_tokens(again) == reply_tokens(first)


def test_chat_reads_a_full_memory_like_generate(served):
    server, service, model = served
    manifest = service.store.manifest("carol")
    assert manifest.rows == manifest.prefix_length == 2049
    assert_like_package(ask(server, "carol"), model, service.state("carol"))


def test_concurrent_requests_each_read_their_own_memory(served):
    server, service, model = served
    names = ["alice", "carol", None, "alice"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda name: ask(server, name), names))
    for name, reply in zip(names, replies):
        state = service.state(name) if name else model.new_memory_state()
        assert_like_package(reply, model, state)
    assert reply_tokens(replies[0]) != reply_tokens(replies[2])  # the memory matters


def test_a_new_version_is_read_and_the_old_one_still_is(served):
    server, service, model = served
    old_manifest, old_state = service.store.manifest("alice"), service.state("alice")
    service.inject("alice", "The lighthouse was rebuilt in 1931 by Ingrid Solheim after a storm destroyed it.")
    new = ask(server, "alice")
    assert_like_package(new, model, service.state("alice"))
    old = server.post("/v1/chat/completions", {
        "messages": QUESTION, "temperature": 0, "max_tokens": TOKENS, "logprobs": True, "return_token_ids": True,
        **old_manifest.request_fields(),
    })  # fmt: skip
    assert_like_package(old, model, old_state)


def test_mismatched_requests_fail_and_the_server_goes_on(served):
    server, service, model = served
    fields = service.store.manifest("alice").request_fields()
    body = {"messages": QUESTION, "max_tokens": 4}
    wrong_salt = {**fields, "cache_salt": "memoryllm:alice:v0:0"}
    no_placeholders = {k: v for k, v in fields.items() if k != "chat_template_kwargs"}
    unknown = {**fields, "kv_transfer_params": {"memoryllm_memory": "nobody"}}
    for bad in (wrong_salt, no_placeholders, unknown):
        assert server.status_of("/v1/chat/completions", {**body, **bad}) >= 400
    assert_like_package(ask(server, "alice"), model, service.state("alice"))
