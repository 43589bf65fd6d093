#!/usr/bin/env python3
"""transformers on CUDA next to MoeLora on CUDA, per fixture, in fp32 and bf16 (runs on the GPU host).

    python3 tools/gpu_smoke/hf_cuda_check.py BIN OUT.json FIXTURE_DIR...

For every fixture (a folder with model/ and reference.safetensors, the CPU float32 transformers reference) it runs
transformers 5.17 on the GPU in float32 and in bfloat16 on the reference inputs, and `BIN hidden-states` (MoeLora) on
the GPU in the same two dtypes, and records the masked relative error (max |a - b| over real tokens / max |b|, as
tools/gpu_smoke/compare.py) of every pair that says something:

* hf_fp32_vs_ref       transformers' own CUDA-vs-CPU difference: a large value means the model's output depends on
                       the device (e.g. a routing decision that flips on a near tie), not that MoeLora is wrong;
* ours_fp32_vs_ref, ours_fp32_vs_hf_fp32   MoeLora on CUDA against the CPU reference and against transformers on CUDA;
* hf_bf16_vs_ref, ours_bf16_vs_ref, ours_bf16_vs_hf_bf16   the bf16 error of both against fp32, and against each other:
                       a fair bf16 tolerance for MoeLora is "no worse than transformers' own bf16 error";
* per_layer            for the fp32 pairs, the error of each hidden state (where a divergence starts).
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file


def rel(a, b, mask):
    """Masked relative error of a against b; a, b: [..., B, S, F] (stacked states) or [B, S, ..., F] (hyper-connection
    streams, [B, S, streams, H]) with mask [B, S]."""
    m = mask.bool()
    a, b = a.float(), b.float()
    trailing = tuple(a.shape[: m.dim()]) == tuple(m.shape)
    while m.dim() < a.dim() - 1:
        m = m.unsqueeze(-1) if trailing else m.unsqueeze(0)
    m = m.expand(a.shape[:-1])
    d = (a - b).abs()[m]
    s = b.abs()[m]
    return float(d.max() / s.max().clamp_min(1e-12)) if d.numel() else 0.0


def states(t):
    """hidden_states as a list (stacked, or hidden_states.N for models whose states differ in shape)."""
    if "hidden_states" in t:
        return list(t["hidden_states"])
    n = sorted(int(k.split(".")[1]) for k in t if k.startswith("hidden_states."))
    return [t[f"hidden_states.{i}"] for i in n]


def hf_run(model_dir, ref, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    # As the fixture was built (discover_moe.build): the causal-LM class where transformers has one for the config,
    # else image-text-to-text (mistral4).
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except ValueError:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    model = model.cuda().eval()
    ids, mask = ref["input_ids"].cuda(), ref["attention_mask"].cuda()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    res = {"logits": out.logits.float().cpu(), "states": [h.float().cpu() for h in out.hidden_states]}
    del model
    torch.cuda.empty_cache()
    return res


def guarded(run, *args):
    """run(*args), or {"error": [message]} when it raises (as ours_run reports a failed process)."""
    try:
        return run(*args)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' forward is a result here
        torch.cuda.empty_cache()
        return {"error": [f"{type(e).__name__}: {str(e)[:300]}"]}


def ours_run(binary, fixture, dtype):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "hs.safetensors")
        p = subprocess.run([binary, "hidden-states", os.path.join(fixture, "model"), "--inputs",
                            os.path.join(fixture, "reference.safetensors"), "--device", "cuda", "--model-dtype", dtype,
                            "--dtype", "fp32", "-o", out], capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
        t = load_file(out)
        return {"logits": t["logits"], "states": states(t)}


def compare(a, b, mask):
    if "error" in a or "error" in b:
        return None
    if len(a["states"]) != len(b["states"]):
        return {"error": f"{len(a['states'])} vs {len(b['states'])} hidden states"}
    per = [rel(x, y, mask) for x, y in zip(a["states"], b["states"])]
    return {"logits": rel(a["logits"], b["logits"], mask), "hidden_states": max(per), "per_layer": per}


def main():
    binary, out_json, fixtures = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    for fx in fixtures:
        name = os.path.basename(os.path.dirname(fx.rstrip("/"))) + "/" + os.path.basename(fx.rstrip("/"))
        r = {}
        try:
            t = load_file(os.path.join(fx, "reference.safetensors"))
            mask = t["attention_mask"]
            ref = {"logits": t["logits"], "states": states(t)}
            # Each run on its own: a transformers forward that fails in bf16 (deepseek_v4 mixes fp32 and bf16 weights)
            # still leaves the fp32 comparisons.
            hf32 = guarded(hf_run, os.path.join(fx, "model"), t, torch.float32)
            hf16 = guarded(hf_run, os.path.join(fx, "model"), t, torch.bfloat16)
            o32 = ours_run(binary, fx, "fp32")
            o16 = ours_run(binary, fx, "bf16")
            r = {
                "hf_fp32_vs_ref": compare(hf32, ref, mask),
                "ours_fp32_vs_ref": compare(o32, ref, mask),
                "ours_fp32_vs_hf_fp32": compare(o32, hf32, mask),
                "hf_bf16_vs_ref": compare(hf16, ref, mask),
                "ours_bf16_vs_ref": compare(o16, ref, mask),
                "ours_bf16_vs_hf_bf16": compare(o16, hf16, mask),
            }
            for k, v in (("hf_fp32", hf32), ("hf_bf16", hf16), ("ours_fp32", o32), ("ours_bf16", o16)):
                if "error" in v:
                    r[k + "_error"] = v["error"]
        except Exception as e:  # recorded per fixture; the next one still runs
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results[name] = r
        short = {k: (round(v["logits"], 6), round(v["hidden_states"], 6)) for k, v in r.items() if isinstance(v, dict) and "logits" in v}
        errors = {k: v for k, v in r.items() if k.endswith("error")}
        print(name, short, errors or "", flush=True)
    json.dump(results, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main()
