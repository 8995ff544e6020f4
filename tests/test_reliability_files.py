"""
Reliability of memory files and of the remote code: fault injection on `MemoryState.save` / `MemoryState.load`.

- A crash (an exception, Ctrl-C, or SIGKILL of the process) in the middle of a save leaves the previous file intact.
- A truncated, bit-flipped, foreign or non-safetensors file, or a memory of another model, is refused with a
  `ValueError` that names the file and the problem; nothing is ever unpickled.
- Every file holds a SHA-256 of its metadata and tensors: a flipped bit anywhere that safetensors itself does not
  catch (tensor data, metadata values) is refused as a checksum mismatch; files of format version 1 (before the
  checksum) still load, with a warning.
- The remote code (`trust_remote_code=True`) opens no network connection and evaluates no strings.
"""

import ast
import json
import os
import pathlib
import pickle
import re
import signal
import struct

import pytest


pytest.importorskip("hypothesis")

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from modeling_memoryllm import MemoryState  # noqa: E402
from modeling_memoryllm import memory_state as memory_module  # noqa: E402
from modeling_memoryllm.memory_state import CHECKSUM_KEY, FORMAT, checksum, config_fingerprint  # noqa: E402
from modeling_memoryllm.modeling_memoryllm import REMOTE_CODE_FILES  # noqa: E402
from tests.conftest import run_offline_script  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


PROPERTY = settings(
    derandomize=True,  # the same cases on every run (CI reproducible)
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
CONFIG = tiny_config()  # memory [2 layers, 12 rows, 32 dims]
SHAPE = (CONFIG.num_hidden_layers, CONFIG.memory_rows, CONFIG.hidden_size)


def make_state(seed: int = 0, shape=SHAPE, dtype=torch.float32, injections: int = 3) -> MemoryState:
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(shape, generator=generator).to(dtype)
    provenance = torch.randint(-1, injections + 1, shape[:2], generator=generator)
    return MemoryState(memory, True, provenance, injections)


def assert_same_state(actual: MemoryState, expected: MemoryState) -> None:
    assert actual.memory.dtype == expected.memory.dtype
    assert torch.equal(actual.memory.view(torch.uint8), expected.memory.view(torch.uint8))  # bit for bit
    assert torch.equal(actual.provenance, expected.provenance)
    assert (actual.initialized, actual.injections) == (expected.initialized, expected.injections)


def header(raw: bytes) -> tuple[int, dict]:
    """The safetensors header: its length (after the 8 length bytes) and its JSON."""
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8 : 8 + length])


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".memory-"))


@pytest.fixture(scope="module")
def original() -> MemoryState:
    return make_state()


@pytest.fixture(scope="module")
def good_file(tmp_path_factory, original) -> tuple[pathlib.Path, bytes]:
    path = tmp_path_factory.mktemp("good") / "memory.safetensors"
    original.save(path, config=CONFIG)
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("scratch") / "damaged.safetensors"


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling while this is active fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)


# ------------------------------------------------------------------------------------------------- round trips
@settings(PROPERTY, max_examples=25)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    injections=st.integers(0, 10**6),
    initialized=st.booleans(),
    seed=st.integers(0, 2**16),
    with_config=st.booleans(),
)
def test_save_then_load_is_bit_exact(tmp_path_factory, dtype, injections, initialized, seed, with_config):
    folder = tmp_path_factory.mktemp("roundtrip")
    made = make_state(seed, dtype=dtype, injections=injections)
    state = MemoryState(made.memory, initialized, made.provenance, made.injections)
    path = folder / "memory.safetensors"
    state.save(path, config=CONFIG if with_config else None)
    state.save(path, config=CONFIG if with_config else None)  # overwriting works the same
    assert_same_state(MemoryState.load(path, config=CONFIG), state)
    assert [p.name for p in folder.iterdir()] == ["memory.safetensors"]  # no temporary file left


# ------------------------------------------------------------------------------------------------- corrupt files
def try_load(path: pathlib.Path, data: bytes):
    path.write_bytes(data)
    try:
        return MemoryState.load(path, config=CONFIG)
    except ValueError as error:
        return error


def value_span(text: str, key: str) -> range:
    """Byte positions (in the header JSON) of the string value of metadata `key`."""
    start = text.index(f'"{key}":"') + len(key) + 4
    end = start
    while text[end] != '"' or text[end - 1] == "\\":
        end += 1
    return range(start, end)


def test_every_header_byte_flip_is_refused_or_leaves_the_file_exact(good_file, scratch, original, no_unpickling):
    """A bit flip in each of the 8 length bytes and in each byte of the JSON header (two bits per byte, 0..7
    rotating) is refused with a ValueError naming the file (broken JSON, offsets, dtypes, shapes, format, names,
    and, for everything else, the checksum), or loads bit-exact: only flips in the header's padding spaces."""
    _, raw = good_file
    length, _ = header(raw)
    text = raw[8 : 8 + length].decode()
    padding = set(range(len(text.rstrip(" ")), length))
    outcomes = {"refused": 0, "refused by checksum": 0, "loaded exact": 0}
    for position in range(8 + length):
        for bit in {position % 8, (position + 4) % 8}:
            data = bytearray(raw)
            data[position] ^= 1 << bit
            result = try_load(scratch, bytes(data))
            if isinstance(result, ValueError):
                outcomes["refused by checksum" if "checksum" in str(result) else "refused"] += 1
                assert str(scratch) in str(result), (position, bit, result)
                continue
            assert position - 8 in padding, (position, bit, text[max(0, position - 28) : position + 12])
            assert_same_state(result, original)
            outcomes["loaded exact"] += 1
    assert outcomes["refused by checksum"] > 0 and outcomes["refused"] > 0, outcomes
    for key in ("initialized", "injections"):  # the flips that loaded other metadata before the checksum
        flipped = bytearray(raw)
        flipped[8 + min(value_span(text, key))] ^= 1  # "1" -> "0", "3" -> "2"
        result = try_load(scratch, bytes(flipped))
        assert isinstance(result, ValueError) and "checksum mismatch" in str(result), key


def test_a_broken_config_metadata_is_refused_with_a_message_naming_the_file(scratch, original):
    tensors = {"memory": original.memory, "provenance": original.provenance}
    metadata = {"format": FORMAT, "format_version": "1", "initialized": "1", "injections": "3", "config": "{oops"}
    safetensors.torch.save_file(tensors, scratch, metadata=metadata)
    with pytest.raises(ValueError, match="config") as error:
        MemoryState.load(scratch, config=CONFIG)
    assert str(scratch) in str(error.value)


def data_layout(raw: bytes) -> dict[str, tuple[int, int, str]]:
    length, meta = header(raw)
    return {
        name: (8 + length + info["data_offsets"][0], 8 + length + info["data_offsets"][1], info["dtype"])
        for name, info in meta.items()
        if name != "__metadata__"
    }


@PROPERTY
@given(
    name=st.sampled_from(["memory", "memory", "provenance"]),
    element=st.integers(0, 2**20),
    byte=st.integers(0, 7),
    bit=st.integers(0, 7),
)
def test_every_data_region_bit_flip_is_refused_as_a_checksum_mismatch(
    good_file, scratch, original, name, element, byte, bit
):
    """safetensors cannot see a flip in the tensor bytes; the stored SHA-256 does."""
    _, raw = good_file
    lo, hi, _ = data_layout(raw)[name]
    reference = original.memory if name == "memory" else original.provenance
    size = reference.element_size()
    position = lo + (element % reference.numel()) * size + byte % size
    assert lo <= position < hi
    data = bytearray(raw)
    data[position] ^= 1 << bit
    result = try_load(scratch, bytes(data))
    assert isinstance(result, ValueError), result
    assert "checksum mismatch" in str(result) and str(scratch) in str(result)


def save_with_valid_checksum(path, memory: torch.Tensor, provenance: torch.Tensor, **metadata: str) -> None:
    """A file as `MemoryState.save` would write it, but for any tensors (e.g. ones `save` would never produce)."""
    tensors = {"memory": memory, "provenance": provenance}
    metadata = {"format": FORMAT, "format_version": "2", "initialized": "1", "injections": "3"} | metadata
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def test_a_memory_with_an_infinite_value_is_refused_even_with_a_valid_checksum(scratch, original):
    memory = original.memory.clone()
    memory[0, 0, 0] = float("inf")
    save_with_valid_checksum(scratch, memory, original.provenance)
    result = try_load(scratch, scratch.read_bytes())
    assert isinstance(result, ValueError) and "NaN or Inf" in str(result)


def test_a_file_of_format_version_1_without_checksum_loads_with_a_warning(scratch, original, caplog):
    tensors = {"memory": original.memory, "provenance": original.provenance}
    metadata = {"format": FORMAT, "format_version": "1", "initialized": "1", "injections": "3"}
    safetensors.torch.save_file(tensors, scratch, metadata=metadata)
    with caplog.at_level("WARNING"):
        assert_same_state(MemoryState.load(scratch, config=CONFIG), original)
    assert "without checksum" in caplog.text


def test_a_file_of_format_version_2_without_checksum_is_refused(scratch, original):
    tensors = {"memory": original.memory, "provenance": original.provenance}
    metadata = {"format": FORMAT, "format_version": "2", "initialized": "1", "injections": "3"}
    safetensors.torch.save_file(tensors, scratch, metadata=metadata)
    with pytest.raises(ValueError, match="checksum is missing"):
        MemoryState.load(scratch)


@PROPERTY
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(good_file, scratch, fraction):
    _, raw = good_file
    result = try_load(scratch, raw[: int(fraction * len(raw))])
    assert isinstance(result, ValueError) and "not a readable safetensors file" in str(result)
    assert str(scratch) in str(result)


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 9, "header-1", "header", "header+1", "end-1"])
def test_truncation_at_the_boundaries_is_refused(good_file, scratch, cut):
    _, raw = good_file
    length, _ = header(raw)
    sizes = {"header-1": 8 + length - 1, "header": 8 + length, "header+1": 8 + length + 1, "end-1": len(raw) - 1}
    result = try_load(scratch, raw[: sizes.get(cut, cut)])
    assert isinstance(result, ValueError) and "not a readable safetensors file" in str(result)


@pytest.mark.parametrize("extra", [b"\x00", b"garbage", bytes(4096)])
def test_trailing_bytes_are_refused(good_file, scratch, extra):
    _, raw = good_file
    result = try_load(scratch, raw + extra)
    assert isinstance(result, ValueError) and "not a readable safetensors file" in str(result)


NOT_SAFETENSORS = {
    "empty": b"",
    "text": b"memory = [1, 2, 3]\n",
    "random": bytes(range(256)) * 8,
    "huge-header-length": struct.pack("<Q", 2**62) + b"{}",
    "header-not-json": struct.pack("<Q", 5) + b"{nope",
    "header-not-utf8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
}


@pytest.mark.parametrize("name", list(NOT_SAFETENSORS))
def test_files_that_are_not_safetensors_are_refused(scratch, name, no_unpickling):
    result = try_load(scratch, NOT_SAFETENSORS[name])
    assert isinstance(result, ValueError) and "not a readable safetensors file" in str(result)
    assert str(scratch) in str(result)


def test_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        MemoryState.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MemoryState.load(tmp_path)


FOREIGN = {
    "other-tensor-names": ({"weight": torch.zeros(3)}, None, "not a MemoryLLM memory file"),
    "model-weights-layout": ({"model.embed_tokens.weight": torch.zeros(4, 2)}, {"format": "pt"}, "format='pt'"),
    "right-names-no-metadata": (
        {"memory": torch.zeros(SHAPE), "provenance": torch.zeros(SHAPE[:2], dtype=torch.long)},
        None,
        "not a MemoryLLM memory file",
    ),
    "format-but-extra-tensor": (
        {"memory": torch.zeros(SHAPE), "provenance": torch.zeros(SHAPE[:2], dtype=torch.long), "x": torch.zeros(1)},
        {"format": FORMAT, "initialized": "1", "injections": "0"},
        "expected tensors 'memory' and 'provenance'",
    ),
    "integer-memory": (
        {"memory": torch.zeros(SHAPE, dtype=torch.int32), "provenance": torch.zeros(SHAPE[:2], dtype=torch.long)},
        {"format": FORMAT, "initialized": "1", "injections": "0"},
        "inconsistent",  # the message says "inconsistent shapes" although the dtype is the problem
    ),
    "nan-memory": (
        {"memory": torch.full(SHAPE, float("nan")), "provenance": torch.zeros(SHAPE[:2], dtype=torch.long)},
        {"format": FORMAT, "initialized": "1", "injections": "0"},
        "NaN or Inf",
    ),
    "missing-counters": (
        {"memory": torch.zeros(SHAPE), "provenance": torch.zeros(SHAPE[:2], dtype=torch.long)},
        {"format": FORMAT},
        "bad metadata",
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_safetensors_files_are_refused_with_the_problem_named(scratch, name, no_unpickling):
    tensors, metadata, message = FOREIGN[name]
    safetensors.torch.save_file(tensors, scratch, metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        MemoryState.load(scratch, config=CONFIG)
    assert str(scratch) in str(error.value)


class Payload:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_refused_and_never_unpickled(tmp_path, original):
    marker = tmp_path / "UNPICKLED"
    payload = {"memory": original.memory, "provenance": original.provenance, "evil": Payload(marker)}
    files = {
        "torch-zip.safetensors": lambda p: torch.save(payload, p),
        "torch-legacy.safetensors": lambda p: torch.save(payload, p, _use_new_zipfile_serialization=False),
        "raw-pickle.safetensors": lambda p: p.write_bytes(pickle.dumps(payload)),
        "memory.bin": lambda p: torch.save(payload, p),
    }
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        for options in ({"config": CONFIG}, {}):
            with pytest.raises(ValueError, match="not a readable safetensors file"):
                MemoryState.load(path, **options)
        assert not marker.exists(), name
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is live: unpickling it does create the marker
    assert control.exists()


# ----------------------------------------------------------------------------------------- metadata (property)
GOOD_CONFIG = json.dumps(config_fingerprint(CONFIG), sort_keys=True)
OTHER_CONFIG = json.dumps(config_fingerprint(tiny_config(vocab_size=98)), sort_keys=True)


FIELDS = {  # the valid value first, then alternatives (some of them still valid)
    "format": [FORMAT, FORMAT.upper(), "pt", "", None],
    "initialized": ["1", "0", "2", " 1", "yes", "", None],
    "injections": ["3", "0", "-3", "1e3", "x", None],
    "config": [GOOD_CONFIG, None, OTHER_CONFIG, "null", "[]", "{oops"],
    "names": [("memory", "provenance"), ("memory",), ("memory", "provenance", "extra"), ("provenance",)],
    "memory_dtype": [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32],
    "memory_shape": [SHAPE, (2, 12, 16), (3, 12, 32), (2, 12), (0, 12, 32)],
    "provenance_dtype": [torch.int64, torch.int32, torch.float32],
    "bad_value": [None, float("nan"), float("inf"), -float("inf"), 1e30],
}


@st.composite
def memory_files(draw):
    """A valid memory file with up to 3 fields (metadata, tensor names, dtypes, shapes, values) changed."""
    changed = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3))
    return {k: draw(st.sampled_from(v)) if k in changed else v[0] for k, v in FIELDS.items()}


@PROPERTY
@given(spec=memory_files())
def test_any_metadata_and_tensors_load_only_when_valid(scratch, spec):
    """The oracle: load succeeds exactly when the file is a complete, finite memory of this model's shape whose
    metadata parses (and whose config, when stored, matches); otherwise a ValueError naming the file."""
    memory = torch.randn(spec["memory_shape"]).to(spec["memory_dtype"])
    if spec["bad_value"] is not None and memory.numel() and memory.is_floating_point():
        memory.view(-1)[0] = spec["bad_value"]
    available = {"memory": memory, "provenance": torch.zeros(spec["memory_shape"][:2]).to(spec["provenance_dtype"])}
    available["extra"] = torch.zeros(1)
    metadata = {k: spec[k] for k in ("format", "initialized", "injections", "config") if spec[k] is not None}
    safetensors.torch.save_file({n: available[n] for n in spec["names"]}, scratch, metadata=metadata)

    def parses(value):
        try:
            int(value)
            return True
        except (TypeError, ValueError):
            return False

    valid = (
        spec["format"] == FORMAT
        and set(spec["names"]) == {"memory", "provenance"}
        and memory.is_floating_point()
        and tuple(memory.shape) == SHAPE
        and spec["config"] in (GOOD_CONFIG, None)
        and bool(torch.isfinite(memory.float()).all())
        and parses(spec["initialized"])
        and parses(spec["injections"])
    )
    try:
        state = MemoryState.load(scratch, config=CONFIG)
    except ValueError as error:
        event("refused")
        assert not valid, error
        if spec["config"] != "{oops":  # see test_a_broken_config_metadata_is_refused_with_a_message_naming_the_file
            assert str(scratch) in str(error)
        return
    event("loaded")
    assert valid
    assert torch.equal(state.memory, memory) and state.memory.dtype == spec["memory_dtype"]
    assert state.provenance.dtype == torch.long
    assert (state.initialized, state.injections) == (bool(int(spec["initialized"])), int(spec["injections"]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"vocab_size": 98},  # same memory shape, another model
        {"num_tokens": 3, "num_blocks": 4},  # same number of rows, another model
        {"num_blocks": 4},
        {"hidden_size": 48},
        {"num_hidden_layers": 3},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_a_memory_of_another_model_is_refused(good_file, overrides):
    path, _ = good_file
    with pytest.raises(ValueError, match="different model") as error:
        MemoryState.load(path, config=tiny_config(**overrides))
    assert str(path) in str(error.value)


def test_a_memory_of_another_model_without_stored_config_is_checked_by_shape(tmp_path, original):
    """Saved without `config=`: only the shape can be checked (another vocabulary is not detectable)."""
    path = tmp_path / "memory.safetensors"
    original.save(path)
    with pytest.raises(ValueError, match="does not fit this model"):
        MemoryState.load(path, config=tiny_config(num_blocks=4))
    assert_same_state(MemoryState.load(path, config=tiny_config(vocab_size=98)), original)


# ---------------------------------------------------------------------------------------- crashes while saving
class DiskFull(OSError):
    pass


@pytest.mark.parametrize(
    "error", [DiskFull(28, "No space left on device"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"]
)
@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_an_exception_while_saving_keeps_the_previous_file_and_cleans_up(tmp_path, monkeypatch, original, error, when):
    path = tmp_path / "memory.safetensors"
    original.save(path, config=CONFIG)
    previous = path.read_bytes()
    new = make_state(seed=1)
    real_save_file, real_replace = memory_module.save_file, os.replace

    def partial_save_file(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        pathlib.Path(filename).write_bytes(data[: len(data) // 2])
        raise error

    def failing_replace(source, target):
        raise error

    if when == "mid-write":
        monkeypatch.setattr(memory_module, "save_file", partial_save_file)
    else:
        monkeypatch.setattr(memory_module.os, "replace", failing_replace)
    with pytest.raises(type(error)):
        new.save(path, config=CONFIG)
    monkeypatch.undo()
    assert memory_module.save_file is real_save_file and os.replace is real_replace
    assert path.read_bytes() == previous
    assert_same_state(MemoryState.load(path, config=CONFIG), original)
    assert leftovers(tmp_path) == []  # the temporary file was removed
    new.save(path, config=CONFIG)  # and the next save works
    assert_same_state(MemoryState.load(path, config=CONFIG), new)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("when", ["mid-write", "before-rename"])
def test_a_process_killed_while_saving_keeps_the_previous_file(tmp_path, when):
    """A child process (fork) saves a 4 MiB memory over a good file and is SIGKILLed half way through writing the
    temporary file, or after writing it but before the rename. The previous file is intact; the killed save
    leaves its `.memory-*.tmp` behind (nothing can clean up after SIGKILL), which does not disturb later saves."""
    path = tmp_path / "memory.safetensors"
    previous = make_state(seed=2, shape=(4, 512, 512))
    previous.save(path)
    previous_bytes = path.read_bytes()
    new = make_state(seed=3, shape=(4, 512, 512))
    serialized = safetensors.torch.save(
        {"memory": new.memory, "provenance": new.provenance}, metadata={"format": FORMAT}
    )  # made before the fork: the child only writes bytes and dies

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if when == "mid-write":

                def dying_save_file(tensors, filename, metadata=None):
                    with open(filename, "wb") as handle:
                        handle.write(serialized[: len(serialized) // 2])
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)

                memory_module.save_file = dying_save_file
            else:

                def dying_replace(source, target):
                    os.kill(os.getpid(), signal.SIGKILL)

                memory_module.os.replace = dying_replace
            new.save(path)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    assert path.read_bytes() == previous_bytes
    assert_same_state(MemoryState.load(path), previous)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].endswith(".tmp"), stale
    stale_size = (tmp_path / stale[0]).stat().st_size
    new.save(path)
    assert_same_state(MemoryState.load(path), new)
    full_size = path.stat().st_size
    assert stale_size < full_size if when == "mid-write" else stale_size == full_size
    assert leftovers(tmp_path) == stale  # the next save neither trips over nor removes the stale file


# -------------------------------------------------------------------------------------- remote code: no network
BANNED_NAMES = {"eval", "exec", "compile", "__import__", "pickle", "marshal", "shelve", "dill", "cloudpickle"}
BANNED_NAMES |= {"socket", "urllib", "urllib3", "requests", "httpx", "http", "aiohttp", "subprocess"}
BANNED_ATTRIBUTES = {("torch", "load"), ("builtins", "eval"), ("builtins", "exec"), ("os", "system")}


def banned_uses(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            found.append(f"{node.id} (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in BANNED_ATTRIBUTES:
                found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for name in modules:
                if name.split(".")[0] in BANNED_NAMES:
                    found.append(f"import {name} (line {node.lineno})")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in names:
                found.append(f"from torch import load (line {node.lineno})")
    return found


def test_banned_uses_finds_what_it_should():
    source = (
        "import pickle\nfrom socket import socket\nx = eval('1')\ntorch.load(p)\nmodel.eval()\nfrom torch import load\n"
    )
    assert len(banned_uses(source)) == 5  # model.eval() (a method) is not flagged


def test_remote_code_files_use_no_eval_exec_pickle_or_network():
    package = pathlib.Path(memory_module.__file__).parent
    assert set(REMOTE_CODE_FILES) >= {"modeling_memoryllm.py", "memory_state.py"}
    for name in REMOTE_CODE_FILES:
        assert banned_uses((package / name).read_text()) == [], name


GUARD = r"""
import builtins, json, os, pickle, socket, sys
sys.modules["modeling_memoryllm"] = None  # only the remote code copied next to the weights can run
events = {"network": [], "eval_exec": [], "unpickle": []}

def refuse(kind):
    def guard(*args, **kwargs):
        events["network"].append(kind)
        raise OSError(f"network access blocked by the test ({kind})")
    return guard

socket.socket.connect = socket.socket.connect_ex = refuse("connect")
socket.socket.sendto = refuse("sendto")
socket.create_connection = refuse("create_connection")
socket.getaddrinfo = refuse("getaddrinfo")

def recording(name, real):
    def wrapper(source, globals=None, locals=None, *rest, **kwargs):
        caller = sys._getframe(1)
        if "transformers_modules" in caller.f_code.co_filename:
            events["eval_exec"].append(f"{name} from {caller.f_code.co_filename}:{caller.f_lineno}")
        if globals is None:
            globals, locals = caller.f_globals, caller.f_locals if locals is None else locals
        return real(source, globals, locals, *rest, **kwargs)
    return wrapper

builtins.eval, builtins.exec = recording("eval", builtins.eval), recording("exec", builtins.exec)
import torch

def unpickle_guard(name):
    def guard(*args, **kwargs):
        events["unpickle"].append(name)
        raise RuntimeError(f"{name} blocked by the test")
    return guard

pickle.load, pickle.loads, torch.load = (unpickle_guard(n) for n in ("pickle.load", "pickle.loads", "torch.load"))

class Unpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        events["unpickle"].append("pickle.Unpickler")
        super().__init__(*args, **kwargs)

pickle.Unpickler = Unpickler
from transformers import AutoModelForCausalLM
folder, work = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
state = model.new_memory_state()
with torch.no_grad():
    model.inject(list(range(10, 40)), memory=state)
    model.inject(torch.tensor([list(range(5, 25))]))
    generated = model.generate(torch.tensor([[3, 4, 5]]), memory=state, max_new_tokens=3, do_sample=False)
path = os.path.join(work, "memory.safetensors")
state.save(path, config=model.config)
loaded = model.load_memory_state(path)
with open(os.path.join(work, "pickled.safetensors"), "wb") as handle:
    handle.write(b"\x80\x04\x95" + bytes(64))
try:
    model.load_memory_state(os.path.join(work, "pickled.safetensors"))
except ValueError:
    pass
result = {**{k: list(v) for k, v in events.items()}, "module": type(model).__module__}
result.update(generated=generated.shape[1], same=bool(torch.equal(loaded.memory, state.memory)))
# controls: the guards do see what they guard against
exec(compile("eval('1 + 1')", os.path.join(work, "transformers_modules", "probe.py"), "exec"))
try:
    socket.create_connection(("192.0.2.1", 80), timeout=1)
except OSError:
    pass
result["controls"] = {k: list(v) for k, v in events.items()}
print(json.dumps(result))
"""


def test_remote_code_opens_no_connection_evaluates_no_string_and_unpickles_nothing(saved_folder, tmp_path):
    result = run_offline_script(
        GUARD, str(saved_folder), str(tmp_path), cwd=tmp_path, unset=("PYTHONPATH",), OMP_NUM_THREADS="1"
    )
    assert result["module"].startswith("transformers_modules")  # the remote code ran, not the package
    assert result["generated"] == 6 and result["same"]
    assert result["network"] == [], result["network"]
    assert result["eval_exec"] == [], result["eval_exec"]
    assert result["unpickle"] == [], result["unpickle"]
    controls = result["controls"]
    assert controls["network"] == ["create_connection"]
    assert len(controls["eval_exec"]) == 1 and "probe.py" in controls["eval_exec"][0]
