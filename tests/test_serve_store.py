"""The memory store and service of `memoryllm_vllm` (no vLLM needed): versions, manifests, request fields, and
what is published equals what the package reads."""

import pytest
import torch

from memoryllm_vllm.service import MemoryService
from memoryllm_vllm.store import MEMORY_KEY, VERSION_KEY, MemoryStore
from modeling_memoryllm.export import export_prefix, export_reading_model
from modeling_memoryllm.testing_utils import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def service(tmp_path):
    model = tiny_model(0, "bench")
    export_reading_model(model, tmp_path / "reading", head_dim=32)
    return MemoryService(model, MemoryStore(tmp_path / "store"), export_dir=tmp_path / "reading")


def test_inject_publishes_versions_that_match_the_package(service):
    store, model = service.store, service.model
    first = service.inject("alice", list(range(5, 25)), generator=torch.Generator().manual_seed(0))
    assert (first.version, first.rows, first.prefix_length) == (1, 21, 65)
    second = service.inject("alice", list(range(30, 50)), generator=torch.Generator().manual_seed(0))
    assert (second.version, second.rows) == (2, 41)
    state = service.state("alice")
    assert state.injections == 4  # 16-token chunks: 16 + 4, 16 + 4
    published = store.load("alice", fingerprint=service.fingerprint)
    expected = export_prefix(model, state, head_dim=32)
    torch.testing.assert_close(published.keys, expected.keys, atol=0, rtol=0)
    assert store.manifest("alice", 1).rows == 21 and store.names() == ["alice"]
    fields = second.request_fields()
    assert fields["kv_transfer_params"] == {MEMORY_KEY: "alice", VERSION_KEY: 2}
    assert fields["chat_template_kwargs"] == {"memory_rows": 41}
    assert fields["cache_salt"] == second.salt != first.salt and "/" not in second.salt and len(second.salt) <= 128


def test_old_versions_go_after_keep_and_reset_empties(service):
    for _ in range(3):
        service.inject("bob", list(range(5, 21)))
    store = service.store
    assert store.manifest("bob", 1) is None and store.manifest("bob", 2).version == 2
    with pytest.raises(ValueError, match="no version 1"):
        store.load("bob", 1)
    assert sorted(p.name for p in store.folder("bob").glob("kv-*")) == [
        "kv-2.json", "kv-2.safetensors", "kv-3.json", "kv-3.safetensors"
    ]  # fmt: skip
    empty = service.reset("bob")
    assert empty.rows == 0 and empty.version == 4 and not service.state("bob").initialized


def test_names_and_foreign_exports_are_refused(service, tmp_path):
    for bad in ("", "../x", "a/b", "x" * 65, ".hidden"):
        with pytest.raises(ValueError, match="memory names"):
            service.inject(bad, [5, 6, 7])
    with pytest.raises(ValueError, match="no memory named"):
        service.store.load("nobody")
    other = tiny_model(1, "bench")
    with pytest.raises(ValueError, match="exported from another model"):
        MemoryService(other, MemoryStore(tmp_path / "s2"), export_dir=tmp_path / "reading")
