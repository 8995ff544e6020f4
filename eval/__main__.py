"""`python -m eval <benchmark> ...`: retention, editing, longbench, card, or bench (speed and memory)."""

import importlib
import runpy
import sys


RUNNERS = {
    "retention": "eval.runners.retention",
    "editing": "eval.runners.editing",
    "longbench": "eval.runners.longbench",
    "card": "eval.runners.card",
}
USAGE = "usage: python -m eval {retention,editing,longbench,card,bench} [--help] ..."


def run_bench(argv: list[str]) -> int:
    """Hand over to `eval.bench` (its own command line), imported only when asked for."""
    try:
        from eval.bench.run import main as bench_main
    except ImportError:
        saved = sys.argv
        sys.argv = ["python -m eval.bench", *argv]
        try:
            runpy.run_module("eval.bench", run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = saved
        return 0
    result = bench_main(argv)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        return run_bench(rest)
    if command not in RUNNERS:
        print(f"{USAGE}\nunknown benchmark {command!r}", file=sys.stderr)
        return 2
    return importlib.import_module(RUNNERS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
