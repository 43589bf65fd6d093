#!/usr/bin/env python3
"""Does PEFT 0.21 load the adapters `moelora adapter convert` wrote, with MoeLora's ΔW per expert?

Run from the repository root on a machine with python3, torch 2.11, transformers 5.17, peft 0.21 (no network):

    OUT=/tmp/out python3 tools/adapter_check/check_peft_convert.py

For every folder tools/adapter_check/inputs/<model>/<case> (written by tools/adapter_check/make_inputs.py with
`moelora adapter convert` from the PEFT-saved fixture adapter tests/MoeLora.Torch.Tests/Data/hf-tiny/<model>/attn_plus_experts)
it builds the tiny model from tests/MoeLora.Torch.Tests/Data/hf-tiny/<model>/model, loads the adapter with
PeftModel.from_pretrained and checks:
  * delta: every ParamWrapper's get_delta_weight equals ΔW computed here, per expert, from the per-expert source
    (per-expert, or per-expert-own-a for peft-v5-blockdiag), placed where transformers keeps gate and up
    (gpt-oss interleaves them: GptOssExperts uses gate_up[..., ::2] and [..., 1::2]) and oriented as the parameter;
  * logits: the model's logits equal those with the original fixture adapter (every case has the same ΔW);
  * load: PEFT's missing/unexpected keys (meaningful for fused files; per-expert files are renamed by PEFT on load).
Writes $OUT/adapter_check_verdict.json. Per-expert folders test PEFT's own on-load conversion of the PEFT <= 0.18
format; models whose checkpoints keep their experts fused (gpt-oss, Llama 4) have no such format, so their per-expert
folders are only used as the ΔW reference, not loaded.
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import traceback

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INPUTS = os.path.join(ROOT, "tools", "adapter_check", "inputs")
FIXTURES = os.path.join(ROOT, "tests", "MoeLora.Torch.Tests", "Data", "hf-tiny")
PREFIX = "base_model.model."
SOURCE = {"peft-v5-blockdiag": "per-expert-own-a"}
# Models whose checkpoints store the experts fused: PEFT has no per-expert format for them.
NO_PER_EXPERT_FORM = {"gpt_oss", "llama4_text"}
# transformers 5.17 GptOssExperts: gate = gate_up[..., ::2], up = gate_up[..., 1::2]; the other families concatenate.
INTERLEAVED = {"gpt_oss"}
ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def per_expert_deltas(folder: str) -> dict:
    """ΔW[(layer, expert, role)] = B @ A * alpha / r (nn.Linear orientation), from a per-expert adapter folder.

    Keyed by layer index and role (gate/up/down), because per-expert names are the checkpoint's (Mixtral:
    block_sparse_moe.experts.E.w1) while PEFT's ParamWrapper sits on the transformers-5 module (mlp.experts)."""
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        m = re.match(r"^.*\.layers\.(?P<layer>\d+)\..*\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.lora_A\.weight$", key[len(PREFIX):])
        if not m or m["proj"] not in ROLES:
            continue
        b = sd[key.replace("lora_A", "lora_B")]
        name = key[len(PREFIX):-len(".lora_A.weight")]
        r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        out[(int(m["layer"]), int(m["e"]), ROLES[m["proj"]])] = (b.double() @ a.double()) * (alpha / r)
    return out


def load_base(model: str):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, model, "model"), dtype=torch.float32).eval()


def peft_model(model: str, adapter: str):
    from peft import PeftModel
    return PeftModel.from_pretrained(load_base(model), adapter).eval()


def check_case(model: str, case: str) -> dict:
    folder = os.path.join(INPUTS, model, case)
    result = {"model": model, "case": case}
    pm = peft_model(model, folder)
    # Keys PEFT expected but the file lacks, and the other way round.
    expected = {k for k in pm.state_dict() if "lora_" in k}
    file_keys = set(load_file(os.path.join(folder, "adapter_model.safetensors")))
    norm = lambda k: re.sub(r"\.default\.", ".", k)
    expected_n = {norm(k) for k in expected}
    result["missing_in_file"] = sorted(expected_n - file_keys)[:20]
    result["unexpected_in_file"] = sorted(file_keys - expected_n)[:20]

    src_case = SOURCE.get(case, "per-expert")
    ref = per_expert_deltas(os.path.join(INPUTS, model, src_case))
    worst, compared = 0.0, 0
    for name, mod in pm.named_modules():
        pname = getattr(mod, "parameter_name", None)
        if pname is None or "default" not in getattr(mod, "lora_A", {}):
            continue
        delta = mod.get_delta_weight("default").double()
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is None or delta.dim() != 3:
            continue
        layer = int(layer.group(1))
        shape = tuple(delta.shape)
        for e in range(shape[0]):
            if pname == "gate_up_proj":
                gate, up = ref[(layer, e, "gate")], ref[(layer, e, "up")]
                if model in INTERLEAVED:
                    want = torch.stack([gate, up], 1).reshape(2 * gate.shape[0], gate.shape[1])
                else:
                    want = torch.cat([gate, up], 0)
            else:
                want = ref[(layer, e, "down")]
            got = delta[e]
            if tuple(got.shape) != tuple(want.shape):
                want = want.T  # (E, in, out) parameters (gpt-oss, Llama 4): get_delta_weight has the parameter's shape
            if tuple(got.shape) != tuple(want.shape):
                raise RuntimeError(f"{name}.{pname}[{e}]: PEFT delta {tuple(got.shape)} vs reference {tuple(want.shape)}")
            worst = max(worst, (got - want).abs().max().item())
            compared += 1
    result["experts_compared"] = compared
    result["max_abs_delta_diff"] = worst

    # Every case has the original's ΔW (own-A only doubles A and halves B of the up LoRAs), so the logits must agree.
    ids = torch.randint(0, pm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pm(input_ids=ids).logits
        orig = peft_model(model, os.path.join(FIXTURES, model, "attn_plus_experts"))(input_ids=ids).logits
    result["max_abs_logits_diff_vs_original"] = (got - orig).abs().max().item()
    ok = compared > 0 and worst <= 1e-6 and result["max_abs_logits_diff_vs_original"] <= 1e-5
    result["pass"] = bool(ok)
    return result


def main() -> int:
    import peft
    import transformers
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    verdict = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "cases": [],
    }
    for model in sorted(os.listdir(INPUTS)):
        for case in sorted(os.listdir(os.path.join(INPUTS, model))):
            if model in NO_PER_EXPERT_FORM and case.startswith("per-expert"):
                continue  # the ΔW reference of the other cases; PEFT cannot load it into this model
            try:
                verdict["cases"].append(check_case(model, case))
            except Exception as exc:  # record and go on: one verdict for every case
                verdict["cases"].append({"model": model, "case": case, "pass": False,
                                         "error": f"{type(exc).__name__}: {exc}",
                                         "trace": traceback.format_exc()[-2000:]})
            print(json.dumps({k: v for k, v in verdict["cases"][-1].items() if k != "trace"}), flush=True)
    verdict["all_pass"] = all(c["pass"] for c in verdict["cases"])
    with open(os.path.join(out_dir, "adapter_check_verdict.json"), "w") as f:
        json.dump(verdict, f, indent=1)
    print("all pass" if verdict["all_pass"] else "some cases fail", file=sys.stderr)
    return 0 if verdict["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
