"""Kernels: a prepack step plus a matmul per (format, bits, group, activation dtype, device).

Importing this package registers the built-in kernels: ``reference`` (dequantize, then a
dense matmul; always present), ``int4_cpu`` (torch's fused int4 CPU kernel) and
``w8a8_int_mm`` (int8 × int8 → int32 by ``torch._int_mm``). A new kernel is one module with a
``@register_kernel`` class, imported here.
"""

from . import int4_cpu, reference, w8a8  # noqa: F401  (registers kernels)
from .plan import KernelPlan, LayerKernel, describe, kernel_plan, kernel_summaries, use_kernels
from .registry import (
    REFERENCE,
    Kernel,
    KernelError,
    KernelKey,
    LayerSpec,
    Packed,
    Selection,
    check_kernel,
    check_policy,
    get_kernel,
    register_kernel,
    registered_kernels,
    select_kernel,
    unregister_kernel,
    valid_policies,
)

__all__ = ["REFERENCE", "Kernel", "KernelError", "KernelKey", "KernelPlan", "LayerKernel",
           "LayerSpec", "Packed", "Selection", "check_kernel", "check_policy", "describe",
           "get_kernel",
           "kernel_plan", "kernel_summaries", "register_kernel", "registered_kernels",
           "select_kernel", "unregister_kernel", "use_kernels", "valid_policies"]
