"""`pytest benchmarks/` writes its medians through `peft-ops bench`'s record writer: one JSON
with the command, date, device and versions, and a row per benchmark."""

import pathlib

import pytest

from peft_ops.tools.records import provenance, write_json


def pytest_addoption(parser):
    parser.addoption("--bench-out", default="bench-results/pytest-benchmark.json",
                     help="where the session's record goes (JSON)")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    bench_session = getattr(session.config, "_benchmarksession", None)
    done = [b for b in getattr(bench_session, "benchmarks", []) if getattr(b, "stats", None) is not None]
    if not done:
        return
    rows = [{"name": b.name, "median_ms": b.stats.median * 1e3, "rounds": b.stats.rounds} for b in done]
    write_json(pathlib.Path(session.config.getoption("--bench-out")),
               {**provenance("pytest benchmarks/"), "rows": rows})
