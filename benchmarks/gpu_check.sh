#!/usr/bin/env bash
# The speed checks that need a CUDA GPU, in under 8 minutes; the tables go to $1.
#
#   bash benchmarks/gpu_check.sh [OUT]     (default OUT: gpu_check.txt)
#
# 1. 3,150 built-in scenes at 256 px (the tutorial's train size), 630 per class;
# 2. benchmarks/throughput.py for ResNet-18 (batch 256) and ResNet-50 (batch 128) at 224;
# 3. a 3-epoch rsscene training run of ResNet-18 at 224 (memory cache, on the GPU);
# 4. one epoch with --cache disk (batches copied up from a memory map through pinned memory);
# 5. a sync audit: host-device synchronisations per line of rsscene during training steps;
# 6. timm's recipe, the tutorial's and the default on AID-5 and SIRI-WHU-12 (peer.py);
# 7. rsscene's step eager and as CUDA graphs (--compile reduce-overhead), at two batches;
# 8. rsscene map over one 8,000 px scene, where rasterio is installed.
# Each part gets a time limit from what is left of the 8 minutes; a part that would start
# with too little time is skipped and says so.
set -uo pipefail

OUT=$(realpath -m "${1:-gpu_check.txt}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rsscene-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$((SECONDS + 8 * 60))
DATA=$WORK/scenes
SPLIT=$WORK/split
cd "$ROOT" || exit 1
: >"$OUT"

log() { echo "$*" | tee -a "$OUT"; }

# run CAP TITLE CMD...: CMD under `timeout` of at most CAP seconds and never past the deadline;
# its stdout is appended to OUT.
run() {
    local cap=$1 title=$2 left status
    shift 2
    left=$((DEADLINE - SECONDS - 5))
    ((left < cap)) && cap=$left
    log ""
    log "## $title"
    if ((cap < 20)); then
        log "skipped: only ${left}s of the 8 minutes left"
        return 1
    fi
    log "\$ $*"
    timeout --kill-after=10 "$cap" "$@" | tee -a "$OUT"
    status=${PIPESTATUS[0]}
    ((status == 124 || status == 137)) && log "stopped: over its ${cap}s limit"
    ((status != 0)) && log "exit status $status"
    return "$status"
}

python - <<'EOF' | tee -a "$OUT" || exit 1
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
print(f"# rsscene GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
EOF

# One process per class: drawing scenes is single-threaded Python.
log ""
log "## data: 5 x 630 built-in scenes at 256 px"
for cls in airplane bridge palace ship stadium; do
    timeout 150 python -m rsscene synth "$DATA" --per-class 630 --size 256 --classes "$cls" \
        >/dev/null &
done
wait
run 90 "split (symlinks, 10% test)" \
    python -m rsscene prepare "$DATA" "$SPLIT" --test-ratio 0.1 --mode symlink || exit 1

BENCH=(python benchmarks/throughput.py --data "$DATA" --device cuda --img-size 224
    --steps 15 --warmup 3)
run 150 "throughput: ResNet-18, 224 px, batch 256" \
    "${BENCH[@]}" --arch resnet18 --batch-size 256 --json "$WORK/r18.json"
run 150 "throughput: ResNet-50, 224 px, batch 128" \
    "${BENCH[@]}" --arch resnet50 --batch-size 128 --json "$WORK/r50.json"

run 120 "rsscene train: ResNet-18, 224 px, 3 epochs" \
    python -m rsscene train "$SPLIT" --arch resnet18 --img-size 224 --epochs 3 \
    --batch-size 256 --device cuda --out "$WORK/run-r18"
run 60 "rsscene train: --cache disk on CUDA, 1 epoch at 128 px" \
    python -m rsscene train "$SPLIT" --arch resnet18 --img-size 128 --epochs 1 \
    --batch-size 256 --device cuda --cache disk --out "$WORK/run-disk"

# timm's train.py recipe, the tutorial's and the default side by side on real images (AID-5,
# then SIRI-WHU-12), each with its accuracy-against-seconds figure beside OUT.
for SET in aid5 siri12; do
    if [[ -d "$ROOT/../shared/data/$SET" ]]; then
        run 150 "peer: timm, tutorial and default on $SET (cuda)" \
            python benchmarks/peer.py --data "$ROOT/../shared/data/$SET" --device cuda \
            --figure "$(dirname "$OUT")/peer-$SET-cuda.png" --json "$WORK/peer-$SET.json"
    else
        log ""
        log "## peer on $SET: skipped: ../shared/data/$SET is absent"
    fi
done

# Every synchronising CUDA call during 24 training steps, by the line of rsscene that made
# it: a line with about one per step is a stall in the hot loop (a few per 20 steps are by
# design: the loss and the stop signal are read there).
run 90 "sync audit: synchronising calls per source line, 24 steps" python - "$SPLIT" "$WORK" <<'EOF'
import collections
import sys
import warnings

import torch

from rsscene.config import build
from rsscene.engine.train import Trainer

split, work = sys.argv[1], sys.argv[2]
cfg = build({"data": split, "epochs": 1, "img_size": 224, "batch_size": 128, "device": "cuda",
             "out": f"{work}/run-sync"})
trainer = Trainer.from_config(cfg, log=lambda *_: None)
steps = (trainer.epoch_batches(0) * 3)[:24]
calls = collections.Counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    # 24 training steps, the test set's evaluation (plain and 8-way TTA), a checkpoint.
    trainer.train_epoch(0, steps)
    trainer.evaluate(trainer.data.test)
    trainer.evaluate(trainer.data.test, tta=True)
    trainer.recorder.save_now(trainer.checkpoint())
    torch.cuda.set_sync_debug_mode(0)
for w in caught:
    if "synchroniz" in str(w.message):
        calls[f"{w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1
print(f"{sum(calls.values())} synchronising calls in 24 training steps, then evaluations of"
      f" {len(trainer.data.test)} test images and a checkpoint")
for where, n in calls.most_common():
    print(f"{n:5d}  {where}")
EOF

# CUDA graphs (torch.compile's reduce-overhead) against the eager step: at the GPU default's
# batch of 64 and 192 px, where the step is launch-bound, and at throughput's 224 px, batch 256.
for SHAPE in "192 64" "224 256"; do
    read -r SIZE BATCH <<<"$SHAPE"
    for MODE in off reduce-overhead; do
        FLAGS=()
        [[ $MODE != off ]] && FLAGS=(--compile "$MODE")
        run 120 "throughput (c): ResNet-18, $SIZE px, batch $BATCH, compile $MODE" \
            python benchmarks/throughput.py --data "$DATA" --device cuda --img-size "$SIZE" \
            --batch-size "$BATCH" --steps 30 --warmup 5 --loops c "${FLAGS[@]}"
    done
done

# rsscene map on the GPU: tiles/s over one large scene, beside a per-tile loop (the geo extra:
# rasterio writes and reads the GeoTIFF).
if python -c "import rasterio" 2>/dev/null; then
    run 120 "map: one 8,000 x 8,000 px scene (cuda where map's --device auto finds it)" \
        python benchmarks/map.py --size 8000 --tile 256 --img-size 128 --batch-size 256
else
    log ""
    log "## map: skipped: rasterio (pip install 'rsscene[geo]') is not installed"
fi

# The ratios in one table: the default's accuracy and whole-run time against timm's.
python benchmarks/peer_ratios.py "$WORK"/peer-*.json | tee -a "$OUT"

log ""
log "total ${SECONDS}s"
