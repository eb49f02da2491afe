"""Where a prefill of 512 tokens and a batch-1 decode step spend their time (torch.profiler), at
Llama-3-8B shapes with random weights. Prints the top kernels by device time and by host time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from zili import LLM, SamplingParams

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
llm = LLM("benchmarks/models/llama-3-8b", load_format="dummy", dtype="bfloat16", max_num_seqs=8, max_model_len=2048,
          kv_cache_memory=4 << 30, use_tune_cache=False)
one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
prompt = list(range(1000, 1512))
for i in range(3):
    llm.generate([[t + i for t in prompt]], one, use_tqdm=False)
decode = SamplingParams(max_tokens=33, ignore_eos=True, temperature=0)
llm.generate([prompt[:8]], decode, use_tqdm=False)


def table(prof, key: str, rows: int = 14) -> str:
    for k in (key, key.replace("cuda", "device")):
        try:
            return prof.key_averages().table(sort_by=k, row_limit=rows, max_name_column_width=60)
        except Exception:
            continue
    return "(no table)"


for name, prompts, params in (("prefill512", [[t + 7 for t in prompt]], one), ("decode32", [prompt[:8]], decode)):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    text = table(prof, "self_cuda_time_total") + "\n" + table(prof, "self_cpu_time_total")
    with open(f"{out_dir}/profile_{name}.txt", "w") as f:
        f.write(text)
    print(f"== {name}: top device kernels")
    print("\n".join(table(prof, "self_cuda_time_total", 10).splitlines()[:16]))
