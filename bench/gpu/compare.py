#!/usr/bin/env python3
"""Side-by-side of the GPU step benchmark: our steps (bench/gpu/run_ours.sh's report JSON, measured.steps.<mode>)
against PyTorch + PEFT (bench/gpu/peft_step.py's JSON, one file per mode), as a markdown table.

    python3 bench/gpu/compare.py ours-qwen3-30b.json peft-lora-b1.json peft-cb-b1.json

Peak memory on both sides is what the process took on the device, read the same way: the device's used memory after
the steps minus before the model was built (cudaMemGetInfo; the caching allocator never returns memory, so this is
the peak reserved). peft_step.py records both readings (base_used_bytes, end_used_bytes); where they are missing or
the step ran out of memory, torch.cuda.max_memory_reserved() stands in. max_memory_allocated is shown alongside.
Goals (issue 10): our LoRA step at least as fast as PEFT's at no more than 60% of its peak memory; our
circuit-breaker step fits on one 80 GB H100.
"""
import json
import sys

GIB = 1 << 30
H100_BYTES = 80 * 10**9  # "80 GB": the H100's 80 GB of HBM3 (about 79.6 GiB usable as reported by the driver)


def load(path):
    with open(path) as f:
        return json.load(f)


def gib(b):
    return "-" if b is None else f"{b / GIB:.2f}"


def main(argv):
    if len(argv) < 2:
        print("usage: compare.py OURS.json PEFT-lora.json [PEFT-cb.json]", file=sys.stderr)
        return 2
    ours = load(argv[0])["measured"].get("steps", {})
    peft = {}
    for path in argv[1:]:
        d = load(path)
        peft[d.get("mode")] = d
    gpu = next((d.get("gpu") for d in peft.values() if d.get("gpu")), "unknown GPU")
    rows = ["| step | ours tokens/s | PEFT tokens/s | speed ours/PEFT | ours peak GiB | PEFT peak GiB (used / allocated) "
            "| memory ours/PEFT | predicted GiB ours / PEFT (Core) | goal | met |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    verdicts = []
    for mode in ("lora", "cb"):
        o, p = ours.get(mode), peft.get(mode)
        if o is None and p is None:
            continue
        o_ok = bool(o and o.get("ok"))
        p_ok = bool(p and p.get("ok"))
        o_tps = o.get("tokens_per_s") if o_ok else None
        p_tps = p.get("tokens_per_s") if p_ok else None
        o_peak = o.get("peak_bytes") if o_ok else None
        p_res = p.get("peak_reserved_bytes") if p else None
        if p_ok and p.get("end_used_bytes") is not None and p.get("base_used_bytes") is not None:
            p_res = p["end_used_bytes"] - p["base_used_bytes"]
        p_alloc = p.get("peak_allocated_bytes") if p else None
        speed = f"{o_tps / p_tps:.2f}x" if o_tps and p_tps else "-"
        mem = f"{o_peak / p_res:.2f}" if o_peak and p_res and p_ok else "-"
        p_text = "OOM" if p and p.get("oom") else ("failed" if p and not p_ok else "-" if p is None else f"{p_tps:.0f}")
        p_mem = f"{gib(p_res)} / {gib(p_alloc)}" + (" (at OOM)" if p and p.get("oom") else "")
        if mode == "lora":
            goal = "ours >= PEFT speed at <= 60% of its peak"
            if o_tps and p_tps and o_peak and p_res:
                met = o_tps >= p_tps and o_peak <= 0.6 * p_res
            elif o_ok and p and p.get("oom"):
                met = True  # PEFT did not fit at all
            else:
                met = None
        else:
            goal = "ours fits on one 80 GB H100"
            met = (o_peak is not None and o_peak <= H100_BYTES) if o_ok else False if o else None
        mark = "-" if met is None else ("yes" if met else "NO")
        verdicts.append((mode, mark))
        rows.append(f"| {mode} | {'-' if o_tps is None else f'{o_tps:.0f}'} | {p_text} | {speed} | {gib(o_peak)} | {p_mem} | {mem} "
                    f"| {gib(o.get('predicted_bytes')) if o else '-'} / {gib(o.get('predicted_peft_bytes')) if o else '-'} | {goal} | {mark} |")
    print(f"GPU: {gpu}; PEFT side: torch {next((d.get('torch') for d in peft.values()), '?')}, "
          f"transformers {next((d.get('transformers') for d in peft.values()), '?')}, peft {next((d.get('peft') for d in peft.values()), '?')}")
    # Decoder blocks each side ran: a cut model (BENCH_LAYERS, or the circuit-breaker truncation) is named, not hidden.
    blocks = [f"{mode} {ours[mode].get('layers', '?') if mode in ours else '-'} / {peft[mode].get('layers', '?') if mode in peft else '-'}"
              for mode in ("lora", "cb") if mode in ours or mode in peft]
    print(f"decoder blocks ours / PEFT: {'; '.join(blocks)}")
    print()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
