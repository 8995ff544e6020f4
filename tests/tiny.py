"""A tiny random MemoryLLM for fast tests of behaviour that golden A does not pin (the `"tests"` preset of
`modeling_memoryllm.testing_utils`)."""

from modeling_memoryllm.testing_utils import tiny_config, tiny_model


__all__ = ["tiny_config", "tiny_model"]
