"""Distillation from a teacher's logits: the loss against a hand-computed KL, a teacher that never learns, the
teacher sources, live switching, and distillation beside the other methods (tiny models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spu_engine.core.policy import Change, PolicyError
from spu_engine.core.policy_files import parse_policy
from spu_engine.methods.distillation.method import Distillation
from spu_engine.tasks.lm import LMTask
from spu_engine.tasks.qa import QATask
from support import build_tiny, tiny_config


def distill_policy(**over):
    return parse_policy({"distillation": {"enabled": True, "alpha": 0.3, "temperature": 2.0, **over}})


def distiller(engine) -> Distillation:
    return next(m for m in engine.methods if isinstance(m, Distillation))


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_teacher || p_student) per row, written out: sum p_t * (log p_t - log p_s) of the softened softmaxes."""
    p_t = torch.softmax(teacher / t, -1)
    return (p_t * (torch.log(p_t) - torch.log(torch.softmax(student / t, -1)))).sum(-1)


def test_the_loss_is_the_task_loss_mixed_with_the_hand_computed_kl(make_engine):
    engine = make_engine(policy=distill_policy())
    for _ in range(4):  # the student moves away from its step-0 teacher, so the KL is not zero
        engine.train_step()
    batch = engine.batch_of(list(range(8)))
    engine.model.eval()  # no dropout: the two computations see the same network
    got = engine.per_sample_loss(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        student = engine.model(**inputs).logits
        teacher = engine.initial_model().to(engine.device).eval()(**inputs).logits
    kl = hand_kl(student, teacher, 2.0)
    want = 0.7 * F.cross_entropy(student, batch["labels"], reduction="none") + 0.3 * 4.0 * kl
    assert kl.min() > 1e-6
    rel = (
        1e-5 if engine.device.type == "cpu" else 2e-4
    )  # a GPU's attention kernels sum in another order (6.7e-5 seen on an H200)
    assert got.detach().tolist() == pytest.approx(want.tolist(), rel=rel, abs=1e-7)


def test_the_teacher_gets_no_gradient_and_never_changes(make_engine):
    engine = make_engine(policy=distill_policy(alpha=0.9))
    teacher = distiller(engine).teacher
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    events = []
    engine.sinks.append(lambda _line, ev: events.append(ev) if ev["type"] == "step" else None)
    for _ in range(3):
        engine.train_step()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert events[-1]["distill_kl"] > 0 and "task_loss" in events[-1]


def test_qa_and_lm_kl_match_the_hand_computation():
    torch.manual_seed(0)
    s_start, s_end, t_start, t_end = (torch.randn(3, 7) for _ in range(4))
    qa = QATask.__new__(QATask)
    got = qa.per_sample_kl((s_start, s_end), (t_start, t_end), {}, 1.5)
    assert got.tolist() == pytest.approx(
        ((hand_kl(s_start, t_start, 1.5) + hand_kl(s_end, t_end, 1.5)) / 2).tolist(), rel=1e-5
    )

    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])  # row 0: two padded positions
    got = LMTask.__new__(LMTask).per_sample_kl((student,), (teacher,), {"labels": labels}, 3.0)
    per_token = hand_kl(student, teacher, 3.0)  # position i is scored when token i + 1 has a label
    assert got.tolist() == pytest.approx([per_token[0, :2].mean().item(), per_token[1, :4].mean().item()], rel=1e-5)


def test_switched_on_and_off_live_and_refused_cleanly(make_engine, tmp_path):
    engine = make_engine()
    engine.train_step()
    with pytest.raises(PolicyError, match=r"distillation.teacher: .*does not exist"):
        engine.apply_change(
            Change(set={"distillation": {"enabled": True, "teacher": str(tmp_path / "nowhere")}}), "test"
        )
    assert not engine.current.distillation.enabled and distiller(engine).teacher is None
    engine.apply_change(Change(set={"distillation": {"enabled": True}}), "test")
    assert distiller(engine).teacher is not None
    assert engine.train_step()["distill_kl"] >= 0
    engine.apply_change(Change(set={"distillation": {"enabled": False}}), "test")
    assert distiller(engine).teacher is None and "distill_kl" not in engine.train_step()


def test_a_teacher_folder_with_another_head_is_refused(make_engine, tokenizer, tmp_path):
    three = build_tiny("bert", tokenizer)
    three.config.num_labels = 3
    three.classifier = torch.nn.Linear(three.config.hidden_size, 3)
    three.save_pretrained(tmp_path / "three")
    engine = make_engine()
    with pytest.raises(PolicyError, match="has num_labels 3, the model being trained has 2"):
        engine.apply_change(Change(set={"distillation": {"enabled": True, "teacher": str(tmp_path / "three")}}), "test")


def test_a_teacher_folder_loads(make_engine, tiny_model_dir):
    engine = make_engine(policy=distill_policy(teacher=str(tiny_model_dir)))
    assert engine.train_step()["distill_kl"] > 0  # another network than the student


def test_the_initial_teacher_of_a_model_loaded_by_name_has_the_same_new_head(tokenizer, tmp_path):
    """A base model without a classification head gets a new one: the teacher, loaded again, must get the same."""
    from transformers import AutoModel

    from spu_engine.loop.engine import Engine, EngineConfig
    from support import SST2

    base = AutoModel.from_config(tiny_config("bert", vocab_size=tokenizer.vocab_size))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = EngineConfig(
        model=str(tmp_path / "base"),
        data=str(SST2),
        steps=2,
        batch_size=4,
        max_train_samples=64,
        max_eval_samples=8,
        max_length=32,
    )
    engine = Engine(config, distill_policy(), None)
    teacher = distiller(engine).teacher
    assert torch.equal(teacher.classifier.weight, engine.model.classifier.weight)
    with pytest.raises(
        PolicyError, match="has no trained classification head .*classifier.*fine-tune it on the task first"
    ):
        engine.apply_change(
            Change(set={"distillation": {"teacher": str(tmp_path / "base")}}), "test"
        )  # as a folder: refused


def test_distillation_composes_with_movement_and_selective_backprop(make_engine):
    policy = parse_policy(
        {
            "distillation": {"enabled": True},
            "selective_backprop": {"mode": "percentile", "keep": 0.5},
            "pruning": {
                "method": "movement",
                "schedule": {"end_step": 4, "every": 1, "final_sparsity": 0.5},
                "movement": {"warmup": 0.0},
            },
        }
    )
    engine = make_engine(policy=policy, steps=6)
    steps = [engine.train_step() for _ in range(6)]
    assert all(s["distill_kl"] >= 0 for s in steps)
    assert next(m for m in engine.methods if m.section == "pruning").sparsity() == pytest.approx(0.5, abs=0.01)


def test_a_loop_of_your_own_is_told_why_not(tokenizer):
    from spu_engine.integrations import attach

    model = build_tiny("bert", tokenizer)
    with pytest.raises(PolicyError, match="your loop computes its own loss"):
        attach(distill_policy(), model, torch.optim.AdamW(model.parameters()))


def test_the_preview_says_what_distillation_costs(make_engine):
    engine = make_engine()
    notes = engine.preview(Change(set={"distillation": {"enabled": True, "alpha": 0.9}}))["notes"]
    assert any(
        "one more forward per step through the teacher (the model as loaded at step 0)" in n and "0.9 x T^2" in n
        for n in notes
    )
    assert distiller(engine).teacher is None  # a preview loads nothing


def test_a_missing_teacher_in_the_timeline_is_refused_at_load_naming_the_entry(make_engine, tmp_path):
    missing = tmp_path / "no-such-teacher"
    policy = parse_policy(
        {"timeline": [{"step": 3, "set": {"distillation": {"enabled": True, "teacher": str(missing)}}}]}
    )
    with pytest.raises(PolicyError) as caught:
        make_engine(policy=policy, steps=4)  # before: trained 2 steps, then stopped at step 3
    assert str(caught.value) == (
        f"timeline[0].set.distillation.teacher: model path {str(missing)!r} does not exist (pass a local folder "
        "with config.json, or a hub id such as 'distilbert-base-uncased')"
    )


def test_a_hub_teacher_neither_cached_nor_reachable_is_refused_at_load(make_engine, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    policy = parse_policy(
        {"timeline": [{"step": 3, "set": {"distillation": {"enabled": True, "teacher": "no-org/no-such-teacher"}}}]}
    )
    with pytest.raises(
        PolicyError,
        match=r"^timeline\[0\]\.set\.distillation\.teacher: 'no-org/no-such-teacher' is not a "
        r"local folder and not in the Hugging Face cache, and the hub is offline \(HF_HUB_OFFLINE\)$",
    ):
        make_engine(policy=policy, steps=4)
