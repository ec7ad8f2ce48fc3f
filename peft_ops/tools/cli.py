"""The ``peft-ops`` command."""

from __future__ import annotations

import sys

from . import aot, bench, check, tune

COMMANDS = {
    "bench": "fused ops against PyTorch, PEFT and bitsandbytes: timings on a GPU, roofline and memory anywhere",
    "check": "run every fused op against its float64 reference on this machine",
    "aot": "build every kernel ahead of time for sm_80 and sm_90a (no GPU needed); registers, spills, shared memory",
    "tune": "time the fused LoRA GEMMs against cuBLAS on this GPU and cache the faster per shape",
}
# Earlier name of a command, still accepted.
ALIASES = {"compile": "aot"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = ALIASES.get(argv[0], argv[0]) if argv else None
    if command not in COMMANDS:
        print("usage: peft-ops {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        print("\n  (peft-ops compile is another name for peft-ops aot)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return {"check": check.main, "bench": bench.main, "aot": aot.main, "tune": tune.main}[command](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
