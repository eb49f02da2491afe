#!/usr/bin/env bash
# GPU correctness first (make test-gpu), then a short Llama-3-8B-shaped run.
source benchmarks/gpu/env.sh
{
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
ZILI_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE tests_gpu \
    tests/unit/test_triton_cases.py 2>&1 | tee "$OUT/test_gpu.log" | tail -60
timeout "${SMOKE_TIMEOUT:-180}" python3 -m zili bench offline --model benchmarks/models/llama-3-8b --load-format dummy \
    -n 64 --input-len 100:1024 --output-len 100:1024 --pp 512 --tg 128 -r 2 --max-num-seqs 64 \
    -o "$OUT/llama8b_smoke.json" 2>&1 | tee "$OUT/llama8b_smoke.log" | grep -v "^\s*$" | tail -30
