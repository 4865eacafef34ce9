"""The hint-regimes study's markdown and heatmaps (numbers only from its runs' data)."""

from __future__ import annotations

from typing import Any

from cadenza.sim.repro.common import Options
from cadenza.sim.repro.report import command_line, fmt, pct, table


def _late_share(placements: dict[str, int]) -> float:
    hinted = placements.get("hinted", 0) + placements.get("hint-late", 0)
    return placements.get("hint-late", 0) / hinted if hinted else 0.0


def gain_table(data: dict[str, Any], key: str) -> str:
    plan = data["plan"]
    cells = data["grid"][key]["symphony"]
    rows = []
    for lead in plan["leads_s"]:
        row: list[Any] = [f"{lead:g} s"]
        for acc in plan["accuracies"]:
            c = cells.get(f"lead={lead:g}/acc={acc:g}")
            row.append(pct(c["gain"]) if c else "–")
        rows.append(row)
    return table(["lead \\ accuracy", *[f"{a:g}" for a in plan["accuracies"]]], rows)


def negative_rows(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    noise = data["plan"].get("noise", 0.0)
    for key, entry in data["grid"].items():
        ref = entry["kv-aware"]
        for name, c in entry["symphony"].items():
            if c["gain"] < -noise:
                rows.append(
                    [
                        key,
                        name,
                        pct(c["gain"]),
                        f"{_late_share(c['placements']):.0%}",
                        f"{c['migrations']} vs {ref['migrations']}",
                        fmt(c["migration_s_mean"]),
                        fmt(c["queue_s"]),
                        c.get("false_hints", 0),
                    ]
                )
    return rows


def markdown(data: dict[str, Any], options: Options) -> str:
    plan = data["plan"]
    parts = [
        "# Where hints stop paying (simulated)",
        "",
        f"Command: `{command_line('hint-regimes', options)}`",
        "",
        f"Conditions: {plan['workers']} simulated {plan['gpu']} (roofline), {plan['model']},"
        f" ShareGPT chat sessions ({data['source']}) with think times x{plan['think_scale']},"
        f" host tier {plan['host_gib']:g} GiB per worker. Gain = 1 - symphony's mean end-to-end"
        " latency / kv-aware's on the same trace (positive: hints help). Accuracy = the share"
        " of hints that are true (the rest: the true hint dropped and a false one injected).",
        "",
        'The paper reference: "Where Should the KV Cache Live?" (arXiv 2609.16215) found'
        " prefetching never paid in its setting.",
        "",
    ]
    for key, entry in data["grid"].items():
        ref = entry["kv-aware"]
        parts += [
            f"## {key}",
            "",
            f"kv-aware: mean e2e {fmt(ref['e2e_s'])} s, TTFT {fmt(ref['ttft_s'])} s,"
            f" {ref['migrations']} migrations.",
            "",
            gain_table(data, key),
            "",
        ]
    negative = negative_rows(data)
    gains = [c["gain"] for e in data["grid"].values() for c in e["symphony"].values()]
    noise = plan.get("noise", 0.0)
    parts += [
        "## Where the gain is negative",
        "",
        f"Of {len(gains)} cells, {sum(g > noise for g in gains)} gain more than {noise:.0%},"
        f" {sum(abs(g) <= noise for g in gains)} are within ±{noise:.0%} (no measurable"
        f" effect) and {sum(g < -noise for g in gains)} lose more than {noise:.0%}.",
        "",
    ]
    if negative:
        parts += [
            table(
                [
                    "setting",
                    "hints",
                    "gain",
                    "hinted turns placed late",
                    "migrations (vs kv-aware)",
                    "mean migration s",
                    "mean queue s",
                    "false hints",
                ],
                negative,
            ),
            "",
        ]
    else:
        parts += [f"No cell of this grid loses more than {noise:.0%}.", ""]
    parts += [WHY]
    return "\n".join(parts)


WHY = """\
## How to read it

* A hint pays when its migration lands before the turn (lead > migration time) and moves the
  session to a worker less loaded than the one holding its KV. A **short lead on a slow
  link** leaves the KV in flight when the turn arrives: the turn is placed late (it falls
  back to kv-aware, which may itself wait for a move), and the copy has occupied both
  workers' network interfaces, delaying other moves.
* **False hints** (low accuracy) move KV for turns that do not come then; on a slow link
  their copies queue ahead of real ones (each interface is first-in first-out), and pins on
  the destination take device memory. The cost grows with load and with 1/bandwidth.
* At **low load** there is little imbalance to fix, so even perfect hints gain little; the
  gain is largest where load is high enough for imbalance and links are fast enough that a
  session's KV moves in well under the lead.
* The mechanism behind a negative cell is in its row above: the share of hinted turns that
  arrived before their KV (placed late), how many more migrations ran than kv-aware's, and
  how long they took against the lead.
"""


def plot(fig: Any, data: dict[str, Any]) -> None:
    plan = data["plan"]
    users = [u for u in plan["users"] if any(k.startswith(f"users={u}/") for k in data["grid"])]
    bws = plan["bandwidths_gbps"]
    if not users:
        return
    axes = fig.subplots(len(users), len(bws), squeeze=False)
    for i, u in enumerate(users):
        for j, bw in enumerate(bws):
            ax = axes[i][j]
            entry = data["grid"].get(f"users={u}/gbps={bw:g}")
            if entry is None:
                ax.set_visible(False)
                continue
            grid = [
                [
                    entry["symphony"][f"lead={lead:g}/acc={a:g}"]["gain"] * 100
                    for a in plan["accuracies"]
                ]
                for lead in plan["leads_s"]
            ]
            bound = max(max(abs(v) for row in grid for v in row), 1.0)
            im = ax.imshow(grid, cmap="RdYlGn", vmin=-bound, vmax=bound, aspect="auto")
            for r, row in enumerate(grid):
                for c, v in enumerate(row):
                    ax.text(c, r, f"{v:+.1f}%", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(plan["accuracies"])), [f"{a:g}" for a in plan["accuracies"]])
            ax.set_yticks(range(len(plan["leads_s"])), [f"{x:g}" for x in plan["leads_s"]])
            ax.set(xlabel="hint accuracy", ylabel="lead (s)", title=f"{u} users, {bw:g} Gb/s")
            fig.colorbar(im, ax=ax, label="gain (%)")
