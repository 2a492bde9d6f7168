#!/usr/bin/env bash
# The GPU session's queue (docs/PERFORMANCE.md), one step per argument, each step's output
# under $OUT (or ./out). Run on the device machine from the source tree, torchao as a wheel:
#
#   bash benchmarks/gpu_queue.sh setup tests graphs-7b-int4          # call 1
#   bash benchmarks/gpu_queue.sh setup load-7b-int4 tune-7b-b1-quant  # call 2
#   bash benchmarks/gpu_queue.sh setup tune-1.1b-b1 tune-7b-b8        # call 3
#   bash benchmarks/gpu_queue.sh setup fuse-memory tune-7b-b1-quant    # call 4: fusing's memory; the 7 B tune again
#   bash benchmarks/gpu_queue.sh setup oracle-1.1b-b1                  # session 21: the tune against the oracle's loop rows
#
# setup installs .whl/*.whl into /tmp/site (torchao 0.18.0 for torch 2.11). The models are random
# Llamas of benchmarks/gpu_tune.py's shapes, built in /tmp/llama-{1.1b,7b} when missing.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
T0=$(date +%s)

model() {  # the model folder of a shape, built when missing
    python3 -c "import sys; sys.path[:0]=['.','benchmarks']; from pathlib import Path; from gpu_tune import SHAPES, build; build(Path('/tmp/llama-$1'), SHAPES['$1'])" >&2
    echo "/tmp/llama-$1"
}

tune() {  # NAME MODEL ARGS...: a tune as a user runs it; the report in NAME.json, its progress in NAME.log
    local name=$1 path; shift
    path=$(model "$1"); shift
    python3 -m autotune tune "$path" --prompt-len 512 --new-tokens 128 --no-cache --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    echo "rc=$? wall=$(( $(date +%s) - T0 ))" >> "$OUT/$name.log"
}

for step in "$@"; do
    echo "== $step at $(( $(date +%s) - T0 )) s" >&2
    case $step in
        setup)
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 ;;
        tests)  # the GPU-marked tests of the torchao fuse, the torchao memory estimate and the decode loop
            python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fuse.py tests/test_torchao_memory.py tests/test_gpu_decode.py \
                > "$OUT/gpu-tests.txt" 2>&1; echo "rc=$?" >> "$OUT/gpu-tests.txt" ;;
        fuse-memory)  # what fusing leaves reserved, against the memory estimate, and its GPU test
            python3 benchmarks/fuse_memory.py --out "$OUT" > "$OUT/fuse-memory.log" 2>&1
            python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fuse_memory.py >> "$OUT/fuse-memory.log" 2>&1; echo "rc=$?" >> "$OUT/fuse-memory.log" ;;
        graphs-7b-int4)  # bf16 and int4 fused with SDPA's GQA, through the loop's own graph
            python3 benchmarks/gpu_graphs.py --shape 7b --skip-transformers --steps 1 --fuse --sdpa-gqa --skip-unfused \
                --quant torchao-int4wo --budget-s 360 --out "$OUT" > "$OUT/graphs-7b.log" 2>&1 ;;
        graphs-1.1b-int4)
            python3 benchmarks/gpu_graphs.py --shape 1.1b --skip-transformers --steps 1 --fuse --sdpa-gqa --skip-unfused \
                --quant torchao-int4wo --budget-s 300 --out "$OUT" > "$OUT/graphs-1.1b.log" 2>&1 ;;
        load-7b-int4)  # what fusing torchao's int4 groups from the checkpoint costs a load
            python3 benchmarks/torchao_fuse_load.py --shape 7b --model "$(model 7b)" --kind int4 --device cuda --reps 1 \
                --out "$OUT/load-7b-int4.json" > "$OUT/load-7b-int4.log" 2>&1 ;;
        tune-7b-b1-quant) tune tune-7b-b1-quant 7b --batch-size 1 --quantization always ;;
        tune-7b-b8) tune tune-7b-b8 7b --batch-size 8 ;;
        tune-1.1b-b1) tune tune-1.1b-b1 1.1b --batch-size 1 ;;
        tune-1.1b-b8) tune tune-1.1b-b8 1.1b --batch-size 8 ;;
        oracle-1.1b-b1)  # the 1.1 B batch 1 tune, then every bf16 / fp16 SDPA candidate of its loop (fused or not, SDPA's GQA or not), one fresh process each
            python3 benchmarks/oracle.py --shape 1.1b --part compiled --procs 1 --no-screen \
                --only '*16 sdpa *static-cache+compile sync-free-loop*' --out "$OUT" > "$OUT/oracle-1.1b-b1.log" 2>&1 ;;
        *) echo "unknown step: $step" >&2; exit 2 ;;
    esac
done
echo "== done at $(( $(date +%s) - T0 )) s" >&2
