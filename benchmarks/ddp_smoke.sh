#!/usr/bin/env bash
# torchrun smoke test on a CUDA machine: NCCL process group, DDP, SyncBN, one run folder.
#
#   bash benchmarks/ddp_smoke.sh [NPROC]     (default 1: one GPU)
#
# Draws 5 x 60 built-in scenes at 96 px, splits them, trains ResNet-18 for one epoch under
# torchrun (one process per GPU; under torchrun even one process joins an NCCL group and
# trains through DDP), prints the run's world size, effective batch, lr and test accuracy,
# and evaluates last.pt again in a single process: the two accuracies must agree.
# DEVICE=cpu runs the same steps with Gloo, to check the script without a GPU.
set -euo pipefail

NPROC=${1:-1}
DEVICE=${DEVICE:-cuda}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rsscene-ddp-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

python - "$DEVICE" "$NPROC" <<'EOF'
import sys
import torch
device, nproc = sys.argv[1], int(sys.argv[2])
if device == "cuda":
    assert torch.cuda.device_count() >= nproc, f"needs {nproc} CUDA GPU(s)"
    assert torch.distributed.is_nccl_available(), "this torch has no NCCL"
    print(f"# {nproc} x {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL")
else:
    print(f"# {nproc} CPU process(es), torch {torch.__version__}, Gloo")
EOF

python -m rsscene synth "$WORK/scenes" --per-class 60 --size 96 >/dev/null
python -m rsscene prepare "$WORK/scenes" "$WORK/split" --test-ratio 0.2 >/dev/null
timeout 300 python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m rsscene train "$WORK/split" --device "$DEVICE" --epochs 1 --img-size 96 \
    --batch-size 32 --sync-bn --workers 2 --out "$WORK/run"

python -m rsscene evaluate "$WORK/run/last.pt" "$WORK/split" --device "$DEVICE" --json \
    >"$WORK/evaluate.json"

python - "$WORK/run" "$WORK/evaluate.json" <<'EOF'
import json
import sys
from pathlib import Path

run, single = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
config = json.loads((run / "config.json").read_text())
report = json.loads((run / "report.json").read_text())
print(
    f"world size {config['world_size']} on {config['device']}, effective batch"
    f" {config['effective_batch']}, lr {config['lr']:g}, amp {config['amp']}"
)
print(
    f"torchrun:       test accuracy {report['test_accuracy']:.4f} on"
    f" {report['test']['images']} images, {report['train_seconds']} s of training"
)
print(f"single process: test accuracy {single['accuracy']:.4f} on {single['images']} images")
EOF
