"""The one boundary that matters: the console imports only the torch-free side of the engine.

``spu_engine.core`` (policy, protocol, run folders, settings, run options, transport, advice, views) and each
method's ``settings`` with the registry load without torch.  The console imports nothing else of the engine (lazy
imports inside functions included), and nothing those modules load at import time is torch, transformers, peft,
datasets or safetensors.  Checked from the source and, once, by loading every console module in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from support import ROOT, import_graph

HEAVY = {"torch", "transformers", "peft", "datasets", "safetensors", "accelerate"}


def torch_free(module: str) -> bool:
    """The modules the console may import: the core, and the methods' settings with their registry."""
    parts = module.split(".")
    if module in ("spu_engine", "spu_engine.methods", "spu_engine.methods.registry", "spu_engine.methods.spec"):
        return True
    if parts[:2] == ["spu_engine", "core"]:
        return True
    return parts[:2] == ["spu_engine", "methods"] and (
        parts[-1] == "settings" or (len(parts) == 3 and is_package(module))
    )


def is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


def loaded_at_import(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports when it is loaded: not inside functions, not TYPE_CHECKING."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module or "")
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def module_file(module: str) -> Path:
    base = ROOT / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def test_the_console_imports_only_the_torch_free_side():
    graph = import_graph("spu_tui", "spu_engine")
    reached = {
        t for m, targets in graph.items() if m.startswith("spu_tui") for t in targets if t.startswith("spu_engine")
    }
    assert reached, "the walk found the console's imports of the engine"
    assert sorted(t for t in reached if not torch_free(t)) == []


def test_the_torch_free_side_loads_no_torch_and_nothing_of_the_engine_side():
    engine = import_graph("spu_engine")
    free = [m for m in engine if torch_free(m)]
    assert "spu_engine.core.policy" in free or any(m.startswith("spu_engine.core.policy.") for m in free)
    heavy = {m: sorted(n for n in loaded_at_import(module_file(m)) if n.split(".")[0] in HEAVY) for m in free}
    assert {m: h for m, h in heavy.items() if h} == {}
    outside = {
        m: sorted(t for t in loaded_at_import(module_file(m)) if t.startswith("spu_engine") and not torch_free(t))
        for m in free
    }
    assert {m: o for m, o in outside.items() if o} == {}


def test_loading_every_console_module_loads_no_torch():
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "spu_tui").rglob("*.py")
    )
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
    code += f"print(sorted(set(sys.modules) & {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
