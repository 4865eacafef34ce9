"""``cadenza simulate reproduce NAME``: run one reproduction and write its report.

    cadenza simulate reproduce symphony --quick
    cadenza simulate reproduce mell --only gpu=RTX-4090 --cache-dir .cache/repro
    cadenza simulate reproduce pensieve --scale 0.5

``--cache-dir`` keeps every simulator run, keyed by its settings and trace: a sweep split over
several invocations (``--only``) is assembled by a last invocation without ``--only``, which
finds the runs cached. Without ``--only`` a report holds what ran. A cache is valid only for
the code that filled it: clear it after changing the engine core, the policies or the
simulator. Each invocation also rebuilds ``repro-summary.md`` (paper vs ours, all of them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

from cadenza.sim.repro import NAMES
from cadenza.sim.repro.common import Options
from cadenza.sim.repro.report import write_report
from cadenza.sim.repro.summary import write_summary

MODULES = {
    "symphony": "symphony",
    "mell": "mell",
    "pensieve": "pensieve",
    "continuum": "continuum",
    "hint-regimes": "hint_regimes",
}


def add_reproduce_parser(sub: Any) -> None:
    """Register ``reproduce`` on ``cadenza simulate``'s subcommands."""
    p = sub.add_parser("reproduce", help="reproduce a paper's results on the simulator")
    p.add_argument("name", choices=NAMES, help="which reproduction")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (under a minute to a few minutes, by reproduction)",
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="virtual duration relative to the full run"
    )
    p.add_argument(
        "--out-dir",
        dest="repro_out_dir",
        default="docs/benchmarks",
        metavar="DIR",
        help="where the JSON, markdown and plot go (default: %(default)s)",
    )
    p.add_argument("--data", dest="repro_data", default=None, metavar="FILE", help="ShareGPT file")
    p.add_argument(
        "--azure", dest="repro_azure", default=None, metavar="CSV", help="Azure 2023 conv CSV"
    )
    p.add_argument(
        "--cache-dir", dest="repro_cache", default=None, metavar="DIR", help="keep runs here"
    )
    p.add_argument(
        "--seed", dest="repro_seed", type=int, default=0, metavar="N", help="simulation seed"
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="restrict the sweep (gpu=H100, arrival=azure, workload=azure, ...); repeatable",
    )
    p.set_defaults(func=main)


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        quick=args.quick,
        scale=args.scale,
        out_dir=Path(args.repro_out_dir),
        data=args.repro_data,
        azure=args.repro_azure,
        cache_dir=Path(args.repro_cache) if args.repro_cache else None,
        seed=args.repro_seed,
        only=tuple(args.only),
    )


def main(args: argparse.Namespace) -> int:
    options = options_from(args)
    if options.scale <= 0:
        print("cadenza simulate reproduce: --scale must be positive", file=sys.stderr)
        return 2
    module = importlib.import_module(f"cadenza.sim.repro.{MODULES[args.name]}")
    problem = _input_problem(options) or _only_problem(
        options, module.sweep_filters(module.plan_for(options))
    )
    if problem is not None:
        print(f"cadenza simulate reproduce {args.name}: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    report = module.run(options)
    paths = write_report(report, options.out_dir)
    paths.append(write_summary(options.out_dir))
    options.log(
        f"{args.name}: {time.perf_counter() - start:.0f} s; wrote "
        + ", ".join(str(p) for p in paths)
    )
    return 0


def _input_problem(options: Options) -> str | None:
    """A data file named on the command line that is not there (without one, a reproduction
    falls back to synthetic data, and says so in its report: with one, that would hide a typo),
    or an output directory that is a file."""
    for flag, path in (("--data", options.data), ("--azure", options.azure)):
        if path is not None and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    if options.out_dir.exists() and not options.out_dir.is_dir():
        return f"--out-dir {options.out_dir} is a file; name a directory"
    return None


def _only_problem(options: Options, filters: dict[str, list[str]]) -> str | None:
    """An ``--only`` filter this reproduction's sweep cannot apply (an unknown key, or a value
    that is not swept: either would run the whole sweep, or nothing, and write the report)."""
    for only in options.only:
        key, sep, value = only.partition("=")
        if not sep or not key or not value:
            return f"--only takes KEY=VALUE; got {only!r}"
        if key not in filters:
            keys = ", ".join(sorted(filters)) or "none (it has one sweep)"
            return f"--only {only}: this reproduction has no {key!r} to restrict; keys: {keys}"
        if value not in filters[key]:
            values = ", ".join(filters[key])
            return f"--only {only}: {key} takes {values} in this run"
    return None
