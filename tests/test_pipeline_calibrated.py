"""The calibrated, block-by-block path of the pipeline, checked with a probe method."""

from dataclasses import dataclass

import pytest
import torch

import edgequant as eq
from edgequant.data.calibration import Calibration
from edgequant.errors import DataError
from edgequant.formats import quantize_tensor
from edgequant.methods import Quantizer, register
from edgequant.methods.registry import is_step_name
from edgequant.models.model import Model

from .helpers import tiny_tokenizer

SEEN: list[dict] = []


def _probe(w, scheme, stats, config):
    SEEN.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()})
    return quantize_tensor(w, scheme)


@dataclass(frozen=True)
class ProbeConfig:
    """The probe takes no options."""


if not is_step_name("test_probe"):
    register(Quantizer("test_probe", _probe, ProbeConfig,
                       needs=frozenset({"hessian", "act_absmean"})))


def wrap(module):
    return Model(module, tiny_tokenizer(module.config.vocab_size), {"name": "tiny"})


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_come_from_quantized_predecessors(fixture, dtype, request):
    """Exact in float32; with bf16 forwards the statistics are still float32 and within
    bf16 rounding of the exact ones."""
    module = request.getfixturevalue(fixture)
    SEEN.clear()
    tokens = torch.randint(4, 128, (6, 20), generator=torch.Generator().manual_seed(1))
    q = eq.quantize(wrap(module), "test_probe", scheme="w4g32",
                    calib=Calibration(tokens, compute_dtype=dtype))
    assert q.calibration["compute_dtype"] == dtype
    assert len(SEEN) == 14
    # Recompute block 1 q_proj's inputs by running the *quantized* model: the pipeline fed
    # block 1 with block 0's quantized outputs, and block 1 itself was still unquantized
    # when q_proj's inputs were observed (its input does not depend on block 1's weights).
    xs = []
    h = q.module.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        q.module(input_ids=tokens, use_cache=False)
    h.remove()
    x = torch.cat(xs)
    stats = SEEN[7]
    assert stats["n_tokens"] == tokens.numel()
    assert stats["hessian"].dtype == stats["act_absmean"].dtype == torch.float32
    if dtype == "float32":
        torch.testing.assert_close(stats["hessian"], 2 * x.T @ x / x.shape[0], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(stats["act_absmean"], x.abs().mean(0), rtol=1e-4, atol=1e-6)
    else:
        def rel(a, b):
            return float((a - b).norm() / b.norm())
        assert 0 < rel(stats["hessian"], 2 * x.T @ x / x.shape[0]) < 2e-2
        assert rel(stats["act_absmean"], x.abs().mean(0)) < 2e-2
    # k/v share q's input (and its accumulators); gate/up share theirs; o and down have
    # inputs of their own
    for j in (8, 9):
        torch.testing.assert_close(SEEN[j]["hessian"], stats["hessian"], rtol=0, atol=0)
    torch.testing.assert_close(SEEN[11]["hessian"], SEEN[12]["hessian"], rtol=0, atol=0)
    assert not torch.equal(SEEN[10]["hessian"][:4, :4], stats["hessian"][:4, :4])


def test_calibrated_method_with_empty_data_is_refused(tiny_llama):
    with pytest.raises(DataError, match="calibration"):
        eq.quantize(wrap(tiny_llama), "test_probe", scheme="w4g32",
                    calib=torch.empty(0, 8, dtype=torch.long))


@pytest.mark.parametrize("bad", [torch.empty(0, 16, dtype=torch.long),
                                 torch.ones(4, 1, dtype=torch.long),
                                 torch.ones(16, dtype=torch.long)])
def test_empty_or_too_short_calibration(bad):
    with pytest.raises(DataError):
        Calibration(bad)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_captured_inputs_and_kwargs_replay_the_model(fixture, request):
    """Blocks run one by one on the captured block-0 inputs with the captured keyword
    arguments (rotary tables, causal and sliding-window masks) give the model's own hidden
    states — windows of 40 tokens exceed the tiny Gemma 3's sliding window of 16."""
    from edgequant.models.architectures import block_list
    from edgequant.statistics import block_output, capture_block_inputs

    module = request.getfixturevalue(fixture)
    blocks = block_list(module)
    batches = list(torch.randint(0, module.config.vocab_size, (4, 40),
                                 generator=torch.Generator().manual_seed(3)).split(2))
    inputs, kwargs = capture_block_inputs(module, blocks, batches)
    assert len(inputs) == 2 and all(kw for kw in kwargs)
    for batch, x in zip(batches, inputs, strict=True):
        with torch.no_grad():
            want = module(input_ids=batch, output_hidden_states=True).hidden_states
            for i, block in enumerate(blocks):
                torch.testing.assert_close(x, want[i])
                x = block_output(block(x, **kwargs[i]))
        assert x.shape == want[-1].shape


def test_compute_dtype_is_checked_and_recorded():
    from edgequant.data.calibration import CalibrationSpec, resolve_compute_dtype

    with pytest.raises(DataError, match="auto, float32, bfloat16"):
        CalibrationSpec(compute_dtype="fp16")
    assert resolve_compute_dtype("auto") in (torch.float32, torch.bfloat16)
    assert Calibration(torch.ones(1, 4, dtype=torch.long), compute_dtype="float32").description \
        == {"compute_dtype": "float32"}
