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
    import importlib.util
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule on first use: `import llava_next_jax` then `llava_next_jax.distributed.initialize()`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'llava_next_jax' has no attribute {name!r}")
