#!/usr/bin/env python3
"""Reference data for config paths the per-type tiny oracle does not reach (dense/MoE layer mixes, upstream config
keys, optional modules), plus LoRA variants on modules only some types have (JetMoE's attention experts, MiniMax's
lightning attention, MiniMax-M3's indexer and vision tower).

Run on the device machine (transformers 5.17 + peft 0.21; no network needed), from the repository root:

    HF_HUB_OFFLINE=1 python3 tools/oracle/config_variants.py --out "$OUT"

Each case starts from a type's tiny ``input_config`` in Data/oracle-moe/moe_tiny_models.json.gz, merges its overrides
(``None`` deletes a key) and writes, in the same format as discover_moe.py, ``moe_config_variants.json.gz``:
``{"models": {case: {type, input_config, config, class, modules, params, buffers, num_params, saved}},
"peft": {case: {variant: peft_record}}}``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import discover_moe as dm  # noqa: E402
import make_oracle as mo  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "tests", "MoeLora.Core.Tests", "Data", "oracle-moe")

M3_TEXT = {
    "layer_types": None,
    "mlp_layer_types": None,
    "sparse_attention_config": {"sparse_attention_freq": [0, 1, 0, 1], "sparse_num_index_heads": 2, "sparse_index_dim": 16},
    "moe_layer_freq": [0, 1, 1, 0],
}

CASES = {
    "minimax/layer_types": ("minimax", {"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]}),
    "minimax_m3_vl_text/upstream_sparse_dense": ("minimax_m3_vl_text", M3_TEXT),
    "minimax_m3_vl/upstream_sparse_dense": (
        "minimax_m3_vl",
        {"text_config": M3_TEXT, "merged_hidden_size": None, "projector_hidden_size": 48},
    ),
    "cohere2_moe/shared_dense_rms": (
        "cohere2_moe",
        {
            "num_shared_experts": 2,
            "mlp_layer_types": None,
            "layer_types": None,
            "first_k_dense_replace": 2,
            "prefix_dense_intermediate_size": 40,
            "rms_norm_eps": 1e-5,
        },
    ),
    "laguna/per_channel_gate": ("laguna", {"gating": False, "num_attention_heads_per_layer": [4, 8, 4, 2]}),
    "mellum/dense_layers": ("mellum", {"mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}),
    "axk1/no_q_lora": ("axk1", {"q_lora_rank": None, "first_k_dense_replace": 2}),
    "axk2/moe_layer_freq": ("axk2", {"mlp_layer_types": None, "first_k_dense_replace": 1, "moe_layer_freq": 2}),
    "granitemoe_swa/thetas_shared": (
        "granitemoe_swa",
        {"layer_rope_theta": [10000.0, 0, 50000.0, 10000.0], "shared_intermediate_size": 32},
    ),
    "jetmoe/attention_experts": ("jetmoe", {}),
}

# LoRA variants beyond make_oracle.tiny_variants(), on modules only some types have.
EXTRA = {
    "jetmoe/attention_experts": {
        "tp_attention_experts": {"r": 4, "lora_alpha": 8, "target_modules": [],
                                 "target_parameters": ["self_attention.experts.input_linear.weight",
                                                       "self_attention.experts.output_linear.weight"]},
        "tp_all_parallel_experts": {"r": 4, "lora_alpha": 8, "target_modules": ["kv_proj"],
                                    "target_parameters": ["input_linear.weight", "output_linear.weight"]},
        "tm_input_linear": {"r": 4, "lora_alpha": 8, "target_modules": ["input_linear"]},
        "tp_attention_rank_pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["kv_proj"],
                                      "target_parameters": ["self_attention.experts.input_linear.weight"],
                                      "rank_pattern": {"self_attention.experts.input_linear": 2}},
    },
    "minimax/layer_types": {
        "lightning": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "out_proj", "output_gate"]},
    },
    "minimax_m3_vl/upstream_sparse_dense": {
        "indexer": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "indexer.k_proj", "gate_up_proj"]},
    },
    "minimax_m3_vl_text/upstream_sparse_dense": {
        "indexer": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "indexer.k_proj", "gate_up_proj"]},
    },
}


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "sparse_attention_config":
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import torch

    tiny = json.load(gzip.open(os.path.join(DATA, "moe_tiny_models.json.gz")))["models"]
    types = json.load(open(os.path.join(DATA, "moe_types.json")))["types"]
    models, peft = {}, {}
    for case, (t, over) in CASES.items():
        if args.only and args.only not in case:
            continue
        cfg = merge(tiny[t]["input_config"], over)
        heads = types[t]["heads"]
        res = {"type": t, "input_config": cfg}
        try:
            config = mo.load_config(cfg)
            with torch.device("meta"):
                model, _ = dm.build(config, heads)
            res["config"] = mo.jsonable(config.to_dict())
            res.update(mo.tree_record(model, with_state_dict=False))
            torch.manual_seed(0)
            real, _ = dm.build(mo.load_config(cfg), heads)
            res["saved"] = dm.saved_keys(real)
            del real
        except Exception as e:
            res["error"] = mo.err_str(e)
            res["error_where"] = mo.tb_tail(6)
            models[case] = res
            print(case, "ERROR", res["error"], flush=True)
            continue
        models[case] = res
        per = {}
        variants = list(mo.tiny_variants()) + [(n, (lambda kw: lambda m: kw)(kw)) for n, kw in EXTRA.get(case, {}).items()]
        for vname, fn in variants:
            with torch.device("meta"):
                m, _ = dm.build(copy.deepcopy(config), heads)
            kwargs = fn(m)
            if kwargs is None:
                per[vname] = {"skipped": "not applicable (no such module/parameter)"}
                continue
            per[vname] = mo.peft_record(m, kwargs, meta_context=True)
        peft[case] = per
        print(case, res["class"], res["num_params"], flush=True)
        # Written after every case, so a run cut short still returns what it finished.
        mo.dump_gz(os.path.join(args.out, "moe_config_variants.json.gz"), {"versions": mo.versions(), "models": models, "peft": peft})


if __name__ == "__main__":
    main()
