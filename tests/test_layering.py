"""The package's imports flow one way, read from its source (AST), not from a running import:

    kernels → ops (with backend, nf4, reference) → nn → peft → tools → the package's __init__

- no module imports one of a later layer, and the imports between modules form no cycle
  (imports inside functions included);
- the kernels import torch, triton, the standard library and each other only;
- an import inside a function is either the one that must wait for TRITON_INTERPRET
  (``peft_ops.backend.kernel_modules``, with a comment saying so) or of an optional package
  that is slow to import; everything else is imported at the top of its module;
- no private name (``_x``) is imported from another module;
- nothing in the repository points at files outside it.
"""

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"kernels": 0, "ops": 1, "nn": 2, "peft": 3, "tools": 4}
TOP_LEVEL = {"peft_ops.backend": 1, "peft_ops.nf4": 1, "peft_ops.nf4_tensor": 1, "peft_ops.reference": 1, "peft_ops": 5}
# Optional packages some functions use, imported where used: installing them is the user's
# choice, and importing PEFT or bitsandbytes takes 10-15 s.
OPTIONAL = {"peft", "bitsandbytes", "transformers", "matplotlib"}
KERNEL_IMPORTS = {"torch", "triton", "__future__"} | set(sys.stdlib_module_names)
LOADER = ("peft_ops.backend", "kernel_modules")  # the one function that imports the kernels


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted((ROOT / "peft_ops").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "kernels":
            parts = ["peft_ops", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def layer(module: str) -> int:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return LAYERS[module.split(".")[1]]


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    package = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str):
    """(imported module, the name imported from it or None, the import node, the enclosing
    function or None) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, None, child, function
            elif isinstance(child, ast.ImportFrom):
                source = resolve(module, child)
                for alias in child.names:
                    yield source, alias.name, child, function
            yield from walk(child, inner)

    return list(walk(tree, None))


def package_edges() -> dict[str, set[str]]:
    """module → the package modules it imports (a name imported from a package counts as its
    submodule when there is one)."""
    edges = {m: set() for m in MODULES}
    for module in MODULES:
        for source, name, _, _ in imports(module):
            if source.split(".")[0] != "peft_ops":
                continue
            target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
            assert target in MODULES, f"{module} imports {target}, which is not a module of the package"
            if target != module:
                edges[module].add(target)
    return edges


def test_the_package_has_the_layers():
    assert {m.split(".")[1] for m in MODULES if m.count(".") >= 2} == set(LAYERS)
    assert {m for m in MODULES if m.count(".") == 1} == set(TOP_LEVEL) - {"peft_ops"} | {
        f"peft_ops.{name}" for name in LAYERS}


def test_no_module_imports_a_later_layer():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in package_edges().items() for t in targets
              if layer(t) > layer(m) and not (t == f"peft_ops.{t.split('.')[-1]}" and t.split(".")[-1] in LAYERS)]
    assert not upward, "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first walk of `edges` meets (each as a closed path)."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_imports_form_no_cycle():
    edges = package_edges()
    # a package's __init__ is imported before its submodules; it imports none of them here
    for package in ("peft_ops.kernels", "peft_ops.ops", "peft_ops.nn", "peft_ops.peft", "peft_ops.tools"):
        assert not edges[package], f"{package}/__init__.py imports {edges[package]}"
    cycles = find_cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_kernels_import_torch_triton_and_each_other_only():
    for module in (m for m in MODULES if layer(m) == 0):
        for source, _, _, _ in imports(module):
            top = source.split(".")[0]
            assert top in KERNEL_IMPORTS or source.startswith("peft_ops.kernels"), f"{module} imports {source}"


def test_imports_inside_functions_are_the_kernel_loader_or_optional_packages():
    lines = MODULES[LOADER[0]].read_text().splitlines()
    found_loader = False
    for module in MODULES:
        for source, _, node, function in imports(module):
            if function is None:
                continue
            top = source.split(".")[0]
            if (module, function) == LOADER and source == "peft_ops.kernels":
                found_loader = True
                above = "\n".join(lines[max(0, node.lineno - 4):node.lineno - 1])
                assert "TRITON_INTERPRET" in above, "the kernel loader's import must say why it waits"
                continue
            assert top in OPTIONAL, f"{module}.{function} imports {source} inside a function (line {node.lineno})"
    assert found_loader


def test_no_private_name_is_imported_across_modules():
    private = []
    for module in MODULES:
        for source, name, node, _ in imports(module):
            if source.split(".")[0] != "peft_ops":
                continue
            parts = source.split(".") + ([name] if name else [])
            if any(p.startswith("_") for p in parts):
                private.append(f"{module} line {node.lineno}: {source} {name or ''}")
    assert not private, "\n".join(private)


def test_importing_the_public_modules_imports_no_kernel_and_no_triton():
    """TRITON_INTERPRET may be set after `import peft_ops` (or the CLI's modules): neither
    imports a kernel module nor triton, whose @triton.jit functions read it once. (One fresh
    process: the CLI's modules import every other public module.)"""
    script = ("import sys, peft_ops, peft_ops.nf4, peft_ops.reference, peft_ops.tools.cli; print(sorted(m for m in "
              "sys.modules if m == 'triton' or m.startswith(('triton.', 'peft_ops.kernels.'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['peft_ops.kernels.interface']", out.stdout


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./shared|/work/|\.\./\.\./")
    found = []
    for name in tracked:
        path = ROOT / name
        if name.startswith("benchmarks/results/") or name == "tests/test_layering.py" or not path.is_file() \
                or path.stat().st_size > 500_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not found, found
