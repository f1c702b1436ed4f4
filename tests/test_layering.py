"""The direction of imports (docs/DESIGN.md, "Layout"): perceiver -> perceiver_kernels'
public API, and inside the package api -> dispatch -> backends -> launchers -> kernels,
with the foundation (the call's description, machine facts, policy, reference) below
them all; no cycles, nothing on the GPU at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import perceiver_kernels

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, package: str, *, top_level_only: bool) -> set[str]:
    """Absolute names of the modules `path` imports (of module `package`'s tree)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        base = module.split(".")
    else:
        base = module.split(".")[:-1]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_op_never_imports_the_model_layer_benchmarks_or_tests():
    for path in _files("perceiver_kernels"):
        for name in _imports(path, "perceiver_kernels", top_level_only=False):
            root = name.split(".")[0]
            assert root not in ("perceiver", "benchmarks", "examples", "tests"), f"{path}: imports {name}"


def test_triton_kernels_import_only_triton_and_each_other():
    for path in _files("perceiver_kernels/triton/kernels"):
        for name in _imports(path, "perceiver_kernels.triton.kernels", top_level_only=False):
            allowed = name.split(".")[0] in ("os", "triton", "__future__") or name.startswith(
                "perceiver_kernels.triton.kernels")
            assert allowed, f"{path}: imports {name}"


# The package's layers, top down; a module may import its own layer and those below. An
# entry ending in "." is a package and everything in it; the longest entry that matches wins.
LAYERS = (
    ("api", ("perceiver_kernels", "perceiver_kernels.api")),
    ("dispatch", ("perceiver_kernels.dispatch",)),
    ("backends", ("perceiver_kernels.backends.", "perceiver_kernels.triton.backend", "perceiver_kernels.cuda.backend",
                  "perceiver_kernels.torch.backend", "perceiver_kernels.autograd")),
    ("launchers", ("perceiver_kernels.triton.", "perceiver_kernels.cuda.", "perceiver_kernels.torch.",
                   "perceiver_kernels.kernel_launch")),
    ("kernels", ("perceiver_kernels.triton.kernels.",)),
    ("foundation", ("perceiver_kernels.problem", "perceiver_kernels.machine", "perceiver_kernels.policy",
                    "perceiver_kernels.reference")),
)
KERNELS, FOUNDATION = 4, 5


def _layer(module: str) -> int:
    """The index in LAYERS of a module's layer."""
    best, length = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            package = entry.endswith(".")
            matches = module.startswith(entry) or module == entry[:-1] if package else module == entry
            if matches and len(entry) > length:
                best, length = index, len(entry)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py"
    return best


def test_the_package_imports_downwards_only():
    modules = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
               for path in _files("perceiver_kernels")}
    for module, path in modules.items():
        for name in _imports(path, module, top_level_only=False):
            # "from .x import y" names both x and x.y; only modules count, and not the
            # packages around the importing module (Python imports them first anyway).
            if name not in modules or name == module or module.startswith(name + "."):
                continue
            below = _layer(name) >= _layer(module)
            leaving = _layer(module) in (KERNELS, FOUNDATION) and _layer(name) != _layer(module)
            assert below and not leaving, \
                f"{module} ({LAYERS[_layer(module)][0]}) imports {name} ({LAYERS[_layer(name)][0]})"


def test_the_model_layer_uses_only_the_public_api():
    public = set(perceiver_kernels.__all__)
    for path in _files("perceiver"):
        for name in _imports(path, "perceiver", top_level_only=False):
            parts = name.split(".")
            assert parts[0] != "triton", f"{path}: imports triton"
            if parts[0] == "perceiver_kernels" and len(parts) > 1:
                assert len(parts) == 2 and parts[1] in public, f"{path}: imports {name}, not the public API"


def test_no_import_cycles_at_module_level():
    modules = {}
    for path in _files("perceiver_kernels"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {target for target in _imports(path, name, top_level_only=True) if target in modules}
             for name, path in modules.items()}
    # A package's __init__ re-exporting its children is not a cycle through them.
    graph = {name: {target for target in targets if not target.startswith(name + ".")}
             for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            assert state.get(target) != "open", "import cycle: " + " -> ".join(trail + [name, target])
            if target not in state:
                visit(target, trail + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_importing_the_packages_touches_no_gpu_and_compiles_nothing():
    script = ("import sys, torch, perceiver_kernels, perceiver\n"
              "assert not torch.cuda.is_initialized()\n"
              "assert 'perceiver_kernels.triton.kernels.attention_fwd' not in sys.modules\n"
              "assert 'triton' not in sys.modules or 'perceiver_kernels.triton.forward' not in sys.modules\n"
              "assert 'perceiver_kernels._C' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_test_name_is_defined_in_two_test_files():
    """One contract, one definition: a case a second file defines again drifts apart."""
    files_of: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                files_of.setdefault(node.name, []).append(path.name)
    twice = {name: files for name, files in files_of.items() if len(files) > 1}
    assert not twice, twice
