"""The ``peft-ops`` command."""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": "fused ops against PyTorch, PEFT and bitsandbytes: timings on a GPU, roofline and memory anywhere",
    "check": "run every fused op against its float64 reference on this machine",
    "compile": "compile every kernel for sm_80 and sm_90a (no GPU needed); registers, spills, shared memory",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: peft-ops {" + ",".join(COMMANDS) + "} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:10s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        from .check import main as run
    elif command == "bench":
        from .bench import main as run
    else:
        from .compile_report import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
