"""Mean pooling under FSDP2 (two ranks, gloo, CPU mesh): the hook on the base encoder survives sharding, so two ranks
end where one process trained on the concatenated batches ends, with LoRA switched on mid-run."""

from __future__ import annotations

import json
import sys

import pytest
from ranks_support import NO_TORCHRUN, assert_same_model, run, step_losses, tiny_folders, train_args, two_ranks, weights

pytestmark = [pytest.mark.process, NO_TORCHRUN]

POLICY = "timeline:\n  - {step: 3, set: {peft: {method: lora, r: 4, alpha: 8, target_modules: [query, value]}}}\n"


def test_two_ranks_with_mean_pooling_match_one_process(tmp_path_factory, tokenizer, tmp_path):
    model = tiny_folders(tmp_path_factory, tokenizer)["bert"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    two, one = tmp_path / "two", tmp_path / "one"
    run([*two_ranks(29571), *train_args(model, "bert", two, 4, 6, policy, "--pooling", "mean")])
    run([sys.executable, *train_args(model, "bert", one, 8, 6, two / "policy.yaml")])
    assert json.loads((one / "config.json").read_text())["pooling"] == "mean"  # the policy's run: section carried it
    assert_same_model(weights(one / "checkpoints" / "step-0000006"), weights(two / "checkpoints" / "step-0000006"))
    assert step_losses(two) == pytest.approx(step_losses(one), abs=2e-5)
