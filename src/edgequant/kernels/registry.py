"""The kernel registry: which code multiplies a quantized layer's weight, chosen explicitly.

A kernel is a **prepack** step (the artifact's tensors → the kernel's layout, once, at load)
plus a **matmul** (activations × that layout, at every call). What it can run is keyed by
(format, bits, group size, activation dtype, device) — with the layer's shape and act-order
beside — and for any layer a kernel says either that it runs it or, in a sentence, why not::

    spec = LayerSpec(scheme, (n, k), act_dtype=torch.bfloat16, device="cpu")
    sel = select_kernel(spec, policy="auto")   # sel.kernel; sel.rejected: {name: why not}
    packed = sel.kernel.prepack(qt, spec)
    y = sel.kernel.matmul(x, packed, bias)

``reference`` (dequantize, then a dense matmul) runs every layer and is always registered.
``auto`` takes the supported kernel of highest priority whose self-check passed, so which
kernel runs, and why a layer fell back, is a recorded result rather than a silent switch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..compute import dtype_name
from ..errors import EdgequantError
from ..formats import QuantizedTensor, QuantScheme

REFERENCE = "reference"
POLICIES = ("auto", REFERENCE)  # besides the name of any registered kernel


class KernelError(EdgequantError):
    """A kernel that is unknown, incomplete, cannot run a layer, or whose layout cannot be
    saved."""


@dataclass(frozen=True)
class KernelKey:
    """What a kernel's support is keyed by (shown by ``edgequant info`` and in plans)."""

    format: str
    bits: int
    granularity: str
    group_size: int | None
    act_bits: int | None
    act_dtype: str
    device: str

    def __str__(self) -> str:
        head = f"w{self.bits}" if self.format == "int" else self.format
        group = f"g{self.group_size}" if self.group_size else f"-{self.granularity}"
        act = f"a{self.act_bits}" if self.act_bits else ""
        return f"{head}{group}{act} {self.act_dtype} {self.device}"


@dataclass(frozen=True)
class LayerSpec:
    """One layer as a kernel sees it: its scheme and shape, and what it will be fed.

    Attributes:
        scheme: the weight's quantization scheme.
        shape: ``(N, K)`` = (out_features, in_features).
        act_dtype: the dtype of the activations the matmul receives.
        device: ``cpu``, ``cuda``, … (a device type, not an index).
        act_order: codes in column order with a group index per column (GPTQ act-order).
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    act_dtype: torch.dtype
    device: str
    act_order: bool = False

    @property
    def key(self) -> KernelKey:
        s = self.scheme
        return KernelKey(s.format, s.bits, s.granularity, s.group_size, s.act_bits,
                         dtype_name(self.act_dtype), self.device)


@dataclass
class Packed:
    """A layer's weight in one kernel's layout: what that kernel's matmul reads.

    Attributes:
        scheme, shape: the layer's (``shape`` = ``(N, K)``).
        tensors: the layout's tensors. The layer registers them as buffers, so ``.to()``
            moves them and its memory counts them; for the reference kernel they are the
            artifact's own tensors (no copy).
        meta: small constants of the layout (e.g. the int4 kernel's group).
        cache: where the reference kernel keeps dequantized weights by dtype while a caller
            asks for it (``dequantized_weights_cached``); None: dequantize on every call.
        act_scale: a static activation scheme's calibrated ``(1,)`` scale (a parameter of the
            layer, saved with it), else None.
    """

    scheme: QuantScheme
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    cache: dict[torch.dtype, torch.Tensor] | None = None
    act_scale: torch.Tensor | None = None


class Kernel(ABC):
    """A prepack step plus a matmul for the layers :meth:`supports` accepts.

    Subclasses set ``name``, ``priority`` (``auto`` prefers higher; the reference is 0),
    ``summary`` (what it computes, in one line) and ``exact`` (whether its matmul equals the
    reference kernel's bit for bit; otherwise the tests hold it to its dtype's rounding), and
    implement the three abstract methods. Optional: :meth:`self_check` (run once before the
    kernel is first chosen; a failure makes every layer fall back with that reason),
    :meth:`dequantize` (the weight the matmul effectively uses) and :meth:`unpack` (the
    artifact tensors back, so a prepacked layer can still be saved).
    """

    name: ClassVar[str]
    priority: ClassVar[int]
    summary: ClassVar[str]
    exact: ClassVar[bool] = False

    def claims(self, scheme: QuantScheme) -> bool:
        """Whether layers of ``scheme`` are this kernel's business at all (its format, bits,
        activation quantization). A layer a kernel claims but cannot run *falls back*, and
        the plan records why; one it does not claim is simply not about it."""
        return True

    @abstractmethod
    def supports(self, spec: LayerSpec) -> str | None:
        """None when this kernel runs ``spec``; otherwise why not, as a short sentence."""

    @abstractmethod
    def prepack(self, qt: QuantizedTensor, spec: LayerSpec) -> Packed:
        """The kernel's layout of ``qt`` (on ``spec.device``). Called once per layer at load;
        the layer then drops the artifact's tensors, so the layout holds the only copy."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, packed: Packed,
               bias: torch.Tensor | None) -> torch.Tensor:
        """``x (…, K) · Wᵀ + bias`` as ``(…, N)`` in ``x.dtype``."""

    def self_check(self) -> str | None:
        """None when the kernel computes what it should on this machine, else what failed."""
        return None

    def dequantize(self, packed: Packed, dtype: torch.dtype) -> torch.Tensor:
        """The ``(N, K)`` weight this kernel's matmul multiplies by."""
        raise KernelError(f"kernel {self.name} cannot show its weights as a dense matrix")

    def unpack(self, packed: Packed) -> QuantizedTensor | None:
        """The artifact's tensors, exactly, from this layout; None when the layout does not
        keep them (a layer on this kernel cannot then be saved)."""
        return None

    def __repr__(self) -> str:
        return f"<kernel {self.name} (priority {self.priority})>"

    def __deepcopy__(self, memo: dict[int, Any]) -> Kernel:
        return self  # stateless: a copied layer keeps the registered instance


_KERNELS: dict[str, Kernel] = {}
_CHECKS: dict[str, str | None] = {}


def register_kernel(cls: type[Kernel], replace: bool = False) -> type[Kernel]:
    """Class decorator: register ``cls()``. An incomplete kernel (a missing method or class
    attribute) fails here, at import, rather than on the first layer it meets."""
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        raise KernelError(f"{cls!r} is not a Kernel subclass")
    missing = sorted(cls.__abstractmethods__)
    missing += [a for a in ("name", "priority", "summary") if not hasattr(cls, a)]
    if missing:
        raise KernelError(f"kernel {getattr(cls, 'name', cls.__name__)!r} is incomplete: it "
                          f"lacks {', '.join(missing)}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier() or cls.name == "auto":
        raise KernelError(f"kernel name {cls.name!r} must be an identifier other than 'auto'")
    if not isinstance(cls.priority, int) or isinstance(cls.priority, bool):
        raise KernelError(f"kernel {cls.name}: priority must be an int, not {cls.priority!r}")
    if (cls.name == REFERENCE) != (cls.priority == 0) or cls.priority < 0:
        raise KernelError(f"kernel {cls.name}: priority 0 is the reference kernel's; others "
                          f"take a positive priority")
    if cls.name in _KERNELS and not replace:
        raise KernelError(f"a kernel named {cls.name!r} is already registered "
                          f"({type(_KERNELS[cls.name]).__qualname__})")
    _KERNELS[cls.name] = cls()
    _CHECKS.pop(cls.name, None)
    return cls


def unregister_kernel(name: str) -> None:
    """Remove a kernel (the reference kernel stays)."""
    if name == REFERENCE:
        raise KernelError("the reference kernel is always registered")
    get_kernel(name)
    del _KERNELS[name]
    _CHECKS.pop(name, None)


def registered_kernels() -> list[Kernel]:
    """Every registered kernel, preferred first (priority, then name)."""
    return sorted(_KERNELS.values(), key=lambda k: (-k.priority, k.name))


def valid_policies() -> list[str]:
    return ["auto", *(k.name for k in registered_kernels())]


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise KernelError(f"unknown kernel {name!r}; registered: "
                          f"{', '.join(k.name for k in registered_kernels())}") from None


def check_kernel(kernel: Kernel) -> str | None:
    """The kernel's self-check, run once per process: None when it passed, else why not."""
    if kernel.name not in _CHECKS:
        try:
            why = kernel.self_check()
        except Exception as e:  # noqa: BLE001 - a crashing self-check disables the kernel
            why = f"{type(e).__name__}: {e}"
        _CHECKS[kernel.name] = None if why is None else f"self-check failed ({why})"
    return _CHECKS[kernel.name]


@dataclass(frozen=True)
class Selection:
    """The kernel chosen for one layer, and why each kernel preferred over it was not."""

    kernel: Kernel
    rejected: dict[str, str]

    @property
    def reason(self) -> str | None:
        """Why the layer is not on a preferred kernel (None: it is on the best one asked)."""
        return "; ".join(f"{k}: {why}" for k, why in self.rejected.items()) or None


def check_policy(policy: str) -> None:
    if policy not in POLICIES and policy not in _KERNELS:
        raise KernelError(f"unknown kernel policy {policy!r}; valid: "
                          f"{', '.join(valid_policies())}")


def select_kernel(spec: LayerSpec, policy: str = "auto") -> Selection:
    """The kernel that runs ``spec`` under ``policy``.

    ``auto``: the registered kernel of highest priority that passed its self-check and
    supports the layer; ``reference``: dequantize-then-matmul; a kernel's name: that kernel
    where it supports the layer. Whatever a policy cannot place runs on the reference kernel,
    and :attr:`Selection.rejected` says why (under ``auto``, for the kernels that claim the
    layer's scheme; when none does, that is the reason).
    """
    check_policy(policy)
    reference = _KERNELS[REFERENCE]
    if policy == "auto":
        candidates = [k for k in registered_kernels()
                      if k is not reference and k.claims(spec.scheme)]
        if not candidates:
            return Selection(reference, {"auto": f"no kernel but the reference takes "
                                                 f"{spec.scheme.name}"})
    else:
        candidates = [] if policy == REFERENCE else [_KERNELS[policy]]
    rejected: dict[str, str] = {}
    for k in candidates:
        why = check_kernel(k) or k.supports(spec)
        if why is None:
            return Selection(k, rejected)
        rejected[k.name] = why
    why = reference.supports(spec)
    if why is not None:
        raise KernelError(f"no kernel runs {spec.key} {spec.shape[0]}×{spec.shape[1]}: {why}")
    return Selection(reference, rejected)
