"""Gradio widget for the metric card, as used by Hugging Face Spaces."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget


module = evaluate.load(str(Path(__file__).resolve().parent))
launch_gradio_widget(module)
