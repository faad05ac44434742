import json
import os

import pytest
import torch

import edgequant as eq
from edgequant.eval.memory import measure_fresh
from edgequant.eval.size import model_size_info
from edgequant.eval.speed import measure_speed, speed_prompt

from ._tiny import tiny_model


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny-hf"
    model.module.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_speed_protocol_on_a_tiny_model():
    r = eq.open(tiny_model())
    prompt = speed_prompt(None, r.bos_id, r.vocab_size, n=32)
    assert len(prompt) == 32 and prompt[0] == r.bos_id
    assert speed_prompt(torch.arange(100), 5, 259, n=4) == [5, 0, 1, 2]
    res = measure_speed(r, prompt, new_tokens=8, runs=3, warmup=1)
    assert res.runs == 3 and len(res.prefill_s) == 3 and res.prompt_tokens == 32
    assert res.prefill_tps > 0 and res.decode_tps > 0
    assert res.threads == torch.get_num_threads()


def test_greedy_generation_with_cache_equals_recomputing_everything():
    r = eq.open(tiny_model())
    prompt = r.tokenize("Once upon a time")
    fast = r.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(r.logits(ids)[-1].argmax()))
    assert fast == ids[len(prompt):]


def test_memory_is_measured_in_a_fresh_process(tiny_dir):
    # this process holds 1.5 GB more than the child ever will: it must not show in the
    # child's figure (Linux's ru_maxrss would carry it across fork + exec)
    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    res = measure_fresh(str(tiny_dir), "torch", list(range(1, 17)), new_tokens=4, runs=1,
                        warmup=0, threads=1)
    assert res["pid"] != os.getpid()
    assert res["peak_rss_mb"] >= res["rss_before_load_mb"] > 10
    assert res["peak_rss_mb"] < 1200
    # the whole peak is the larger of loading's and running's; both phases hold the model
    assert res["peak_rss_mb"] == max(res["peak_rss_load_mb"], res["peak_rss_run_mb"])
    assert res["rss_before_load_mb"] < res["peak_rss_run_mb"] <= res["peak_rss_mb"]
    del ballast
    assert res["threads"] == 1 and res["decode_tps"] > 0 and res["torch_imported"]


def test_size_of_original_and_quantized_models():
    model = tiny_model()
    dense = model_size_info(model)
    n = sum(p.numel() for p in model.module.parameters())
    assert dense["num_params"] == n and dense["bits_per_weight"] == 32.0
    assert dense["size_on_disk"] is False and dense["size_bytes"] == 4 * n
    q = eq.quantize(model, "rtn", scheme="w4g32")
    info = eq.open(q).size_info()
    assert info["bits_per_weight"] == pytest.approx(q.summary()["bits_per_weight"])
    assert info["bits_per_weight_total"] == pytest.approx(q.summary()["bits_per_weight_total"])
    assert info["num_params"] == n


def test_evaluate_everything_on_a_saved_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some plain English text for a tiny model. " * 30)
    base = tiny_model(chat=True)
    base.module.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    art = eq.quantize(base, "rtn", scheme="w4g32").save(tmp_path / "art")
    gen = tmp_path / "gen.json"
    res = eq.evaluate(str(art), None, kld_base=str(tmp_path / "base"), corpus=str(corpus),
                      ctx=64, max_tokens=512, prompt_tokens=32, new_tokens=8, speed_runs=1,
                      warmup=0, threads=1)
    d = res.to_dict()
    for key in ("ppl", "tokens_scored", "kld_mean", "kld_median", "kld_p99", "top1",
                "prefill_tps", "decode_tps", "threads", "peak_rss_mb", "size_bytes",
                "bits_per_weight", "bits_per_weight_total", "num_params"):
        assert d[key] is not None, key
    assert d["metrics"] == ["ppl", "kld", "speed", "memory", "size"]
    assert d["tokens_scored"] == d["windows"] * 63 and d["kld_mean"] > 0
    assert d["size_bytes"] == (art / "model.safetensors").stat().st_size and d["size_on_disk"]
    assert d["threads"] == 1 and d["tasks"] == {}
    assert json.loads(json.dumps(d))  # plain JSON
    # the base's distributions were cached: a second run does not run the base again
    res2 = eq.evaluate(str(art), ["ppl", "kld", "generate"], kld_base=str(tmp_path / "base"),
                       corpus=str(corpus), ctx=64, max_tokens=512, generate_tokens=4,
                       generate_out=str(gen))
    assert res2.kld_mean == pytest.approx(res.kld_mean, rel=1e-9)
    assert res.kld_base_cached is False and res2.kld_base_cached is True
    saved = json.loads(gen.read_text())
    assert len(saved["samples"]) == 5 and saved["samples"][0]["chat_template"] is True
    assert saved["samples"][0]["input"].startswith("<s>user: ")


def test_speed_runs_in_the_deployment_dtype(tmp_path):
    """``speed_dtype`` reopens a torch model in bf16 with 4-bit layers on the fused kernel;
    its logits stay within bf16 error of the float32 model's."""
    from edgequant.compute import native_bf16
    from edgequant.errors import EvaluationError

    art = eq.quantize(tiny_model(), "rtn", scheme="w4g32").save(tmp_path / "art")
    with eq.open(str(art)) as exact, eq.open(str(art), dtype="bfloat16") as fast:
        assert {k: exact.runtime[k] for k in ("dtype", "device", "kernels",
                                              "kernel_fallbacks")} == {
            "dtype": "float32", "device": "cpu", "kernels": {"reference": 14},
            "kernel_fallbacks": {"int4_cpu: multiplies bfloat16 activations, not float32": 14}}
        # q, o, gate, up, down of 2 blocks; k/v have 32 rows, under the kernel's 64-row block
        assert fast.runtime["dtype"] == "bfloat16"
        assert fast.runtime["kernels"] == {"int4_cpu": 10, "reference": 4}
        assert fast.runtime["kernel_fallbacks"] == {
            "int4_cpu: 32 output rows are not a multiple of 64": 4}
        ids = exact.tokenize("Some plain English text")
        want = exact.logits(ids)
        assert (fast.logits(ids) - want).norm() / want.norm() < 3e-2
        assert fast.generate(ids, max_tokens=4, ignore_eos=True).completion_tokens == 4
    res = eq.evaluate(str(art), ["speed"], prompt_tokens=16, new_tokens=4, speed_runs=1,
                      warmup=0, threads=1)
    assert res.speed["runtime"]["dtype"] == ("bfloat16" if native_bf16() else "float32")
    res = eq.evaluate(str(art), ["speed"], prompt_tokens=16, new_tokens=4, speed_runs=1,
                      warmup=0, threads=1, speed_dtype="float32")
    assert res.speed["runtime"]["kernels"] == {"reference": 14}
    with pytest.raises(EvaluationError, match="speed_dtype must be one of"):
        eq.evaluate(str(art), ["speed"], speed_dtype="fp16")
