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
        max_model_len=512, gpu_memory_utilization=0.05, enable_prefix_caching=True,
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
