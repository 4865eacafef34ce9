"""The GPU cost model: a decode step and a prefill step of Llama-2-7B on an A100-80GB priced by
hand from the datasheet numbers, and every GPU x model configuration resolves (or says why a
model does not fit)."""

from __future__ import annotations

import pytest

from cadenza.sim.hardware import GPUS, gpu_spec
from cadenza.sim.model_shapes import MODELS, model_shape
from cadenza.sim.roofline import RooflineCost, RooflineParams
from cadenza.sim.setup import SimConfig, resolve
from cadenza.sim.step_cost import StepShape, causal_pairs, prefill_shape


def test_llama2_7b_shape_matches_its_published_size():
    m = model_shape("llama-2-7b")
    assert m.linear_params + 2 * m.head_params == pytest.approx(6.74e9, rel=0.01)
    assert m.kv_bytes_per_token == 2 * 32 * 4096 * 2  # 512 KiB per token in bf16
    assert model_shape("llama-3.1-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # GQA


def test_decode_step_is_weight_bandwidth_bound_and_prefill_compute_bound():
    m, gpu = model_shape("llama-2-7b"), gpu_spec("A100-80GB")
    p = RooflineParams()
    cost = RooflineCost(m, gpu, p)
    hbm = 2039e9 * 0.8
    peak = 312e12
    # One sequence decoding at context 1000: GEMMs read the weights once (memory-bound), and
    # attention reads 1000 + 1 positions of KV.
    decode = StepShape(
        tokens=1, decode_seqs=1, seqs=1, attention_pairs=1000, context_tokens=1000, sampled=1
    )
    weights = (m.linear_params + m.head_params) * 2
    kv = 524288 * 1001
    expected = 2e-3 + 2e-5 + weights / hbm + kv / hbm
    assert cost.step_seconds(decode) == pytest.approx(expected)
    assert 0.008 < expected < 0.012  # ~10 ms per token: the known A100 7B decode speed
    # A 2048-token prefill: 2 x tokens x params FLOPs at 60% of the tensor peak.
    pre = prefill_shape(0, 2048)
    gemm = (2 * 2048 * m.linear_params + 2 * m.head_params) / (peak * 0.6)
    attn = 4 * 32 * 32 * 128 * causal_pairs(0, 2048) / (peak * 0.4)
    assert cost.step_seconds(pre) == pytest.approx(2e-3 + 2e-5 + gemm + attn)


def test_faster_parts_price_the_same_step_lower():
    shape = prefill_shape(0, 512)
    times = {
        g: RooflineCost(model_shape("llama-3.1-8b"), gpu_spec(g), RooflineParams()).step_seconds(
            shape
        )
        for g in GPUS
    }
    assert times["H200"] <= times["H100"] < times["A100-80GB"] < times["RTX-4090"]


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("model", ["llama-2-7b", "llama-2-13b", "llama-3.1-8b"])
def test_every_configuration_resolves_or_says_it_does_not_fit(gpu, model):
    assert model in MODELS
    config = SimConfig(cost_model="gpu", gpu=gpu, model=model)
    if gpu == "RTX-4090" and model == "llama-2-13b":
        with pytest.raises(ValueError, match="does not fit"):
            resolve(config)
        return
    resolved = resolve(config)
    blocks = resolved.spec.num_blocks
    pool = blocks * resolved.spec.block_bytes
    assert 0 < pool < gpu_spec(gpu).memory_bytes
    assert resolved.placement_costs.block_bytes == resolved.spec.block_bytes
    assert resolved.placement_costs.prefill_s_per_token > 0


def test_gpu_params_override_and_reject_unknown_names():
    p = RooflineParams().updated(["matmul_efficiency=0.5", "step-overhead-s=0.001"])
    assert p.matmul_efficiency == 0.5 and p.step_overhead_s == 0.001
    with pytest.raises(ValueError, match="NAME=VALUE"):
        RooflineParams().updated(["warp_speed=9"])
