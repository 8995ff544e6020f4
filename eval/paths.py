"""Where the evaluation finds things: its own files in the package, everything else through explicit settings.

The package's own files (the `evaluate` metrics, the default result folders) lie beside this module, wherever the
package is imported from (`eval` in a checkout, `memoryllm_eval` once installed). What it reads from outside comes
from environment variables (or a command-line argument where one is named), each with a default relative to the
current folder, so that the defaults fit a command run from the repository's root:

* `MEMORYLLM_SHARED`: the shared folder (golden checkpoints, data); default `../shared`.
* `MEMORYLLM_DATA`: the benchmark data folder (`--data-dir` of the runners first); default `$MEMORYLLM_SHARED/data`.
* `MEMORYLLM_HUB_CONFIGS`: the `hub_configs` folder (the 8B shape of `bench`); default `./hub_configs`.
"""

import os
import pathlib


PACKAGE = pathlib.Path(__file__).resolve().parent
METRICS = PACKAGE / "metrics"
RESULTS = PACKAGE / "results"
BENCH_RESULTS = PACKAGE / "bench" / "results"
COMMAND = f"python -m {__name__.partition('.')[0]}"  # `python -m eval` or `python -m memoryllm_eval`


def _setting(name: str, default: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.environ.get(name) or default)


def shared_dir() -> pathlib.Path:
    return _setting("MEMORYLLM_SHARED", pathlib.Path.cwd().parent / "shared")


def data_dir(explicit: str | None = None) -> pathlib.Path:
    """`explicit` (e.g. `--data-dir`), else `$MEMORYLLM_DATA`, else `data` in the shared folder."""
    return pathlib.Path(explicit) if explicit else _setting("MEMORYLLM_DATA", shared_dir() / "data")


def hub_configs_dir() -> pathlib.Path:
    return _setting("MEMORYLLM_HUB_CONFIGS", pathlib.Path.cwd() / "hub_configs")
