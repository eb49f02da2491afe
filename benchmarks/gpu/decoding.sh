#!/usr/bin/env bash
# This wave's decoding paths on the GPU: `make test-gpu` (tests_gpu/ with speculative decoding,
# jump-forward, int8/fp8 KV caches and deterministic mode through the captured graphs, and the Triton
# kernel cases compiled for the device), then 64 sequences at Llama-3-8B shapes with a bf16 and an
# int8 KV cache (long prompts: the decode step reads more KV cache than weights).
source benchmarks/gpu/env.sh
{
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
ZILI_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE --timeout 150 \
    --durations=12 tests_gpu tests/unit/test_triton_cases.py 2>&1 | tee "$OUT/test_gpu.log" | grep -v "^\s*$" | tail -45
for kv in bfloat16 int8; do
    timeout "${BENCH_TIMEOUT:-60}" python3 -m zili bench offline --model benchmarks/models/llama-3-8b --load-format dummy \
        -n 64 --input-len 2048 --output-len 128 --max-num-seqs 64 -r 1 --no-single-stream --no-roofline \
        --kv-cache-dtype $kv --label "llama3-8b-gpu-kv-$kv" -o "$OUT/kv_$kv.json" 2>&1 | tee "$OUT/kv_$kv.log" \
        | grep -E "tok/s|rror|KV" | tail -4
done
