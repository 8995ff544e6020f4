"""
The MemoryLLM Space, as a package beside `app.py` (its entry point):

- `settings`: what an operator sets (`MEMORYLLM_*` environment variables) and where the model runs;
- `sessions`: one memory per browser session, in RAM, dropped when idle;
- `gpu`: the model work (load, inject, answer), wrapped by `spaces.GPU` on ZeroGPU;
- `views`: what the page shows of a memory (stats as Markdown, provenance as an SVG chart);
- `handlers`: the event handlers (`MemorySpace`);
- `layout`: the `gr.Blocks` page, its wiring, and `main`.

Loading, prompting, answering and injecting come from `modeling_memoryllm.serving`, as for the command line.
"""

import os


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before anything imports gradio (`spaces` does too)

try:  # ZeroGPU: `spaces` must be imported before torch; every module of this package is imported after this one
    import spaces  # noqa: F401 (imported for its side effect; `gpu` uses it)
except ImportError:
    pass
