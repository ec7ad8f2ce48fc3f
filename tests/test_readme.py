"""The README is for users and stays true: short, every Python example in it runs as written,
its Quick start commands are the ones CI runs, and every file it (or a doc) names exists."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_is_at_most_12_kb():
    assert len(README.encode()) <= 12_000


# Runs each example given on the command line (file paths) in a namespace of its own, as if
# pasted into a fresh interpreter; one process for all of them (torch is imported once).
RUNNER = """
import pathlib, sys, traceback
for path in sys.argv[1:]:
    try:
        exec(compile(pathlib.Path(path).read_text(), path, "exec"), {"__name__": "__main__"})
    except Exception:
        traceback.print_exc()
        sys.exit(f"README example {path} failed")
"""


@pytest.mark.parametrize("interpreted", [False, True], ids=["pytorch-path", "kernels-interpreted"])
def test_readme_examples_run(interpreted, tmp_path):
    """Every example as written: on the PyTorch path (a CPU without the interpreter), and with
    the kernels in the Triton interpreter."""
    paths = []
    for index, example in enumerate(EXAMPLES):
        paths.append(tmp_path / f"example_{index}.py")
        paths[-1].write_text(example)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFT_OPS_BACKEND")}
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", RUNNER, *map(str, paths)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(EXAMPLES) >= 3


def test_readme_has_examples_of_every_public_op_and_layer():
    code = "\n".join(EXAMPLES)
    for name in ("lora_linear", "qlora_linear", "LoraLinear", "QLoraLinear", "BottleneckAdapter", "apply_lora",
                 "save_peft_adapter", "load_peft_adapter", "merge_and_unload", "set_backend", "use_backend"):
        assert f"peft_ops.{name}" in code, name


def test_quick_start_commands_are_what_ci_runs():
    quick_start = README.split("## Quick start", 1)[1].split("## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", quick_start, re.S)
                .group(1).splitlines() if line.strip()]
    assert commands == ["scripts/dev peft-ops bench", "scripts/dev pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/dev pytest\n" in ci and "scripts/dev peft-ops bench" in ci


def test_every_file_the_docs_name_exists():
    named = set()
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named |= {m for m in re.findall(r"`((?:kernels|peft_ops|docs|tests|benchmarks|scripts|examples)/[\w./-]+)`",
                                        doc.read_text())}
    missing = sorted(name for name in named if "<" not in name and not (ROOT / name).exists())
    assert not missing, missing
