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

    fields = [k for k in Policy.model_fields if k not in ("spu_policy", "run", "machine", "timeline")]
    assert fields == list(SECTIONS) == ["freeze", *section_specs(), "faults", "lr", "memory"]
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


def test_the_console_sections_are_the_registrys():
    from spu_engine.methods.registry import section_specs
    from spu_tui.widgets.control_fields import CONSOLE_SECTIONS, FIELDS, TITLES

    specs = section_specs()
    assert list(TITLES) == [
        *(n for n in specs if n != "auto_freeze"),
        "lr",
        "auto_freeze",
        "memory",
    ]  # the order as before
    for name, spec in specs.items():
        assert CONSOLE_SECTIONS[name] is spec and TITLES[name] == spec.title
        shown = [(f.path, f.id, f.label) for f in FIELDS if f.section == name]
        assert shown == [(f.path, f.id, f.label) for f in spec.fields]


def test_a_method_added_to_the_registry_gets_its_section_in_the_console(monkeypatch):
    """One registry line: its section, fields and status line reach the console; the learning rates keep their place."""
    from pydantic import Field

    from spu_engine.core.validation import Section
    from spu_engine.methods import registry
    from spu_engine.methods.spec import ConsoleField, MethodSpec, SectionSpec
    from spu_tui.widgets import control_fields, controls
    from spu_tui.widgets.control_fields import console_sections, fields_from

    class Novel(Section):
        strength: float = Field(0.5, gt=0.0, le=1.0)

    spec = MethodSpec(
        "novel",
        SectionSpec(
            "novel",
            Novel,
            title="Novel method",
            fields=(ConsoleField("strength", "nv-strength", "strength"),),
            status=lambda s: f"strength {s.strength}",
        ),
        "nowhere:Novel",
    )
    monkeypatch.setattr(registry, "SPECS", (*registry.SPECS, spec))
    sections = console_sections()
    assert sections["novel"] is spec.section_spec
    assert list(sections).index("novel") < list(sections).index("lr"), "it does not decide what trains: before lr"
    monkeypatch.setattr(control_fields, "CONSOLE_SECTIONS", sections)
    [field] = [f for f in fields_from(sections) if f.section == "novel"]
    assert (field.path, field.id, field.label, field.default, field.choices) == (
        "strength",
        "nv-strength",
        "strength",
        "0.5",
        None,
    )
    assert field.problem("2") == "strength: 2.0 is out of range; allowed 0.0 < strength <= 1.0"
    monkeypatch.setattr(controls, "CONSOLE_SECTIONS", sections)
    monkeypatch.setattr(controls, "TITLES", {name: s.title for name, s in sections.items()})
    panel = controls.ControlsPanel()
    assert [w.id for w in panel.section("novel").extra] == ["now-novel"], "its status line"
    assert sections["novel"].status(Novel()) == "strength 0.5"


def test_the_console_names_no_method():
    from spu_engine.methods.registry import SPECS

    names = {s.name for s in SPECS} | {s.section for s in SPECS}
    widgets = ROOT / "spu_tui" / "widgets"
    for path in [*widgets.glob("control*.py"), widgets / "method_section.py", ROOT / "spu_tui" / "screens" / "run.py"]:
        assert not (_code_words(path) & names), (path.name, _code_words(path) & names)


def test_the_ablation_is_the_registered_methods():
    from spu_engine.methods.registry import ablated_method

    spec = ablated_method()
    assert spec is not None and spec.name == "adapter" and spec.ablates == "Houlsby adapters"
    assert spec.in_use({"method": "adapter"}) and not spec.in_use({}) and not spec.in_use({"method": "lora"})
    assert spec.switch_text({}) == "peft.method: none"


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
