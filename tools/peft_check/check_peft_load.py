#!/usr/bin/env python3
"""Load adapters saved by ``moelora train`` with real PEFT and compare with MoeLora's own runtime outputs.

Input folder (``--data``, made on the MoeLora side, see README.md):
    tinybase/                     base checkpoint (config.json, model.safetensors, tokenizer.json)
    inputs.safetensors            input_ids / attention_mask [B, S] (right- and left-padded rows)
    base_cli.safetensors          ``moelora hidden-states tinybase --inputs inputs.safetensors --layers all``
    cases.json                    {case: {"adapter": dir, "moelora_reported_trainable": n, ...}}
    <case>/adapter_config.json, adapter_model.safetensors   written by ``moelora train``
    <case>/moelora_out.safetensors    MoeLora runtime (tools/peft_check ``run``): hidden_states, logits,
                                      base_hidden_states, base_logits [+ metadata: trainable, missing_in_file]

For each case: AutoModelForCausalLM.from_pretrained(tinybase, dtype=float32) then PeftModel.from_pretrained(model,
adapter, is_trainable=True); the adapter keys PEFT expects (get_peft_model_state_dict) against the file's keys
(missing / unexpected / shape / value after load); warnings and log records raised while loading;
get_nb_trainable_parameters(); hidden states and logits against MoeLora's at attention_mask == 1 positions.
Writes ``$OUT/peft_check_verdict.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import traceback
import warnings

import torch

TOL_ABS = 1e-4  # float32 tiny model: agreement is expected at ~1e-6


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.levelname}: {record.getMessage()}"[:2000])


def _capture():
    h = _Records()
    for name in ("transformers", "peft"):
        logging.getLogger(name).addHandler(h)
    return h


def _release(h):
    for name in ("transformers", "peft"):
        logging.getLogger(name).removeHandler(h)


def compare(ref: torch.Tensor, got: torch.Tensor, mask: torch.Tensor, seq_dim_mask_shape: str):
    """Max abs / relative error over positions with attention_mask == 1 (mask [B,S] broadcast)."""
    ref = ref.double()
    got = got.double()
    if seq_dim_mask_shape == "hs":  # [L+1, B, S, H]
        m = mask.bool()[None, :, :, None].expand_as(ref)
    else:  # logits [B, S, V]
        m = mask.bool()[:, :, None].expand_as(ref)
    d = (ref - got).abs()[m]
    r = ref.abs()[m]
    out = {
        "max_abs_err": float(d.max()),
        "mean_abs_err": float(d.mean()),
        "max_abs_ref": float(r.max()),
        "max_err_over_max_ref": float(d.max() / r.max()),
        "max_rel_err_where_ref_gt_1e-2": float((d / r)[r > 1e-2].max()) if bool((r > 1e-2).any()) else None,
        "shape_ref": list(ref.shape),
        "shape_got": list(got.shape),
    }
    if seq_dim_mask_shape == "hs":
        per = []
        for i in range(ref.shape[0]):
            mi = mask.bool()[:, :, None].expand_as(ref[i])
            per.append(float((ref[i] - got[i]).abs()[mi].max()))
        out["max_abs_err_per_hidden_state"] = per
    return out


def row_report(ref_logits, got_logits, mask):
    rows = []
    for b in range(ref_logits.shape[0]):
        mb = mask[b].bool()
        rows.append(float((ref_logits[b][mb].double() - got_logits[b][mb].double()).abs().max()))
    return rows


def forward(model, ids, mask, device):
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    hs = torch.stack([h.float().cpu() for h in out.hidden_states], 0)
    return hs, out.logits.float().cpu()


def load_base(model_dir, device, attn):
    from transformers import AutoModelForCausalLM

    h = _capture()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
        )
    _release(h)
    model.to(device).eval()
    info = {k: sorted(map(str, v)) if isinstance(v, (set, list)) else str(v) for k, v in info.items()}
    return model, info, [str(x.message)[:2000] for x in w], h.records


def check_case(name, case, data, ids, mask, device, attn, moelora_base):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    adir = os.path.join(data, case["adapter"])
    res = {"adapter": case["adapter"], "device": device, "attn_implementation": attn}
    with open(os.path.join(adir, "adapter_config.json")) as f:
        res["adapter_config"] = json.load(f)
    file_sd = load_file(os.path.join(adir, "adapter_model.safetensors"))
    mo = load_file(os.path.join(adir, "moelora_out.safetensors"))
    from safetensors import safe_open

    with safe_open(os.path.join(adir, "moelora_out.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    res["moelora_runtime_meta"] = meta

    base, _, _, _ = load_base(os.path.join(data, "tinybase"), device, attn)
    h = _capture()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, adir, is_trainable=True)
    _release(h)
    pm.eval()
    res["load_warnings"] = [f"{x.category.__name__}: {str(x.message)[:3000]}" for x in w]
    res["load_log_records"] = h.records
    res["peft_config_loaded"] = json.loads(json.dumps(pm.peft_config["default"].to_dict(), default=str))

    expected = get_peft_model_state_dict(pm)
    exp_keys, file_keys = set(expected), set(file_sd)
    missing = sorted(exp_keys - file_keys)
    unexpected = sorted(file_keys - exp_keys)
    shape_mismatch = sorted(
        f"{k}: file {list(file_sd[k].shape)} vs peft {list(expected[k].shape)}"
        for k in exp_keys & file_keys
        if tuple(file_sd[k].shape) != tuple(expected[k].shape)
    )
    value_mismatch = sorted(
        k
        for k in exp_keys & file_keys
        if tuple(file_sd[k].shape) == tuple(expected[k].shape)
        and not torch.equal(file_sd[k].float(), expected[k].detach().float().cpu())
    )
    res["keys"] = {
        "file": len(file_keys),
        "peft_expects": len(exp_keys),
        "missing_in_file": missing,
        "unexpected_in_file": unexpected,
        "shape_mismatch": shape_mismatch,
        "loaded_value_differs_from_file": value_mismatch,
    }
    trainable, total = pm.get_nb_trainable_parameters()
    res["trainable"] = {
        "peft_get_nb_trainable_parameters": [int(trainable), int(total)],
        "moelora_train_reported": case.get("moelora_reported_trainable"),
        "moelora_train_reported_note": case.get("moelora_reported_note"),
        "moelora_runtime_full_model": int(meta["trainable"]) if "trainable" in meta else None,
        "file_numel": int(sum(t.numel() for t in file_sd.values())),
    }
    # Wrapped modules / parameters as PEFT built them.
    res["peft_targeted_module_names"] = sorted(getattr(pm, "targeted_module_names", []) or [])
    res["peft_targeted_parameter_names"] = sorted(getattr(pm, "targeted_parameter_names", []) or [])

    # Base model agreement (PEFT's disable_adapter == the HF base model).
    with pm.disable_adapter():
        bhs, blog = forward(pm, ids, mask, device)
    res["base_vs_moelora_base"] = {
        "hidden_states": compare(mo["base_hidden_states"], bhs, mask, "hs"),
        "logits": compare(mo["base_logits"], blog, mask, "logits"),
    }
    hs, logits = forward(pm, ids, mask, device)
    res["adapter_effect_peft"] = {"max_abs_logits_change_vs_base": float(((logits - blog).abs() * mask[:, :, None]).max())}
    res["as_loaded"] = {
        "hidden_states": compare(mo["hidden_states"], hs, mask, "hs"),
        "logits": compare(mo["logits"], logits, mask, "logits"),
        "logits_max_abs_err_per_row": row_report(mo["logits"], logits, mask),
    }
    if missing:
        # What MoeLora's runtime did on its side: no update where the file has no tensors (lora_B zeroed).
        names = dict(pm.named_parameters())
        zeroed = []
        with torch.no_grad():
            for k in missing:
                if ".lora_B." not in k:
                    continue
                pname = k.replace(".lora_B.", ".lora_B.default.")
                if pname in names:
                    res.setdefault("missing_lora_B_norm_as_loaded", {})[k] = float(names[pname].norm())
                    names[pname].zero_()
                    zeroed.append(k)
        hs2, logits2 = forward(pm, ids, mask, device)
        res["missing_lora_B_zeroed"] = {
            "zeroed": zeroed,
            "hidden_states": compare(mo["hidden_states"], hs2, mask, "hs"),
            "logits": compare(mo["logits"], logits2, mask, "logits"),
        }
    # PEFT's own save of the loaded adapter: keys and config fields against MoeLora's files.
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        re_sd = load_file(os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            re_cfg = json.load(f)
    res["peft_resave"] = {
        "keys_only_in_peft_save": sorted(set(re_sd) - file_keys),
        "keys_only_in_moelora_file": sorted(file_keys - set(re_sd)),
        "tensors_differ": sorted(k for k in set(re_sd) & file_keys if not torch.equal(re_sd[k], file_sd[k])),
        "config_fields_only_in_peft_save": sorted(set(re_cfg) - set(res["adapter_config"])),
        "config_fields_only_in_moelora": sorted(set(res["adapter_config"]) - set(re_cfg)),
        "config_values_differ": {
            k: {"moelora": res["adapter_config"][k], "peft": re_cfg[k]}
            for k in set(re_cfg) & set(res["adapter_config"])
            if json.dumps(re_cfg[k], sort_keys=True) != json.dumps(res["adapter_config"][k], sort_keys=True)
        },
    }

    def ok(c):
        return c["max_abs_err"] <= TOL_ABS

    cmp_block = res["missing_lora_B_zeroed"] if missing else res["as_loaded"]
    res["verdict"] = {
        "loads": True,
        "keys_exact": not (missing or unexpected or shape_mismatch or value_mismatch),
        "base_matches": ok(res["base_vs_moelora_base"]["hidden_states"]) and ok(res["base_vs_moelora_base"]["logits"]),
        "outputs_match_as_loaded": ok(res["as_loaded"]["hidden_states"]) and ok(res["as_loaded"]["logits"]),
        "outputs_match_after_zeroing_missing": (ok(cmp_block["hidden_states"]) and ok(cmp_block["logits"])) if missing else None,
        "trainable_matches_moelora_train": int(trainable) == case.get("moelora_reported_trainable"),
        "trainable_matches_file": int(trainable) == res["trainable"]["file_numel"],
    }
    del pm, base
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".peftcheck")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--attn", default="eager,sdpa")
    args = ap.parse_args()

    import peft
    import safetensors
    import transformers
    from safetensors.torch import load_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    verdict = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "tolerance_max_abs": TOL_ABS,
        "runs": {},
    }
    with open(os.path.join(args.data, "cases.json")) as f:
        cases = json.load(f)
    inp = load_file(os.path.join(args.data, "inputs.safetensors"))
    ids, mask = inp["input_ids"].long(), inp["attention_mask"].long()
    cli = load_file(os.path.join(args.data, "base_cli.safetensors"))

    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    for device in devices:
        for attn in args.attn.split(","):
            run_key = f"{device}/{attn}"
            run = {}
            try:
                base, info, w, recs = load_base(os.path.join(args.data, "tinybase"), device, attn)
                bhs, blog = forward(base, ids, mask, device)
                run["base_load_info"] = info
                run["base_load_warnings"] = w
                run["base_load_log_records"] = recs
                run["base_vs_moelora_hidden_states_cli"] = {
                    "hidden_states": compare(cli["hidden_states"], bhs, mask, "hs"),
                    "logits": compare(cli["logits"], blog, mask, "logits"),
                }
                del base
            except Exception:
                run["base_error"] = traceback.format_exc()
            run["cases"] = {}
            for name, case in cases.items():
                try:
                    run["cases"][name] = check_case(name, case, args.data, ids, mask, device, attn, cli)
                except Exception:
                    run["cases"][name] = {"error": traceback.format_exc()}
                c = run["cases"][name]
                print(f"[{run_key}] {name}: " + json.dumps(c.get("verdict") or c.get("error"))[:1500], flush=True)
                if "as_loaded" in c:
                    print(
                        f"    keys {json.dumps(c['keys'])[:600]}\n    trainable {c['trainable']}\n"
                        f"    base logits err {c['base_vs_moelora_base']['logits']['max_abs_err']:.3g}; as loaded: hs err "
                        f"{c['as_loaded']['hidden_states']['max_abs_err']:.3g} logits err {c['as_loaded']['logits']['max_abs_err']:.3g}"
                        f" (adapter effect {c['adapter_effect_peft']['max_abs_logits_change_vs_base']:.3g})"
                        + (
                            f"; missing-B zeroed: hs {c['missing_lora_B_zeroed']['hidden_states']['max_abs_err']:.3g} logits "
                            f"{c['missing_lora_B_zeroed']['logits']['max_abs_err']:.3g}"
                            if "missing_lora_B_zeroed" in c
                            else ""
                        )
                        + f"\n    warnings {c['load_warnings'][:3]}\n    resave {json.dumps(c['peft_resave'])[:800]}",
                        flush=True,
                    )
            verdict["runs"][run_key] = run

    # Overall: every case loads, the base agrees, and outputs agree (after zeroing LoRA that the file lacks, if any).
    summary = {}
    for run_key, run in verdict["runs"].items():
        for name, c in run["cases"].items():
            v = c.get("verdict")
            summary[f"{run_key}/{name}"] = v if v else "ERROR"
    verdict["summary"] = summary
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peft_check_verdict.json"), "w") as f:
        json.dump(verdict, f, indent=1, default=str)
    print("wrote", os.path.join(args.out, "peft_check_verdict.json"))


if __name__ == "__main__":
    main()
