#!/usr/bin/env bash
# The GPU figures of README "Benchmarks" and examples/iwslt14/README.md in one script for a
# 15-minute lease of one GPU (the parts' limits add up to 12 minutes, most important first; the
# time it took: docs/BENCHMARKS.md): checks of the dropout masks and of the loss from the logits on
# the device, benchmarks.cost at transformer_iwslt_de_en (fp32 and fp16), benchmarks.meta_breakdown
# with each Hessian-vector product, and short real fine-tunes (updates/s of the baseline and the
# teacher; the teacher under --bf16).
#
#   benchmarks/gpu.sh DATA_BIN LOG
#
# DATA_BIN is a fairseq-preprocess directory (e.g. runs/gettext/noisy/data-bin from
# examples/iwslt14/README.md). Each part appends its whole output to LOG as it goes and is cut at its
# own time limit (the number after its name), so a lease that ends early still returns the parts
# before it; the console gets each part's last lines. fairseq must be importable (on a machine
# without a package index: ../shared/device/setup.sh). GPU_QUICK=1 runs the fp32 parts for a few
# updates of a tiny model on the CPU: a check of the script before a lease, figures meaningless.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA=${1:?usage: benchmarks/gpu.sh DATA_BIN LOG}
LOG=${2:?usage: benchmarks/gpu.sh DATA_BIN LOG}
mkdir -p "$(dirname "$LOG")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=(--arch transformer_iwslt_de_en --share-decoder-input-output-embed --max-tokens 4096)
QUICK=${GPU_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  # a smoke run on the CPU: the small model, few updates (figures meaningless)
  MODEL=(--arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32
         --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2
         --decoder-attention-heads 2 --max-tokens 1024 --cpu)
fi

part() {  # part NAME SECONDS COMMAND...: run, append to LOG, cut at SECONDS
  local name=$1 limit=$2 start=$SECONDS here
  shift 2
  here=$(mktemp)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$here" 2>&1
  local rc=$?
  cat "$here" >>"$LOG"
  echo "=== $name: rc $rc after $((SECONDS - start))s" | tee -a "$LOG"
  grep -v "Warning\|warn(\|^  \|'_name'\|[Hh]ydra\|deprecated\|version_base\|compatability\|assume defaults\|ConfigStore\|^$" \
    "$here" | tail -25
  rm -f "$here"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, fairseq; print('torch', torch.__version__, '| fairseq', fairseq.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available())"
  nproc; date -u; } 2>&1 | tee -a "$LOG"

if [ "$QUICK" = 1 ]; then
  SWEEP=(--sweep 2:1,2:2 --replay-sweep 2:2 --dual-sweep 2:1 --chunk-sweep 2:2:2 --adam-sweep 2:1 --no-lookahead
         --periods 3)
  SWEEP16=(--sweep 2:1 --dual-sweep '' --chunk-sweep '' --adam-sweep '' --no-lookahead --periods 3)
  PAIR=(--sweep 2:2 --dual-sweep '' --chunk-sweep '' --adam-sweep '' --no-lookahead --periods 3)
  LONG=(--sweep 3:2 --dual-sweep '' --chunk-sweep '' --adam-sweep '')
  INTERVAL=3 BREAK_UPDATES=10 UPDATES=24 LOG_INTERVAL=8  # the teacher fine-tune: one meta-update (K = 20)
else
  # each run times lcm(K) updates per configuration: K = 50 and the look-ahead go separately
  SWEEP=(--sweep 20:2,20:5 --replay-sweep 20:2 --dual-sweep 20:2 --chunk-sweep 20:5:2 --adam-sweep 20:2 --no-lookahead
         --periods 3)
  SWEEP16=(--sweep 20:2,20:5 --dual-sweep '' --chunk-sweep '' --adam-sweep '' --no-lookahead --periods 3)
  PAIR=(--sweep 20:2 --replay-sweep 20:2 --dual-sweep '' --chunk-sweep '' --adam-sweep '' --no-lookahead --periods 3)
  LONG=(--sweep 50:5 --dual-sweep '' --chunk-sweep '' --adam-sweep '')
  INTERVAL=10 BREAK_UPDATES=71 UPDATES=200 LOG_INTERVAL=100
fi

# 0. the replay of an --fp16 (or --bf16) step runs its dropout in fp32: it keeps the step's masks only
# if the fused kernel draws the same mask for a half and a float tensor of one shape from one seed
[ "$QUICK" = 1 ] || part dropout-masks 30 $PY -c "
import torch
for shape in [(4096, 512), (37, 29, 512), (1001, 7)]:
    masks = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        masks.append(torch.native_dropout(torch.ones(shape, device='cuda', dtype=dtype), 0.3, True)[1])
    print(shape, 'fp16 mask == fp32 mask:', torch.equal(masks[0], masks[1]),
          '| bf16 mask == fp32 mask:', torch.equal(masks[0], masks[2]))
"
# the loss from the logits (core/losses.py) on this device: its gradient and Hessian-vector product
# against autograd through fairseq's formulation, float64 and float32
[ "$QUICK" = 1 ] || part losses-cuda 30 $PY -c "
import torch
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq_reweight.core.losses import smoothed_nll_from_logits
for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
    z = torch.randn(3000, 10000, device='cuda', dtype=dtype, requires_grad=True)
    y = torch.randint(0, 10000, (3000,), device='cuda'); y[::7] = 1
    w, u = torch.rand(3000, device='cuda', dtype=dtype), torch.randn_like(z)
    out = []
    for ours in (True, False):
        l = smoothed_nll_from_logits(z, y, 0.1, 1)[0] if ours else label_smoothed_nll_loss(
            torch.log_softmax(z, -1), y[:, None], 0.1, ignore_index=1, reduce=False)[0].view(-1)
        g, = torch.autograd.grad((l * w).sum(), z, create_graph=True)
        out.append((g.detach(), torch.autograd.grad((g * u).sum(), z)[0]))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    print(dtype, 'gradient and HVP from the logits == fairseq formulation on', torch.cuda.get_device_name())
"
# 1. the goal's figures: time and peak memory per update against plain fairseq, fp32 then fp16
# (the limits: from an H200's time to build a configuration and per update, docs/BENCHMARKS.md)
part cost-fp32 170 $PY -m benchmarks.cost "$DATA" "${MODEL[@]}" "${SWEEP[@]}"
# plain and K = 20, B = 2 in turns (kept newest step, and replayed): ordinary updates against plain's, and
# a meta-update in plain updates
part cost-fp32-interleaved 90 $PY -m benchmarks.cost "$DATA" "${MODEL[@]}" "${PAIR[@]}" --interleave
if [ "$QUICK" != 1 ]; then  # --fp16 needs a GPU here
  part cost-fp16 80 $PY -m benchmarks.cost "$DATA" "${MODEL[@]}" --fp16 "${SWEEP16[@]}"
fi
part cost-fp32-long 75 $PY -m benchmarks.cost "$DATA" "${MODEL[@]}" "${LONG[@]}"
# 2. where a meta-update's time goes on this device, with each Hessian-vector product
part breakdown 40 $PY -m benchmarks.meta_breakdown "$DATA" "${MODEL[@]}" --interval $INTERVAL \
  --updates $BREAK_UPDATES
part breakdown-fwdrev 40 $PY -m benchmarks.meta_breakdown "$DATA" "${MODEL[@]}" --interval $INTERVAL \
  --updates $BREAK_UPDATES --reweight-hvp forward-over-reverse
# 3. real fine-tunes through fairseq-train: updates/s of the baseline and the teacher (fairseq's "ups";
# the second log line is past the first epoch's one-off costs), and the teacher under --bf16
train() {  # train NAME EXTRA_FLAGS...
  local name=$1
  shift
  part "$name" 45 $PY -m fairseq_cli.train "$DATA" --user-dir fairseq_reweight --task reweight_translation \
    "${MODEL[@]}" --dropout 0.3 --criterion reweighted_cross_entropy --label-smoothing 0.1 \
    --optimizer reweight_sgd --lr 1e-3 --momentum 0.9 --lr-scheduler fixed --max-update "$UPDATES" \
    --seed 1 --num-workers 0 --no-save --disable-validation --log-format simple --log-interval $LOG_INTERVAL "$@"
}
train finetune-baseline --reweight-teacher none
train finetune-deep --reweight-teacher deep --reweight-interval 20 --reweight-backprop-steps 2
if [ "$QUICK" != 1 ]; then
  train finetune-deep-bf16 --reweight-teacher deep --reweight-interval 20 --reweight-backprop-steps 2 --bf16 \
    --max-update 60
fi
echo "=== done after ${SECONDS}s"
