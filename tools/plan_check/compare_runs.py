#!/usr/bin/env python3
"""Checks one run of a generated plan folder (train.py) on the GPU host; appends the result to RESULTS.json.

    compare_runs.py CS_RUN PY_RUN BASE RESULTS.json      tiny preset: losses of the C# trainer's run (CS_RUN/metrics.jsonl)
                                                         against train.py's, and train.py's adapter against the C# one
    compare_runs.py --memory NAME PY_RUN RESULTS.json    peak memory per GPU against the plan's prediction (goal: 5%)

Loss bounds as tools/gpu_smoke (CUDA fp32 against the C# CPU run, same weights, data and initial LoRA): step 1 below
1e-4 relative, steps 1-10 below 1e-3; AdamW amplifies kernel rounding over the run, so the rest is reported only.
"""
import json
import os
import sys
import warnings


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps(run):
    return [r for r in lines(os.path.join(run, "metrics.jsonl")) if "step" in r]


def memory(run):
    return next((r["memory"] for r in lines(os.path.join(run, "metrics.jsonl")) if "memory" in r), None)


def record(path, entry):
    results = json.load(open(path)) if os.path.isfile(path) else []
    results.append(entry)
    json.dump(results, open(path, "w"), indent=1)


def shapes(adapter_dir):
    from safetensors import safe_open
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def tiny(cs_run, py_run, base, out):
    cs, py = steps(cs_run), steps(py_run)
    entry = dict(run="tiny", cs_steps=len(cs), py_steps=len(py), memory=memory(py_run))
    ok = len(cs) == len(py) and len(cs) > 0
    if ok:
        rel = {k: [abs(p[k] - c[k]) / max(abs(c[k]), 1e-12) for c, p in zip(cs, py)] for k in ("loss", "retain_loss", "cb_loss")}
        entry.update(step1_rel=rel["loss"][0], steps1_10_max_rel=max(rel["loss"][:10]), run_max_rel=max(rel["loss"]),
                     part_max_rel={k: max(v[:10]) for k, v in rel.items()},
                     loss_cs=[cs[0]["loss"], cs[-1]["loss"]], loss_py=[py[0]["loss"], py[-1]["loss"]])
        ok = rel["loss"][0] < 1e-4 and max(rel["loss"][:10]) < 1e-3
    # The adapter: the C# trainer's keys and shapes (the whole model's), and PEFT loads it on the whole model cleanly.
    want, have = shapes(cs_run), shapes(py_run)
    entry["adapter_same_keys_and_shapes"] = want == have
    entry["adapter_key_diff"] = sorted(set(want) ^ set(have))[:6]
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), py_run, is_trainable=True)
        entry["peft_load_warnings"] = [str(w.message)[:300] for w in caught if "adapter" in str(w.message).lower()]
        entry["peft_trainable"] = model.get_nb_trainable_parameters()[0]
    except Exception as e:  # recorded: the summary line says what failed
        entry["peft_load_error"] = f"{type(e).__name__}: {e}"[:400]
    ok = ok and entry["adapter_same_keys_and_shapes"] and not entry.get("peft_load_error") and not entry.get("peft_load_warnings")
    entry["ok"] = ok
    record(out, entry)
    if "step1_rel" in entry:
        print(f"tiny: {'ok  ' if ok else 'FAIL'} {len(py)} steps; loss C# {entry['loss_cs'][0]:.6f} -> {entry['loss_cs'][1]:.6f}, "
              f"train.py {entry['loss_py'][0]:.6f} -> {entry['loss_py'][1]:.6f}; relative difference step 1 {entry['step1_rel']:.1e} "
              f"(bound 1e-4), steps 1-10 max {entry['steps1_10_max_rel']:.1e} (bound 1e-3), whole run max {entry['run_max_rel']:.1e} "
              f"(reported only); adapter keys/shapes as C#: {entry['adapter_same_keys_and_shapes']}; PEFT load: "
              f"{entry.get('peft_load_error') or entry.get('peft_load_warnings') or 'clean'}")
    else:
        print(f"tiny: FAIL {len(py)} train.py steps vs {len(cs)} C# steps")
    return ok


def peak(name, py_run, out):
    m = memory(py_run)
    if m is None or not m.get("predicted_per_gpu_bytes"):
        print(f"{name}: FAIL no memory line with a prediction in {py_run}/metrics.jsonl")
        return False
    measured, predicted = max(m["per_gpu_peak_allocated_bytes"]), m["predicted_per_gpu_bytes"]
    ratio = measured / predicted
    ok = abs(ratio - 1) <= 0.05
    s = steps(py_run)
    record(out, dict(run=name, ok=ok, ratio=ratio, steps=len(s), loss=[r["loss"] for r in s], **m))
    gib = 2**30
    print(f"{name}: {'ok  ' if ok else 'FAIL'} peak allocated {measured / gib:.2f} GiB (reserved "
          f"{max(m['per_gpu_peak_reserved_bytes']) / gib:.2f} GiB), plan {predicted / gib:.2f} GiB: measured/predicted "
          f"{ratio:.3f} (goal 0.95-1.05); {m['distributed_type']}, {m['processes']} process(es), {m['gpu']}")
    return ok


if __name__ == "__main__":
    a = sys.argv[1:]
    good = peak(*a[1:4]) if a and a[0] == "--memory" else tiny(*a[:4])
    sys.exit(0 if good else 1)
