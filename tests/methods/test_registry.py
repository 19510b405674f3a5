"""The method registry is the one list: the policy's sections, the hosts' method table and the console's controls
come from it; the policy and the registry import no torch; the hosts name no method."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOSTS = [
    "loop/engine.py",
    "loop/trainer.py",
    "runtime/policy_runtime.py",
    "integrations.py",
    "loop/lifecycle.py",
    "loop/policy_record.py",
    "loop/lr_groups.py",
    "loop/emitter.py",
    "loop/commands.py",
]


def test_the_policy_and_the_registry_import_no_torch():
    code = "import sys, spu_engine.core.policy, spu_engine.methods.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_policy_sections_come_from_the_registry():
    from spu_engine.core.policy import SECTIONS, Policy
    from spu_engine.methods.registry import section_specs

    fields = [k for k in Policy.model_fields if k not in ("spu_policy", "run", "timeline")]
    assert fields == list(SECTIONS) == ["freeze", *section_specs(), "faults", "lr"]
    for name, spec in section_specs().items():
        assert Policy.model_fields[name].annotation is spec.settings


def test_the_methods_run_in_stage_order_and_each_reads_its_registered_section():
    from spu_engine.methods.registry import METHODS, method_classes

    assert [s.name for s in METHODS] == [
        "auto_freeze",
        "bitfit",
        "adapter",
        "ia3",
        "lora",
        "adalora",
        "selective_backprop",
        "weight_update_skipping",
        "pruning",
        "distillation",
    ]
    assert [cls.section for cls in method_classes()] == [s.section for s in METHODS]


def test_the_console_fields_are_the_registrys():
    from spu_engine.methods.registry import section_specs
    from spu_tui.widgets.control_fields import FIELDS, TITLES

    for name, spec in section_specs().items():
        assert TITLES[name] == spec.title
        shown = [(f.path, f.id, f.label) for f in FIELDS if f.section == name]
        assert shown == [(f.path, f.id, f.label) for f in spec.fields]


def _code_words(path: Path) -> set[str]:
    """Identifiers, attribute names and string constants of a module, its docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(re.findall(r"[A-Za-z_]+", node.value))
    return words


def test_the_hosts_name_no_method_and_look_up_no_hook():
    from spu_engine.methods.registry import SPECS

    names = {s.name for s in SPECS} | {s.section for s in SPECS} | {"lisa", "autofreeze", "movement"}
    for host in HOSTS:
        path = ROOT / "spu_engine" / host
        assert not (_code_words(path) & names), host
        assert not re.search(r"hasattr\(m\b|getattr\(m, \"", path.read_text(encoding="utf-8")), host
