"""The activation functions a config may name (transformers' `ACT2FN` keys), as transformers computes them.

`config.ACTIVATIONS` lists the same names (the config parser refuses any other without importing jax).
"""

from __future__ import annotations

import jax


def _erf_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _tanh_gelu(x):   # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


FUNCTIONS = {
    "gelu": _erf_gelu, "gelu_python": _erf_gelu,
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu_python_tanh": _tanh_gelu, "gelu_fast": _tanh_gelu,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu, "swish": jax.nn.silu,
}


def get(name: str):
    """The function named `name` (one of `config.ACTIVATIONS`)."""
    return FUNCTIONS[name]
