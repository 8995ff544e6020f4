"""
`python -m eval.bench.serve`: serving memories with vLLM against the package's `generate` and against vLLM with
each user's text in the prompt plus prefix caching (what a vLLM user would do instead). Run it in the vLLM venv.

Every user has their own memory: one SQuAD 2.0 dev paragraph (part-a) injected into the embedded default. For 1, 8
and 32 concurrent users (disjoint users per level, so every first round is cold), each mode answers a cold round
and three warm rounds (new questions about the same paragraph; their medians are reported), 16 greedy tokens each:

* `vllm_memory`: `vllm serve` with `MemoryLLMConnector`; the prompt is the question only, the memory's K/V come
  from the store (cold) or vLLM's prefix cache (warm; blocks salted per memory version);
* `vllm_text`: the same server, the paragraph then the question in the prompt, prefix caching on;
* `package`: `model.generate` over up to 8 users in one left-padded batch (`memory=[s1, ..., s8]`; more users run
  batch after batch, since each holds a 141.6 MB state and a 118 MB cached prefix in RAM; N = 1 is the sequential
  case); cold: the prefix K/V computed from the memory rows, warm: cached on each state. It runs before the vLLM
  server starts, so that the two never share the cores.

Both sides get one core by default (`--threads 1` for the package, `--vllm-cores 0` for vLLM's CPU worker): on 2
shared cores, two OpenMP threads of torch mostly wait on each other (16 tokens took 31-47 s with 2 threads and 3-4 s
with 1 here), and one core each keeps the ratios about the software, not the thread setup.

Time to first token is measured per request by the client (streamed for vLLM, a streamer for the package);
throughput is the round's generated tokens over its wall time. Writes `serve.json` and `serve.png` to `--out`;
`--replot` redraws the plot from the JSON.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import urllib.request

import torch

from .timing import machine_info


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LEVELS = (1, 8, 32)
NEW_TOKENS = 16
WARM_ROUNDS = 3  # warm rounds (new questions about the same paragraph); their median is reported
PACKAGE_BATCH = 8  # the package's users per `generate` batch (RAM: a state and a cached prefix per user)
PER_TOKEN_NOTE = "KV bytes per token = layers x 2 x kv_heads x head_dim x dtype bytes"


@dataclasses.dataclass
class User:
    name: str
    context: str
    questions: list[str]


def squad_users(data_dir: pathlib.Path, count: int) -> list[User]:
    """`count` users, each with one SQuAD paragraph (part-a) and `1 + WARM_ROUNDS` of its questions."""
    data = json.loads((data_dir / "squad_v2" / "dev-v2.0.part-a.json").read_text(encoding="utf-8"))["data"]
    users = []
    for article in data:
        for paragraph in article["paragraphs"]:
            questions = [qa["question"].strip() for qa in paragraph["qas"]][: 1 + WARM_ROUNDS]
            if len(questions) == 1 + WARM_ROUNDS and len(users) < count:
                users.append(User(f"user{len(users):02d}", paragraph["context"], questions))
    return users


def memory_messages(user: User, round_idx: int) -> list[dict]:
    return [{"role": "user", "content": user.questions[round_idx]}]


def text_messages(user: User, round_idx: int) -> list[dict]:
    return [{"role": "user", "content": f"{user.context}\n\n{user.questions[round_idx]}"}]


# ------------------------------------------------------------------------------------------------------ vLLM side
def stream_chat(url: str, body: dict) -> dict:
    """One streamed chat completion: seconds to the first token, total seconds, tokens generated."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=1800) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "total_s": end - start, "tokens": tokens}


def vllm_round(server, users: list[User], round_idx: int, mode: str) -> dict:
    """All users' requests at once (one thread each); per-request TTFT and the round's throughput."""
    bodies = []
    for user in users:
        body = {"model": server.export, "temperature": 0, "max_tokens": NEW_TOKENS, "ignore_eos": True}
        if mode == "vllm_memory":
            body.update(messages=memory_messages(user, round_idx), **server.store.manifest(user.name).request_fields())
        else:
            body.update(messages=text_messages(user, round_idx))
        bodies.append(body)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda body: stream_chat(server.url, body), bodies))
    return summarize([r["ttft_s"] for r in results], sum(r["tokens"] for r in results), time.perf_counter() - start)


def summarize(ttfts: list[float], tokens: int, wall: float) -> dict:
    return {
        "ttft_median_s": statistics.median(ttfts),
        "ttft_max_s": max(ttfts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }


# --------------------------------------------------------------------------------------------------- package side
class FirstToken:
    """A `generate` streamer that notes when the first new tokens arrive (its first `put` is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        return


def package_batch(model, states, users: list[User], round_idx: int) -> tuple[float, float]:
    """One batched `generate` over `users` (left-padded, one memory per row): seconds to the first token, wall."""
    from memoryllm_vllm.parity import chat_ids
    from modeling_memoryllm.serving import pad_token_id

    prompts = [chat_ids(model.tokenizer, memory_messages(user, round_idx)) for user in users]
    width, pad = max(map(len, prompts)), pad_token_id(model.tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    streamer, start = FirstToken(), time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids, attention_mask=mask, memory=list(states), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, streamer=streamer, pad_token_id=pad,
        )  # fmt: skip
    return streamer.first - start, time.perf_counter() - start


def package_level(model, service, users: list[User], batch: int) -> dict:
    """The package serving `users` in batches of `batch` (each batch's states loaded fresh: its first round is
    cold, the next ones read the prefix cached on the states), one round after another. A user's time to first
    token includes the batches of that round before its own."""
    rounds = 1 + WARM_ROUNDS
    walls, ttfts = [[] for _ in range(rounds)], [[] for _ in range(rounds)]
    for offset in range(0, len(users), batch):
        group = users[offset : offset + batch]
        states = [service.state(user.name) for user in group]
        for idx in range(rounds):
            first, wall = package_batch(model, states, group, idx)
            ttfts[idx] += [sum(walls[idx]) + first] * len(group)
            walls[idx].append(wall)
        del states
    tokens = NEW_TOKENS * len(users)
    cold = summarize(ttfts[0], tokens, sum(walls[0]))
    return {"cold": cold, "warm": median_round([summarize(t, tokens, sum(w)) for t, w in zip(ttfts[1:], walls[1:])])}


def median_round(rounds: list[dict]) -> dict:
    """The warm rounds: the median of each number, and every round."""
    keys = ("ttft_median_s", "ttft_max_s", "wall_s", "tokens_per_s")
    return {
        **{k: statistics.median(r[k] for r in rounds) for k in keys},
        "tokens": rounds[0]["tokens"],
        "rounds": rounds,
    }


def vllm_level(server, users: list[User]) -> dict:
    """The cold round and the warm rounds of both vLLM modes for one group of concurrent users."""
    result = {}
    for mode in ("vllm_memory", "vllm_text"):
        cold = vllm_round(server, users, 0, mode)
        warm = [vllm_round(server, users, idx, mode) for idx in range(1, 1 + WARM_ROUNDS)]
        result[mode] = {"cold": cold, "warm": median_round(warm)}
    return result


def ratios(level: dict) -> dict:
    """vLLM with memories against the package and against the text in the prompt (> 1: the memory server wins)."""
    out = {}
    for temperature in ("cold", "warm"):
        memory = level["vllm_memory"][temperature]
        for other in ("package", "vllm_text"):
            base = level[other][temperature]
            out[f"tokens_per_s_vs_{other}_{temperature}"] = memory["tokens_per_s"] / base["tokens_per_s"]
            out[f"ttft_speedup_vs_{other}_{temperature}"] = base["ttft_median_s"] / memory["ttft_median_s"]
    return out


# ------------------------------------------------------------------------------------------- parity, footprint
def default_parity(server, service, model, users: list[User], questions_all: bool = False) -> dict:
    """Chat completions reading each user's memory against the package's `generate` (greedy, logprobs)."""
    from memoryllm_vllm.parity import compare

    rows = []
    for user in users:
        rows_of = service.store.manifest(user.name).rows
        for idx in range(len(user.questions) if questions_all else 1):
            messages = memory_messages(user, idx)
            reply = server.chat(user.name, messages, max_tokens=NEW_TOKENS, logprobs=True, return_token_ids=True)
            result = compare(reply, model, service.state(user.name), messages, NEW_TOKENS)
            rows.append({"user": user.name, "memory_rows": rows_of, **result})
    return {
        "requests": rows,
        "all_tokens_equal": all(r["tokens_equal"] for r in rows),
        "max_logprob_diff": max(r["max_logprob_diff"] for r in rows),
    }


def footprint(model, service, users: list[User]) -> dict:
    """Bytes per user: the package's state and cached prefix, the store's file, and the KV that vLLM holds."""
    from memoryllm_vllm.parity import chat_ids

    config = model.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    manifests = [service.store.manifest(user.name) for user in users]
    state = service.state(users[0].name)
    model(torch.tensor([[1]]), memory=state)  # caches the prefix on the state
    prefix = state.prefix
    tokenizer = model.tokenizer
    context = [
        len(chat_ids(tokenizer, text_messages(u, 0))) - len(chat_ids(tokenizer, memory_messages(u, 0))) for u in users
    ]
    return {
        "kv_bytes_per_token": per_token,
        "note": PER_TOKEN_NOTE + " (float32); vLLM rounds up to whole blocks",
        "mean_memory_rows": statistics.mean(m.rows for m in manifests),
        "mean_context_tokens": statistics.mean(context),
        "package_state_bytes": state.nbytes,
        "package_prefix_cache_bytes": sum(
            b.numel() * b.element_size() for b in prefix.key_buffers + prefix.value_buffers
        ),
        "store_file_bytes": statistics.mean(os.path.getsize(service.store.folder(m.name) / m.file) for m in manifests),
        "vllm_memory_kv_bytes": statistics.mean(m.rows for m in manifests) * per_token,
        "vllm_text_kv_bytes": statistics.mean(context) * per_token,
        "service_state_file_bytes": os.path.getsize(service.store.state_path(users[0].name)),
    }


def golden_parity(work: pathlib.Path) -> dict:
    """Offline vLLM on golden A (heads padded to 32 for vLLM's CPU attention) against the package's `generate`."""
    from vllm import LLM, SamplingParams

    from memoryllm_vllm.parity import package_greedy
    from memoryllm_vllm.service import MemoryService
    from memoryllm_vllm.store import MemoryStore
    from modeling_memoryllm import MemoryLLMForCausalLM
    from modeling_memoryllm.export import export_reading_model

    golden = pathlib.Path(os.environ.get("MEMORYLLM_SHARED", "../shared")) / "golden" / "A" / "checkpoint"
    if not golden.exists():
        golden = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data" / "golden_A" / "checkpoint"
    model = MemoryLLMForCausalLM.from_pretrained(golden, attn_implementation="sdpa").eval()
    info = export_reading_model(model, work / "golden_reading", head_dim=32)
    service = MemoryService(model, MemoryStore(work / "golden_store"), export_dir=work / "golden_reading")
    fields = service.publish("golden", model.memory_state).request_fields()
    connector = {"kv_connector": "MemoryLLMConnector", "kv_role": "kv_consumer",
                 "kv_connector_extra_config": {"store": str(work / "golden_store")}}  # fmt: skip
    llm = LLM(model=str(work / "golden_reading"), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=512, kv_cache_memory_bytes=1 << 28, enable_prefix_caching=True,
              kv_transfer_config=connector)  # fmt: skip
    prompts = [[5, 17, 301, 42, 9, 77, 250], [3, 99, 12, 400, 8], [480, 2, 64]]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True,
                            extra_args={"kv_transfer_params": fields["kv_transfer_params"]})  # fmt: skip
    opening = [info["placeholder_token_id"]] * service.store.manifest("golden").rows
    requests = [{"prompt_token_ids": opening + p, "cache_salt": fields["cache_salt"]} for p in prompts]
    rows = []
    for prompt, output in zip(prompts, llm.generate(requests, params, use_tqdm=False)):
        tokens = list(output.outputs[0].token_ids)
        logprobs = [step[t].logprob for step, t in zip(output.outputs[0].logprobs, tokens)]
        expected, expected_logprobs = package_greedy(model, model.memory_state, prompt, 8, ignore_eos=True)
        diff = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs))
        rows.append({"prompt": prompt, "tokens_equal": tokens == expected, "max_logprob_diff": diff})
    del llm
    return {"requests": rows, "all_tokens_equal": all(r["tokens_equal"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- running
def prepare(args, work: pathlib.Path):
    """The default model, its export, and one published memory per user (with the time it took)."""
    from memoryllm_vllm.service import MemoryService
    from memoryllm_vllm.store import MemoryStore
    from modeling_memoryllm.default import load_default
    from modeling_memoryllm.export import export_reading_model

    model = load_default().eval()
    export_reading_model(model, work / "reading")
    service = MemoryService(model, MemoryStore(work / "store"), export_dir=work / "reading")
    users = squad_users(args.data_dir, sum(args.levels))
    start = time.perf_counter()
    for user in users:
        service.inject(user.name, user.context, generator=torch.Generator().manual_seed(0))
    return model, service, users, (time.perf_counter() - start) / max(1, len(users))


def run(args) -> dict:
    """The package first (no server running: vLLM's CPU workers would compete for the cores), then vLLM."""
    from memoryllm_vllm.server import ServerProcess

    torch.set_num_threads(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_cores  # read by the server's CPU worker
    machine = machine_info(torch.device("cpu"))  # its load average is the start's
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="memoryllm-serve-bench-"))
    model, service, users, inject_s = prepare(args, work)
    groups, offset = {}, 0
    for count in args.levels:
        groups[count], offset = users[offset : offset + count], offset + count
    levels = {
        str(n): {"package": package_level(model, service, group, args.package_batch)} for n, group in groups.items()
    }
    options = ["--enforce-eager", "--gpu-memory-utilization", str(args.kv_fraction), "--max-num-seqs", "64"]
    with ServerProcess(work / "reading", work / "store", extra=options, log_path=work / "server.log") as server:
        parity = default_parity(server, service, model, users[:4])
        for count, group in groups.items():
            levels[str(count)].update(vllm_level(server, group))
            levels[str(count)]["ratios"] = ratios(levels[str(count)])
            print(json.dumps({count: levels[str(count)]["ratios"]}), flush=True)
    return {
        "command": "python -m eval.bench.serve " + " ".join(sys.argv[1:]),
        "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "vllm_block_size": 128,  # vLLM's CPU default (vllm/platforms/cpu.py); prefix-cache hits are whole blocks
        "vllm": _vllm_version(),
        "new_tokens": NEW_TOKENS,
        "warm_rounds": WARM_ROUNDS,
        "package_batch": args.package_batch,
        "package_torch_threads": args.threads,
        "vllm_cpu_omp_threads_bind": args.vllm_cores,
        "inject_and_publish_s_per_user": inject_s,
        "levels": levels,
        "footprint_per_user": footprint(model, service, groups[args.levels[-1]]),
        "parity": {"default": parity, "golden_A": golden_parity(work) if args.golden else None},
    }


def _vllm_version() -> str:
    import importlib.metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


# ------------------------------------------------------------------------------------------------------- output
SERIES = {"vllm_memory": "vLLM + memory connector", "vllm_text": "vLLM, text in prompt + prefix cache",
          "package": "package generate (batched)"}  # fmt: skip


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = sorted(int(n) for n in result["levels"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, label in SERIES.items():
        for temperature, style in (("cold", "--"), ("warm", "-")):
            rows = [result["levels"][str(n)][mode][temperature] for n in users]
            name = f"{label}, {temperature}"
            left.plot(users, [r["tokens_per_s"] for r in rows], style, marker="o", label=name)
            right.plot(users, [r["ttft_median_s"] for r in rows], style, marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="concurrent users", ylabel="aggregate tokens/s")
    right.set(xscale="log", yscale="log", xlabel="concurrent users", ylabel="median time to first token (s)")
    for axis in (left, right):
        axis.set_xticks(users, [str(n) for n in users])
        axis.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle(f"Serving memories, {result['machine']['device_name']}, {result['vllm']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m eval.bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,32", help="concurrent users per level (comma-separated)")
    parser.add_argument("--data-dir", type=pathlib.Path, help="folder with squad_v2/ (default: the shared data)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--work", help="folder for the export, the store and the server log (default: a temporary one)")
    parser.add_argument("--kv-fraction", type=float, default=0.15, help="vLLM's --gpu-memory-utilization (RAM on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="the package's torch threads (default 1, see below)")
    parser.add_argument("--vllm-cores", default="0", help="VLLM_CPU_OMP_THREADS_BIND of the server (default: core 0)")
    parser.add_argument("--package-batch", type=int, default=PACKAGE_BATCH, help="users per package batch")
    parser.add_argument("--no-golden", dest="golden", action="store_false", help="skip the golden A parity check")
    parser.add_argument("--parity-only", action="store_true", help="only the parity checks (serve_parity.json)")
    parser.add_argument("--replot", action="store_true", help="redraw serve.png from serve.json in --out")
    args = parser.parse_args(argv)
    args.levels = [int(n) for n in args.levels.split(",")]
    if args.data_dir is None:
        from ..paths import data_dir

        args.data_dir = data_dir()
    return args


def parity_run(args) -> dict:
    """Parity only: the bundled passage (a partly written memory, 308 of 2,049 rows) and a full memory (the passage
    and 14 SQuAD paragraphs), three questions each, through `vllm serve`; and golden A through offline vLLM."""
    from memoryllm_vllm.server import ServerProcess, kv_cache_options
    from modeling_memoryllm.default import PASSAGE

    torch.set_num_threads(args.threads)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="memoryllm-serve-parity-"))
    args.levels = [0]
    model, service, _, _ = prepare(args, work)
    squad = squad_users(args.data_dir, 14)
    questions = ["Who built the lighthouse on Varden Island?", "Who was the first keeper?", "What is in the museum?"]
    users = [User("passage", PASSAGE.read_text(), questions), User("full", PASSAGE.read_text(), questions)]
    service.inject("passage", users[0].context, generator=torch.Generator().manual_seed(0))
    full = [users[1].context, *(u.context for u in squad)]
    service.inject("full", full, generator=torch.Generator().manual_seed(0))
    options = ["--enforce-eager", *kv_cache_options()]
    with ServerProcess(work / "reading", work / "store", extra=options, log_path=work / "server.log") as server:
        default = default_parity(server, service, model, users, questions_all=True)
    return {"command": "python -m eval.bench.serve " + " ".join(sys.argv[1:]), "vllm": _vllm_version(),
            "default": default, "golden_A": golden_parity(work)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.parity_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_parity.json").write_text(json.dumps(parity_run(args), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out / 'serve_parity.json'}")
        return 0
    if not args.replot:
        args.out.mkdir(parents=True, exist_ok=True)
        result = run(args)
        (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result = json.loads((args.out / "serve.json").read_text(encoding="utf-8"))
    plot(result, args.out / "serve.png")
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
