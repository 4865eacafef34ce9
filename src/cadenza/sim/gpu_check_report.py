"""The GPU check's report: ``sim-gpu-check.json``, ``.md`` (the roofline's error by kind of
step, and every decode batch side by side) and ``.png`` (measured against roofline, per step).

The document ``cadenza simulate gpu-check`` writes (and this module renders)::

    meta     {command, model, gpu, device, device_name, roofline_params {...}, ...}
    summary  {prefill|decode|mixed|all: {steps, median_abs_error, worst_abs_error,
              median_measured_over_roofline, median_measured_s, implied_step_overhead_s}}
    steps    [{kind, StepShape fields, measured_s, roofline_s, error}]
    decode_gpu_busy  {batch, steps, prompt_tokens, step_wall_s, kernel_s_per_step,
                      roofline_compute_s_per_step, busy_share, kernels_per_step}
                     (None on the CPU; {error} if the profiler failed)
    links    {blocks, bytes, device_to_host_gbps, host_to_device_gbps, modelled_pcie_gbps,
              raw_device_to_host_gbps, raw_host_to_device_gbps (CUDA only)}
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cadenza.sim.gpu_check import KINDS
from cadenza.sim.report_files import write_report_files

WITHIN = 0.25  # what the report calls close: the simulator's GPU numbers are what-ifs, not fits


def summary_table(doc: Mapping[str, Any]) -> list[str]:
    lines = [
        "| steps | count | median measured | measured / roofline (median) | roofline error"
        " (median / worst) | per-step overhead that would fit |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = doc["summary"]  # kinds in a fixed order (the JSON file stores keys sorted)
    for kind in [k for k in (*KINDS, "all") if k in summary]:
        s = summary[kind]
        lines.append(
            f"| {kind} | {s['steps']} | {s['median_measured_s'] * 1e3:.2f} ms"
            f" | {s['median_measured_over_roofline']:.2f}x"
            f" | {s['median_abs_error']:.0%} / {s['worst_abs_error']:.0%}"
            f" | {s['implied_step_overhead_s'] * 1e3:.2f} ms |"
        )
    return lines


def decode_table(doc: Mapping[str, Any]) -> list[str]:
    """Plain decode steps by batch width, short and long contexts apart (medians of each)."""
    by_batch: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in doc["steps"]:
        if r["kind"] == "decode":
            by_batch[r["seqs"]].append(r)
    lines = [
        "| decode batch | context per sequence (median) | steps | measured | roofline |"
        " measured / roofline |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seqs in sorted(by_batch):
        rows = by_batch[seqs]
        short = [r for r in rows if r["context_tokens"] / seqs < 512]
        long = [r for r in rows if r["context_tokens"] / seqs >= 512]
        for part in (short, long):
            if not part:
                continue
            measured = statistics.median(r["measured_s"] for r in part)
            roofline = statistics.median(r["roofline_s"] for r in part)
            context = statistics.median(r["context_tokens"] / seqs for r in part)
            lines.append(
                f"| {seqs} | {context:,.0f} | {len(part)} | {measured * 1e3:.2f} ms"
                f" | {roofline * 1e3:.2f} ms | {measured / roofline:.2f}x |"
            )
    return lines


def prefill_table(doc: Mapping[str, Any]) -> list[str]:
    lines = [
        "| prefill tokens | steps | measured | roofline | measured / roofline |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in doc["steps"]:
        if r["kind"] == "prefill":
            groups[r["tokens"]].append(r)
    for tokens in sorted(groups):
        rows = groups[tokens]
        measured = statistics.median(r["measured_s"] for r in rows)
        roofline = statistics.median(r["roofline_s"] for r in rows)
        lines.append(
            f"| {tokens:,} | {len(rows)} | {measured * 1e3:.2f} ms | {roofline * 1e3:.2f} ms"
            f" | {measured / roofline:.2f}x |"
        )
    return lines


def busy_text(busy: Mapping[str, Any] | None) -> list[str]:
    """The decode step's kernel time against its wall time, as a paragraph (none on CPU)."""
    if busy is None:
        return []
    if "error" in busy:
        return [f"The profiler could not read the device's kernel time: {busy['error']}.", ""]
    return [
        f"**Where a decode step's time goes.** Over {busy['steps']} plain decode steps of"
        f" {busy['batch']} sequences under torch's profiler, a step took"
        f" {busy['step_wall_s'] * 1e3:.1f} ms of wall time, of which the GPU ran kernels for"
        f" {busy['kernel_s_per_step'] * 1e3:.1f} ms ({busy['busy_share']:.0%}; the profiler's"
        f" own cost makes this a floor), launching {busy['kernels_per_step']:.0f} kernels per"
        " step. The roofline prices the same steps' weights and attention, without its fixed"
        f" overheads, at {busy['roofline_compute_s_per_step'] * 1e3:.1f} ms"
        f" ({busy['kernel_s_per_step'] / busy['roofline_compute_s_per_step']:.2f}x of it"
        " measured on the device). The rest of the step is this engine's host side: Python,"
        " one launch per operation, no CUDA graphs. The roofline's fixed step overhead is that"
        " of a vLLM-class engine that replays captured graphs.",
        "",
    ]


def links_text(links: Mapping[str, Any] | None) -> list[str]:
    """The device <-> host copies against the simulator's modelled link, as a paragraph."""
    if not links:
        return []
    raw = ""
    if "raw_device_to_host_gbps" in links:
        raw = (
            f" One plain pinned copy of the same bytes moved {links['raw_device_to_host_gbps']:.1f}"
            f" / {links['raw_host_to_device_gbps']:.1f} GB/s."
        )
    return [
        f"**Device <-> host.** The engine's swap engine copied {links['blocks']} KV blocks"
        f" ({links['bytes'] / 2**20:,.0f} MiB) device -> host at"
        f" {links['device_to_host_gbps']:.1f} GB/s (an offload: strided slices of every"
        f" layer, each host slot checksummed) and host -> device at"
        f" {links['host_to_device_gbps']:.1f} GB/s (a fetch: each slot verified first), best"
        f" of three.{raw} The simulator models this link at"
        f" {links['modelled_pcie_gbps']:.1f} GB/s each way.",
        "",
    ]


def markdown(doc: Mapping[str, Any], plot_name: str | None) -> str:
    m = doc["meta"]
    p = m["roofline_params"]
    overall = doc["summary"].get("all", {})
    verdict = "within" if overall and overall["median_abs_error"] <= WITHIN else "outside"
    lines = [
        "# The GPU roofline against this engine on a GPU",
        "",
        f"`{m['command']}` — on {m['device_name']} ({m['device']}), torch {m['torch']},"
        f" attention backend `{m['attention_backend']}`; {m['model']} shape with random"
        f" weights; engine built in {m['engine_build_s']:.0f} s, steps profiled in"
        f" {m['profile_s']:.0f} s.",
        "",
        f"Roofline parameters: matmul efficiency {p['matmul_efficiency']}, attention"
        f" efficiency {p['attention_efficiency']}, memory efficiency"
        f" {p['memory_efficiency']}, step overhead {p['step_overhead_s'] * 1e3:.1f} ms,"
        f" per-sequence overhead {p['seq_overhead_s'] * 1e6:.0f} µs.",
        "",
        f"**Over all {overall.get('steps', 0)} measured steps the roofline's median error is"
        f" {overall.get('median_abs_error', float('nan')):.0%} ({verdict} {WITHIN:.0%}).** Error"
        ' is (roofline − measured) / measured for the same step shape; "per-step overhead'
        " that would fit\" is the roofline's step overhead plus the median of measured minus"
        " roofline, what `--gpu-param step_overhead_s=` would need for the median step of"
        " that kind to be exact.",
        "",
        *summary_table(doc),
        "",
        *busy_text(doc.get("decode_gpu_busy")),
        *links_text(doc.get("links")),
        "## Prefill steps",
        "",
        *prefill_table(doc),
        "",
        "## Decode steps",
        "",
        *decode_table(doc),
    ]
    if plot_name:
        lines += ["", f"![measured against roofline, per step]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(doc: Mapping[str, Any], path: Path) -> Path:
    """Each step's measured time against the roofline's price of its shape (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    values = []
    for kind, marker in (("prefill", "o"), ("decode", "s"), ("mixed", "^")):
        rows = [r for r in doc["steps"] if r["kind"] == kind]
        if not rows:
            continue
        x = [r["roofline_s"] * 1e3 for r in rows]
        y = [r["measured_s"] * 1e3 for r in rows]
        values += x + y
        ax.scatter(x, y, marker=marker, s=18, alpha=0.7, label=f"{kind} ({len(rows)})")
    if values:
        lo, hi = min(values) * 0.8, max(values) * 1.25
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="measured = roofline")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("roofline price of the step's shape (ms)")
    ax.set_ylabel("measured step time (ms)")
    m = doc["meta"]
    ax.set_title(f"{m['model']} on {m['device_name']} vs roofline of {m['gpu']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(doc: Mapping[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.json, .md and .png under ``out_dir``; returns the paths."""
    return write_report_files(doc, out_dir, name, plot, markdown)
