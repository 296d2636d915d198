#!/usr/bin/env bash
# The CUDA paths, checked on a GPU machine in one go (a few minutes on one H100):
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (PY=python3 by default: a Python with torch + CUDA)
# The original's settings beside ours at 512 px (benchmarks/gpu_throughput.py: model throughput, compile,
# two timm backbones, whole pipeline epochs from PNGs and from the cache), then the pipeline on
# synthetic 48 px data with a DenseNet121: fp16 AMP + channels-last training with pseudo-labels,
# --resume, TTA prediction with embeddings, both submission recipes, bf16 + torch.compile, torchrun
# with NCCL (one process per GPU), and finally the test suite on the GPU. Each step's log is in
# OUT_DIR/<step>.log, one line per step in OUT_DIR/summary.txt.
set -u
OUT=${1:-gpu_check}
PY=${PY:-python3}
WORK=${WORK:-/tmp/cellpaint-gpu-check}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null) || { echo "error: $PY cannot import torch" >&2; exit 2; }
if [ "$GPUS" -lt 1 ]; then  # every step below is about CUDA: on the CPU it would only mislead
  echo "error: no CUDA device visible to $PY: gpu_check.sh checks the CUDA paths; nothing was run" >&2
  exit 2
fi
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$OUT/$name.log" | cut -c1-400
}

nvidia-smi -L | tee "$OUT/machine.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/machine.txt"

step throughput 600 $PY benchmarks/gpu_throughput.py --also timm-convnext_small,timm-efficientnetv2_rw_s --json "$OUT/throughput.json"

D=$WORK/data
step synthetic 60 $PY synthetic.py "$D" -q
COMMON=(--data "$D" --pretrained none --num-data-workers 6 --seed 1 --disp-batches 20)
TRAIN=("${COMMON[@]}" --backbone densenet121 -b 32 --lr cosine,1e-3 -e 3 --pl-epoch 2 --pl-size-func 0.5)
# --overwrite: WORK is kept between runs of this script, and a --save holding another run's files is refused
step train_fp16_channels_last 150 $PY main.py "${TRAIN[@]}" --channels-last true --save "$WORK/run/dn" --overwrite
rm -rf "$WORK/resumed" && mkdir -p "$WORK/resumed" && cp "$WORK/run/dn.1" "$WORK/resumed/dn.1"
step resume 90 $PY main.py "${TRAIN[@]}" --channels-last true --resume "$WORK/resumed/dn.1"
step resume_difference 30 $PY -c "
import torch
a = torch.load('$WORK/run/dn.2', weights_only=True)['model']; b = torch.load('$WORK/resumed/dn.2', weights_only=True)['model']
print('max |weight difference| resumed vs uninterrupted (GPU kernels are not bitwise deterministic):',
      max((a[k].float() - b[k].float()).abs().max().item() for k in a))"
step predict_tta8 120 $PY main.py "${COMMON[@]}" --mode predict --load "$WORK/run/dn" --tta 8 --save-embeddings
step submission 60 $PY make_submission.py --data "$D" -o "$WORK/run/sub.csv" "$WORK/run/dn.output"
step submission_knn 60 $PY make_submission.py --data "$D" --knn 10 --use-valid -o "$WORK/run/knn.csv" "$WORK/run/dn.embeddings"
step train_timm 150 $PY main.py "${COMMON[@]}" --backbone timm-convnext_atto -b 32 --lr cosine,1e-3 -e 2 --save "$WORK/timm/net" --overwrite
step bf16_compile 240 $PY main.py "${COMMON[@]}" --backbone smallcnn -b 64 --lr cosine,3e-3 -e 2 --precision bf16 --compile --save "$WORK/compiled/net" --overwrite
step torchrun_nccl 150 $PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" main.py "${TRAIN[@]}" --save "$WORK/ddp/dn" --overwrite
step torchrun_nccl_predict 90 $PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" main.py "${COMMON[@]}" --mode predict --load "$WORK/ddp/dn" --tta 4
cp "$WORK"/run/*.json "$WORK"/run/dn.log "$OUT"/ 2>/dev/null
step pytest "${PYTEST_SECONDS:-150}" $PY -m pytest -q -p no:cacheprovider tests
