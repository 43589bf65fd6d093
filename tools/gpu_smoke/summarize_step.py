#!/usr/bin/env python3
"""One line from a step-benchmark result JSON (bench/gpu/peft_step.py): time, tokens/s, memory."""
import json
import sys

GiB = 2**30
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"no result ({e})")
    sys.exit(1)
head = f"{r.get('side')} {r.get('mode')} batch {r.get('batch')} x {r.get('tokens')} tokens on {r.get('gpu')}"
mem = (f"peak reserved {r.get('peak_reserved_bytes', 0) / GiB:.1f} GiB, allocated {r.get('peak_allocated_bytes', 0) / GiB:.1f} GiB, "
       f"device used at end {r.get('end_used_bytes', 0) / GiB:.1f} GiB")
if r.get("ok"):
    print(f"{head}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s; {mem}; weights {r.get('weight_bytes', 0) / GiB:.1f} GiB")
else:
    print(f"{head}: FAILED{' (out of memory)' if r.get('oom') else ''}: {r.get('error')}; {mem}")
