"""``cadenza simulate gpu-check`` without a GPU: the pipeline (engine with random weights of a
priced shape, the calibration's workload, each step priced by the roofline, the report) runs
on the CPU with a tiny shape; the command refuses to run without CUDA unless told ``cpu``."""

from __future__ import annotations

import json
import statistics

import pytest

from cadenza.cli import main
from cadenza.sim.gpu_check import run_check, step_kind
from cadenza.sim.gpu_check_report import busy_text, write_report
from cadenza.sim.hardware import GPUS
from cadenza.sim.model_shapes import ModelShape
from cadenza.sim.roofline import RooflineCost, RooflineParams
from cadenza.sim.step_cost import StepShape

TINY = ModelShape("tiny", 2, 64, 4, 2, 128, 256, 4096, dtype_bytes=4)


def test_every_measured_step_is_priced_by_the_roofline_and_reported(tmp_path):
    params = RooflineParams()
    doc = run_check(TINY, GPUS["H200"], device="cpu", params=params, quick=True, kv_cache_gib=0.05)
    rows = doc["steps"]
    assert {r["kind"] for r in rows} == {"prefill", "decode", "mixed"}
    roofline = RooflineCost(TINY, GPUS["H200"], params)
    fields = StepShape.__dataclass_fields__
    for r in rows:
        shape = StepShape(**{k: r[k] for k in fields})
        assert r["kind"] == step_kind(shape)
        assert r["roofline_s"] == roofline.step_seconds(shape)
        assert r["measured_s"] > 0
        assert r["error"] == pytest.approx((r["roofline_s"] - r["measured_s"]) / r["measured_s"])
    # A plain decode batch of 4 at 64-token prompts: four sequences, one token each.
    assert any(r["kind"] == "decode" and r["seqs"] == 4 and r["tokens"] == 4 for r in rows)
    overall = doc["summary"]["all"]
    assert overall["steps"] == len(rows)
    assert overall["median_abs_error"] == statistics.median(abs(r["error"]) for r in rows)
    assert doc["meta"]["attention_backend"] == "torch"
    links = doc["links"]  # the swap engine's copies, both ways (no pinned probe on the CPU)
    assert links["device_to_host_gbps"] > 0 and links["host_to_device_gbps"] > 0
    assert links["modelled_pcie_gbps"] == GPUS["H200"].pcie_bytes_per_s / 1e9
    assert "raw_device_to_host_gbps" not in links
    doc["meta"]["command"] = "cadenza simulate gpu-check --gpu H200 --device cpu"
    paths = write_report(doc, tmp_path, "check")
    assert [p.name for p in paths] == ["check.json", "check.md", "check.png"]
    assert json.loads(paths[0].read_text())["summary"]["all"]["steps"] == len(rows)
    md = paths[1].read_text()
    assert "| decode | " in md and "| prefill tokens |" in md and "check.png" in md
    assert "**Device <-> host.**" in md


def test_gpu_check_needs_cuda_unless_told_cpu(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert main(["simulate", "gpu-check", "--gpu", "H200", "--out-dir", str(tmp_path)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err
    assert main(["simulate", "gpu-check", "--gpu", "H200", "--device", "tpu"]) == 2
    assert "--device must be cuda, cuda:N or cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_decode_busy_paragraph_says_where_the_step_went():
    busy = {
        "batch": 8,
        "steps": 12,
        "prompt_tokens": 64,
        "step_wall_s": 0.050,
        "kernel_s_per_step": 0.0068,
        "roofline_compute_s_per_step": 0.0040,
        "busy_share": 0.136,
        "kernels_per_step": 1439.0,
    }
    text = " ".join(busy_text(busy))
    assert "50.0 ms of wall time" in text and "6.8 ms (14%" in text
    assert "1439 kernels per step" in text and "4.0 ms (1.70x" in text
    assert busy_text(None) == []
    assert "could not read" in busy_text({"error": "RuntimeError: no CUPTI"})[0]
