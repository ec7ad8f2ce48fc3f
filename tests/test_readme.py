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


@pytest.mark.parametrize("interpreted", [False, True], ids=["pytorch-path", "kernels-interpreted"])
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, interpreted):
    """Each example in a fresh process, as a user pastes it: on the PyTorch path (a CPU without
    the interpreter), and with the kernels in the Triton interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFT_OPS_BACKEND")}
    if interpreted:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", EXAMPLES[index]], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


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
