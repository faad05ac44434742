"""Quantization methods: how to choose codes for one layer."""

from .registry import Method, get_method, list_methods, register_method

__all__ = ["Method", "get_method", "list_methods", "register_method"]
