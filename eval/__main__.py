"""`python -m eval <command> ...` from a checkout, `python -m memoryllm_eval <command> ...` once installed: a
benchmark runner (retention, editing, longbench), card (results -> model card), merge (a run's shards as one
result), subset (a retention run's questions with shorter answers) or bench (speed and memory)."""

import importlib
import sys

from .paths import COMMAND
from .runners import BENCHMARKS


COMMANDS = {**{name: f".runners.{module}" for name, module in BENCHMARKS.items()}, "card": ".runners.card"}
COMMANDS["merge"] = ".runners.merge"  # a run's shards (`--offset`) as one result
COMMANDS["subset"] = ".runners.subset"  # a retention run's questions with shorter answers
COMMANDS["bench"] = ".bench.run"  # its own command line, imported only when asked for
USAGE = f"usage: {COMMAND} {{{','.join(COMMANDS)}}} [--help] ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{USAGE}\nunknown command {command!r}", file=sys.stderr)
        return 2
    result = importlib.import_module(COMMANDS[command], __package__).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
