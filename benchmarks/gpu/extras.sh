#!/usr/bin/env bash
# A step profile at 8B shapes, the GPU suite, the tp=1 overhead of the tensor-parallel path (nccl),
# and `zili tune` at 8B shapes.
source benchmarks/gpu/env.sh
timeout 120 python3 benchmarks/gpu/profile_step.py "$OUT" 2>&1 | grep -v "^\s*$" | cut -c1-150 | tail -40
ZILI_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rfE tests_gpu \
    tests/unit/test_triton_cases.py 2>&1 | tee "$OUT/test_gpu.log" | tail -8
for path in plain tp; do
    flag=""; [ $path = tp ] && flag="--tp-path"
    timeout 150 python3 -m zili bench offline --model benchmarks/models/llama-3-8b --load-format dummy -n 64 \
        --input-len 128 --output-len 128 --pp 128 --tg 128 -r 2 --max-num-seqs 64 --enforce-eager --no-roofline \
        $flag --label "llama3-8b-tp1-$path" -o "$OUT/tp1_$path.json" 2>&1 | grep -E "tok/s|rror" | tail -5
done
timeout "${TUNE_TIMEOUT:-200}" python3 -m zili tune benchmarks/models/llama-3-8b --load-format dummy --dtype bfloat16 \
    --block-sizes 16,32 --repeats 3 --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" | tail -12
