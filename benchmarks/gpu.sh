#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md, in one command (one lease).
# Usage: OUT=/some/dir bash benchmarks/gpu.sh [part ...]   (parts: check deriv nodes
# measure simulate steps validate krylov distributed memory; default: all).  Each part writes
# $OUT/<part>.txt and is capped in time.
set -u
OUT=${OUT:-/tmp/perturb-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
parts=${*:-check deriv nodes measure simulate steps validate krylov distributed memory}
py=${PYTHON:-python3}
run() {  # name seconds command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$OUT/$name.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$OUT/$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}
for part in $parts; do
    case $part in
    check)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/check.txt"
        $py -c 'import torch; print("torch", torch.__version__)' >>"$OUT/check.txt"
        run check 150 $py benchmarks/check_gpu.py ;;
    deriv)
        run deriv 120 $py benchmarks/bench_derivatives.py --device cuda --width 16 --rows 4096 \
            --naive-rows 256 --repeat 10 ;;
    nodes)
        run nodes 150 $py benchmarks/bench_nodes.py --device cuda --rows 4096 --chunk 1024 \
            --repeat 5 ;;
    measure)
        run measure 150 $py benchmarks/bench_measure.py --device cuda --width 16 --rows 4096 \
            --skip-groups --naive-tuples 32
        run measure 150 $py benchmarks/bench_measure.py --device cuda --width 16 --rows 4096 \
            --skip-groups --naive-tuples 16 --quantities test train gap
        run measure 150 $py benchmarks/bench_measure.py --device cuda --width 16 --rows 4096 \
            --skip-groups --naive-tuples 16 --all ;;
    simulate)
        run simulate 200 $py benchmarks/bench_simulate.py --device cuda --side 28 --width 12 \
            --ks 256 --out /tmp/simulate28.md
        run simulate 120 $py benchmarks/bench_simulate.py --device cuda --ks 256 \
            --out /tmp/simulate8.md ;;
    steps)  # the SGD steps alone: final test loss on 64 rows instead of the population
        run steps 120 $py benchmarks/bench_simulate.py --device cuda --side 28 --width 12 \
            --ks 256 --test-rows 64 --out /tmp/steps28.md
        run steps 90 $py benchmarks/bench_simulate.py --device cuda --ks 256 --test-rows 64 \
            --out /tmp/steps8.md ;;
    krylov)
        run krylov 200 $py benchmarks/bench_krylov.py --device cuda --params 100000 \
            --samples 1024 --rank 512 --probes 31 --chunk-size 256 ;;
    distributed)
        run distributed 120 $py benchmarks/bench_distributed.py --device cuda
        run distributed 120 $py -m torch.distributed.run --nproc-per-node 1 \
            benchmarks/bench_distributed.py --device cuda --backend nccl ;;
    memory)
        run memory 240 $py benchmarks/bench_memory.py --device cuda --width 52 --rows 1024 \
            --chunks 16 64 256 0
        for rows in 1024 4096; do  # a 16 GB GPU, emulated
            run memory 240 $py benchmarks/bench_memory.py --device cuda --width 52 \
                --rows $rows --chunks 0 16 --memory-gib 16
        done ;;
    validate)
        run validate 240 $py -m perturb.cli validate --device cuda --out /tmp/validate
        cp /tmp/validate/results.json "$OUT/validate.json" ;;
    *)
        echo "unknown part $part (valid: check deriv nodes measure simulate steps validate krylov" \
            "distributed memory)"
        exit 2 ;;
    esac
done
tail -n 30 "$OUT"/*.txt
