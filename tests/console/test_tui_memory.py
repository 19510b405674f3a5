"""The what-if's memory line in the console: a PEFT change's preview shows device memory before -> after with its
breakdown, and a change that would not fit says so on a line of its own."""

from __future__ import annotations

import pytest

from spu_tui.app import SpuApp
from support import ScriptedLink, record_run, screen_lines

GIB = 2**30


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tokenizer):
    return record_run(tmp_path_factory, tokenizer, "memory", [], steps=4, eval_every=0)


def preview(cid: str, available: int, fits: bool) -> dict:
    """A preview as a GPU engine answers a LoRA switch (figures of a 0.5B model in bf16 with fp32 LoRA tensors)."""
    return {
        "type": "preview",
        "t": 1e12,
        "id": cid,
        "trainable": 4_400_000,
        "total": 500_000_000,
        "trainable_now": 500_000_000,
        "backward": 1.0,
        "frozen_prefix_backward": 1.0,
        "notes": [],
        "memory": {
            "where": "device",
            "before": {
                "weights": {"bf16": GIB},
                "gradients": {"bf16": GIB},
                "optimizer": {"fp32": 4 * GIB},
                "activations": 3 * GIB,
                "total": 9 * GIB,
            },
            "after": {
                "weights": {"bf16": GIB, "fp32": GIB // 8},
                "gradients": {"fp32": GIB // 8},
                "optimizer": {"fp32": GIB // 4},
                "activations": 3 * GIB,
                "total": GIB * 9 // 2,
            },
            "available": available,
            "fits": fits,
            "optimizer": "AdamW",
            "measured_step": 12,
            "checkpointing": False,
        },
    }


async def test_a_peft_preview_shows_the_memory_line_and_flags_what_would_not_fit(plain_run):
    run_dir, history = plain_run
    link = ScriptedLink()
    app = SpuApp(run_dir, history=history, link=link)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("4")  # the controls (below 160x45 the panels show one at a time)
        await pilot.pause(0.3)
        app.query_one("#peft-method").value = "lora"
        await pilot.pause(0.2)
        cmd, fields = link.sent[-1]
        assert cmd == "preview" and fields["change"]["set"]["peft"]["method"] == "lora"
        link.deliver(preview(f"c{len(link.sent)}", available=79 * GIB, fits=True))
        await pilot.pause(0.3)
        whatif = str(app.query_one("#whatif-peft").render())
        assert (
            "device memory 9.00 → 4.50 GiB (weights 1.12 bf16+fp32, grads 0.12 fp32, AdamW 0.25 fp32; "
            "activations 3.00 from step 12) of 79.0 GiB available" in whatif
        )
        assert "would not fit" not in whatif
        app.query_one("#peft-method").value = "ia3"
        await pilot.pause(0.2)
        link.deliver(preview(f"c{len(link.sent)}", available=4 * GIB, fits=False))
        await pilot.pause(0.3)
        whatif = str(app.query_one("#whatif-peft").render())
        assert "would not fit: 4.50 GiB needed, 4.00 GiB available (512 MiB short)" in whatif
        app.query_one("#whatif-peft").scroll_visible()
        await pilot.pause(0.3)
        assert any("device memory 9.00 → 4.50 GiB" in line for line in screen_lines(app))
