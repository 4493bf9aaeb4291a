#!/usr/bin/env bash
# One GPU check in one device call (≤ 8 minutes on an H100/H200): install (with the CUDA C++ extension), the CUDA
# tests (the attention kernels at edm2-s sizes in bf16 among them), the step benchmark of score / reference / fused
# eager / fused compiled / fused compiled + CUDA graph (and torch.compile's reduce-overhead) at the paper preset,
# batch 128, fp32 and bf16, channels_last rows with the time left, `profile`, the cost report, the EDM2-style edm2-s energy (batch 32, bf16: score / reference / fused eager, then
# score / fused compiled) with the time left, the sm_80/sm_90 compile check of every Triton kernel under the machine's Triton
# (`profile --ptx --largest-only`, with the time left), and a markdown table for benchmarks/RESULTS.md printed last.
# Every part has its own time limit and log under $OUT, so one that fails or runs long does not cost the others;
# the script stays within 470 s (the channels_last and compile-check parts run only if they fit).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (device `run`), writes $OUT/*
#   DRY_RUN=1 bash benchmarks/gpu_check.sh  # on the CPU: every part at the tiny preset, graph rows left out
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
  PRESET=tiny BATCH=4 SIZE=16 STEPS=3 WARMUP=1 DEVICE=cpu GRAPH="" EAGER_S=600 COMPILED_S=900 PROFILE_S=600
  LAYOUT_S=900 PTX_S=900 BUDGET_S=100000 EDM2_PRESET=edm2-tiny EDM2_BATCH=2 EDM2_STEPS=2 EDM2_S=900
  INSTALL="echo dry run: no install"
  TESTS="$PY -m pytest -q tests/test_routes_cuda.py tests/test_kernels_custom_ops.py --benchmark-disable -x"
  export TRITON_INTERPRET=1
else
  PRESET=paper BATCH=128 SIZE=64 STEPS=20 WARMUP=3 DEVICE=cuda GRAPH=",fused+compile+graph,fused+reduce-overhead"
  EAGER_S=40 COMPILED_S=95 PROFILE_S=25 LAYOUT_S=60 PTX_S=45 BUDGET_S=470
  EDM2_PRESET=edm2-s EDM2_BATCH=32 EDM2_STEPS=5 EDM2_S=60
  INSTALL="env DSM_FAST_BUILD_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e ."
  TESTS="$PY -m pytest -q tests/test_routes_cuda.py tests/test_csrc.py \
         tests/test_model_adjoint.py::test_fused_triton_route_in_the_trainers_precisions \
         tests/test_tools_parity.py::test_triton_route_agrees_with_the_release_on_cuda \
         tests/test_kernels_cosine_attention.py::test_on_the_gpu_at_edm2_sizes[bf16] \
         --benchmark-disable -p no:cacheprovider"
fi
EAGER="score,reference,fused"
COMPILED="score+compile,fused+compile$GRAPH"  # after the eager rows: a compile that hangs costs only its own part
status() { echo "[$(date +%H:%M:%S)] $1: exit $2" | tee -a "$OUT/status.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)";
  git log -1 --format='commit %h %cs'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 85 $INSTALL > "$OUT/install.log" 2>&1; status install $?
$PY -c "from dsm_fast import cuda_ext; print('cuda extension:', cuda_ext.unavailable_reason() or 'available')" \
  >> "$OUT/env.txt" 2>&1
timeout 60 $TESTS > "$OUT/tests.log" 2>&1; status tests $?
for precision in fp32 bf16; do
  [ "$DEVICE" = cpu ] && [ "$precision" = bf16 ] && continue  # bf16 autocast is CUDA-only
  for part in eager compiled; do
    if [ $part = eager ]; then routes=$EAGER limit=$EAGER_S; else routes=$COMPILED limit=$COMPILED_S; fi
    timeout "$limit" $PY -m dsm_fast bench --preset $PRESET --batch-size $BATCH --image-size $SIZE --steps $STEPS \
      --warmup $WARMUP --device $DEVICE --precision $precision --routes "$routes" \
      --json "$OUT/bench_${precision}_$part.json" > "$OUT/bench_${precision}_$part.log" 2>&1
    status "bench $precision $part" $?
  done
done
# channels_last, only with the time the parts above left (their limits and this one's stay within 470 s)
LAYOUT="score+compile+channels-last,fused+compile+channels-last"
low_precision=bf16; [ "$DEVICE" = cpu ] && low_precision=fp32
if [ $((SECONDS + LAYOUT_S + 2 * PROFILE_S + 5)) -le $BUDGET_S ]; then
  timeout "$LAYOUT_S" $PY -m dsm_fast bench --preset $PRESET --batch-size $BATCH --image-size $SIZE --steps $STEPS \
    --warmup $WARMUP --device $DEVICE --precision $low_precision --routes "$LAYOUT" \
    --json "$OUT/bench_${low_precision}_layout.json" > "$OUT/bench_layout.log" 2>&1
  status "bench $low_precision channels-last" $?
else
  status "bench channels-last skipped (time)" 0
fi
timeout "$PROFILE_S" $PY -m dsm_fast profile --preset $PRESET --batch-size $BATCH --image-size $SIZE --device $DEVICE \
  --repeat 10 --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1; status profile $?
timeout $((PROFILE_S + 5)) $PY -m dsm_fast profile --cost --json "$OUT/cost.json" > "$OUT/cost.log" 2>&1; status "profile --cost" $?
# the attention UNet energy, eager then compiled, each part only if it fits (bf16 on the GPU, fp32 in the dry run)
for part in eager compiled; do
  if [ $part = eager ]; then routes="score,reference,fused" limit=$EDM2_S; else routes="score+compile,fused+compile" limit=$((2 * EDM2_S)); fi
  if [ $((SECONDS + limit + PTX_S / 2)) -le $BUDGET_S ]; then
    timeout "$limit" $PY -m dsm_fast bench --preset $EDM2_PRESET --batch-size $EDM2_BATCH --image-size $SIZE \
      --steps $EDM2_STEPS --warmup 1 --device $DEVICE --precision $low_precision --routes "$routes" \
      --json "$OUT/bench_${low_precision}_edm2_$part.json" > "$OUT/bench_edm2_$part.log" 2>&1
    status "bench $EDM2_PRESET $part" $?
  else
    status "bench $EDM2_PRESET $part skipped (time)" 0
  fi
done
if [ $((SECONDS + PTX_S)) -le $BUDGET_S ]; then  # needs no GPU: last, with the time left
  timeout "$PTX_S" env -u TRITON_INTERPRET $PY -m dsm_fast profile --ptx --largest-only --jobs 8 \
    --json "$OUT/ptx.json" > "$OUT/ptx.log" 2>&1; status "profile --ptx" $?
else
  status "profile --ptx skipped (time)" 0
fi
$PY benchmarks/gpu_table.py "$OUT" > "$OUT/table.md" 2>&1; status table $?
tail -n 3 "$OUT/tests.log"
cat "$OUT/table.md"
