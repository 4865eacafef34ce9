"""oneDNN pre-packed linear layers: same products as torch, rows independent of the batch."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import TINY_QWEN2
from torch import nn

from cadenza import LLM, SamplingParams
from cadenza.bench.roofline import GemmShape, measure_roofline
from cadenza.model.packed_linear import (
    PackedLinear,
    onednn_linear_available,
    pack_linears,
    use_onednn,
)
from cadenza.model.source import random_model_source

needs_onednn = pytest.mark.skipif(
    not onednn_linear_available(), reason="this torch build has no oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_torch_for_any_row_count(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    for rows in (1, 3, 32, 77):
        x = torch.randn(rows, 96)
        expected = linear(x)
        got = packed(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_rows_product_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(1)
    packed = PackedLinear(nn.Linear(576, 1536, bias=False))
    batch = torch.randn(32, 576)
    together = packed(batch)
    for row in (0, 17, 31):
        assert torch.equal(packed(batch[row : row + 1])[0], together[row])


@needs_onednn
def test_pack_linears_replaces_every_linear_and_keeps_the_tied_embedding():
    source = random_model_source(TINY_QWEN2, seed=0)  # tied LM head, q/k/v biases
    llm = LLM(source=source, num_kv_blocks=32, kv_cost_model="linear")
    model = llm.engine.runner.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(
        model.embed_tokens.weight, source.state_dict["model.embed_tokens.weight"]
    )
    assert pack_linears(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == 2


@needs_onednn
def test_onednn_and_torch_kernels_give_the_same_greedy_tokens():
    source = random_model_source(TINY_QWEN2, seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 13, 40, 41], [7] * 19, list(range(3, 40))]
    outputs = {}
    for backend in ("onednn", "torch"):
        llm = LLM(source=source, num_kv_blocks=64, linear_backend=backend, kv_cost_model="linear")
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs["onednn"] == outputs["torch"]


def test_backend_choice_is_validated():
    cpu = torch.device("cpu")
    assert use_onednn("torch", cpu, torch.float32) is False
    assert use_onednn("auto", cpu, torch.bfloat16) is False
    assert use_onednn("auto", torch.device("cuda"), torch.float32) is False
    with pytest.raises(ValueError, match="linear backend must be one of"):
        use_onednn("blas", cpu, torch.float32)
    with pytest.raises(ValueError, match="needs float32 on CPU"):
        use_onednn("onednn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="linear backend must be one of"):
        LLM(source=random_model_source(TINY_QWEN2, seed=0), linear_backend="blas")


@needs_onednn
def test_roofline_takes_the_faster_kernel_per_shape():
    shapes = [GemmShape("proj", 1, 8, 64, 96, 2), GemmShape("scores", 2, 8, 16, 8, 2, 0.5)]
    roof = measure_roofline(TINY_QWEN2, 8, shapes)
    proj, scores = roof["shapes"]
    assert set(proj["gflops_per_s_by_kernel"]) == {"torch", "onednn"}
    assert proj["gflops_per_s"] == max(proj["gflops_per_s_by_kernel"].values())
    assert proj["kernel"] in ("torch", "onednn")
    assert set(scores["gflops_per_s_by_kernel"]) == {"torch"}  # batched: torch.matmul only
    assert roof["seconds"] > 0 and roof["tokens_per_s"] == 8 / roof["seconds"]
