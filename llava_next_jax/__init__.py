"""LLaVA-NeXT in JAX/Flax.

`LlavaNext` holds (config, params) and calls pure jitted functions; `LlavaNextProcessor` turns
images and prompts into the model's inputs. Both load from a directory written by
`scripts/convert_torch_weights.py` or straight from an HF checkpoint directory.
"""

__all__ = ["LlavaNext", "LlavaNextProcessor", "LlavaNextConfig"]


def __getattr__(name):  # lazy: importing the processor should not pull in jax
    if name == "LlavaNext":
        from .model import LlavaNext
        return LlavaNext
    if name == "LlavaNextProcessor":
        from .processor import LlavaNextProcessor
        return LlavaNextProcessor
    if name == "LlavaNextConfig":
        from .config import LlavaNextConfig
        return LlavaNextConfig
    raise AttributeError(f"module 'llava_next_jax' has no attribute {name!r}")
