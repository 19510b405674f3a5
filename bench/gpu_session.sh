#!/usr/bin/env bash
# Everything a GPU machine is wanted for, in one call of about 8 minutes (an H100 or H200 holds all of it at once):
#   check:   bench/gpu.sh (the engine tests on cuda, a system sample, overhead in bf16, the full row in bf16);
#   lanes:   every row of bench/fidelity.py in fp32 with SEEDS seeds each (default 3), five lanes at a time (a
#            MiniLM step leaves most of such a GPU idle); lane 1 holds full fine-tuning and every row whose claim is
#            about time, so they share one load; the lanes begin with the rows issue 29 needs first (full, magnitude,
#            movement and soft movement at 90 %), and the mean lane runs the pruning family with mean pooling.
# Rows land in $OUT/rows.jsonl as they finish, so a run cut short keeps what it did (a rerun with the same OUT
# skips them); every lane's output goes to $OUT/lanes.log, prefixed with its name.  BUDGET (seconds, default 480)
# stops what is left.
#
# A bare machine gets its packages from .dev/ where that exists (it is ignored by git):
#   .dev/whl/*.whl      wheels the machine lacks (pydantic, peft, ...), installed into /tmp/spu-site;
#   .dev/site/          the offline MiniLM package, its weights stored as fp16 (model.fp16.safetensors) to travel
#                       light and widened to fp32 here;
#   .dev/shared/data    a copy of ../shared/data, linked as ../shared.
# SPU_BENCH_VERSION names the code version in the rows where the copy has no .git.
set -uo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
BUDGET=${BUDGET:-480}
DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-1000} SEEDS=${SEEDS:-3}  # small ones: a smoke test on a CPU
END_AT=$(($(date +%s) + BUDGET))
WORK=$(mktemp -d)
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.dev/whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spu-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/spu-site:${PYTHONPATH:-}
fi
if [ -d .dev/site ]; then
  export PYTHONPATH=$PWD/.dev/site:${PYTHONPATH:-}
  "$PY" - <<'WIDEN' || exit 1
from pathlib import Path
from safetensors.torch import load_file, save_file
for half in Path(".dev/site").glob("*/model/model.fp16.safetensors"):
    tensors = load_file(half)
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, half.with_name("model.safetensors"), metadata={"format": "pt"})
    print(f"widened {half} to fp32")
WIDEN
fi
if [ -d .dev/shared ] && [ ! -e ../shared ]; then
  ln -s "$PWD/.dev/shared" ../shared || echo "cannot link ../shared: the tests will not find their data"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
DEVICE=$DEVICE "$PY" - <<'CHECK' || exit 2
import os, sys, torch, transformers, peft, pydantic
import spu_engine.loop.engine  # noqa: F401  (every import the rows need, before four lanes start)
from spu_engine.core.model_source import offline_model_dir
if os.environ["DEVICE"].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("bench/gpu_session.sh: no CUDA device here")
print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}  torch {torch.__version__}  transformers {transformers.__version__}  peft {peft.__version__}  "
      f"pydantic {pydantic.__version__}  MiniLM {offline_model_dir()}")
CHECK

left() { local n=$((END_AT - $(date +%s))); echo $((n > 1 ? n : 1)); }
lane() {  # lane NAME COMMAND...: run it in the background, its output prefixed into lanes.log
  local name=$1; shift
  ( "$@" 2>&1 | sed -u "s/^/[$name] /" >> "$OUT/lanes.log" ) &
}
fidelity() { (cd bench && timeout "$(left)" "$PY" fidelity.py --device "$DEVICE" "$@"); }
rows() {  # rows KEY...: fidelity rows in fp32 with SEEDS seeds, into rows.jsonl
  fidelity --steps "$STEPS" --seeds "$SEEDS" --only "$@" --out "$OUT/rows.jsonl" --teacher "$WORK/teacher" \
    --note "one of 6 jobs sharing the GPU"
}
after_teacher() {  # the distillation rows wait for the full row (lane time's first) and its saved model
  until grep -q '"key": "full"' "$OUT/rows.jsonl" 2>/dev/null; do
    [ "$(left)" -le 1 ] && return 1
    sleep 2
  done
  rows "$@"
}

lane check env OUT="$WORK/check" timeout "$(left)" bash bench/gpu.sh
lane time rows full prefix sb moonshot lisa autofreeze wus
lane peft rows lora dora adalora bitfit adapter ia3
lane prune rows magnitude90 movement90 soft_movement90 magnitude97 movement97 soft_movement97
lane distill after_teacher magnitude90-kd movement90-kd soft_movement90-kd magnitude97-kd movement97-kd soft_movement97-kd
lane mean rows full-mean movement90-mean soft_movement90-mean magnitude90-mean movement97-mean soft_movement97-mean \
  magnitude97-mean movement90-kd-mean soft_movement90-kd-mean magnitude90-kd-mean movement97-kd-mean \
  soft_movement97-kd-mean magnitude97-kd-mean
wait
cp "$WORK/check/device.txt" "$OUT/device.txt" 2>/dev/null
tar -czf "$OUT/check.tar.gz" -C "$WORK" check 2>/dev/null
echo "rows: $(cat "$OUT/rows.jsonl" 2>/dev/null | wc -l)  in $SECONDS s"
"$PY" - "$OUT" <<'SUMMARY'
import json, sys
from pathlib import Path
for name in ("rows.jsonl",):
    path = Path(sys.argv[1]) / name
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        print(f"seed {r.get('seed', 0)} {r['key']:22} acc {r['accuracy']:.4f}  train {r['train_s']:6.1f} s  wall {r['wall_s']:6.1f} s  "
              + " ".join(f"{100 * e['accuracy']:.1f}" for e in r["evals"]))
SUMMARY
grep -h -E "passed|failed|ratio|median" "$WORK"/check/*.log 2>/dev/null | tail -8
