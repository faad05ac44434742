"""``QuantLinear``: a linear layer that stores packed codes and multiplies through a kernel.

Everything a ``QuantizedTensor`` stores becomes a buffer under the same name (``qweight``,
``scales``, ``zeros``, …), so a model's ``state_dict`` *is* the artifact's tensor layout and
``nbytes`` counts exactly what is stored. The forward pass is its kernel's matmul
(:mod:`edgequant.kernels`). A layer starts on the ``reference`` kernel — dequantize, then a
dense matmul: simple and exact — and changes kernel only when asked
(:func:`edgequant.kernels.use_kernels`, which records the choice and its reason). A kernel
with its own layout replaces the artifact's buffers by its own (non-persistent) ones, so the
codes are held once; saving such a layer unpacks the artifact's tensors back where the
kernel can (``w8a8_int_mm``) and fails with a clear error where it cannot (``int4_cpu``).
:func:`dequantized_weights_cached` keeps reference layers' dequantized weights between calls
where memory is not being measured (accuracy metrics).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme
from ..kernels import REFERENCE, Kernel, KernelError, LayerSpec, Packed, get_kernel

Record = dict  # a layer's entry in the artifact manifest (see pipeline.layer_record)
LAYOUT_PREFIX = "packed_"  # buffer names of a kernel's own layout


class QuantLinear(nn.Module):
    """y = x · Wᵀ + b, with W kept packed and multiplied by the layer's kernel.

    Attributes:
        kernel: the kernel its forward calls (``reference`` until ``use_kernels``).
        kernel_spec: what the kernel was chosen and prepacked for (None: never chosen; the
            reference kernel runs whatever it is fed).
        kernel_reason: why the layer is not on a kernel preferred over ``kernel``, if so.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme: QuantScheme = qt.scheme
        self.out_features, self.in_features = qt.shape
        self._names = tuple(qt.tensors())
        self._act_order = qt.g_idx is not None
        for name, t in qt.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.kernel: Kernel = get_kernel(REFERENCE)
        self.kernel_spec: LayerSpec | None = None
        self.kernel_reason: str | None = None
        self._layout: tuple[str, ...] = ()   # names of a kernel layout's tensors; () = artifact's
        self._meta: dict[str, Any] = {}
        self._cache: dict[torch.dtype, torch.Tensor] | None = None
        self._view: Packed | None = None  # see _packed

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None,
                       stats: dict | None = None, config: object = None) -> QuantLinear:
        """The layer a method's result becomes (subclasses may use calibration ``stats``)."""
        if not qt.scheme.is_weight_only:
            raise SchemeError(f"{qt.scheme.name} quantizes activations too, which a weight-only "
                              f"layer cannot do; use the dynamic, static or smoothquant method")
        return cls(qt, bias)

    def record_extra(self) -> dict:
        """Manifest fields beyond scheme/shape/bias that :meth:`skeleton` needs."""
        return {"act_order": self._act_order}

    @classmethod
    def skeleton(cls, record: Record, where: str = "") -> QuantLinear:
        """An uninitialised layer with the buffers a manifest record describes (for loading)."""
        scheme = QuantScheme.from_dict(record["scheme"])
        shape = tuple(record["shape"])
        layout = QuantizedTensor.layout(shape, scheme,  # type: ignore[arg-type]
                                        act_order=record.get("act_order", False))
        empty = {k: torch.empty(s, dtype=d) for k, (s, d) in layout.items()}
        qt = QuantizedTensor.from_tensors(empty, scheme, shape, where=where)  # type: ignore[arg-type]
        return cls(qt, torch.empty(shape[0]) if record.get("bias") else None)

    # ------------------------------------------------------------------ the artifact's view
    @property
    def prepacked(self) -> bool:
        """Whether the weight is held in a kernel's own layout instead of the artifact's."""
        return bool(self._layout)

    def quantized(self) -> QuantizedTensor:
        """The artifact's tensors (unpacked from a kernel's layout where it keeps them)."""
        if not self._layout:
            t = {n: getattr(self, n) for n in self._names}
            stored = {k: v for k, v in t.items() if k not in ("qweight", "g_idx")}
            return QuantizedTensor(self.scheme, (self.out_features, self.in_features),
                                   t["qweight"], stored, t.get("g_idx"))
        qt = self.kernel.unpack(self._packed())
        if qt is None:
            raise KernelError(
                f"this {self.scheme.name} layer runs kernel {self.kernel.name}, whose layout "
                f"does not keep the artifact's tensors: save, measure or convert the model "
                f"before use_kernels(...), or reload it (kernels='reference' keeps them)")
        return qt

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The artifact's weight, exactly as its format defines it."""
        return self.quantized().dequantize(dtype)

    def kernel_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer's kernel multiplies by (its layout's own rounding)."""
        return self.kernel.dequantize(self._packed(), dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight as stored (codes and parameters; the bias apart),
        whatever layout a kernel holds it in."""
        layout = QuantizedTensor.layout((self.out_features, self.in_features), self.scheme,
                                        act_order=self._act_order)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())

    # ------------------------------------------------------------------------ kernels
    def spec_for(self, act_dtype: torch.dtype, device: str) -> LayerSpec:
        """The layer as a kernel sees it when fed ``act_dtype`` activations on ``device``."""
        return LayerSpec(self.scheme, (self.out_features, self.in_features), act_dtype,
                         device, self._act_order)

    def use_kernel(self, kernel: Kernel, spec: LayerSpec, reason: str | None = None,
                   where: str = "") -> None:
        """Prepack for ``kernel`` (chosen by :func:`~edgequant.kernels.select_kernel`); the
        artifact's buffers give way to the kernel's layout, one copy of the codes at a time."""
        if kernel.name == self.kernel.name and (not self._layout or spec == self.kernel_spec):
            self.kernel_spec, self.kernel_reason = spec, reason
            return
        qt = self.quantized()
        why = kernel.supports(spec)
        if why is not None:
            raise KernelError(f"{where or 'layer'}: kernel {kernel.name} cannot run "
                              f"{spec.key} {spec.shape[0]}×{spec.shape[1]}: {why}")
        packed = kernel.prepack(qt, spec)
        for name in (*self._names, *(LAYOUT_PREFIX + n for n in self._layout)):
            if name in self._buffers:
                delattr(self, name)
        keep = kernel.name == REFERENCE
        for name, t in packed.tensors.items():
            self.register_buffer(name if keep else LAYOUT_PREFIX + name, t, persistent=keep)
        self._layout = () if keep else tuple(packed.tensors)
        self._meta = dict(packed.meta)
        self.kernel, self.kernel_spec, self.kernel_reason = kernel, spec, reason

    def _packed(self) -> Packed:
        """The kernel's view of the layer's current tensors. Built once and kept (a decode
        step calls every layer, where microseconds count); anything that can replace a
        tensor or a setting of the layer — attribute writes, ``register_buffer``, ``.to()``
        and the like (``_apply``) — drops it."""
        view = self._view
        if view is None:
            b = self._buffers
            if self._layout:
                tensors = {n: b[LAYOUT_PREFIX + n] for n in self._layout}
            else:
                tensors = {n: b[n] for n in self._names}
            view = Packed(self.scheme, (self.out_features, self.in_features),
                          tensors, self._meta, self._cache,  # type: ignore[arg-type]
                          self._parameters.get("act_scale"))
            self.__dict__["_view"] = view
        return view

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__["_view"] = None

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__["_view"] = None

    def register_buffer(self, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self.__dict__["_view"] = None

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        out = super()._apply(fn, recurse)
        self.__dict__["_view"] = None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.matmul(x, self._packed(), self.bias)

    # ------------------------------------------------------------------------ saving
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout:  # the kernel's buffers are not persistent: the artifact's instead
            for name, t in self.quantized().tensors().items():
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        if self._layout:
            raise KernelError(f"cannot load artifact tensors into a layer prepacked for kernel "
                              f"{self.kernel.name}; load into a fresh model")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bias={self.bias is not None}, "
                f"kernel={self.kernel.name}")


@contextmanager
def dequantized_weights_cached(module: nn.Module) -> Iterator[None]:
    """Inside, each ``QuantLinear`` of ``module`` on the reference kernel dequantizes once and
    keeps the result: the same outputs bit for bit, without re-dequantizing on every forward
    (a decode step spends ~20× the matmul doing that). It holds a float copy of every such
    weight, so it is for computing accuracy metrics, never for measuring memory or speed.
    Layers on other kernels compute as they always do."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m._cache = {}
    try:
        yield
    finally:
        for m in layers:
            m._cache = None
