"""How every tool reports: plain-text tables for the terminal, and records (JSON, CSV) that say
where they came from (command, date, device, package versions)."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import pathlib

import torch


def text_table(header: tuple, body: list[tuple]) -> str:
    """Left-aligned columns, a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def package_versions() -> dict:
    """torch, triton and the optional packages the comparisons use (None: not installed), read
    without importing them (importing triton early would fix TRITON_INTERPRET too soon)."""
    versions = {"torch": torch.__version__}
    for package in ("triton", "peft", "bitsandbytes", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(command: str) -> dict:
    """What a record says about its origin: the command, the UTC date, the device, the versions."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, **package_versions()}


def write_json(path: pathlib.Path, record: dict) -> None:
    """`record` as indented JSON at `path` (its folder created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """One CSV row per dict; the columns are every key, in order of first appearance."""
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
