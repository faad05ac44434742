"""Every registered kernel against the reference kernel, on every scheme it supports here:
bit-exact where it declares the same math (``exact``), within its dtype's rounding otherwise;
and a layout that can be unpacked gives the artifact's tensors back exactly."""

import pytest
import torch
import torch.nn.functional as F

from edgequant.formats import QuantScheme, quantize_tensor
from edgequant.kernels import REFERENCE, LayerSpec, get_kernel, registered_kernels

SCHEMES = ["w4g128", "w4g128-asym", "w4g64-asym-fz", "w4", "w4g32", "w4g64-bf16", "w3g128",
           "w2g64-asym", "w8", "w8-tensor", "w8a8", "w8a8-static", "w4a8", "w8a8-tensor", "nf4",
           "nf4-dq", "fp4", "fp4_e2m1g32", "fp8", "fp8_e5m2", "binary", "ternaryg64"]
SHAPES = [(128, 576), (64, 256), (48, 200)]  # a ragged last group; plain; N, K off-grid
DTYPES = [torch.float32, torch.bfloat16]
KERNELS = [k.name for k in registered_kernels() if k.name != REFERENCE]


def _case(scheme: str, shape: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qt = quantize_tensor(torch.randn(*shape, generator=gen), scheme)
    bias = torch.randn(shape[0], generator=gen)
    act_scale = None if qt.scheme.act_dynamic else torch.tensor([3.0 / 127])
    return qt, bias, act_scale


def _run(kernel, qt, spec, x, bias, act_scale):
    packed = kernel.prepack(qt, spec)
    packed.act_scale = act_scale
    return kernel.matmul(x, packed, bias), packed


def _supported(name):
    k = get_kernel(name)
    out = []
    for scheme in SCHEMES:
        for shape in SHAPES:
            for dt in DTYPES:
                spec = LayerSpec(QuantScheme.parse(scheme), shape, dt, "cpu")
                if k.claims(spec.scheme) and k.supports(spec) is None:
                    out.append((scheme, shape, dt))
    return out


@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_runs_something_here(name):
    """Else the agreement test below would pass vacuously."""
    assert _supported(name), f"{name} supports none of the test schemes on this machine"


@pytest.mark.parametrize("name,scheme,shape,dt", [
    pytest.param(n, s, shape, dt, id=f"{n}-{s}-{shape[0]}x{shape[1]}-{str(dt)[6:]}")
    for n in KERNELS for s, shape, dt in _supported(n)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_matmul_agrees_with_the_reference(name, scheme, shape, dt, rows):
    kernel, ref = get_kernel(name), get_kernel(REFERENCE)
    qt, bias, act_scale = _case(scheme, shape)
    spec = LayerSpec(qt.scheme, qt.shape, dt, "cpu")
    x = torch.randn(2, rows, shape[1], generator=torch.Generator().manual_seed(1)).to(dt)
    want, rpacked = _run(ref, qt, spec, x, bias, act_scale)
    got, packed = _run(kernel, qt, spec, x, bias, act_scale)
    assert got.dtype == dt and got.shape == (2, rows, shape[0])
    if kernel.exact:
        assert torch.equal(got, want)
        return
    # otherwise: the product with the kernel's own weights, which are the reference's up to
    # its rounding of scales (bf16: relative 2^-8 of each step)
    w = kernel.dequantize(packed, torch.float32)
    exact = F.linear(x.float(), w, bias)
    assert (got.float() - exact).norm() / exact.norm() < 1e-2
    w_ref = ref.dequantize(rpacked, torch.float32)
    assert (w - w_ref).norm() / w_ref.norm() < 2 ** -7
    assert (got.float() - want.float()).norm() / want.float().norm() < 2e-2


@pytest.mark.parametrize("name,scheme", sorted(
    {(k.name, c[0]) for k in registered_kernels() for c in _supported(k.name)}))
def test_a_layout_that_unpacks_gives_the_artifact_back_exactly(name, scheme):
    kernel = get_kernel(name)
    qt, _, _ = _case(scheme, (64, 256))
    spec = LayerSpec(qt.scheme, qt.shape, torch.bfloat16, "cpu")
    back = kernel.unpack(kernel.prepack(qt, spec))
    if back is None:
        return  # such a layer refuses to be saved (tests/kernels/test_plan.py)
    want = qt.tensors()
    assert back.tensors().keys() == want.keys()
    for k, t in back.tensors().items():
        assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k
