"""Dependencies run one way: ``worlds -> models / rewards / evaluate -> core (credit, flow, registry)``.

The import graph of ``src/otca`` is read with ``ast`` (imports at module level and inside functions alike; no
module is imported), then checked: no cycle, no core module names a world, the pure core imports only itself.
Imports under ``if TYPE_CHECKING:`` never run, so they count for the naming rules but not for cycles. Modules
loaded from strings (a registry's providers, the ``otca.worlds`` entry points) are late-bound on purpose and are
not edges; a string that spells a world's module in core code is caught separately.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Modules that must not import, nor name in a string, any module of otca.worlds.
CORE_PACKAGES = ("otca.models", "otca.rewards", "otca.credit", "otca.flow")
CORE_MODULES = ("otca.trainer", "otca.rollout", "otca.evaluate", "otca.config", "otca.checkpoint", "otca.dist",
                "otca.registry")
# The pure core: each may import only from these prefixes (within otca).
PURE = {
    "otca.flow": ("otca.flow", "otca.registry"),
    "otca.credit": ("otca.credit", "otca.flow", "otca.registry"),
    "otca.registry": ("otca.registry",),
}


@dataclass
class Module:
    name: str
    imports: set[str] = field(default_factory=set)  # every imported otca module, typing-only ones included
    runtime: set[str] = field(default_factory=set)  # those executed at run time (not under TYPE_CHECKING)
    strings: set[str] = field(default_factory=set)  # string constants that spell a module path of the package


def _in(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_modules(root: Path, package: str) -> dict[str, Module]:
    """Every module of ``root/package`` with the in-package modules it imports (resolved to the most specific
    existing module: ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    names = set(files)

    def resolve(base: str) -> str | None:
        while base and base not in names:
            base = base.rpartition(".")[0]
        return base or None

    modules = {}
    for name, (path, is_pkg) in files.items():
        mod = Module(name)
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{node.module}" if node.module else pkg
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(rf"{package}(\.\w+)+", node.value):
                    mod.strings.add(node.value)
            for t in targets:
                target = resolve(t) if _in(t, package) else None
                if target is None or target == name:
                    continue
                mod.imports.add(target)
                if id(node) not in typing_only:
                    mod.runtime.add(target)
        modules[name] = mod
    return modules


def find_cycle(modules: dict[str, Module]) -> list[str] | None:
    """A cycle of run-time imports as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(modules[m].runtime):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def world_violations(modules: dict[str, Module], package: str = "otca") -> list[str]:
    """'module -> world module' for every core module that imports ``<package>.worlds`` or spells one world's module."""
    worlds = f"{package}.worlds"
    core_pkgs = tuple(p.replace("otca", package, 1) for p in CORE_PACKAGES)
    core_mods = tuple(p.replace("otca", package, 1) for p in CORE_MODULES)
    bad = []
    for m in sorted(modules):
        if any(_in(m, p) for p in core_pkgs) or m in core_mods:
            bad += [f"{m} -> {t}" for t in sorted(modules[m].imports) if _in(t, worlds)]
            # a string naming one world's module (the entry-point group's name, 'otca.worlds', names none)
            bad += [f"{m} -> {t}" for t in sorted(modules[m].strings) if t.startswith(worlds + ".")]
    return bad


def purity_violations(modules: dict[str, Module], pure: dict[str, tuple[str, ...]]) -> list[str]:
    """'module -> import' for every module under a key of ``pure`` that imports outside its allowed prefixes."""
    bad = []
    for m in sorted(modules):
        for prefix, allowed in pure.items():
            if _in(m, prefix):
                bad += [f"{m} -> {t}" for t in sorted(modules[m].imports) if not any(_in(t, a) for a in allowed)]
    return bad


# ------------------------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def otca_modules() -> dict[str, Module]:
    return read_modules(SRC, "otca")


def test_the_graph_is_read(otca_modules):
    """The reader sees what it must: top-level, function-level and typing-only imports (a reader that saw nothing
    would pass every rule below)."""
    flux = otca_modules["otca.models.flux"]
    assert "otca.models.registry" in flux.runtime  # top level: register_policy
    policy = otca_modules["otca.worlds.digits.policy"]
    assert "otca.models.flux" in policy.runtime
    register = otca_modules["otca.worlds.digits.register"]
    assert "otca.worlds.digits.policy" in register.runtime  # inside the builder function
    assert "otca.config" in register.imports and "otca.config" not in register.runtime  # under TYPE_CHECKING
    assert len(otca_modules) > 40


def test_no_import_cycle(otca_modules):
    cycle = find_cycle(otca_modules)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_core_module_names_a_world(otca_modules):
    assert world_violations(otca_modules) == []


def test_the_pure_core_imports_only_itself(otca_modules):
    assert purity_violations(otca_modules, PURE) == []


# ------------------------------------------------------------------------------- the checker on a made-up package


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return read_modules(root, "pkg")


def test_a_back_edge_through_a_function_level_import_is_a_cycle(tmp_path):
    files = {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/flux.py": "from pkg.models.registry import register\n",
        "models/registry.py": "def build():\n    from pkg.worlds.policy import load\n    return load()\n",
        "worlds/__init__.py": "",
        "worlds/policy.py": "from pkg.models import flux\n\ndef load():\n    return flux\n",
    }
    modules = _write(tmp_path, files)
    cycle = find_cycle(modules)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.models.flux", "pkg.models.registry", "pkg.worlds.policy"}
    assert world_violations(modules, "pkg") == ["pkg.models.registry -> pkg.worlds.policy"]


def test_relative_typing_only_and_string_imports(tmp_path):
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n",
        "b.py": "from . import a\n",
        "rewards/__init__.py": "",
        "rewards/registry.py": "PROVIDERS = ('pkg.worlds.digits.rewards',)\n",
        "worlds/__init__.py": "",
        "worlds/digits/__init__.py": "",
        "worlds/digits/rewards.py": "from ... import a\n",
        "credit/__init__.py": "",
        "credit/x.py": "import pkg.b\n",
    }
    modules = _write(tmp_path, files)
    assert modules["pkg.b"].runtime == {"pkg.a"}
    assert modules["pkg.a"].imports == {"pkg.b"} and modules["pkg.a"].runtime == set()
    assert modules["pkg.worlds.digits.rewards"].runtime == {"pkg.a"}
    assert find_cycle(modules) is None  # a -> b only under TYPE_CHECKING
    assert world_violations(modules, "pkg") == ["pkg.rewards.registry -> pkg.worlds.digits.rewards"]
    assert purity_violations(modules, {"pkg.credit": ("pkg.credit",)}) == ["pkg.credit.x -> pkg.b"]
