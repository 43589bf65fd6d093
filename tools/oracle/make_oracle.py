#!/usr/bin/env python3
"""Make extra reference ("oracle") data with the real Hugging Face libraries.

What it records (all models are built on the meta device, so no weights are allocated):

* ``tiny_models.json.gz``: module trees of tiny configs (defined in ``TINY_CONFIGS`` below) for every
  model type MoeLora supports: named_modules, named_parameters, buffers, state_dict keys, tied groups.
* ``tiny_peft.json.gz``: many LoRA variants (``tiny_variants`` below, r=4, lora_alpha=8) applied to each
  tiny model: trainable/total counts, wrapped modules, trainable shapes, the keys PEFT saves, the
  resulting peft_config, warnings, or the error PEFT raised.
* ``catalog.json.gz``: for each real config in ``configs/catalog`` the module tree (unless the project's
  older oracle ``shared/oracle/tf5.17-peft0.21`` already has it) and three LoRA variants (r=16,
  lora_alpha=32): the seed target list, ``"all-linear"``, and attention + ``target_parameters`` on the
  fused experts (only where the model has 3-D parameters).

How it was run (transformers 5.17.0, peft 0.21.0, torch 2.11, Python 3.12 on the project's GPU
device machine; the GPU itself is not used):

    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 tools/oracle/make_oracle.py all --out "$OUT" \
        --deadline 420 --workers 6

Sub-commands:
    all                 tiny + catalog (catalog LoRA in two passes, see below) and versions.json
    tiny                tiny_models.json.gz and tiny_peft.json.gz only
    catalog-meta        catalog trees + every catalog LoRA variant with get_peft_model run inside
                        ``with torch.device("meta")`` (fast: LoRA tensors are not initialised on CPU)
    catalog-job         one catalog LoRA variant, get_peft_model run normally (LoRA tensors are created
                        and initialised on the CPU, then moved to the base weights' meta device: this
                        is the path users hit, and what the older oracle timed)
    assemble            merge the catalog job outputs into catalog.json.gz
    dump-tiny-configs   write the tiny configs as JSON files (no torch needed)

In the catalog each LoRA record says which path produced it (``peft_path``: "cpu-init" or
"meta-context"); where both ran, ``meta_context_agrees`` says whether counts, wrapped modules and saved
shapes were identical.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import enum
import gzip
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
CATALOG_DIR = os.path.join(HERE, "configs", "catalog")

SEED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS_TP = ["experts.gate_up_proj", "experts.down_proj"]

# Trees already in shared/oracle/tf5.17-peft0.21 (not recorded again).
EXISTING_TREES = {
    "Qwen__Qwen3-30B-A3B",
    "deepseek-ai__DeepSeek-V2-Lite",
    "meta-llama__Llama-4-Scout-17B-16E-Instruct",
    "meta-llama__Meta-Llama-3.1-8B",
    "mistralai__Mixtral-8x7B-v0.1",
    "openai__gpt-oss-20b",
}

# Rough cost order for the CPU-init catalog jobs (largest first).
CATALOG_COST_ORDER = [
    "deepseek-ai__DeepSeek-V3",
    "Qwen__Qwen3-Next-80B-A3B-Thinking",
    "Qwen__Qwen3-235B-A22B",
    "zai-org__GLM-4.5-Air",
    "Qwen__Qwen3-30B-A3B",
    "meta-llama__Llama-4-Maverick-17B-128E-Instruct",
    "openai__gpt-oss-120b",
    "Qwen__Qwen2-57B-A14B",
    "mistralai__Mixtral-8x22B-v0.1",
    "meta-llama__Llama-4-Scout-17B-16E-Instruct",
    "deepseek-ai__DeepSeek-V2-Lite",
    "Qwen__Qwen1.5-MoE-A2.7B-Chat",
    "mistralai__Mixtral-8x7B-v0.1",
    "openai__gpt-oss-20b",
]

# ----------------------------------------------------------------------------------------------
# Tiny configs: hidden 64, 4 layers, 4 heads, 2 kv heads, vocab 128, 4 experts, top-k 2,
# dense intermediate 96, expert intermediate 48, shared-expert intermediate 80, head_dim 24 where
# a model takes an explicit head_dim (so that it differs from hidden/heads = 16).
# ----------------------------------------------------------------------------------------------
_B = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-06,
    hidden_act="silu",
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def _c(model_type, **kw):
    d = {"model_type": model_type}
    d.update(_B)
    d.update(kw)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()

_DS = dict(
    intermediate_size=96,
    moe_intermediate_size=48,
    num_key_value_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_layer_freq=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
)

TINY_CONFIGS = {
    # DBRX has its own field names (d_model, n_heads, attn_config, ffn_config); attn_config.rope_theta must be set
    # or the 5.17 DbrxAttention raises.
    "dbrx": {
        "model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 3, "max_seq_len": 256, "vocab_size": 128,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8},
        "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2},
        "tie_word_embeddings": False,
    },
    # Jamba: Mamba/attention hybrid, MoE every other layer (periods and offsets as in its config).
    "jamba": _c("jamba", num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                expert_layer_period=2, expert_layer_offset=0, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                mamba_dt_rank="auto", use_mamba_kernels=False),
    "llama": _c("llama"),
    "llama_bias": _c("llama", attention_bias=True, mlp_bias=True),
    "mistral": _c("mistral", head_dim=24, sliding_window=None),
    "qwen2": _c("qwen2"),
    "qwen2_tied": _c("qwen2", tie_word_embeddings=True),
    "qwen3": _c("qwen3", head_dim=24),
    "qwen3_no_head_dim": _c("qwen3"),
    "mixtral": _c("mixtral", num_local_experts=4, num_experts_per_tok=2),
    # MoE layer rule: i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0
    "qwen2_moe": _c(
        "qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        decoder_sparse_step=2,
        mlp_only_layers=[0],
    ),
    "qwen2_moe_mlp_only": _c(
        "qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        decoder_sparse_step=1,
        mlp_only_layers=[2],
    ),
    "qwen3_moe": _c(
        "qwen3_moe",
        head_dim=24,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        decoder_sparse_step=2,
        mlp_only_layers=[0],
    ),
    "qwen3_moe_no_head_dim": _c(
        "qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=[3],
    ),
    "olmoe": _c("olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "deepseek_v2": _c(
        "deepseek_v2",
        **dict(_DS, n_shared_experts=2, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    ),
    "deepseek_v2_q_lora": _c(
        "deepseek_v2",
        **dict(_DS, n_shared_experts=1, q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1),
    ),
    "deepseek_v3": _c(
        "deepseek_v3",
        **dict(
            _DS,
            n_shared_experts=1,
            q_lora_rank=24,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            n_group=2,
            topk_group=1,
        ),
    ),
    "llama4": {
        "model_type": "llama4",
        "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {
            "model_type": "llama4_text",
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 48,
            "intermediate_size_mlp": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "no_rope_layers": [1, 0, 1, 0],
            "use_qk_norm": True,
            "attention_chunk_size": 32,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "llama4_vision_model",
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_channels": 3,
            "image_size": 28,
            "patch_size": 14,
            "vision_output_dim": 64,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
            "pixel_shuffle_ratio": 0.5,
            "multi_modal_projector_bias": False,
            "norm_eps": 1e-05,
            "rope_theta": 10000,
            "hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
        },
    },
    "llama4_text": _c(
        "llama4_text",
        intermediate_size=48,
        intermediate_size_mlp=96,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        rope_theta=500000.0,
    ),
    "llama4_text_moe_layers": _c(
        "llama4_text",
        intermediate_size=48,
        intermediate_size_mlp=96,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        moe_layers=[1, 2],
        use_qk_norm=False,
        rope_theta=500000.0,
    ),
    "gpt_oss": _c(
        "gpt_oss",
        intermediate_size=48,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_per_token=2,
        sliding_window=16,
        attention_bias=True,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rms_norm_eps=1e-05,
        rope_theta=150000.0,
    ),
    "glm4_moe": _c(
        "glm4_moe",
        intermediate_size=96,
        moe_intermediate_size=48,
        head_dim=24,
        partial_rotary_factor=0.5,
        attention_bias=True,
        use_qk_norm=True,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    ),
    "glm4_moe_no_qk_norm": _c(
        "glm4_moe",
        intermediate_size=96,
        moe_intermediate_size=48,
        head_dim=24,
        partial_rotary_factor=0.5,
        attention_bias=False,
        use_qk_norm=False,
        n_routed_experts=4,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=2,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
    ),
    "phimoe": _c(
        "phimoe",
        num_local_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        lm_head_bias=True,
    ),
    "granitemoe": _c("granitemoe", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "granitemoeshared": _c(
        "granitemoeshared",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=48,
        shared_intermediate_size=80,
    ),
    "qwen3_next": _c(
        "qwen3_next",
        head_dim=16,
        partial_rotary_factor=0.25,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        decoder_sparse_step=1,
        mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
}

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s pid{os.getpid()}] {msg}", flush=True)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        vals = [jsonable(v) for v in x]
        try:
            return sorted(vals)
        except TypeError:
            return sorted(vals, key=str)
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return jsonable(x.value)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        try:
            return jsonable(dataclasses.asdict(x))
        except Exception:
            pass
    if hasattr(x, "to_dict"):
        try:
            return jsonable(x.to_dict())
        except Exception:
            pass
    return str(x)


def dump_gz(path, obj):
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def dump_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(f"{record.name}: {record.getMessage()}")
        except Exception:
            pass


@contextlib.contextmanager
def capture():
    """Collect Python warnings (every occurrence) and peft/transformers log records >= WARNING."""
    out = {"warnings": [], "log": []}
    handler = _ListHandler()
    loggers = [logging.getLogger("peft"), logging.getLogger("transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        try:
            yield out
        finally:
            out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in wl]
            for lg in loggers:
                lg.removeHandler(handler)
            out["log"] = list(handler.records)


def err_str(e):
    return type(e).__name__ + ": " + str(e)


def tb_tail(n=4):
    frames = traceback.extract_tb(sys.exc_info()[2])[-n:]
    return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames]


def versions():
    import platform

    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # pragma: no cover
            out[mod] = "missing: " + err_str(e)
    return out


def load_config(cfg_dict):
    """Load a config exactly as from a checkpoint folder: write config.json, AutoConfig.from_pretrained."""
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg_dict, f)
        config = AutoConfig.from_pretrained(d, trust_remote_code=False)
    # from_pretrained records the (temporary) folder as name_or_path; PEFT copies it into
    # peft_config.base_model_name_or_path. Reset it, as for a config built in memory.
    config.name_or_path = ""
    return config


def build_model(config, device="meta"):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        if config.model_type == "llama4":
            from transformers import Llama4ForConditionalGeneration

            return Llama4ForConditionalGeneration._from_config(config)
        return AutoModelForCausalLM.from_config(config)


def tree_record(model, with_state_dict=True):
    rec = {
        "class": type(model).__name__,
        "modules": [[n, type(m).__name__] for n, m in model.named_modules()],
        "params": [[n, list(p.shape)] for n, p in model.named_parameters()],
    }
    bufs = []
    for mn, m in model.named_modules():
        for bn, b in m._buffers.items():
            if b is None:
                continue
            bufs.append([f"{mn}.{bn}" if mn else bn, list(b.shape), bn not in m._non_persistent_buffers_set])
    rec["buffers"] = bufs
    rec["num_params"] = sum(p.numel() for _, p in model.named_parameters())
    groups = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    rec["tied"] = [g for g in groups.values() if len(g) > 1]
    if with_state_dict:
        try:
            rec["state_dict"] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        except Exception as e:
            rec["state_dict_error"] = err_str(e)
    return rec


def peft_record(model, kwargs, meta_context=False, full=True):
    """Apply LoraConfig(**kwargs) with get_peft_model and describe the result."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    rec = {"kwargs": jsonable(kwargs)}
    with capture() as cap:
        t = time.time()
        try:
            stage = "LoraConfig"
            lc = LoraConfig(**copy.deepcopy(kwargs))
            stage = "get_peft_model"
            if meta_context:
                with torch.device("meta"):
                    pm = get_peft_model(model, lc)
            else:
                pm = get_peft_model(model, lc)
            rec["seconds_peft"] = time.time() - t
            stage = "count"
            tr, tot = pm.get_nb_trainable_parameters()
            rec["trainable"] = int(tr)
            rec["total"] = int(tot)
            wrapped = [(n, type(m).__name__) for n, m in pm.named_modules() if hasattr(m, "lora_A")]
            rec["wrapped_count"] = len(wrapped)
            rec["wrapped"] = [n for n, _ in wrapped]
            rec["wrapped_class"] = [c for _, c in wrapped]
            # per wrapped module: [r, lora_alpha, scaling] of the default adapter
            lm = []
            for n, m in pm.named_modules():
                if hasattr(m, "lora_A"):
                    try:
                        lm.append(
                            [
                                jsonable(getattr(m, "r", {}).get("default")),
                                jsonable(getattr(m, "lora_alpha", {}).get("default")),
                                jsonable(getattr(m, "scaling", {}).get("default")),
                            ]
                        )
                    except Exception as e:
                        lm.append(err_str(e))
            rec["wrapped_r_alpha_scaling"] = lm
            try:
                from peft.utils.other import AuxiliaryTrainingWrapper

                rec["aux_wrappers"] = [
                    [n, type(m).__name__] for n, m in pm.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)
                ]
            except Exception:
                pass
            if full:
                rec["trainable_shapes"] = [[n, list(p.shape)] for n, p in pm.named_parameters() if p.requires_grad]
            stage = "peft_config"
            rec["peft_config"] = jsonable(pm.peft_config["default"].to_dict())
            stage = "get_peft_model_state_dict"
            try:
                sd = get_peft_model_state_dict(pm)
                rec["saved"] = [[k, list(v.shape)] for k, v in sd.items()]
            except Exception as e:
                rec["saved_error"] = err_str(e)
                rec["saved_error_where"] = tb_tail()
        except Exception as e:
            rec["error"] = err_str(e)
            rec["error_stage"] = stage
            rec["error_where"] = tb_tail()
            rec["seconds_peft"] = time.time() - t
    rec["warnings"] = cap["warnings"]
    rec["log"] = cap["log"]
    return rec


# ----------------------------------------------------------------------------------------------
# LoRA variants for the tiny models (r=4, lora_alpha=8 unless stated)
# ----------------------------------------------------------------------------------------------
def _first_layer0_linear(model):
    import torch

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers.0." in n and "vision" not in n:
            return n
    return None


def _first_3d_param(model):
    cands = [n for n, p in model.named_parameters() if p.dim() == 3 and "vision" not in n]
    for n in cands:
        if ".layers.1." in n:
            return n
    return cands[0] if cands else None


def tiny_variants():
    V = []

    def add(name, fn):
        V.append((name, fn))

    def const(**kw):
        return lambda model: dict(r=4, lora_alpha=8, **kw)

    add("seed", const(target_modules=list(SEED)))
    add("all_linear", const(target_modules="all-linear"))
    add("attn_plus_experts", const(target_modules=list(QKVO), target_parameters=list(EXPERTS_TP)))
    add("regex_qv", const(target_modules=r".*\.(q_proj|v_proj)"))
    add("seed_layers_1_2", const(target_modules=list(SEED), layers_to_transform=[1, 2]))
    add(
        "seed_layers_1_2_pattern",
        const(target_modules=list(SEED), layers_to_transform=[1, 2], layers_pattern="layers"),
    )
    add("seed_exclude_o", const(target_modules=list(SEED), exclude_modules=["o_proj"]))
    add("seed_exclude_regex_layer0", const(target_modules=list(SEED), exclude_modules=r".*\.layers\.0\..*"))
    add("seed_exclude_regex_o_down", const(target_modules=list(SEED), exclude_modules=r".*\.(o_proj|down_proj)"))
    add(
        "rank_alpha_pattern",
        const(
            target_modules=list(SEED),
            rank_pattern={"q_proj": 8, "down_proj": 2, r".*\.gate_up_proj": 16},
            alpha_pattern={"v_proj": 32},
        ),
    )
    add("dora_qv", const(target_modules=["q_proj", "v_proj"], use_dora=True))
    add("rslora", const(target_modules=list(SEED), use_rslora=True))
    add("bias_lora_only", const(target_modules=list(SEED), bias="lora_only"))
    add("bias_all", const(target_modules=list(SEED), bias="all"))
    add("qv_modules_to_save_lm_head", const(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    add(
        "q_modules_to_save_embed_tying",
        const(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    )
    add("lm_head", const(target_modules=["lm_head"]))
    add("lm_head_ensure_tying", const(target_modules=["lm_head"], ensure_weight_tying=True))
    add("embed_tokens", const(target_modules=["embed_tokens"]))
    add("embed_tokens_dora", const(target_modules=["embed_tokens"], use_dora=True))
    add("w1_w2_w3", const(target_modules=["w1", "w2", "w3"]))
    add("gate", const(target_modules=["gate"]))
    add("router", const(target_modules=["router"]))
    add("tp_gate_weight", const(target_modules=[], target_parameters=["gate.weight"]))
    add("tp_router_weight", const(target_modules=[], target_parameters=["router.weight"]))
    add("mlp_trio", const(target_modules=["gate_proj", "up_proj", "down_proj"]))
    add("up_down_only", const(target_modules=["up_proj", "down_proj"]))
    add("shared_expert", const(target_modules=["shared_expert.gate_proj", "shared_expert_gate"]))
    add("shared_experts_deepseek", const(target_modules=["shared_experts.gate_proj", "shared_experts.down_proj"]))

    def exact_layer0(model):
        n = _first_layer0_linear(model)
        if n is None:
            return None
        return dict(r=4, lora_alpha=8, target_modules=[n], layers_to_transform=[1])

    add("exact_layer0_name_with_layers_1", exact_layer0)
    add("target_modules_none", const(target_modules=None))
    add("target_modules_none_with_tp", const(target_modules=None, target_parameters=list(EXPERTS_TP)))
    add("tp_only", const(target_modules=[], target_parameters=list(EXPERTS_TP)))
    add("tp_gate_up_only", const(target_modules=[], target_parameters=["experts.gate_up_proj"]))

    def tp_exact(model):
        n = _first_3d_param(model)
        if n is None:
            return None
        return dict(r=4, lora_alpha=8, target_modules=[], target_parameters=[n])

    add("tp_exact_full_name", tp_exact)
    add(
        "attn_experts_rank_pattern",
        const(
            target_modules=list(QKVO),
            target_parameters=list(EXPERTS_TP),
            rank_pattern={"experts.gate_up_proj": 1, "down_proj": 2},
            alpha_pattern={"experts.down_proj": 3},
        ),
    )
    add(
        "dropout_with_tp",
        const(target_modules=list(QKVO), target_parameters=list(EXPERTS_TP), lora_dropout=0.1),
    )
    add(
        "m3_ltt0_exclude_tp",
        const(
            target_modules=["q_proj"],
            target_parameters=["experts.down_proj"],
            layers_to_transform=[0],
            exclude_modules=["down_proj"],
        ),
    )
    add("all_linear_exclude_o", const(target_modules="all-linear", exclude_modules=["o_proj"]))
    add("all_linear_layers_1", const(target_modules="all-linear", layers_to_transform=[1]))
    add("regex_q_mlp", const(target_modules=r".*\.(q_proj|gate_proj|up_proj|down_proj)"))
    add("dora_seed", const(target_modules=list(SEED), use_dora=True))
    add("lora_bias_qv", const(target_modules=["q_proj", "v_proj"], lora_bias=True))
    add("lora_bias_seed", const(target_modules=list(SEED), lora_bias=True))
    add("exclude_everything", const(target_modules=["q_proj"], exclude_modules=["q_proj"]))
    # DBRX names: fused Wqkv, out_proj, router.layer (nn.Linear), 2-D expert parameters experts.mlp.{w1,v1,w2}.
    add("dbrx_attn", const(target_modules=["Wqkv", "out_proj"]))
    add("dbrx_attn_experts", const(target_modules=["Wqkv", "out_proj"], target_parameters=["mlp.w1", "mlp.v1", "mlp.w2"]))
    add("dbrx_router_layer", const(target_modules=["layer"]))
    add("dbrx_experts_ltt", const(target_modules=["Wqkv"], target_parameters=["experts.mlp.w2"], layers_to_transform=[1]))
    add(
        "lm_head_modules_to_save_tying",
        const(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    )
    add("embed_and_lm_head_tying", const(target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True))
    add("embed_and_lm_head", const(target_modules=["embed_tokens", "lm_head"]))

    def full_names_ltt1(model):
        import torch

        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and "vision" not in n
        ]
        if not names:
            return None
        # >= 20 entries triggers PEFT's _find_minimal_target_modules compression
        return dict(r=4, lora_alpha=8, target_modules=names, layers_to_transform=[1])

    add("full_names_all_layer_linears_ltt1", full_names_ltt1)

    def full_names_q_ltt1(model):
        import torch

        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(".q_proj") and "vision" not in n
        ]
        if not names:
            return None
        return dict(r=4, lora_alpha=8, target_modules=names, layers_to_transform=[1])

    add("full_names_q_proj_ltt1", full_names_q_ltt1)
    add("r64_seed", lambda model: dict(r=64, lora_alpha=128, target_modules=list(SEED)))
    # LoraConfig options MoeLora plans (issue 9, item 5). Expected from PEFT 0.21's source; these check it.
    add("init_false_seed", const(target_modules=list(SEED), init_lora_weights=False))
    add("init_gaussian_seed", const(target_modules=list(SEED), init_lora_weights="gaussian"))
    add("init_orthogonal_qv", const(target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal"))
    add("init_orthogonal_r3_error", lambda model: dict(r=3, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    add("init_unknown_error", const(target_modules=["q_proj"], init_lora_weights="kaiming"))
    add("init_unknown_embed_only", const(target_modules=["embed_tokens"], init_lora_weights="kaiming"))
    # MiCA: lora_B frozen (trainable drops by out*r per Linear, dim*r per Embedding), still saved.
    add("mica_seed", const(target_modules=list(SEED), init_lora_weights="mica"))
    add("mica_embed_lm_head", const(target_modules=["embed_tokens", "lm_head"], init_lora_weights="mica"))
    add("mica_mixed_case_qv", const(target_modules=["q_proj", "v_proj"], init_lora_weights="MiCA"))
    add("mica_dora_error", const(target_modules=["q_proj"], init_lora_weights="mica", use_dora=True))
    add("mica_tp_error", const(target_modules=["q_proj"], target_parameters=list(EXPERTS_TP), init_lora_weights="mica"))
    add("mica_lora_bias_error", const(target_modules=["q_proj"], init_lora_weights="mica", lora_bias=True))
    # fan_in_fan_out: reset by the first nn.Linear, so ParamWrapper only refuses it when no Linear came first.
    add("fan_in_fan_out_attn_experts", const(target_modules=list(QKVO), target_parameters=list(EXPERTS_TP), fan_in_fan_out=True))
    add("fan_in_fan_out_tp_only_error", const(target_modules=[], target_parameters=list(EXPERTS_TP), fan_in_fan_out=True))
    # trainable_token_indices: token_adapter.trainable_tokens_delta (tokens x dim) on the embedding.
    add("tokens_list_qv", const(target_modules=["q_proj", "v_proj"], trainable_token_indices=[0, 3, 5]))
    add("tokens_dict_qv", const(target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [1, 2]}))
    add(
        "tokens_list_tying",
        const(target_modules=["q_proj"], trainable_token_indices=[0, 3, 5], ensure_weight_tying=True),
    )
    add("tokens_not_found_error", const(target_modules=["q_proj"], trainable_token_indices={"no_such_embedding": [1]}))
    add(
        "tokens_modules_to_save_error",
        const(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
    )
    # Unknown keyword (TypeError) and PEFT's own __post_init__ errors.
    add("unknown_kwarg_error", const(target_modules=["q_proj"], lora_aplha=8))
    add("lora_bias_gaussian_error", const(target_modules=["q_proj"], lora_bias=True, init_lora_weights="gaussian"))
    add("lora_bias_dora_error", const(target_modules=["q_proj"], lora_bias=True, use_dora=True))
    add("task_type_invalid_error", const(target_modules=["q_proj"], task_type="CAUSAL"))
    add("no_effect_fields", const(
        target_modules=["q_proj"], megatron_core="megatron.core", qalora_group_size=32, eva_config={},
        loftq_config={"loftq_bits": 4}, base_model_name_or_path="x/y", revision="main",
    ))
    return V


# ----------------------------------------------------------------------------------------------
# tiny
# ----------------------------------------------------------------------------------------------
def cmd_tiny(args):
    import torch

    torch.set_num_threads(args.threads)
    vers = versions()
    models_out = {}
    peft_out = {}
    only = set(args.only.split(",")) if args.only else None
    for name, cfg in TINY_CONFIGS.items():
        if only and name not in only:
            continue
        log(f"tiny {name}: build")
        rec = {"input_config": cfg}
        try:
            with capture() as cap:
                t = time.time()
                config = load_config(cfg)
                model = build_model(config)
                rec["seconds_build"] = time.time() - t
            rec["config"] = jsonable(config.to_dict())
            rec.update(tree_record(model))
            rec["build_warnings"] = cap["warnings"]
            rec["build_log"] = cap["log"]
        except Exception as e:
            rec["error"] = err_str(e)
            rec["error_where"] = tb_tail()
            models_out[name] = rec
            log(f"tiny {name}: BUILD FAILED {rec['error']}")
            _dump_tiny(args.out, vers, models_out, peft_out)
            continue
        models_out[name] = rec
        per = {}
        wanted = set(args.variants.split(",")) if args.variants else None
        for vname, fn in tiny_variants():
            if wanted and vname not in wanted:
                continue
            try:
                # MiCA initialises from an SVD of the base weight, which meta tensors cannot give: --cpu builds real
                # (random) weights for such variants.
                m = build_model(copy.deepcopy(config), "cpu" if args.cpu else "meta")
                kwargs = fn(m)
            except Exception as e:
                per[vname] = {"error": "setup: " + err_str(e)}
                continue
            if kwargs is None:
                per[vname] = {"skipped": "not applicable (no such module/parameter)"}
                continue
            r = peft_record(m, kwargs)
            per[vname] = r
            status = r.get("error") or f"trainable={r.get('trainable')} wrapped={r.get('wrapped_count')}"
            log(f"  {name}/{vname}: {status[:160]}")
        peft_out[name] = per
        _dump_tiny(args.out, vers, models_out, peft_out)  # incremental: survives a kill
    _dump_tiny(args.out, vers, models_out, peft_out)
    log("tiny done")


def _dump_tiny(out, vers, models_out, peft_out):
    meta = {"versions": vers, "generator": "tools/oracle/make_oracle.py tiny"}
    dump_gz(os.path.join(out, "tiny_models.json.gz"), dict(meta, models=models_out))
    dump_gz(os.path.join(out, "tiny_peft.json.gz"), dict(meta, default_r=4, default_lora_alpha=8, models=peft_out))


# ----------------------------------------------------------------------------------------------
# catalog
# ----------------------------------------------------------------------------------------------
def catalog_keys():
    return sorted(f[:-5] for f in os.listdir(CATALOG_DIR) if f.endswith(".json"))


def catalog_cfg(key):
    with open(os.path.join(CATALOG_DIR, key + ".json")) as f:
        return json.load(f)


def catalog_variants(model):
    V = [
        ("seed", dict(r=16, lora_alpha=32, target_modules=list(SEED))),
        ("all_linear", dict(r=16, lora_alpha=32, target_modules="all-linear")),
    ]
    if any(p.dim() == 3 for _, p in model.named_parameters()):
        V.append(
            (
                "attn_plus_experts",
                dict(r=16, lora_alpha=32, target_modules=list(QKVO), target_parameters=list(EXPERTS_TP)),
            )
        )
    return V


def cmd_catalog_meta(args):
    """Trees + all LoRA variants with get_peft_model inside torch.device('meta') (fast)."""
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for key in catalog_keys():
        cfg = catalog_cfg(key)
        rec = {"key": key, "input_config": cfg}
        try:
            with capture() as cap:
                t = time.time()
                config = load_config(cfg)
                model = build_model(config)
                rec["seconds_build"] = time.time() - t
            rec["config"] = jsonable(config.to_dict())
            tr = tree_record(model, with_state_dict=key not in EXISTING_TREES)
            if key in EXISTING_TREES:
                rec["tree_in"] = f"shared/oracle/tf5.17-peft0.21/{key}.json.gz"
                rec["class"] = tr["class"]
                rec["num_params"] = tr["num_params"]
                rec["buffers"] = tr["buffers"]
                rec["tied"] = tr["tied"]
            else:
                rec.update(tr)
            rec["build_warnings"] = cap["warnings"]
            rec["build_log"] = cap["log"]
            rec["variants"] = [v for v, _ in catalog_variants(model)]
        except Exception as e:
            rec["error"] = err_str(e)
            rec["error_where"] = tb_tail()
            dump_json(os.path.join(args.out, f"tree__{key}.json"), rec)
            log(f"catalog {key}: BUILD FAILED {rec['error']}")
            continue
        dump_json(os.path.join(args.out, f"tree__{key}.json"), rec)
        log(f"catalog {key}: tree ok ({len(rec.get('modules', []))} modules), num_params={rec['num_params']}")
        for vname, kwargs in catalog_variants(model):
            m = build_model(copy.deepcopy(config))
            r = peft_record(m, kwargs, meta_context=True, full=False)
            r["peft_path"] = "meta-context"
            dump_json(os.path.join(args.out, f"meta__{key}__{vname}.json"), r)
            log(
                f"  {key}/{vname} [meta]: {r.get('error') or ('trainable=%s total=%s wrapped=%s %.1fs' % (r['trainable'], r['total'], r['wrapped_count'], r['seconds_peft']))}"
            )
    log("catalog-meta done")


def cmd_catalog_job(args):
    import torch

    torch.set_num_threads(args.threads)
    key, vname = args.key, args.variant
    config = load_config(catalog_cfg(key))
    model = build_model(config)
    kwargs = dict(catalog_variants(model)).get(vname)
    if kwargs is None:
        log(f"{key}/{vname}: not applicable")
        return
    r = peft_record(model, kwargs, meta_context=False, full=False)
    r["peft_path"] = "cpu-init"
    r["threads"] = args.threads
    dump_json(os.path.join(args.out, f"cpu__{key}__{vname}.json"), r)
    log(
        f"  {key}/{vname} [cpu]: {r.get('error') or ('trainable=%s total=%s wrapped=%s %.1fs' % (r['trainable'], r['total'], r['wrapped_count'], r['seconds_peft']))}"
    )


def _same(a, b):
    keys = ["trainable", "total", "wrapped", "saved", "error"]
    return all(a.get(k) == b.get(k) for k in keys)


def cmd_assemble(args):
    d = args.jobdir
    out = {"versions": versions(), "generator": "tools/oracle/make_oracle.py catalog", "r": 16, "lora_alpha": 32}
    models = {}
    for key in catalog_keys():
        p = os.path.join(d, f"tree__{key}.json")
        if not os.path.exists(p):
            models[key] = {"key": key, "error": "not run (deadline)"}
            continue
        with open(p) as f:
            rec = json.load(f)
        lora = []
        for vname in rec.get("variants", []):
            pm = os.path.join(d, f"meta__{key}__{vname}.json")
            pc = os.path.join(d, f"cpu__{key}__{vname}.json")
            meta_r = json.load(open(pm)) if os.path.exists(pm) else None
            cpu_r = json.load(open(pc)) if os.path.exists(pc) else None
            if cpu_r is not None:
                r = cpu_r
                if meta_r is not None:
                    r["meta_context_agrees"] = _same(cpu_r, meta_r)
                    r["seconds_peft_meta_context"] = meta_r.get("seconds_peft")
            elif meta_r is not None:
                r = meta_r
            else:
                r = {"error": "not run (deadline)"}
            r["variant"] = vname
            lora.append(r)
        rec["lora"] = lora
        rec.pop("variants", None)
        models[key] = rec
    out["models"] = models
    dump_gz(os.path.join(args.out, "catalog.json.gz"), out)
    log("assembled catalog.json.gz")


# ----------------------------------------------------------------------------------------------
# all
# ----------------------------------------------------------------------------------------------
def cmd_all(args):
    os.makedirs(args.out, exist_ok=True)
    jobdir = args.jobdir
    os.makedirs(jobdir, exist_ok=True)
    deadline = T0 + args.deadline
    me = [sys.executable, os.path.abspath(__file__)]
    dump_json(os.path.join(args.out, "versions.json"), versions())

    procs = []
    if not args.skip_tiny:
        procs.append(("tiny", subprocess.Popen(me + ["tiny", "--out", args.out, "--threads", "2"])))
    if not args.skip_catalog:
        procs.append(("catalog-meta", subprocess.Popen(me + ["catalog-meta", "--out", jobdir, "--threads", "2"])))

    # CPU-init catalog jobs, largest first.
    jobs = []
    if not args.skip_catalog and not args.skip_cpu:
        keys = catalog_keys()
        order = [k for k in CATALOG_COST_ORDER if k in keys] + [k for k in keys if k not in CATALOG_COST_ORDER]
        for k in order:
            for v in ("seed", "all_linear", "attn_plus_experts"):
                jobs.append((k, v))
    running = []
    slots = args.workers
    while True:
        now = time.time()
        # start jobs
        while jobs and len(running) < slots and now < deadline - 20:
            k, v = jobs.pop(0)
            p = subprocess.Popen(
                me + ["catalog-job", "--key", k, "--variant", v, "--out", jobdir, "--threads", str(args.job_threads)]
            )
            running.append((f"{k}/{v}", p, now))
        running = [(n, p, t) for (n, p, t) in running if p.poll() is None]
        alive_fixed = [(n, p) for (n, p) in procs if p.poll() is None]
        if not running and not jobs and not alive_fixed:
            break
        if now > deadline:
            for n, p, t in running:
                log(f"deadline: killing job {n} (ran {now - t:.0f}s)")
                p.kill()
            for n, p in alive_fixed:
                log(f"deadline: killing {n}")
                p.kill()
            for n in jobs:
                log(f"deadline: not started {n}")
            break
        time.sleep(0.5)
    if not args.skip_catalog:
        ns = argparse.Namespace(jobdir=jobdir, out=args.out)
        cmd_assemble(ns)
    log("all done")


def cmd_dump_tiny(args):
    os.makedirs(args.out, exist_ok=True)
    for name, cfg in TINY_CONFIGS.items():
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
    print(f"wrote {len(TINY_CONFIGS)} configs to {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("--out", required=True)
    a.add_argument("--jobdir", default="/tmp/oracle_jobs")
    a.add_argument("--deadline", type=float, default=420)
    a.add_argument("--workers", type=int, default=6)
    a.add_argument("--job-threads", type=int, default=2)
    a.add_argument("--skip-tiny", action="store_true")
    a.add_argument("--skip-catalog", action="store_true")
    a.add_argument("--skip-cpu", action="store_true")
    a.set_defaults(fn=cmd_all)
    t = sub.add_parser("tiny")
    t.add_argument("--out", required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--only", default="")
    t.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    t.add_argument("--cpu", action="store_true", help="build the models with CPU weights instead of on the meta device")
    t.set_defaults(fn=cmd_tiny)
    c = sub.add_parser("catalog-meta")
    c.add_argument("--out", required=True)
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(fn=cmd_catalog_meta)
    j = sub.add_parser("catalog-job")
    j.add_argument("--key", required=True)
    j.add_argument("--variant", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--threads", type=int, default=2)
    j.set_defaults(fn=cmd_catalog_job)
    s = sub.add_parser("assemble")
    s.add_argument("--jobdir", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_assemble)
    dt = sub.add_parser("dump-tiny-configs")
    dt.add_argument("--out", default=os.path.join(HERE, "configs", "tiny"))
    dt.set_defaults(fn=cmd_dump_tiny)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
