"""`python -m eval.bench`: the quick mode and a tiny soak write JSON of the expected schema, plots and the table.
Timings are not checked (CI machines are noisy); the 8B-shape code path runs on CPU with a tiny config."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytest.importorskip("matplotlib")

from eval.bench.measures import gpu_8b  # noqa: E402
from eval.bench.run import main  # noqa: E402
from modeling_memoryllm.testing_utils import tiny_config  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
MEASURES = {"ttft", "per_query_cost", "injection", "decode", "size", "read", "gpu_8b"}
RATIOS = {
    "ttft": {"cached_vs_plain", "recompute_vs_cached", "in_context_vs_cached"},
    "per_query_cost": {"last_vs_first", "max_vs_min", "control_max_vs_min"},
    "injection": {"inject_vs_forward", "batched_1_vs_sequential", "batched_2_vs_sequential"},
    "decode": {"memory_vs_plain_tokens_per_s"},
    "size": {"nbytes_vs_formula", "file_vs_formula"},
}
TARGET_KEYS = {"name", "value", "op", "threshold", "applies", "met", "note"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["--quick", "--out", str(out), "--batch-sizes", "1,2", "--repeats", "2"]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_writes_json_plots_and_table(quick):
    out, result = quick
    for name in ("bench.json", "bench_table.md", "ttft.png", "per_query_cost.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ttft.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "bench_table.md").read_text()
    assert "| # | Measure |" in table and "cached vs plain backbone" in table


def test_quick_json_schema(quick):
    _, result = quick
    assert result["schema"] == "memoryllm-bench/1" and result["mode"] == "quick"
    machine = result["machine"]
    for key in ("cpu_model", "cpu_cores", "torch", "transformers", "torch_threads", "device", "device_name"):
        assert key in machine, key
    assert machine["torch_threads"] == 1
    assert result["settings"]["model"]["memory_rows"] == 64
    assert set(result["measures"]) == MEASURES
    for measure, names in RATIOS.items():
        ratios = result["measures"][measure]["ratios"]
        assert names <= set(ratios), (measure, set(ratios))
        assert all(_number(ratios[name]) for name in names), (measure, ratios)
    for target in result["targets"]:
        assert TARGET_KEYS | {"measure"} <= set(target)
        assert target["applies"] is False and target["met"] is None  # quick mode: the tiny config has no targets
        assert target["value"] is None or _number(target["value"])
    assert {t["measure"] for t in result["targets"]} >= {"ttft", "per_query_cost", "injection", "size"}


def test_quick_measure_details(quick):
    _, result = quick
    measures = result["measures"]
    for variant in ("plain", "cached", "recompute", "in_context"):
        samples = measures["ttft"]["variants"][variant]
        assert _number(samples["median_s"]) and samples["repeats"] == len(samples["samples_s"]) == 2
    sweep = measures["ttft"]["by_query_tokens"]
    assert [point["query_tokens"] for point in sweep] == [4] and _number(sweep[0]["cached_vs_plain"])
    cost = measures["per_query_cost"]
    points = [row["injected_tokens"] for row in cost["memoryllm"]]
    assert points[0] == 1024 and points[-1] == 1_048_576
    assert {row["injected"] for row in cost["memoryllm"]} == {"measured", "simulated"}
    assert any(row["fits"] for row in cost["in_context"]) and not cost["in_context"][-1]["fits"]
    control = [cost["memoryllm"][0]["median_s"], cost["control"]["median_s"]]  # the first point, timed twice
    assert cost["ratios"]["control_max_vs_min"] == max(control) / min(control)
    assert cost["control"]["repeats"] == cost["memoryllm"][0]["repeats"]
    expected = measures["ttft"]["ratios"]["recompute_expected"]
    assert expected["recompute_flops"] > expected["cached_flops"] and expected["ratio"] > 1
    assert [b["memories"] for b in measures["injection"]["batched"]] == [1, 2]
    size = measures["size"]
    assert size["state_nbytes"] == size["formula_bytes"] == 2 * 64 * 64 * 4
    assert size["file_bytes"] > size["formula_bytes"]
    gpu = measures["gpu_8b"]
    if not torch.cuda.is_available():
        assert gpu["skipped"] is True and "GPU" in gpu["reason"]


def test_read_measure_times_a_restored_and_an_in_place_chunk(quick, tmp_path):
    from eval.bench.measures import read
    from eval.bench.measures.base import Bench, Context
    from modeling_memoryllm.testing_utils import tiny_model

    assert "skipped" in quick[1]["measures"]["read"]  # the quick preset reads its whole memory
    options = dict(memory_variant="training-free-ranked", memory_read="relevant", read_chunks=1, archive_rows=4096)
    model = tiny_model(0, "bench", drop_memory_per_layer=False, **options)
    bench = Bench(model, lambda: None, 2, 0, 16, 4, (1,), 1, 1, (32,))  # the tiny vocabulary: long enough to match
    result = read.run(Context(None, torch.device("cpu"), str(tmp_path), bench=bench))
    assert result["first_text_rows_in_memory"] < read.TEXT_TOKENS  # the first text lost rows
    for point in result["by_query_tokens"]:
        assert point["restores"] == {"first": True, "last": False}
        assert set(point["variants"]) == {"plain", "in_place", "restored_first", "restored_again", "whole_memory"}
        rows = point["prefix_rows_read"]  # bos and one chunk, far fewer than the memory's rows
        assert 1 < rows["in_place"] <= 1 + model.config.num_tokens < model.config.prefix_length
        first, again = point["ratios"]["floors"]["first"], point["ratios"]["floors"]["again"]
        config = model.config
        kv_weights = (
            2 * config.hidden_size * config.num_key_value_heads * config.hidden_size // config.num_attention_heads
        )
        projections = config.num_hidden_layers * 2 * min(read.TEXT_TOKENS, config.num_tokens) * kv_weights
        assert first["restored_flops"] - again["restored_flops"] == projections
        assert again["in_place_flops"] == first["in_place_flops"] and first["ratio"] > again["ratio"]
    assert [t["op"] for t in result["targets"]] == ["<="] * 4 and len(read.rows(result)) == 4


def test_soak_mode(tmp_path, capsys):
    assert main(["--soak", "96", "--soak-memories", "8", "--out", str(tmp_path)]) == 0
    progress = re.findall(r"soak: ([\d,]+) / 96 injections", capsys.readouterr().err)
    assert progress and progress[-1] == "96" and len(progress) <= 11  # each further tenth, and the end
    result = json.loads((tmp_path / "soak.json").read_text())["soak"]
    assert result["injections"] == 96 and result["memories"] == 8
    assert set(result["checks"]) == {"finite", "norm_bounded", "rss_flat", "time_flat"}
    assert result["checks"]["finite"] is True
    record = result["records"][-1]
    assert {"injections", "max_abs", "rms", "finite", "rss_bytes", "seconds_per_injection"} <= set(record)
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert "soak: 96 injections" in (tmp_path / "bench_table.md").read_text()
    (tmp_path / "soak.png").unlink()
    assert main(["--replot", "--out", str(tmp_path)]) == 0  # plots and table again from the JSON
    assert (tmp_path / "soak.png").exists()


def test_8b_code_path_runs_on_cpu_with_a_tiny_shape():
    config = tiny_config("bench", num_tokens=8, num_blocks=2)
    result = gpu_8b.measure_8b(torch.device("cpu"), config=config, repeats=1, warmup=0, query_tokens=8)
    assert result["skipped"] is False
    assert result["memory_on_gpu"]["memory_device"] == "cpu"
    assert result["memory_offloaded"]["peak_allocated_mb"] is None  # no CUDA: no peak
    assert _number(result["memory_offloaded"]["cached"]["median_s"])
    assert set(result["ratios"]) >= {"peak_offloaded_vs_aim", "cached_offloaded_vs_plain"}


def test_eight_b_config_is_the_paper_shape():
    config = gpu_8b.eight_b_config()
    assert (config.num_hidden_layers, config.memory_rows, config.hidden_size) == (32, 12_800, 4096)


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "eval.bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--quick" in done.stdout and "--soak" in done.stdout


def test_gpu_check_runs_its_code_path_on_cpu_with_tiny_shapes(tmp_path):
    from eval.bench import gpu_check

    assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    batched = result["batched_injection"]
    assert batched["memories"] == 8 and _number(batched["batched_throughput_vs_sequential"])
    assert result["eight_b"]["skipped"] is False and "device_name" in result["machine"]
    assert "memories batched" in (tmp_path / "gpu_check.md").read_text()


def test_the_size_measure_loads_a_ranked_memory_with_its_scores(tmp_path):
    from eval.bench.measures.base import Bench
    from eval.bench.measures.size import measure_size
    from modeling_memoryllm.testing_utils import tiny_model

    model = tiny_model(preset="bench", memory_variant="training-free-ranked").eval()
    state = model.new_memory_state()
    with torch.inference_mode():
        model.inject(torch.arange(3, 40)[None], memory=state)
    bench = Bench(model, lambda: None, 1, 0, 4, 2, (1,), 1, 1)
    size = measure_size(bench, state, str(tmp_path))
    assert size["file_bytes"] > size["formula_bytes"] and size["load"]["repeats"] == 1


def test_floors_follow_the_shapes():
    from eval.bench import floors
    from modeling_memoryllm.testing_utils import tiny_model

    model = tiny_model(preset="bench", memory_variant="memoryllm-8b")
    shape = floors.Shape.of(model)
    ttft = floors.ttft_floor(shape, 16)
    extra = shape.layers * shape.attention_flops(16 * shape.prefix)  # attention over the prefix rows
    assert ttft["memory_flops"] - ttft["plain_flops"] == extra and ttft["ratio"] > 1
    decode = floors.decode_floor(shape, 10)
    assert decode["memory_bytes"] - decode["plain_bytes"] == shape.key_value_bytes(shape.prefix)
    recompute = floors.recompute_expectation(shape, 16)  # the cached prefill plus the prefix's k/v projections
    kv_weights = 2 * shape.hidden * shape.kv_heads * shape.head_dim
    assert recompute["cached_flops"] == ttft["memory_flops"]
    assert recompute["recompute_flops"] - ttft["memory_flops"] == shape.layers * 2 * shape.prefix * kv_weights
    injection = floors.injection_floor(model, model.config.max_inject_length, 0.01)
    assert injection["ratio"] == injection["injection_flops"] / injection["plain_flops"] + 0.01
    fewer = floors.ttft_floor(shape, 16, read=5)  # a query that reads 5 prefix rows (`memory_read: relevant`)
    assert fewer["memory_flops"] - fewer["plain_flops"] == shape.layers * shape.attention_flops(16 * 5)
    assert floors.decode_floor(shape, 10, read=5)["memory_bytes"] - decode["plain_bytes"] == shape.key_value_bytes(5)


def test_a_target_on_a_ratio_over_its_floor_says_so_in_the_table():
    from eval.bench.measures.base import target
    from eval.bench.measures.cells import goal

    assert goal(target("16-token query: (cached / plain TTFT) / its FLOP floor 1.64", 1.0, "<=", 1.1)) == (
        "<= 1.1 × floor"
    )
    assert goal(target("decode step time with memory / plain backbone", 1.1, "<=", 1.25)) == "<= 1.25"
