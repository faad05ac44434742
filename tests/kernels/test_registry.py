"""The registry: what it refuses at registration, how it selects, and the errors it gives."""

from collections.abc import Iterator

import pytest
import torch

from edgequant.formats import QuantScheme, quantize_tensor
from edgequant.kernels import (
    REFERENCE,
    Kernel,
    KernelError,
    LayerSpec,
    get_kernel,
    register_kernel,
    registered_kernels,
    select_kernel,
    unregister_kernel,
    valid_policies,
)
from edgequant.kernels.reference import ReferenceKernel


def _spec(scheme: str, shape=(128, 256), dtype=torch.bfloat16, device="cpu") -> LayerSpec:
    return LayerSpec(QuantScheme.parse(scheme), shape, dtype, device)


class _Toy(ReferenceKernel):
    """A complete kernel (the reference's math) under another name, for selection tests."""

    name = "toy"
    priority = 50
    summary = "the reference's math, registered for a test"
    check: str | None = None

    def claims(self, scheme: QuantScheme) -> bool:
        return scheme.bits == 4 and scheme.act_bits is None

    def supports(self, spec: LayerSpec) -> str | None:
        return None if spec.shape[1] % 512 == 0 else "K not a multiple of 512"

    def self_check(self) -> str | None:
        if self.check == "raise":
            raise RuntimeError("boom")
        return self.check


@pytest.fixture
def toy() -> Iterator[type[_Toy]]:
    register_kernel(_Toy)
    yield _Toy
    unregister_kernel("toy")
    _Toy.check = None


def test_builtin_kernels_are_registered_reference_last():
    names = [k.name for k in registered_kernels()]
    assert names[-1] == REFERENCE and {"int4_cpu", "w8a8_int_mm"} <= set(names)
    assert valid_policies() == ["auto", *names]


def test_an_incomplete_kernel_is_refused_at_registration():
    class NoMatmul(Kernel):
        name, priority, summary = "no_matmul", 5, "lacks its matmul"

        def supports(self, spec):
            return None

        def prepack(self, qt, spec):
            raise AssertionError

    with pytest.raises(KernelError, match="incomplete: it lacks matmul"):
        register_kernel(NoMatmul)

    class NoSummary(Kernel):
        name, priority = "no_summary", 5
        supports = ReferenceKernel.supports
        prepack = ReferenceKernel.prepack
        matmul = ReferenceKernel.matmul

    with pytest.raises(KernelError, match="'no_summary' is incomplete: it lacks summary"):
        register_kernel(NoSummary)
    assert not {"no_matmul", "no_summary"} & set(valid_policies())


@pytest.mark.parametrize("attrs,match", [
    ({"name": "auto"}, "identifier other than 'auto'"),
    ({"name": "has space"}, "identifier"),
    ({"priority": 1.5}, "priority must be an int"),
    ({"priority": 0}, "priority 0 is the reference kernel's"),
    ({"name": REFERENCE}, "priority 0 is the reference"),
    ({"name": "int4_cpu"}, "already registered"),
])
def test_bad_declarations_are_refused(attrs, match):
    bad = type("Bad", (_Toy,), attrs)
    with pytest.raises(KernelError, match=match):
        register_kernel(bad)


def test_not_a_kernel_and_unknown_names_are_clear_errors():
    with pytest.raises(KernelError, match="not a Kernel subclass"):
        register_kernel(int)  # type: ignore[arg-type]
    with pytest.raises(KernelError, match="unknown kernel 'int5'; registered: int4_cpu, "):
        get_kernel("int5")
    with pytest.raises(KernelError, match="always registered"):
        unregister_kernel(REFERENCE)


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(KernelError, match=r"unknown kernel policy 'fast'; valid: auto, "
                                          r"int4_cpu, w8a8_int_mm, reference"):
        select_kernel(_spec("w4g128"), "fast")


SCHEMES = ["w4g128", "w4g64-asym", "w4", "w3g128", "w8", "w8a8", "w8a8-static", "nf4", "fp8"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_reference_never_picks_another_kernel(scheme, dtype):
    sel = select_kernel(_spec(scheme, dtype=dtype), "reference")
    assert sel.kernel.name == REFERENCE and sel.reason is None


def test_auto_takes_the_best_supported_kernel_and_says_why_not_the_others(toy):
    assert select_kernel(_spec("w4g128", shape=(128, 512)), "auto").kernel.name == "toy"
    sel = select_kernel(_spec("w4g128"), "auto")
    assert sel.kernel.name == "int4_cpu"
    assert sel.rejected == {"toy": "K not a multiple of 512"}
    sel = select_kernel(_spec("w4g128", dtype=torch.float32), "auto")
    assert sel.kernel.name == REFERENCE
    assert sel.reason == ("toy: K not a multiple of 512; "
                          "int4_cpu: multiplies bfloat16 activations, not float32")


def test_a_scheme_no_kernel_claims_runs_the_reference_with_that_reason(toy):
    sel = select_kernel(_spec("w3g128"), "auto")
    assert sel.kernel.name == REFERENCE
    assert sel.reason == "auto: no kernel but the reference takes w3g128"


def test_a_named_kernel_runs_where_it_can_and_says_why_not_elsewhere(toy):
    assert select_kernel(_spec("w4g128", shape=(128, 512)), "int4_cpu").kernel.name \
        == "int4_cpu"
    sel = select_kernel(_spec("w3g128"), "int4_cpu")
    assert sel.kernel.name == REFERENCE
    assert sel.reason == "int4_cpu: takes 4-bit weight-only integer schemes, not w3g128"
    assert select_kernel(_spec("w4g128", shape=(128, 512)), "toy").kernel.name == "toy"


@pytest.mark.parametrize("check,why", [("wrong sums", "self-check failed (wrong sums)"),
                                       ("raise", "self-check failed (RuntimeError: boom)")])
def test_a_failed_self_check_disables_the_kernel_with_its_reason(toy, check, why):
    _Toy.check = check
    register_kernel(_Toy, replace=True)  # a fresh registration forgets the cached check
    sel = select_kernel(_spec("w4g128", shape=(128, 512)), "auto")
    assert sel.kernel.name == "int4_cpu" and sel.rejected == {"toy": why}


def test_builtin_self_checks_pass_here():
    from edgequant.kernels import check_kernel

    for k in registered_kernels():
        assert check_kernel(k) is None, k.name


def test_layer_spec_key_names_what_support_is_keyed_by():
    assert str(_spec("w4g128").key) == "w4g128 bfloat16 cpu"
    assert str(_spec("w8a8", dtype=torch.float32).key) == "w8-channela8 float32 cpu"
    assert str(_spec("nf4").key) == "nf4g64 bfloat16 cpu"
    qt = quantize_tensor(torch.randn(8, 64), "w4g32")
    assert LayerSpec(qt.scheme, qt.shape, torch.float32, "cpu").key.group_size == 32
