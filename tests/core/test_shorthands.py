"""--peft, --prune and --freeze write the very policy the YAML sections would; a clash with --policy is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spu_engine.cli import app as spu
from spu_engine.core.policy import Policy, PolicyError
from spu_engine.core.policy_files import policy_from_yaml
from spu_engine.core.shorthands import with_shorthands


@pytest.mark.parametrize(
    ("flags", "yaml_text"),
    [
        ({"peft": "lora"}, "peft: {method: lora}"),
        ({"peft": "lora:r=4,alpha=8,use_rslora=true"}, "peft: {method: lora, r: 4, alpha: 8, use_rslora: true}"),
        ({"peft": "adapter:size=16"}, "peft: {method: adapter, size: 16}"),
        ({"prune": "magnitude:0.5"}, "pruning: {method: magnitude, schedule: {final_sparsity: 0.5}}"),
        ({"prune": "movement:80%"}, "pruning: {method: movement, schedule: {final_sparsity: 0.8}}"),
        ({"prune": "imp"}, "pruning: {method: imp}"),
        (
            {"freeze": "embeddings,0-3,*.bias"},
            "freeze: [{units: [embeddings], trainable: false}, {layers: 0-3, trainable: false}, "
            "{match: '*.bias', trainable: false}]",
        ),
        (
            {"peft": "lora:r=8", "prune": "magnitude:0.3", "freeze": "-1"},
            "peft: {method: lora, r: 8}\npruning: {method: magnitude, schedule: {final_sparsity: 0.3}}\n"
            "freeze: [{layers: [-1], trainable: false}]",
        ),
    ],
)
def test_a_shorthand_writes_the_policy_its_yaml_would(flags, yaml_text):
    from_flags = with_shorthands(Policy(), None, **flags)
    assert from_flags == policy_from_yaml(yaml_text)
    assert from_flags.to_yaml() == policy_from_yaml(yaml_text).to_yaml()


def test_a_shorthand_joins_a_policy_file_s_other_sections(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("run: {steps: 7}\nfaults: {on_nonfinite: stop}\ntimeline: [{step: 3, set: {lr: {decay: 0.9}}}]\n")
    from_flags = with_shorthands(policy_from_yaml(path.read_text()), path, peft="lora:r=4")
    assert from_flags == policy_from_yaml(path.read_text() + "peft: {method: lora, r: 4}\n")
    given = policy_from_yaml(path.read_text()).run.model_fields_set
    assert from_flags.run.model_fields_set == given  # the file's run settings stay the ones it gave


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"peft": "lora:r=0"}, "peft.r: Input should be greater than or equal to 1 (got 0)"),
        ({"peft": "lorra"}, "peft.method: Input should be 'none', 'bitfit', 'adapter', 'ia3', 'lora' or 'adalora'"),
        ({"peft": "lora:r"}, "--peft lora:r: 'r' is not key=value (e.g. lora:r=8)"),
        ({"peft": "lora:rank=4"}, "unknown key 'rank' in peft"),
        (
            {"prune": "magnitude:half"},
            "--prune magnitude:half: 'half' is no sparsity; write magnitude:0.5 or magnitude:50%",
        ),
        ({"prune": "magnitude:1.5"}, "pruning.schedule.final_sparsity: Input should be less than 1 (got 1.5)"),
        ({"prune": "imp:0.5"}, "--prune imp:0.5: imp prunes by rounds"),
        ({"freeze": " , "}, "--freeze ' , ': name units (embeddings), blocks (0-3) or parameter globs (*.bias)"),
    ],
)
def test_a_bad_shorthand_is_one_line_naming_the_key(flags, message):
    with pytest.raises(PolicyError) as err:
        with_shorthands(Policy(), None, **flags)
    assert message in str(err.value)


def test_a_shorthand_and_the_policy_file_setting_the_same_section_are_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("peft: {method: adapter}\n")
    result = CliRunner().invoke(spu, ["train", "--policy", str(path), "--peft", "lora", "--steps", "1"])
    assert result.exit_code == 2
    assert f"--peft lora: {path} has a peft: section too; say it in one place (edit the file, or leave out --peft)" in (
        " ".join(result.output.split())
    )
    resumed = CliRunner().invoke(spu, ["train", "--resume", str(tmp_path), "--prune", "magnitude:0.5"])
    assert resumed.exit_code == 2 and "a resumed run keeps its own" in resumed.output
