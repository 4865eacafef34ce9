"""The three files a simulator report writes: the document as JSON, its plot and its markdown."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_report_files(
    doc: Mapping[str, Any],
    out_dir: Path,
    name: str,
    plot: Callable[[Mapping[str, Any], Path], Path],
    markdown: Callable[[Mapping[str, Any], str], str],
) -> list[Path]:
    """Write ``name``.json, .png (``plot``) and .md (``markdown``, given the plot's file name)
    under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    png = plot(doc, out_dir / f"{name}.png")
    md = out_dir / f"{name}.md"
    md.write_text(markdown(doc, png.name), encoding="utf-8")
    return [json_path, md, png]
