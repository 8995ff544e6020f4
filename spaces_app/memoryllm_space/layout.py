"""The page: `build_demo` lays out the `gr.Blocks` and wires its events to `MemorySpace`; `main` serves it."""

import logging

import gradio as gr

from modeling_memoryllm import MemoryLLMForCausalLM
from modeling_memoryllm.serving import DEFAULT_NAMES

from . import gpu
from .handlers import EXAMPLES, MemorySpace, load_example
from .settings import Settings
from .views import limits_note


INTRO = """
# MemoryLLM: a language model with a memory you can write to

[MemoryLLM](https://arxiv.org/abs/2402.04624) keeps a pool of memory vectors in every layer. **Injecting** text
writes new vectors into that pool (dropping a few old ones at random once it is full); the model reads the whole
pool when it answers. Give it a text below, then ask about it. Your memory is yours alone and lives for this
browser session only: download it to keep it.
"""
CSS = "#memory-stats p { margin: 0.2em 0; }"


def build_demo(model: MemoryLLMForCausalLM | None = None, settings: Settings | None = None) -> gr.Blocks:
    """The Space's Blocks. `model`: default `gpu.load_model(settings)`; `settings`: default `Settings.from_env()`."""
    settings = settings or Settings.from_env()
    space = MemorySpace(model if model is not None else gpu.load_model(settings), settings)
    embedded = model is None and settings.model in DEFAULT_NAMES
    with gr.Blocks(title="MemoryLLM", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                memory_view = _memory_column(settings)
            with gr.Column(scale=7):
                chat_view = _chat_column()
        gr.Markdown(limits_note(settings, space.model, space.memory_dtype, embedded))
        _wire(space, settings, memory_view, chat_view)
        demo.load(space.show, None, [memory_view["stats"], memory_view["chart"]], api_name="memory")
        demo.unload(space.drop)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.memory_space = space  # for tests and operators
    space.store.start_sweeper()
    return demo


def _memory_column(settings: Settings) -> dict:
    gr.Markdown("### 1. Give the model something to remember")
    view = {"example": gr.Dropdown(choices=list(EXAMPLES), value=None, label="A bundled example", elem_id="example")}
    view["text"] = gr.Textbox(
        lines=8,
        max_lines=16,
        label=f"Text to inject (at most {settings.max_inject_chars:,} characters)",
        placeholder="Paste text here, or upload a file.",
        elem_id="inject-text",
    )
    with gr.Row():
        view["text_file"] = gr.UploadButton(
            "Upload a .txt / .md file", file_types=[".txt", ".md"], elem_id="text-upload"
        )
        view["inject"] = gr.Button("Inject into memory", variant="primary", elem_id="inject-btn")
    view["status"] = gr.Markdown(label="Status", elem_id="status")
    gr.Markdown("### The memory")
    view["stats"] = gr.Markdown(label="Memory", elem_id="memory-stats")
    view["chart"] = gr.HTML(label="Provenance", elem_id="provenance-chart")
    with gr.Row():
        view["reset"] = gr.Button("Reset memory", variant="stop", elem_id="reset-btn")
        view["download"] = gr.Button("Download memory", elem_id="download-btn")
        view["upload_file"] = gr.UploadButton("Upload a memory", file_types=[".safetensors"], elem_id="memory-upload")
    view["download_file"] = gr.File(label="Your memory (.safetensors)", interactive=False, visible=False)
    return view


def _chat_column() -> dict:
    gr.Markdown("### 2. Ask about it")
    view = {"compare": gr.Checkbox(label="Compare with the same model and an empty memory", elem_id="compare")}
    with gr.Row():
        view["chat"] = gr.Chatbot(label="With your memory", elem_id="chat-memory", height=420)
        with gr.Column(visible=False) as view["plain_column"]:
            view["plain"] = gr.Chatbot(label="Same model, empty memory", elem_id="chat-plain", height=420)
    view["question"] = gr.Textbox(label="Question", placeholder="Ask about the text you injected…", elem_id="question")
    view["hint"] = gr.Markdown(label="Hint", elem_id="hint")
    with gr.Row():
        view["ask"] = gr.Button("Ask", variant="primary", elem_id="ask-btn")
        view["clear"] = gr.Button("Clear chat", elem_id="clear-btn")
    return view


def _wire(space: MemorySpace, settings: Settings, m: dict, c: dict) -> None:
    memory_outputs = [m["status"], m["stats"], m["chart"]]
    model_work = dict(concurrency_id="model", concurrency_limit=settings.concurrency)
    m["example"].change(load_example, m["example"], [m["text"], c["question"], c["hint"]], api_name="example")
    m["text_file"].upload(space.read_text_file, m["text_file"], m["text"], api_name="load_file")
    m["inject"].click(space.inject, m["text"], memory_outputs, api_name="inject", **model_work)
    m["reset"].click(space.reset, None, memory_outputs, api_name="reset")
    m["download"].click(space.download, None, m["download_file"], api_name="download_memory").then(
        lambda: gr.File(visible=True), None, m["download_file"], api_visibility="private"
    )
    m["upload_file"].upload(space.upload, m["upload_file"], memory_outputs, api_name="upload_memory")
    ask = dict(fn=space.ask, inputs=[c["question"], c["compare"], c["chat"], c["plain"]], **model_work)
    ask["outputs"] = [c["chat"], c["plain"], c["question"]]
    c["ask"].click(**ask, api_name="ask")
    c["question"].submit(**ask, api_visibility="private")
    c["compare"].change(lambda on: gr.Column(visible=on), c["compare"], c["plain_column"], api_visibility="private")
    c["clear"].click(lambda: ([], []), None, [c["chat"], c["plain"]], api_visibility="private")


def launch_demo(demo: gr.Blocks, **options):
    """`demo.launch` with this Space's options (no share link, upload size fitting a memory file); `options`
    override them (e.g. `server_name`, `server_port`, `prevent_thread_lock`)."""
    defaults = dict(share=False, max_file_size=demo.memory_space.memory_file_limit(), css=CSS, show_error=True)
    return demo.launch(**{**defaults, **options})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    launch_demo(build_demo())
