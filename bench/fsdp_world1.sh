#!/usr/bin/env bash
# bench/gpu.sh step 5: the sharded path (FSDP2, NCCL, bf16 MixedPrecisionPolicy) at world size 1 on one GPU, and the
# same run in a plain process: both finish, and their per-step losses and step times are printed side by side.
#   bash bench/fsdp_world1.sh PYTHON OUT
set -euo pipefail
PY=$1; OUT=$2
WORK=$(mktemp -d)
"$PY" - "$WORK" <<'BUILD'
import sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from spu_engine.core.model_source import offline_model_dir
folder = Path(sys.argv[1]) / "llama"
tok = AutoTokenizer.from_pretrained(offline_model_dir())
tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
torch.manual_seed(0)
cfg = AutoConfig.for_model("llama", vocab_size=tok.vocab_size, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=512,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
tok.save_pretrained(folder)
BUILD
cat > "$WORK/policy.yaml" <<'YAML'
auto_freeze: {method: lisa, interval: 4, n_layers: 2}
timeline:
  - {step: 3, freeze: [{match: "*layers.1.mlp.up_proj.weight", trainable: false}]}
  - {step: 5, set: {peft: {method: lora, r: 8, target_modules: [q_proj, v_proj]}}}
  - {step: 6, set: {pruning: {method: magnitude, schedule: {start_step: 6, end_step: 12, every: 2, final_sparsity: 0.5}}}}
YAML
DATA=${SPU_GSM8K:-../shared/data/gsm8k}
ARGS=(-m spu_engine.cli train --model "$WORK/llama" --data "$DATA" --task sft --steps 20 --batch-size 16 --max-length 256
      --eval-every 0 --max-eval-samples 16 --lr 1e-3 --precision bf16 --policy "$WORK/policy.yaml")
"$PY" -m torch.distributed.run --nproc-per-node 1 "${ARGS[@]}" --run-dir "$WORK/fsdp" > "$OUT/fsdp-run.log" 2>&1
"$PY" "${ARGS[@]}" --run-dir "$WORK/plain" > "$OUT/plain-run.log" 2>&1
"$PY" - "$WORK" <<'COMPARE'
import json, statistics, sys
from pathlib import Path
def steps(run):
    return [json.loads(l) for l in (Path(sys.argv[1]) / run / "events.jsonl").read_text().splitlines() if json.loads(l)["type"] == "step"]
fsdp, plain = steps("fsdp"), steps("plain")
for a, b in zip(fsdp, plain):
    print(f"step {a['step']:3d}  loss fsdp {a['loss']}  plain {b['loss']}")
ratio = statistics.median(a["step_time"] for a in fsdp[3:]) / statistics.median(b["step_time"] for b in plain[3:])
print(f"step time, FSDP2 world 1 / plain process: {ratio:.3f} (median of steps 4-20)")
COMPARE
