"""The SYMPHONY reproduction's markdown and figure (numbers only from its runs' data)."""

from __future__ import annotations

from typing import Any

from cadenza.sim.repro.common import Options, ratio
from cadenza.sim.repro.report import command_line, fmt, pct, table

PAPER = {
    "served": "4x more users than vLLM at ~1.3% more latency (NSDI: 64 -> 256); arXiv: >8x",
    "e2e": "2.4x lower end-to-end latency than vLLM",
    "imbalance": "up to 300 outstanding requests between busiest and idlest of 8 GPUs"
    " (sticky, 1,024 users; secondary source)",
    "missing": "TPOT 21.3 -> 24.4 ms (+14.6%) with 10% missing hints (secondary)",
    "false": "-2.1% throughput with 60% false hints (secondary)",
}


def _served(res: dict[str, Any], policy: str) -> str:
    s = res["served_users"][policy]
    return ("≥" if s["at_least"] else "") + fmt(s["users"])


def headline_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for combo, res in data["results"].items():
        vs = res["served_vs_round_robin"]
        sym = res["served_users"]["symphony"]
        rows.append(
            [
                f"users within {data['plan']['bound_factor']:.2f}x RR@{data['plan']['users'][0]}"
                f" latency ({combo})",
                PAPER["served"],
                f"symphony {_served(res, 'symphony')} vs round-robin"
                f" {_served(res, 'round-robin')}: "
                + (("≥" if sym["at_least"] else "") + fmt(vs["symphony"]) + "x"),
            ]
        )
        oracle = res.get("compute_free_oracle")
        if oracle:
            rows.append(
                [
                    f"ceiling: users within the same bound on GPUs with free compute ({combo})",
                    "(not in the paper)",
                    f"round-robin {_oracle_served(oracle)}: {fmt(oracle['vs_round_robin'])}x"
                    f" round-robin's; symphony reaches {fmt(vs['symphony'])}x",
                ]
            )
        loose = res.get("served_users_looser_bounds", {})
        if loose:
            factor = max(loose, key=float)
            sym, rr = loose[factor]["symphony"], loose[factor]["round-robin"]
            rows.append(
                [
                    f"users within {factor}x RR@{data['plan']['users'][0]} latency ({combo})",
                    "(looser bound, not in the paper)",
                    f"symphony {'≥' if sym['at_least'] else ''}{fmt(sym['users'])} vs round-robin"
                    f" {'≥' if rr['at_least'] else ''}{fmt(rr['users'])}: "
                    f"{fmt(ratio(sym['users'], rr['users']))}x",
                ]
            )
        fixed = res["e2e_at_fixed_users"]
        if "symphony" in fixed and fixed["symphony"]["round_robin_over_this"] is not None:
            rows.append(
                [
                    f"e2e latency at {fixed['users']} users ({combo})",
                    PAPER["e2e"],
                    f"{fmt(fixed['symphony']['round_robin_over_this'])}x lower"
                    f" ({fmt(fixed['symphony']['e2e_s'])} s vs"
                    f" {fmt(fixed['round-robin']['e2e_s'])} s)",
                ]
            )
        imb = res["imbalance_at_max_users"]
        if "sticky" in imb:
            other = ", ".join(f"{p} {imb[p]['max']}" for p in imb if p != "sticky")
            rows.append(
                [
                    f"busiest - idlest outstanding at {data['plan']['users'][-1]} users ({combo})",
                    PAPER["imbalance"],
                    f"sticky max {imb['sticky']['max']} (window mean"
                    f" {fmt(imb['sticky']['window_mean'])})" + (f"; {other}" if other else ""),
                ]
            )
    rob = data.get("robustness")
    if rob:
        base = rob["all_hints"]
        miss = next(v for k, v in rob.items() if k.startswith("missing_"))
        false = next(v for k, v in rob.items() if k.startswith("false_"))
        rows.append(
            [
                f"10% missing hints, symphony TPOT at {rob['users']} users",
                PAPER["missing"],
                f"{base['tpot_s'] * 1e3:.1f} -> {miss['tpot_s'] * 1e3:.1f} ms"
                f" ({pct(ratio(miss['tpot_s'], base['tpot_s']) - 1 if base['tpot_s'] else None)})",
            ]
        )
        change = ratio(false["output_tokens_per_s"], base["output_tokens_per_s"])
        rows.append(
            [
                f"60% false hints, symphony throughput at {rob['users']} users",
                PAPER["false"],
                f"{pct(change - 1 if change else None)} output tokens/s in the window"
                f" ({false.get('false_hints', 0)} false hints; e2e {fmt(base['e2e_s'])} ->"
                f" {fmt(false['e2e_s'])} s; migrations {base['migrations']} ->"
                f" {false['migrations']})",
            ]
        )
    return rows


def looser_table(data: dict[str, Any], res: dict[str, Any]) -> str:
    rows = []
    factors = [data["plan"]["bound_factor"], *map(float, res["served_users_looser_bounds"])]
    for policy in res["served_users"]:
        row = [policy, _served(res, policy)]
        for factor in factors[1:]:
            s = res["served_users_looser_bounds"][f"{factor:g}"][policy]
            row.append(("≥" if s["at_least"] else "") + fmt(s["users"]))
        rows.append(row)
    return table(["policy", *[f"within {f:g}x" for f in factors]], rows)


def combo_table(data: dict[str, Any], res: dict[str, Any]) -> str:
    users = data["plan"]["users"]
    rows = []
    for policy, by_users in res["runs"].items():
        row = [policy]
        for u in users:
            r = by_users.get(str(u))
            row.append(fmt(r["window"]["e2e_s"]["mean"]) if r else "–")
        row.append(_served(res, policy))
        rows.append(row)
    return table(["policy", *[f"{u} users" for u in users], "served users"], rows)


def windows(res: dict[str, Any]) -> str:
    seen: dict[str, str] = {}
    for by_users in res["runs"].values():
        for u, r in by_users.items():
            a, b = r["window"]["window_s"]
            seen[u] = f"{u} users {a:.0f}-{b:.0f}"
    return ", ".join(seen[u] for u in sorted(seen, key=int))


def detail_table(res: dict[str, Any]) -> str:
    rows = []
    for policy, by_users in res["runs"].items():
        for u, r in by_users.items():
            w = r["window"]
            rows.append(
                [
                    policy,
                    u,
                    w["turns"],
                    fmt(w["ttft_s"]["mean"]),
                    fmt(w["tpot_s"]["mean"] * 1e3),
                    fmt(w["e2e_s"]["p90"]),
                    fmt(w["output_tokens_per_s"]),
                    fmt(w["computed_prompt_tokens"] / max(w["prompt_tokens"], 1)),
                    r["migrations"]["count"],
                    fmt(r["wall_s"], 2),
                ]
            )
    headers = [
        "policy",
        "users",
        "turns",
        "TTFT s",
        "TPOT ms",
        "p90 e2e s",
        "out tok/s",
        "computed/prompt",
        "migrations",
        "sim wall s",
    ]
    return table(headers, rows)


WHY = """\
## Why ours differs

* **Hardware and engine.** The paper measured its prototype on real GPUs; these are roofline
  GPUs (datasheet peaks times stated efficiencies) running Cadenza's engine core. A roofline
  step has no kernel-launch jitter, no Python overhead that grows with the batch and no
  contention between copies and compute beyond what the transfer model charges, so every
  policy is faster than on hardware and the gaps between them come only from work avoided
  (recompute, queueing) and from placement.
* **Users.** The paper's users and think times are not public. Ours are open sessions with
  the ShareGPT converter's reading + typing think times compressed by `think_scale` (see the
  conditions), sized by Little's law, so "users" is a load level, not a count of clients.
* **Baselines.** round-robin stands for vLLM: no host tier, but its device prefix cache is
  kept (a returning turn that lands where its KV still is reuses it, as vLLM's automatic
  prefix caching would). sticky stands for InferCept: session affinity with a host tier.
  Both run Cadenza's engine, not vLLM's or InferCept's.
* **Imbalance.** The paper's 300 is a secondary-source figure for its own load; ours is the
  spread of outstanding requests (running + waiting, from each turn's submission to its
  finish) at our largest user count, which depends on how overloaded that count makes the
  cluster.
* **Robustness.** A missing hint here makes the turn fall back to kv-aware placement (it may
  still hit its KV where it is); a false hint is injected at a random moment of a session's
  think gap (or after its last turn) and costs a migration and a pin (see
  `cadenza/sim/repro/false_hints.py`).
"""


def markdown(data: dict[str, Any], options: Options) -> str:
    plan = data["plan"]
    parts = [
        "# SYMPHONY reproduction (simulated)",
        "",
        f"Command: `{command_line('symphony', options)}`",
        "",
        f"Conditions: {plan['workers']} simulated GPUs ({', '.join(plan['gpus'])}; roofline cost"
        f" model), {plan['model']}, ShareGPT sessions ({data['sources']['conversations']}),"
        f" think times and hint leads of the converter's reading + typing model x"
        f" {plan['think_scale']}, session starts Poisson or Azure-2023-bursty"
        f" ({data['sources']['azure']}), users {', '.join(map(str, plan['users']))}; host tier"
        f" {plan['host_gib']} GiB per worker except round-robin (0). Latency bound:"
        f" {plan['bound_factor']}x round-robin's mean end-to-end latency at"
        f" {plan['users'][0]} users. Every number below comes from the simulator runs recorded"
        " in the JSON next to this file.",
        "",
        "## Paper vs ours",
        "",
        table(["claim", "paper", "ours"], headline_rows(data)),
        "",
    ]
    for combo, res in data["results"].items():
        parts += [
            f"## {combo}: mean end-to-end latency (s) in the steady-state window",
            "",
            f"Mean session span {fmt(res['mean_session_span_s'])} s; bound"
            f" {fmt(res['bound_e2e_s'])} s; windows (virtual s): {windows(res)}.",
            "",
            combo_table(data, res),
            "",
            "Users served within looser bounds (multiples of round-robin's latency at"
            f" {data['plan']['users'][0]} users):",
            "",
            looser_table(data, res),
            "",
            "<details><summary>per run</summary>",
            "",
            detail_table(res),
            "",
            "</details>",
            "",
        ]
    parts.append(WHY)
    parts.append(batching_note(data))
    parts.append(ceiling_note(data))
    return "\n".join(parts)


def _oracle_served(oracle: dict[str, Any]) -> str:
    served = oracle["served_users"]
    return ("≥" if served["at_least"] else "") + fmt(served["users"])


def ceiling_note(data: dict[str, Any]) -> str:
    """The compute-free oracle against symphony, per setup."""
    lines = []
    for combo, res in data["results"].items():
        oracle = res.get("compute_free_oracle")
        if oracle:
            lines.append(
                f"* {combo}: the ceiling is {_oracle_served(oracle)} users"
                f" ({fmt(oracle['vs_round_robin'])}x round-robin's); symphony serves"
                f" {_served(res, 'symphony')} ({fmt(res['served_vs_round_robin']['symphony'])}x)"
            )
    if not lines:
        return ""
    return "\n".join(
        [
            "",
            "**The ceiling of what avoiding prefill can buy.** Round-robin on the same traces,"
            " on GPUs whose compute is free (matmul and attention efficiency set to 10^6), so"
            " every prefill, recomputed or not, costs only its memory reads while decode steps,"
            " bound by memory, are unchanged. No policy whose gain is prefill avoided (cached,"
            " migrated or prefetched KV) can do much better than this; a 4x target is out of"
            " reach wherever this ceiling is below 4x:",
            "",
            *lines,
        ]
    )


def batching_note(data: dict[str, Any]) -> str:
    """What latency the load costs every policy: symphony's TPOT across the sweep."""
    lines = []
    for combo, res in data["results"].items():
        runs = res["runs"].get("symphony", {})
        pts = sorted((int(u), r["window"]["tpot_s"]["mean"]) for u, r in runs.items())
        if len(pts) >= 2:
            lines.append(
                f"* {combo}: symphony's mean TPOT "
                + " -> ".join(f"{t * 1e3:.1f} ms ({u} users)" for u, t in pts)
            )
    if not lines:
        return ""
    return "\n".join(
        [
            "",
            "**Latency that no placement removes.** A decode step reads every running"
            " request's KV, so its time grows with the batch; with hints and no recompute,"
            " what is left of the latency growth is this:",
            "",
            *lines,
            "",
            "A bound of 1.05x round-robin's latency at the smallest load is therefore reached"
            " by every policy once batches are large enough, whatever it saves on prefill.",
        ]
    )


COLORS = {
    "round-robin": "tab:red",
    "sticky": "tab:orange",
    "kv-aware": "tab:blue",
    "symphony": "tab:green",
}


def plot(fig: Any, data: dict[str, Any]) -> None:
    axes = fig.subplots(2, 2)
    results = data["results"]
    if not results:
        return
    combo, res = next(iter(results.items()))
    ax = axes[0][0]
    for policy, by_users in res["runs"].items():
        pts = sorted((int(u), r["window"]["e2e_s"]["mean"]) for u, r in by_users.items())
        ax.plot(*zip(*pts, strict=True), "o-", label=policy, color=COLORS.get(policy))
    ax.axhline(res["bound_e2e_s"], ls="--", color="grey", label="bound")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="users",
        ylabel="mean e2e latency (s)",
        title=f"latency vs users ({combo})",
    )
    ax.legend(fontsize=8)
    ax = axes[0][1]
    combos = list(results)
    width = 0.8 / max(len(combos), 1)
    for k, c in enumerate(combos):
        served = results[c]["served_users"]
        xs = [i + k * width for i in range(len(served))]
        ax.bar(xs, [s["users"] for s in served.values()], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(served))], list(served))
    ax.set(ylabel="users within the latency bound", title="users served (1.05x bound)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for policy, imb in res["imbalance_at_max_users"].items():
        ts = [k * imb["sample_s"] for k in range(len(imb["spread"]))]
        ax.plot(ts, imb["spread"], label=policy, color=COLORS.get(policy), lw=0.8)
    ax.set(
        xlabel="virtual time (s)",
        ylabel="busiest - idlest outstanding",
        title=f"imbalance at {data['plan']['users'][-1]} users ({combo})",
    )
    ax.legend(fontsize=8)
    ax = axes[1][1]
    rob = data.get("robustness")
    if rob:
        cases = [k for k in rob if isinstance(rob[k], dict)]
        ax.bar(cases, [rob[k]["tpot_s"] * 1e3 for k in cases], color="tab:green")
        ax.set(ylabel="symphony mean TPOT (ms)", title=f"robustness at {rob['users']} users")
        ax2 = ax.twinx()
        ax2.plot(cases, [rob[k]["output_tokens_per_s"] for k in cases], "ko-")
        ax2.set_ylabel("output tokens/s (window)")
