"""`memoryllm`: the command line (demo, chat, inject, ask, convert, push)."""

import argparse
import os
import pathlib
import sys
import time

from .default import PASSAGE, DefaultModelMissing
from .memory_state import MemoryState
from .serving import (
    DEFAULT_NAMES,
    DTYPES,
    FRAMINGS,
    answer,
    answer_stream,
    inject_framed,
    load_model,
    load_state,
    memory_stats,
    resolve_dtype,
)


DEMO_QUESTIONS = (  # with the word each answer must hold (tests/test_default_and_cli.py)
    ("Who built the lighthouse on Varden Island?", "Brekke"),
    ("What was the name of the first keeper of the lighthouse?", "Moravec"),
    ("What is the museum's most famous object?", "Aurora"),  # was "Which ship's bell is kept in the museum?",
)  # which the 135M model misses with the passage in its prompt too


class CommandError(Exception):
    """A bad input: reported in one line, exit status 2."""


# ------------------------------------------------------------------------------------------------------ helpers
def model_at(path: str | None):
    """The model `--model` names (`serving.load_model`): the embedded default, a `.gguf` file or a local folder;
    a path that does not exist is a bad input, found before anything loads."""
    if path not in DEFAULT_NAMES and not os.path.exists(path):
        raise CommandError(f"no model at {path}")
    return load_model(path)


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
    """`serving.memory_stats` in one line."""
    stats = memory_stats(state)
    per_layer = ", ".join(f"#{k}: {v:.4g}" for k, v in stats["rows_by_injection"].items())
    archive = f"; archive: {stats['archived_chunks']} chunks, {stats['archived_rows']} rows"
    return (
        f"memory {stats['layers']} layers x {stats['rows']} rows x {stats['width']} ({stats['megabytes']:.1f} MB, "
        f"{stats['dtype']}); initialized={stats['initialized']}; injections={stats['injections']}; "
        f"rows written per layer: {stats['rows_written']} of {stats['rows']}; rows per layer by injection: "
        f"{per_layer or 'none'}" + (archive if stats["archived_chunks"] else "")
    )


# ----------------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> None:
    start = time.perf_counter()
    model = load_model()
    print(f"Loaded the default model in {time.perf_counter() - start:.1f} s.")
    passage = PASSAGE.read_text(encoding="utf-8")
    state = model.new_memory_state()
    start = time.perf_counter()
    inject_framed(model, state, passage)
    tokens = len(model.tokenizer(passage, add_special_tokens=False).input_ids)
    print(f"Injected a {tokens}-token passage ({PASSAGE.name}) in {time.perf_counter() - start:.1f} s.\n")
    for question, _ in DEMO_QUESTIONS:
        start = time.perf_counter()
        with_memory = answer(model, state, question, args.max_new_tokens)
        middle = time.perf_counter()
        without = answer(model, None, question, args.max_new_tokens)
        print(f"Q: {question}")
        print(f"  with memory    ({middle - start:.1f} s): {with_memory}")
        print(f"  without memory ({time.perf_counter() - middle:.1f} s): {without}\n")


def cmd_chat(args) -> None:
    model = model_at(args.model)
    state = load_state(model, args.memory)
    print("Ask a question, or: /inject TEXT, /inject-file PATH, /save FILE, /load FILE, /reset, /stats, /quit")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        try:
            state = chat_step(model, state, line, args.framing)
        except (CommandError, ValueError, OSError) as error:
            print(f"error: {error}")


def chat_step(model, state: MemoryState, line: str, framing: str | None = None) -> MemoryState:
    command, _, argument = line.partition(" ")
    if command == "/inject":
        inject_framed(model, state, argument, framing)
        print(f"injected; {state.injections} injections so far")
    elif command == "/inject-file":
        inject_framed(model, state, read_inputs([argument])[0], framing)
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
        ask_streaming(model, state, line, framing)
    return state


def ask_streaming(model, state: MemoryState, question: str, framing: str | None, max_new_tokens: int = 48) -> str:
    """Print the answer as it streams and return it (`serving.answer_stream`). An answer cut at `max_new_tokens`
    says so: its last complete sentence is repeated after a note (or, with none, the note follows the text)."""
    shown = ""
    for text in answer_stream(model, state, question, max_new_tokens, framing=framing):
        if not text.startswith(shown):  # the final answer, back to its last complete sentence
            print(f"\n(cut at {max_new_tokens} tokens; the complete part: {text})", end="")
            shown = text
            break
        print(text[len(shown) :], end="", flush=True)
        shown = text
    print()
    return shown


def cmd_inject(args) -> None:
    texts = read_inputs(args.inputs)
    model = model_at(args.model)
    state = load_state(model, args.memory)
    inject_framed(model, state, texts, args.framing, show_progress=True)
    state.save(args.memory, config=model.config)
    print(stats_line(state))


def cmd_ask(args) -> None:
    if not os.path.exists(args.memory):  # before the model loads: bad input costs nothing
        raise CommandError(f"no memory file {args.memory} (create one with `memoryllm inject`)")
    model = model_at(args.model)
    print(answer(model, model.load_memory_state(args.memory), args.question, args.max_new_tokens, framing=args.framing))


def cmd_convert(args) -> None:
    from .hub import convert

    written = convert(args.src, args.dst, dtype=resolve_dtype(args.dtype) if args.dtype else None)
    print(f"wrote {len(written)} files to {args.dst}")


def cmd_push(args) -> None:
    from .hub import push

    for line in push(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private):
        print(line)


# ------------------------------------------------------------------------------------------------------ parsing
def add_framing_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--framing",
        choices=FRAMINGS,
        help="how texts are injected and questions asked: chat (the chat template; the default for chat models) "
        "or raw (the text as it is); use the same for inject and ask",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm", description="MemoryLLM: inject text, then ask about it.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="inject a bundled passage into the default model and ask about it")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(run=cmd_demo)
    chat = commands.add_parser("chat", help="interactive session: questions, /inject, /save, /load, /stats")
    chat.add_argument("--model", help="model folder, .gguf file, or 'default' (the embedded default)")
    chat.add_argument("--memory", help="memory file to start from")
    add_framing_argument(chat)
    chat.set_defaults(run=cmd_chat)
    inject = commands.add_parser("inject", help="inject files (or - for stdin) into a memory file")
    inject.add_argument("--model", help="model folder, .gguf file, or 'default'")
    inject.add_argument("--memory", required=True, help="memory file (created, or appended to)")
    inject.add_argument("inputs", nargs="+", help="text files, or - for standard input")
    add_framing_argument(inject)
    inject.set_defaults(run=cmd_inject)
    ask = commands.add_parser("ask", help="answer a question from a memory file")
    ask.add_argument("--model", help="model folder, .gguf file, or 'default'")
    ask.add_argument("--memory", required=True)
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.add_argument("question")
    add_framing_argument(ask)
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
    commands.add_parser("serve", help="serve memories with vLLM (see `memoryllm serve --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the trainer has its own dataclass-driven parser
        from .training import main as train_main

        train_main(argv[1:])
        return 0
    if argv[:1] == ["serve"]:  # export, publish and serve with vLLM: memoryllm_vllm's own parser
        from memoryllm_vllm.cli import main as serve_main

        return serve_main(argv[1:])
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
