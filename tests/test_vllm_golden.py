"""
vLLM (offline `LLM`, the memory connector) on golden A: greedy tokens and logprobs of memory-reading requests equal
the package's `generate`. Golden A's heads have 16 dims, and vLLM's CPU attention takes 32 or more: the export pads
them to 32 (`pad_head_dim`, the same attention). Runs in the vLLM venv only (skipped elsewhere).
"""

import pytest
import torch


pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402

from memoryllm_vllm.service import MemoryService  # noqa: E402
from memoryllm_vllm.store import MemoryStore  # noqa: E402
from modeling_memoryllm.export import export_reading_model  # noqa: E402
from tests.conftest import load_golden  # noqa: E402
from tests.vllm_support import package_greedy  # noqa: E402


TOKENS = 8
PROMPTS = [[5, 17, 301, 42, 9, 77, 250], [3, 99, 12, 400, 8], [480, 2, 64]]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = load_golden()
    folder = tmp_path_factory.mktemp("golden_a")
    info = export_reading_model(model, folder / "reading", head_dim=32)
    service = MemoryService(model, MemoryStore(folder / "store"), export_dir=folder / "reading")
    service.publish("golden", model.memory_state)  # the checkpoint's own memory: 32 rows and bos
    service.inject("golden2", [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], generator=torch.Generator().manual_seed(0))
    connector = {"kv_connector": "MemoryLLMConnector", "kv_role": "kv_consumer"}
    llm = LLM(
        model=str(folder / "reading"), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        max_model_len=512, kv_cache_memory_bytes=1 << 28, enable_prefix_caching=True,
        kv_transfer_config={**connector, "kv_connector_extra_config": {"store": str(folder / "store")}},
    )  # fmt: skip
    yield llm, service, model, info["placeholder_token_id"]
    del llm


def vllm_greedy(llm, service, placeholder, name, prompts):
    manifest = service.store.manifest(name)
    fields = manifest.request_fields()
    params = SamplingParams(
        temperature=0, max_tokens=TOKENS, logprobs=1, ignore_eos=True,
        extra_args={"kv_transfer_params": fields["kv_transfer_params"]},
    )  # fmt: skip
    opening = [placeholder] * manifest.rows
    requests = [{"prompt_token_ids": opening + p, "cache_salt": fields["cache_salt"]} for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for output in outputs:
        tokens = list(output.outputs[0].token_ids)
        results.append((tokens, [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens)]))
    return results


@pytest.mark.parametrize("name", ["golden", "golden2"])
def test_vllm_greedy_equals_generate(engine, name):
    llm, service, model, placeholder = engine
    state = model.memory_state if name == "golden" else service.state(name)
    for repeat in range(2):  # the second time, the memory's blocks come from vLLM's prefix cache
        for prompt, (tokens, logprobs) in zip(PROMPTS, vllm_greedy(llm, service, placeholder, name, PROMPTS)):
            expected, expected_logprobs = package_greedy(model, state, prompt, TOKENS, ignore_eos=True)
            assert tokens == expected, (name, repeat, prompt)
            assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) < 1e-4


def test_slots_heads_and_request_checks(monkeypatch):
    from memoryllm_vllm import connector
    from memoryllm_vllm.store import Manifest

    assert connector.slot_mapping([5, 9], 126, 130, 128).tolist() == [766, 767, 1152, 1153]
    assert connector.worker_heads(8, 8) == slice(None)
    for rank, ranks, here, expected in ((1, 2, 4, slice(4, 8)), (5, 8, 1, slice(1, 2)), (3, 8, 1, slice(0, 1))):
        monkeypatch.setattr("vllm.distributed.get_tensor_model_parallel_rank", lambda rank=rank: rank)
        monkeypatch.setattr("vllm.distributed.get_tensor_model_parallel_world_size", lambda ranks=ranks: ranks)
        assert connector.worker_heads(8 if here == 4 else 2, here) == expected
    manifest = Manifest("m", 2, 3, 9, "f" * 64, "kv-2.safetensors", 0, 1)
    plan = connector.Plan("m", 2, 3)
    assert connector.check_request(manifest, plan, [0, 0, 0, 7, 8], manifest.salt, 0) is None
    assert "cache_salt" in connector.check_request(manifest, plan, [0, 0, 0, 7], None, 0)
    assert "open with 3 placeholder" in connector.check_request(manifest, plan, [0, 0, 7, 8], manifest.salt, 0)
    assert "more than 3" in connector.check_request(manifest, plan, [0, 0, 0, 0, 8], manifest.salt, 0)
    assert "not in the store" in connector.check_request(None, plan, [0, 0, 0, 7], manifest.salt, 0)
