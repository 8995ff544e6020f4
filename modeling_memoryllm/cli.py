"""`memoryllm`: the command line (demo, chat, inject, ask, convert, push)."""

import argparse
import os
import pathlib
import sys
import time

import torch
from transformers import AutoTokenizer, TextStreamer

from .default import PASSAGE, DefaultModelMissing, load_default
from .memory_state import MemoryState
from .modeling_memoryllm import MemoryLLMForCausalLM
from .serving import chat_prompt


DEMO_QUESTIONS = (
    "Who built the lighthouse on Varden Island?",
    "What was the name of the first keeper of the lighthouse?",
    "Which ship's bell is kept in the museum?",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A bad input: reported in one line, exit status 2."""


# ------------------------------------------------------------------------------------------------------ helpers
def load_model(path: str | None) -> MemoryLLMForCausalLM:
    """`None` or "default": the embedded default; a `.gguf` file: a training-free MemoryLLM on it; else a folder."""
    if path in (None, "default"):
        return load_default()
    if not os.path.exists(path):
        raise CommandError(f"no model at {path}")
    if path.endswith(".gguf"):
        return MemoryLLMForCausalLM.from_backbone(path)
    model = MemoryLLMForCausalLM.from_pretrained(path).eval()
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass  # token-id inputs still work; string inputs say what is missing
    return model


def load_state(model: MemoryLLMForCausalLM, path: str | None) -> MemoryState:
    """The memory in `path` if it exists, else a new empty one."""
    if path and os.path.exists(path):
        return model.load_memory_state(path)
    return model.new_memory_state()


def answer(model, state: MemoryState | None, question: str, max_new_tokens: int = 48, stream: bool = False) -> str:
    """Greedy answer to `question`, reading `state` (an empty memory when `None`)."""
    tokenizer = model.tokenizer
    prompt = tokenizer(chat_prompt(tokenizer, question, answer_prefix=""), return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(
        prompt.input_ids,
        attention_mask=prompt.attention_mask,
        memory=state if state is not None else model.new_memory_state(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, prompt.input_ids.shape[1] :], skip_special_tokens=True).strip()


def read_inputs(inputs: list[str]) -> list[str]:
    texts = []
    for item in inputs:
        if item == "-":
            texts.append(sys.stdin.read())
        elif os.path.isfile(item):
            texts.append(pathlib.Path(item).read_text(encoding="utf-8"))
        else:
            raise CommandError(f"no such file: {item} (use - for standard input)")
    return texts


def stats_line(state: MemoryState) -> str:
    layers, rows, width = state.memory.shape
    provenance = state.provenance_summary()
    per_layer = ", ".join(f"#{k}: {v // layers}" for k, v in sorted(provenance.items()) if k)
    return (
        f"memory {layers} layers x {rows} rows x {width} ({state.nbytes / 1e6:.1f} MB, {state.memory.dtype}); "
        f"initialized={state.initialized}; injections={state.injections}; rows per layer by injection: "
        f"{per_layer or 'none'}"
    )


# ----------------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> None:
    start = time.perf_counter()
    model = load_default()
    print(f"Loaded the default model in {time.perf_counter() - start:.1f} s.")
    passage = PASSAGE.read_text(encoding="utf-8")
    state = model.new_memory_state()
    start = time.perf_counter()
    model.inject(passage, memory=state)
    tokens = len(model.tokenizer(passage, add_special_tokens=False).input_ids)
    print(f"Injected a {tokens}-token passage ({PASSAGE.name}) in {time.perf_counter() - start:.1f} s.\n")
    for question in DEMO_QUESTIONS:
        start = time.perf_counter()
        with_memory = answer(model, state, question, args.max_new_tokens)
        middle = time.perf_counter()
        without = answer(model, None, question, args.max_new_tokens)
        print(f"Q: {question}")
        print(f"  with memory    ({middle - start:.1f} s): {with_memory}")
        print(f"  without memory ({time.perf_counter() - middle:.1f} s): {without}\n")


def cmd_chat(args) -> None:
    model = load_model(args.model)
    state = load_state(model, args.memory)
    print("Ask a question, or: /inject TEXT, /inject-file PATH, /save FILE, /load FILE, /reset, /stats, /quit")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            state = chat_step(model, state, line)
        except (CommandError, ValueError, OSError) as error:
            print(f"error: {error}")


def chat_step(model, state: MemoryState, line: str) -> MemoryState:
    command, _, argument = line.partition(" ")
    if command == "/inject":
        model.inject(argument, memory=state)
        print(f"injected; {state.injections} injections so far")
    elif command == "/inject-file":
        model.inject(read_inputs([argument])[0], memory=state)
        print(f"injected {argument}; {state.injections} injections so far")
    elif command == "/save":
        state.save(argument, config=model.config)
        print(f"saved to {argument}")
    elif command == "/load":
        state = model.load_memory_state(argument)
        print(f"loaded {argument}")
    elif command == "/reset":
        state.reset()
        print("memory reset")
    elif command == "/stats":
        print(stats_line(state))
    elif command.startswith("/"):
        raise CommandError(f"unknown command {command}")
    else:
        answer(model, state, line, stream=True)
    return state


def cmd_inject(args) -> None:
    texts = read_inputs(args.inputs)
    model = load_model(args.model)
    state = load_state(model, args.memory)
    model.inject(texts, memory=state, show_progress=True)
    state.save(args.memory, config=model.config)
    print(stats_line(state))


def cmd_ask(args) -> None:
    if not os.path.exists(args.memory):  # before the model loads: bad input costs nothing
        raise CommandError(f"no memory file {args.memory} (create one with `memoryllm inject`)")
    model = load_model(args.model)
    print(answer(model, model.load_memory_state(args.memory), args.question, args.max_new_tokens))


def cmd_convert(args) -> None:
    from .hub import convert

    written = convert(args.src, args.dst, dtype=DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {len(written)} files to {args.dst}")


def cmd_push(args) -> None:
    from .hub import push

    for line in push(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private):
        print(line)


# ------------------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm", description="MemoryLLM: inject text, then ask about it.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="inject a bundled passage into the default model and ask about it")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.set_defaults(run=cmd_demo)
    chat = commands.add_parser("chat", help="interactive session: questions, /inject, /save, /load, /stats")
    chat.add_argument("--model", help="model folder, .gguf file, or 'default' (the embedded default)")
    chat.add_argument("--memory", help="memory file to start from")
    chat.set_defaults(run=cmd_chat)
    inject = commands.add_parser("inject", help="inject files (or - for stdin) into a memory file")
    inject.add_argument("--model", help="model folder, .gguf file, or 'default'")
    inject.add_argument("--memory", required=True, help="memory file (created, or appended to)")
    inject.add_argument("inputs", nargs="+", help="text files, or - for standard input")
    inject.set_defaults(run=cmd_inject)
    ask = commands.add_parser("ask", help="answer a question from a memory file")
    ask.add_argument("--model", help="model folder, .gguf file, or 'default'")
    ask.add_argument("--memory", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.add_argument("question")
    ask.set_defaults(run=cmd_ask)
    convert = commands.add_parser("convert", help="released checkpoint folder -> Hub-ready folder")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="e.g. bfloat16 halves the released float32 size")
    convert.set_defaults(run=cmd_convert)
    push = commands.add_parser("push", help="upload a converted folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    push.add_argument("--private", action="store_true")
    push.set_defaults(run=cmd_push)
    commands.add_parser("train", help="train adapters (see `memoryllm train --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the trainer has its own dataclass-driven parser
        from .training import main as train_main

        train_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, DefaultModelMissing, ValueError, OSError) as error:
        print(f"memoryllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
