#!/usr/bin/env python3
"""Discover every MoE model type of the installed transformers and record reference data for each.

Run on the device machine (transformers 5.17 + peft 0.21; no network needed):

    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 tools/oracle/discover_moe.py --out "$OUT" --workers 14

What it writes under --out (few files, since the device returns at most 8):

* ``moe_types.json``: every config class whose default config has experts, with its auto classes, its default
  config (``to_dict()``), transformers' checkpoint conversion mapping facts (whether
  ``get_checkpoint_conversion_mapping`` has an entry, the conversion pattern PEFT reads) and why a type was skipped.
* ``moe_tiny_models.json.gz`` / ``moe_tiny_peft.json.gz``: as make_oracle.py's tiny files, for a small config
  made from each type's default config by ``shrink`` (hidden 64, 4 layers, 4 experts, top-2, ...), with every
  LoRA variant of make_oracle.tiny_variants(); plus ``saved`` (the keys save_pretrained writes).
* ``moe_fixtures.tar.gz``: per type a tiny random float32 checkpoint (``save_pretrained``, hidden 32) and its
  ``reference.safetensors`` (input_ids [2,10] with row 1 left-padded by 3, logits, hidden_states, router logits).
  With ``--perturb-constants`` the parameters init leaves constant get seeded noise first (see perturb_constants);
  ``--only doge --fixtures --perturb-constants --no-peft`` remakes the doge fixture so it checks Doge's A, dt_proj
  and residual scales (the committed one has A = 0 and residual scales of 1).
* ``moe_sources.tar.gz``: the configuration/modeling/modular source files of each type, and PEFT's
  transformers weight-conversion module, to read the layouts from.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_oracle as mo  # noqa: E402

TEXT_TYPES = """afmoe aria_text axk1 axk2 cohere2_moe deepseek_v2 deepseek_v3 deepseek_v4 doge ernie4_5_moe exaone_moe
flex_olmo glm4_moe glm4_moe_lite glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid granitemoeshared hy_v3
hy_v4 inkling_text jamba jetmoe kimi_linear laguna llama4 llama4_text longcat_flash mellum mimo_v2_flash minimax
minimax_m2 minimax_m3_vl_text mixtral nemotron_h olmoe phimoe qwen2_moe qwen3_5_moe qwen3_5_moe_text qwen3_moe
qwen3_next solar_open zaya dbrx dots1 hunyuan_v1_moe lfm2_moe qwen4_exp""".split()
MM_TYPES = """aria ernie4_5_vl_moe glm4v_moe kimi_k25 mistral4 step3p7 qwen3_omni_moe qwen3_omni_moe_thinker qwen3_vl_moe
minimax_m3_vl deepseek_ocr2 glm5_next inkling_mm_model""".split()

# Fields the generic shrink cannot guess (read from each type's configuration file), applied after shrink().
# Extra fixtures: name -> (type, overrides). llama4_text_chunked makes the left-padded row cross chunk boundaries
# (attention_chunk_size 4 < the 10-token inputs), which the default 32-token chunk never does.
# deepseek_v2_group_limited routes with topk_method "group_limited_greedy" (2 groups of 2 experts, the best one kept).
# The *_sparse fixtures keep 4 keys per query in the DSA indexer (index_topk 4 < the 10-token inputs; the default 2048
# keeps every key, so the plain fixtures never exercise the selection); glm_moe_dsa_sparse also has "shared" layers
# that reuse the previous layer's selection. 8 indexer heads of 16 dims keep them small.
_DSA = dict(index_topk=4, index_n_heads=8, index_head_dim=16)
EXTRA_FIXTURES = {
    "llama4_text_chunked": ("llama4_text", dict(attention_chunk_size=4)),
    "deepseek_v2_group_limited": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    "axk2_sparse": ("axk2", _DSA),
    "deepseek_v32_sparse": ("deepseek_v32", _DSA),
    "glm_moe_dsa_sparse": ("glm_moe_dsa", dict(_DSA, indexer_types=["full", "shared", "full", "shared"])),
    # MiniMax-M3's sparse (MSA) layers: the Lightning Indexer scores blocks of 2 keys and keeps the 2 best plus the local
    # one, so its block selection acts on the 10-token inputs (full and sparse layers alternate).
    "minimax_m3_vl_text_sparse": ("minimax_m3_vl_text", dict(
        layer_types=["full_attention", "minimax_m3_sparse", "full_attention", "minimax_m3_sparse"],
        index_n_heads=2, index_head_dim=8, index_block_size=2, index_topk_blocks=2, index_local_blocks=1)),
    # Doge with its CDMoE feed-forward (is_moe): 16 experts on a 4 x 4 product-key grid, 4 kept per token.
    "doge_moe": ("doge", dict(is_moe=True, num_experts=16, num_experts_per_tok=4)),
}

# Types outside TEXT_TYPES that get a fixture anyway (deepseek_v32 is DeepSeek-V3 with the DSA indexer; the multimodal
# types are run on text alone, as the llama4 fixture is: input_ids and attention_mask, no pixels). deepseek_ocr2 needs
# nothing beyond its OVERRIDES (mlp_layer_types, num_experts_per_tok): without pixel_values DeepseekOcr2Model never
# calls its vision tower and passes the embeddings to its text model, whose positions are its own 0..S-1; its
# image_token_id (moved to 127 by shrink) is kept out of the inputs by special_token_ids. ernie4_5_vl_moe needs nothing
# more either: without image/video grids Ernie4_5_VLMoeModel.compute_3d_position_ids returns None and its text model
# takes positions 0..S-1 for all three rope rows, and without moe_mm_token_type_ids every token goes to text_moe
# (vision_moe never runs); output_router_logits=True returns text_moe's [B*S, E] logits per sparse layer.
MORE_FIXTURE_TYPES = {"deepseek_v32", "inkling_mm_model", "qwen3_vl_moe", "glm4v_moe", "kimi_k25", "step3p7", "qwen3_omni_moe_thinker",
                      "deepseek_ocr2", "ernie4_5_vl_moe"}

# Types whose fixture always gets perturb_constants' noise, as --perturb-constants gives every type. ERNIE 4.5 VL's
# moe_statics.e_score_correction_bias initialises to zeros for both the text and the vision router; the checkpoint stores
# them as one [2, E] tensor (text row, then vision row) and its routers transposed, so with zeros the reference would
# check neither the statics-biased top-k nor which row the runtime reads as the text router's.
PERTURB_FIXTURE_TYPES = {"ernie4_5_vl_moe"}

# Multimodal-listed types whose default config is a text model AutoModelForCausalLM builds: they get fixtures too.
MM_TEXT_FIXTURE_TYPES = {"mistral4"}

_QWEN4_EXP = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=4, indexer_compress_ratio=2,
                  hc_count=3, hc_lowrank=16, ple_layer_ids=[2, 3], ple_embed_dim=40, heads_per_ngram=2,
                  ngram_vocab_size_base=8, make_ngram_vocab_size_divisible_by=16, split_ngram_parts=4, eos_token_id=1)

OVERRIDES = {
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2),
    "glm5_next": dict(num_key_value_heads=4),
    # mamba_n_heads * mamba_d_head must be mamba_expand * hidden_size (2 * 32) or the config refuses to build.
    "granitemoehybrid": dict(mamba_n_heads=2, mamba_d_head=32),
    # Jamba's default puts attention at layer 4 of every 8: four layers would hold none, and then the cache has no
    # attention layer to take the sequence length from. Attention at odd layers, experts at odd layers.
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    # DeepseekV2Config has no num_experts_per_tok default (None): its router's topk fails ("topk k None").
    "deepseek_v2": dict(num_experts_per_tok=2),
    # Mistral 4's yarn rope rotates head_dim * partial_rotary_factor (0.5) dims, which must be qk_rope_head_dim:
    # equal nope and rope widths with head_dim their sum keep that true at the small sizes.
    "mistral4": dict(qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=16),
    # Fields the generic shrink does not know, left at full size they make fixtures of 7-20 MB: inkling's sliding-window
    # attention widths, longcat's zero experts, kimi_linear's delta-attention heads, deepseek_v4's grouped output
    # projection and indexer. Smaller windows, compression rates and index_topk also make 10-token inputs reach the
    # code paths (a window of 512 or a compression rate of 128 never bites on 10 tokens).
    "inkling_text": dict(swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, sliding_window_size=6),
    "longcat_flash": dict(zero_expert_num=4, moe_topk=3),
    # Four layers of the default pattern hold no full-attention layer; alternate them, experts after the first.
    "kimi_linear": dict(linear_head_dim=16, linear_num_heads=4,
                        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # DeepseekOcr2TextConfig has no mlp_layer_types default (None) and DeepseekOcr2TextDecoderLayer indexes it per layer
    # (config.mlp_layer_types[layer_idx]): the "'NoneType' object is not subscriptable" at modeling_deepseek_ocr2.py:1259.
    # First layer dense, the rest sparse, as convert_deepseek_ocr2_weights_to_hf.py derives it from first_k_dense_replace;
    # both top-level fields land in text_config. num_experts_per_tok has no default either (the router's top-k needs one).
    # The vision sub-configs are replaced whole (apply_overrides merges one level): shrink leaves the SAM neck and
    # downsampling convs at full width (output_channels 256, downsample_channels [512, 896], a 4.1M-parameter 3x3 conv)
    # and mlp_dim at its computed 3072, and its window (14) and global layers (2, 5, 8, 11) never bite on two layers of a
    # 2x2 grid. A 4x4 grid (56 / 14) with window 2 and layer 1 global gives rel_pos of 3 and 7 rows; the last downsample
    # width is the encoder's hidden size, since the forward concatenates SAM features with the encoder's queries.
    "deepseek_ocr2": dict(
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_experts_per_tok=2,
        vision_config=dict(
            sam_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                            window_size=2, global_attn_indexes=[1], mlp_dim=64, output_channels=24,
                            downsample_channels=[48, 64]),
            encoder_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2))),
    # ERNIE 4.5 VL's text rope pre-rotates its inverse frequencies by mrope_section (h, w, t), default [22, 22, 20] from
    # the code (the default rope_parameters hold none) for head_dim 128; here head_dim is hidden / heads = 16, i.e. 8
    # frequencies, so inv_freq[:-20] is empty and __init__ fails ("expanded size ... (8) ... existing size (0)"). The
    # sections must sum to head_dim / 2 with t > 0, and h == w (the forward stacks the h and w tables): [3, 3, 2], the
    # default's proportions. moe_intermediate_size is a [text, vision] list the shrink leaves at [1536, 512]: make it
    # small and keep the two widths different. The image/video start/end ids (101304-101307) sit outside the 128-token
    # vocabulary and image_token_id == video_token_id == 127 after the shrink: give each its own id inside it.
    "ernie4_5_vl_moe": dict(text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                              "mrope_section": [3, 3, 2]},
                                             moe_intermediate_size=[48, 32]),
                            image_start_token_id=120, image_end_token_id=121, image_token_id=122,
                            video_start_token_id=123, video_end_token_id=124, video_token_id=125),
    # Qwen4-Exp builds a QSA indexer in every attention layer, and its five indexer_* fields default to None (the default
    # config itself does not build: None // None in Qwen4ExpTextQSAIndexer.__init__): 2 query heads and the required single
    # key head of 32 dims (at least the attention's rotary width, head_dim 24), a budget of 4 tokens in blocks of 2 (a
    # budget that bites on 10-token inputs). The generic shrink leaves hc_lowrank at 320: 16. 3 hyper-connection streams
    # tell hc_count apart from the head, kv-head, expert and layer counts. PLE (off by default) on layers 2 and 3 (one-indexed, both
    # linear_attention, where every source version allows it) with eos_token_id set (PLE requires it): 2 heads per n-gram
    # order (4 heads of 40 / 4 = 10 dims); a vocabulary base of 8 and a divisor of 16 make the n-gram tables 64 and 128
    # rows (primes 11+13+17+19 and 23+29+31+37, padded), instead of ~320M, and 4 checkpoint shards divide both.
    # qwen4_exp takes them in its text_config.
    "qwen4_exp_text": _QWEN4_EXP,
    "qwen4_exp": dict(text_config=_QWEN4_EXP),
    "deepseek_v4": dict(o_lora_rank=16, o_groups=2, index_n_heads=4, index_head_dim=16, index_topk=2, sliding_window=4,
                        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
}

# Overrides for the fixtures only (after OVERRIDES): what a forward needs that a module tree does not, so the oracle
# trees made before them stay reproducible.
FIXTURE_OVERRIDES = {
    # The multimodal Inkling: the same text overrides (they land in text_config), and an audio embedding of
    # mel_vocab_size x n_mel_bins rows (20,480 at the defaults) cut to 64.
    "inkling_mm_model": dict(swa_head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, sliding_window_size=6,
                             audio_config=dict(mel_vocab_size=16, n_mel_bins=4)),
    # Its default layer_types are all Mamba ("linear_attention"), whose cache then has no attention layer to take the
    # sequence length from: alternate them.
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    # Step-3.7 builds a sliding-window mask in every forward and fails while sliding_window is null (its default);
    # alternate sliding and full layers (a window of 4 bites on 10 tokens), each with its own rope, experts after the
    # first layer.
    "step3p7": dict(sliding_window=4, num_sliding_attention_heads=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}}),
    # GLM-4.5V rotates head_dim * partial_rotary_factor = 4 dims here: its mrope sections (default 8/12/12) split the
    # 2 inverse frequencies, so they must sum to 2.
    "glm4v_moe": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                       "mrope_section": [1, 1, 0]}),
    # The Qwen3-Omni thinker's audio tower keeps fields the generic shrink does not know: three 3x3 convolutions of
    # downsample_hidden_size (480) channels (2.1M parameters each), conv_out over 128 mel bins and proj2 to output_dim
    # 3584, which made a 19 MB fixture. The towers never run on text, so small widths change nothing the reference checks;
    # output_dim is the text width, as in real checkpoints.
    "qwen3_omni_moe_thinker": dict(audio_config=dict(downsample_hidden_size=8, num_mel_bins=16, output_dim=32)),
    # ERNIE 4.5 VL at the fixture's sizes: head_dim 32 / 4 = 8, i.e. 4 frequencies, so its sections (see OVERRIDES) are
    # [1, 1, 2] (h == w, t > 0).
    "ernie4_5_vl_moe": dict(text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                              "mrope_section": [1, 1, 2]})),
}

EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts_total",
               "n_experts", "num_routed_experts", "expert_num", "num_moe_experts")

T0 = time.time()


def clean(x):
    """JSON without Infinity/NaN tokens (System.Text.Json rejects them): such floats become "inf", "-inf", "nan"."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# shrinking a default config
# ------------------------------------------------------------------------------------------------
def sizes(kind):
    if kind == "oracle":
        return dict(hidden=64, inter=96, moe_inter=48, shared_inter=80, heads=4, kv=2, head_dim=24, layers=4,
                    vocab=128, experts=4, topk=2, vision_hidden=32)
    return dict(hidden=32, inter=48, moe_inter=24, shared_inter=40, heads=4, kv=2, head_dim=16, layers=4,
                vocab=128, experts=4, topk=2, vision_hidden=32)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def shrink(d, kind="oracle", depth=0, orig_layers=None):
    """A small valid config from a default config dict (recursively for text/vision sub-configs)."""
    s = sizes(kind)
    d = copy.deepcopy(d)
    vision = depth > 0 and any(k in str(d.get("model_type", "")) for k in ("vision", "visual", "audio", "vit", "siglip", "clip"))
    L = d.get("num_hidden_layers") or d.get("n_layers") or d.get("num_layers")
    orig_layers = L if _is_int(L) else orig_layers
    hid = s["vision_hidden"] if vision else s["hidden"]

    def setif(key, val, only_if=lambda v: _is_int(v) and v > 0):
        if key in d and only_if(d[key]):
            d[key] = val

    for k in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"):
        setif(k, hid)
    for k in ("intermediate_size", "ffn_hidden_size", "intermediate_size_mlp", "dense_intermediate_size", "ffn_dim"):
        setif(k, s["inter"] if not vision else 48)
    for k in ("moe_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size", "expert_ffn_hidden_size",
              "moe_inter_size", "expert_hidden_size"):
        setif(k, s["moe_inter"])
    for k in ("shared_expert_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size",
              "shared_ffn_hidden_size"):
        setif(k, s["shared_inter"])
    for k in ("num_hidden_layers", "n_layers", "num_layers"):
        setif(k, 2 if vision else s["layers"])
    for k in ("num_attention_heads", "n_heads", "n_head", "num_heads"):
        setif(k, s["heads"] if not vision else 2)
    for k in ("num_key_value_heads", "kv_n_heads", "num_kv_heads", "n_kv_heads"):
        setif(k, s["kv"] if not vision else 2)
    if not vision:
        setif("head_dim", s["head_dim"])
        setif("attention_head_dim", s["head_dim"])
    for k in ("vocab_size",):
        setif(k, s["vocab"])
    # special token ids must stay inside the smaller vocabulary
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "image_token_id", "video_token_id"):
        if _is_int(d.get(k)) and d[k] >= s["vocab"]:
            d[k] = None if k == "pad_token_id" else s["vocab"] - 1
    for k in ("encoder_attention_heads", "decoder_attention_heads"):
        setif(k, 2)
    for k in ("encoder_layers", "decoder_layers", "depth"):
        setif(k, 2)
    for k in ("encoder_ffn_dim", "decoder_ffn_dim"):
        setif(k, 48)
    for k in EXPERT_KEYS:
        setif(k, s["experts"], lambda v: _is_int(v) and v > s["experts"])
    for k in ("num_experts_per_tok", "moe_top_k", "experts_per_token", "top_k", "num_experts_per_token", "moe_k",
              "n_activated_experts"):
        setif(k, s["topk"], lambda v: _is_int(v) and v > s["topk"])
    # A MoE config class without a top-k default (DeepseekV2Config) writes None; its router cannot run without one.
    if "num_experts_per_tok" in d and d["num_experts_per_tok"] is None and any(_is_int(d.get(k)) for k in EXPERT_KEYS):
        d["num_experts_per_tok"] = s["topk"]
    setif("n_shared_experts", 1, lambda v: _is_int(v) and v > 2)
    setif("num_shared_experts", 1, lambda v: _is_int(v) and v > 2)
    setif("first_k_dense_replace", 1, lambda v: _is_int(v) and v > 1)
    setif("n_group", 2, lambda v: _is_int(v) and v > 2)
    setif("topk_group", 1, lambda v: _is_int(v) and v > 1)
    setif("max_position_embeddings", 256)
    setif("max_seq_len", 256)
    setif("sliding_window", 16, lambda v: _is_int(v) and v > 16)
    setif("attention_chunk_size", 32)
    # MLA
    setif("kv_lora_rank", 32)
    setif("q_lora_rank", 24)
    setif("qk_nope_head_dim", 16)
    setif("qk_rope_head_dim", 8)
    setif("v_head_dim", 16)
    if _is_int(d.get("qk_head_dim")) and "qk_nope_head_dim" in d:
        d["qk_head_dim"] = d["qk_nope_head_dim"] + d.get("qk_rope_head_dim", 0)
    if _is_int(d.get("kv_lora_rank")) and _is_int(d.get("qk_rope_head_dim")):
        # MLA: the rotary tables are built for head_dim (= qk_rope_head_dim in these configs) and keys come out with
        # num_attention_heads heads, so a shrunk kv-head count would make repeat_kv duplicate them.
        if "head_dim" in d:
            d["head_dim"] = d["qk_rope_head_dim"]
        for k in ("num_key_value_heads",):
            if _is_int(d.get(k)) and _is_int(d.get("num_attention_heads")):
                d[k] = d["num_attention_heads"]
    # linear attention / state-space mixers
    setif("linear_num_key_heads", 2)
    setif("linear_num_value_heads", 4)
    setif("linear_key_head_dim", 16)
    setif("linear_value_head_dim", 16)
    setif("linear_conv_kernel_dim", 4)
    setif("mamba_d_state", 8)
    setif("ssm_state_size", 8)
    setif("mamba_n_heads", 4)
    setif("mamba_num_heads", 4)
    setif("mamba_head_dim", 16)
    setif("mamba_d_head", 16)
    setif("mamba_n_groups", 1)
    setif("n_groups", 1)
    setif("mamba_d_conv", 4)
    setif("mamba_expand", 2)
    setif("num_nextn_predict_layers", 0)
    setif("mtp_num_layers", 0, lambda v: _is_int(v) and v > 0)
    setif("num_mtp_modules", 0, lambda v: _is_int(v) and v > 0)
    # vision-ish
    setif("image_size", 28)
    setif("patch_size", 14)
    setif("vision_output_dim", s["hidden"])
    setif("projector_input_dim", s["hidden"])
    setif("projector_output_dim", s["hidden"])
    setif("out_hidden_size", s["hidden"])
    setif("text_hidden_size", s["hidden"])
    # per-layer lists: cut to the new number of layers; index lists: keep indices that still exist
    newL = d.get("num_hidden_layers") or d.get("n_layers") or d.get("num_layers")
    for k, v in list(d.items()):
        if isinstance(v, list) and _is_int(orig_layers) and _is_int(newL) and len(v) == orig_layers and orig_layers != newL:
            d[k] = _cut_layer_list(v, newL)
        elif isinstance(v, list) and k in ("mlp_only_layers", "moe_layers", "dense_layers", "full_attn_idxs",
                                            "attn_layer_indices", "global_attn_layers", "sliding_window_layers"):
            if all(_is_int(x) for x in v) and _is_int(newL):
                kept = [x for x in v if x < newL]
                d[k] = kept
    # mrope sections must sum to head_dim / 2
    hd = d.get("head_dim") if _is_int(d.get("head_dim")) else None
    for rk in ("rope_scaling", "rope_parameters"):
        r = d.get(rk)
        if isinstance(r, dict) and isinstance(r.get("mrope_section"), list) and hd:
            n = len(r["mrope_section"])
            half = hd // 2
            base = [half // n] * n
            base[0] += half - sum(base)
            r["mrope_section"] = base
    for k, v in list(d.items()):
        if isinstance(v, dict) and k.endswith("_config") and ("model_type" in v or k in ("text_config", "vision_config", "audio_config")):
            d[k] = shrink(v, kind, depth + 1, orig_layers)
    if depth == 0:
        d["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
    return d


def apply_overrides(cfg, ov):
    """Set each override where the field lives: the top level, else text_config. A dict given for a sub-config
    (a key ending in _config) is merged into it."""
    for k, v in ov.items():
        if k.endswith("_config") and isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        elif k in cfg or not isinstance(cfg.get("text_config"), dict):
            cfg[k] = v
        else:
            cfg["text_config"][k] = v


def _cut_layer_list(v, n):
    """Keep the first n entries, but make sure every distinct value of the original occurs (layer patterns)."""
    out = list(v[:n])
    missing = [x for x in dict.fromkeys(map(json.dumps, v)) if x not in set(map(json.dumps, out))]
    for i, m in enumerate(missing[: max(0, n - 1)]):
        out[n - 1 - i] = json.loads(m)
    return out


# ------------------------------------------------------------------------------------------------
# type discovery
# ------------------------------------------------------------------------------------------------
def has_experts(d):
    if not isinstance(d, dict):
        return False
    for k in EXPERT_KEYS:
        if _is_int(d.get(k)) and d[k] > 0:
            return True
    if isinstance(d.get("ffn_config"), dict) and d["ffn_config"].get("moe_num_experts"):
        return True
    return any(has_experts(v) for k, v in d.items() if isinstance(v, dict) and k.endswith("_config"))


def auto_heads(model_type):
    from transformers import models
    from transformers.models.auto import modeling_auto as ma

    heads = {}
    for name in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                 "MODEL_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        m = getattr(ma, name, None)
        if m and model_type in m:
            heads[name] = m[model_type]
    return heads


def conversion_facts(model_type):
    out = {}
    try:
        from transformers import conversion_mapping as cm

        f = getattr(cm, "get_checkpoint_conversion_mapping", None)
        if f is not None:
            try:
                r = f(model_type)
                out["has_checkpoint_conversion"] = r is not None
                out["checkpoint_conversion"] = [mo.jsonable(getattr(x, "__dict__", str(x))) for x in (r or [])][:40]
            except Exception as e:
                out["checkpoint_conversion_error"] = mo.err_str(e)
        pat = getattr(cm, "_MODEL_TO_CONVERSION_PATTERN", None)
        if pat is not None:
            out["conversion_pattern"] = pat.get(model_type)
    except Exception as e:
        out["error"] = mo.err_str(e)
    return out


def discover():
    from transformers import CONFIG_MAPPING

    types = {}
    for t in sorted(CONFIG_MAPPING.keys()):
        rec = {}
        try:
            cfg = CONFIG_MAPPING[t]()
            d = cfg.to_dict()
        except Exception as e:
            if t in TEXT_TYPES or t in MM_TYPES:
                types[t] = {"default_error": mo.err_str(e), "heads": auto_heads(t), "listed": True}
            continue
        if not (has_experts(d) or t in TEXT_TYPES or t in MM_TYPES):
            continue
        rec["heads"] = auto_heads(t)
        rec["default_config"] = mo.jsonable(d)
        rec["listed"] = t in TEXT_TYPES or t in MM_TYPES
        rec["conversion"] = conversion_facts(t)
        types[t] = rec
    return types


def build(config, heads):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" in heads:
        return AutoModelForCausalLM.from_config(config), "causal_lm"
    if "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES" in heads:
        return AutoModelForImageTextToText.from_config(config), "image_text_to_text"
    raise RuntimeError("no causal-LM or image-text-to-text head")


def saved_keys(model):
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        keys = []
        for f in sorted(x for x in os.listdir(d) if x.endswith(".safetensors")):
            with safe_open(os.path.join(d, f), "pt") as s:
                for k in s.keys():
                    keys.append([k, list(s.get_slice(k).get_shape())])
    return sorted(keys)


def job_type(args):
    """Tree + PEFT variants + saved keys for one type (runs in a worker process)."""
    t, rec, out_dir, with_peft = args
    import torch

    torch.set_num_threads(1)
    res = {"type": t}
    if "default_config" not in rec:
        res["error"] = rec.get("default_error", "no default config")
        return res
    cfg = shrink(rec["default_config"], "oracle")
    apply_overrides(cfg, OVERRIDES.get(t, {}))
    cfg["model_type"] = t
    res["input_config"] = cfg
    try:
        with mo.capture() as cap:
            config = mo.load_config(cfg)
            with torch.device("meta"):
                model, head = build(config, rec["heads"])
        res["head"] = head
        res["config"] = mo.jsonable(config.to_dict())
        res.update(mo.tree_record(model))
        res["build_warnings"] = cap["warnings"][:20]
    except Exception as e:
        res["error"] = mo.err_str(e)
        res["error_where"] = mo.tb_tail(6)
        return res
    try:
        torch.manual_seed(0)
        real, _ = build(mo.load_config(cfg), rec["heads"])
        res["saved"] = saved_keys(real)
        del real
    except Exception as e:
        res["saved_error"] = mo.err_str(e)
    if with_peft:
        per = {}
        for vname, fn in mo.tiny_variants():
            try:
                with torch.device("meta"):
                    m, _ = build(copy.deepcopy(config), rec["heads"])
                kwargs = fn(m)
            except Exception as e:
                per[vname] = {"error": "setup: " + mo.err_str(e)}
                continue
            if kwargs is None:
                per[vname] = {"skipped": "not applicable (no such module/parameter)"}
                continue
            per[vname] = mo.peft_record(m, kwargs, meta_context=True)
        res["peft"] = per
    return res


def job_fixture(args):
    """Tiny random float32 checkpoint and reference outputs for one type."""
    name, rec, fx_root = args[:3]
    t, extra = EXTRA_FIXTURES.get(name, (name, {}))
    perturb = (len(args) > 3 and args[3]) or t in PERTURB_FIXTURE_TYPES
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    res = {"type": name}
    try:
        cfg = shrink(rec["default_config"], "fixture")
        apply_overrides(cfg, OVERRIDES.get(t, {}))
        apply_overrides(cfg, FIXTURE_OVERRIDES.get(t, {}))
        apply_overrides(cfg, extra)
        # Nested sub-configs without a model type of their own (dbrx's attn_config/ffn_config) reject the generic
        # PretrainedConfig keys to_dict() wrote into them.
        for v in cfg.values():
            if isinstance(v, dict) and v.get("model_type") == "":
                for k in ("_name_or_path", "output_attentions"):
                    v.pop(k, None)
        if t == "hunyuan_v1_moe":
            cfg["head_dim"] = 8
        # transformers 5.17's DbrxConfig.to_dict() leaves rope_theta out of attn_config (it writes rope_parameters at
        # the top), but DbrxAttention reads attn_config.rope_theta: "DbrxAttentionConfig has no rope_theta".
        if isinstance(cfg.get("attn_config"), dict) and "rope_theta" not in cfg["attn_config"]:
            cfg["attn_config"]["rope_theta"] = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        # transformers 5.17's DbrxAttention clamps with min=max=None when clip_qkv is None (its default), which torch
        # refuses; DBRX checkpoints set clip_qkv 8.
        if t == "dbrx" and isinstance(cfg.get("attn_config"), dict) and cfg["attn_config"].get("clip_qkv") is None:
            cfg["attn_config"]["clip_qkv"] = 8.0
        # Qwen3OmniMoeThinkerConfig declares no vision_start_token_id (its parent's is deleted), but the thinker's
        # get_rope_index reads config.vision_start_token_id on every forward without position_ids, so transformers 5.17
        # cannot run the default config; Qwen3-Omni checkpoints set it at the thinker's top level (151652). Put it inside
        # the small vocabulary, where special_token_ids keeps it out of the inputs.
        if t == "qwen3_omni_moe_thinker" and "vision_start_token_id" not in cfg:
            cfg["vision_start_token_id"] = int((cfg.get("text_config") or {}).get("vocab_size", 64)) - 2
        cfg["model_type"] = t
        cfg["initializer_range"] = 0.1
        config = mo.load_config(cfg)
        torch.manual_seed(0)
        model, head = build(config, rec["heads"])
        model = model.float().eval()
        if perturb:
            res["perturbed"] = perturb_constants(model, torch)
        d = os.path.join(fx_root, name)
        os.makedirs(os.path.join(d, "model"), exist_ok=True)
        model.save_pretrained(os.path.join(d, "model"))
        g = torch.Generator().manual_seed(1)
        vocab = config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (2, 10), generator=g)
        # Multimodal placeholders (image/video/audio token ids, which shrink() may have moved inside the small vocab)
        # would make the model look for pixels: draw them again until the inputs are text only.
        special = special_token_ids(cfg)
        while special and any(int(i) in special for i in ids.flatten()):
            redo = torch.randint(3, vocab, ids.shape, generator=g)
            ids = torch.where(torch.isin(ids, torch.tensor(sorted(special))), redo, ids)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with torch.no_grad():
            try:
                out = model(**kw, output_router_logits=True)
            except TypeError:
                out = model(**kw)
        tensors = {"input_ids": ids, "attention_mask": mask, "logits": out.logits.float().contiguous()}
        hs = getattr(out, "hidden_states", None)
        if hs is not None:
            if len({tuple(h.shape) for h in hs}) == 1:
                tensors["hidden_states"] = torch.stack([h.float() for h in hs]).contiguous()
            else:  # hyper-connection models (deepseek_v4, hy_v4) return [B, S, streams, H] inside the stack
                for i, h in enumerate(hs):
                    tensors[f"hidden_states.{i}"] = h.float().contiguous()
        rl = getattr(out, "router_logits", None)
        if rl is not None:
            for i, r in enumerate(rl):
                if isinstance(r, torch.Tensor):
                    tensors[f"router_logits.{i}"] = r.float().contiguous().clone()  # jetmoe returns views of one tensor
        save_file(tensors, os.path.join(d, "reference.safetensors"))
        res["ok"] = True
        res["head"] = head
        res["files"] = sorted(os.listdir(os.path.join(d, "model")))
    except Exception as e:
        res["error"] = mo.err_str(e)
        res["error_where"] = mo.tb_tail(6)
    return res


def special_token_ids(cfg):
    """Token ids a multimodal config reserves for non-text inputs (keys like image_token_id, video_token_index,
    vision_start_token_id), top level and text_config; bos/eos/pad stay allowed."""
    out = set()
    for d in (cfg, cfg.get("text_config") or {}):
        for k, v in d.items():
            if (k.endswith("_token_id") or k.endswith("_token_index")) and not k.startswith(("bos", "eos", "pad")) \
                    and isinstance(v, int) and not isinstance(v, bool):
                out.add(v)
    return out


def perturb_constants(model, torch):
    """Adds seeded noise (std 0.1) to every parameter whose values are all equal after init (norm weights of ones,
    zero-initialised gates and mask parameters such as Doge's A, learned residual scales of ones), so the reference
    exercises what those tensors do instead of an identity the runtime could get right by leaving them out."""
    g = torch.Generator().manual_seed(2)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                names.append(name)
    return names


def copy_sources(types, dst):
    import transformers

    base = os.path.dirname(transformers.__file__)
    for t in types:
        mod = t
        for cand in (t, t.replace("_text", ""), t.replace("_thinker", "")):
            if os.path.isdir(os.path.join(base, "models", cand)):
                mod = cand
                break
        src = os.path.join(base, "models", mod)
        if not os.path.isdir(src):
            continue
        out = os.path.join(dst, mod)
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(src):
            if f.startswith(("modeling_", "configuration_", "modular_")) and f.endswith(".py"):
                shutil.copy(os.path.join(src, f), out)
    for rel in ("conversion_mapping.py", "core_model_loading.py", "integrations/moe.py"):
        p = os.path.join(base, rel)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(dst, "transformers__" + rel.replace("/", "__")))
    try:
        import peft

        pb = os.path.dirname(peft.__file__)
        for rel in ("utils/transformers_weight_conversion.py", "tuners/lora/config.py", "tuners/tuners_utils.py",
                    "tuners/lora/layer.py", "tuners/lora/model.py", "utils/constants.py", "utils/other.py",
                    "utils/save_and_load.py", "tuners/_buffer_dict.py"):
            p = os.path.join(pb, rel)
            if os.path.exists(p):
                shutil.copy(p, os.path.join(dst, "peft__" + rel.replace("/", "__")))
    except Exception as e:
        log(f"peft sources: {e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--deadline", type=float, default=480)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-sources", action="store_true")
    ap.add_argument("--tree-types", default="", help="record trees and PEFT variants only for these types")
    ap.add_argument("--fixtures", action="store_true")
    ap.add_argument("--no-fixture", default="")
    ap.add_argument("--perturb-constants", action="store_true",
                    help="fixtures: add noise to parameters init leaves constant (norms, Doge's A, residual scales)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    types = discover()
    if a.only:
        types = {k: v for k, v in types.items() if k in a.only.split(",")}
    log(f"{len(types)} types: {' '.join(types)}")
    facts = {"versions": mo.versions(), "types": types}
    try:
        from transformers import conversion_mapping as cm

        facts["conversion_pattern_table"] = mo.jsonable(getattr(cm, "_MODEL_TO_CONVERSION_PATTERN", None))
    except Exception as e:
        facts["conversion_pattern_table"] = mo.err_str(e)
    mo.dump_json(os.path.join(a.out, "moe_types.json"), clean(facts))

    if not a.no_sources:
        src = tempfile.mkdtemp()
        copy_sources(list(types), os.path.join(src, "src"))
        with tarfile.open(os.path.join(a.out, "moe_sources.tar.gz"), "w:gz") as tf:
            tf.add(os.path.join(src, "src"), arcname="src")
        log("sources packed")

    fx_root = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    results = {}
    fixtures = {}
    with ctx.Pool(a.workers, maxtasksperchild=1) as pool:
        tree_types = [t for t in types if not a.tree_types or t in a.tree_types.split(",")]
        tree_jobs = pool.imap_unordered(job_type, [(t, types[t], a.out, not a.no_peft) for t in tree_types])
        fx_types = [t for t, r in types.items() if "default_config" in r and (t in TEXT_TYPES or t in MM_TEXT_FIXTURE_TYPES or t in MORE_FIXTURE_TYPES)
                    and t not in a.no_fixture.split(",")]
        fx_types += [n for n, (t, _) in EXTRA_FIXTURES.items() if t in fx_types]
        fx_jobs = pool.imap_unordered(job_fixture, [(t, types[EXTRA_FIXTURES.get(t, (t,))[0]], fx_root, a.perturb_constants) for t in fx_types] if a.fixtures else [])
        for res in tree_jobs:
            results[res["type"]] = res
            n = len(res.get("peft", {}))
            log(f"type {res['type']}: {res.get('error') or ('%d modules, %d variants' % (len(res.get('modules', [])), n))}")
            if time.time() - T0 > a.deadline:
                log("deadline reached: stopping tree jobs")
                break
        for res in fx_jobs:
            fixtures[res["type"]] = res
            log(f"fixture {res['type']}: {res.get('error') or 'ok'}")
            if time.time() - T0 > a.deadline + 60:
                log("deadline reached: stopping fixture jobs")
                break
        pool.terminate()
    models = {t: {k: v for k, v in r.items() if k != "peft"} for t, r in results.items()}
    peft = {t: r["peft"] for t, r in results.items() if "peft" in r}
    meta = {"versions": facts["versions"], "generator": "tools/oracle/discover_moe.py"}
    mo.dump_gz(os.path.join(a.out, "moe_tiny_models.json.gz"), clean(dict(meta, models=models)))
    mo.dump_gz(os.path.join(a.out, "moe_tiny_peft.json.gz"), clean(dict(meta, default_r=4, default_lora_alpha=8, models=peft)))
    mo.dump_json(os.path.join(a.out, "moe_fixtures_index.json"), fixtures)
    pack_fixtures(fx_root, a.out)
    log("done")


def pack_fixtures(root, out, limit=12 * 2**20):
    """Pack the fixture folders into as few tar.gz files as keep each under ``limit`` bytes (the device returns 16 MiB)."""
    chunk, size, n = [], 0, 0

    def flush():
        nonlocal chunk, size, n
        if not chunk:
            return
        with tarfile.open(os.path.join(out, f"moe_fixtures_{n}.tar.gz"), "w:gz") as tf:
            for t in chunk:
                tf.add(os.path.join(root, t), arcname=f"fixtures/{t}")
        n, chunk, size = n + 1, [], 0

    for t in sorted(os.listdir(root)):
        p = os.path.join(root, t)
        if not os.path.isdir(p) or not os.path.exists(os.path.join(p, "reference.safetensors")):
            continue
        s = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(p) for f in fs)
        if s > limit:
            log(f"fixture {t}: {s} bytes, too large, left out")
            continue
        if size + s > limit:
            flush()
        chunk.append(t)
        size += s
    flush()


if __name__ == "__main__":
    main()
