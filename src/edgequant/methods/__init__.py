"""Quantization methods: transforms that rewrite weights and quantizers that choose codes."""

from .registry import (
    Quantizer,
    Transform,
    get_quantizer,
    get_step,
    get_transform,
    list_methods,
    list_quantizers,
    list_transforms,
    register,
)

__all__ = ["Quantizer", "Transform", "get_quantizer", "get_step", "get_transform",
           "list_methods", "list_quantizers", "list_transforms", "register"]
