#!/usr/bin/env bash
# Llama-3-8B shapes with random bf16 weights (no download): single-stream decode against the HBM
# roofline, and 256 requests (100-1024 tokens in and out, ignore_eos) against HF transformers.
source benchmarks/gpu/env.sh
timeout "${OFFLINE_TIMEOUT:-420}" python3 -m zili bench offline --model benchmarks/models/llama-3-8b \
    --load-format dummy -n 256 --input-len 100:1024 --output-len 100:1024 --pp 512 --tg 128 -r 3 \
    --max-num-seqs 256 --peers transformers --hf-dtypes bfloat16 --hf-num-prompts "${HF_PROMPTS:-64}" \
    --hf-batch-size 64 --label llama3-8b-dummy-gpu -o "$OUT/llama8b_offline.json" 2>&1 \
    | tee "$OUT/llama8b_offline.log" | grep -E "tok/s|roofline|rror|graphs|fused" | tail -20
