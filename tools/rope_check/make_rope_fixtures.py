"""Tiny checkpoints with reference outputs for rope variants and tied embeddings (transformers 5.17).

    python3 tools/rope_check/make_rope_fixtures.py $OUT/rope_fixtures.tar

Each case folder holds config.json + model.safetensors (save_pretrained) and reference.safetensors with input_ids,
attention_mask (row 1 left-padded by 3), logits and hidden_states [L+1, B, S, H], fp32, eager attention; then, from
the same model object, logits_second for the first 20 tokens (a second forward: "dynamic" rope keeps the table of the
longest sequence it has seen, so this one checks that state). With a third argument SOURCES, the transformers source of
the rope functions these cases exercise is written there (what the C# rules were checked against).

    python3 tools/rope_check/make_rope_fixtures.py OUT.tar [case,case] [SOURCES.txt]
"""
import os
import sys
import tarfile
import tempfile

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, MistralConfig, PhimoeConfig, Qwen2Config, AutoModelForCausalLM

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)

CASES = {
    "llama_rope_llama3": LlamaConfig(**BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_rope_linear": LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "qwen2_tied": Qwen2Config(**BASE, tie_word_embeddings=True),
    "mistral_sliding": MistralConfig(**BASE, sliding_window=8),
}

# longrope: one factor per rotated frequency (head_dim 16 -> 8). The 24-token input is past an original length of 16
# (long factors) and within one of 32 (short factors); attention_factor is left to transformers' default, which reads
# max_position_embeddings / original_max_position_embeddings.
SHORT = [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0]
LONG = [1.0, 1.2, 1.6, 2.4, 3.5, 5.0, 7.0, 9.0]
for name, original in (("llama_rope_longrope_long", 16), ("llama_rope_longrope_short", 32)):
    CASES[name] = LlamaConfig(**BASE, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                                                       "long_factor": LONG, "original_max_position_embeddings": original})
# dynamic NTK: max_position_embeddings 16 < 24 tokens, so the base grows with the sequence.
CASES["llama_rope_dynamic"] = LlamaConfig(**{**BASE, "max_position_embeddings": 16},
                                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
# Phi-3.5-MoE's own rotary: short_mscale / long_mscale replace the attention factor (different here, so the choice shows).
for name, original in (("phimoe_longrope_long", 16), ("phimoe_longrope_short", 32)):
    CASES[name] = PhimoeConfig(**{**BASE, "num_key_value_heads": 1}, num_local_experts=4, num_experts_per_tok=2,
                               original_max_position_embeddings=original,
                               rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                                                "long_factor": LONG, "short_mscale": 1.1, "long_mscale": 1.3,
                                                "original_max_position_embeddings": original})


def write_sources(path):
    import importlib
    import inspect
    names = ["transformers.modeling_rope_utils:_compute_longrope_parameters",
             "transformers.modeling_rope_utils:_compute_dynamic_ntk_parameters",
             "transformers.modeling_rope_utils:dynamic_rope_update",
             "transformers.modeling_rope_utils:RotaryEmbeddingConfigMixin.standardize_rope_params",
             "transformers.models.llama.modeling_llama:LlamaRotaryEmbedding",
             "transformers.models.phimoe.modeling_phimoe:PhimoeRotaryEmbedding",
             "transformers.models.phimoe.configuration_phimoe:PhimoeConfig"]
    with open(path, "w") as f:
        for name in names:
            module, attr = name.split(":")
            try:
                obj = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                f.write(f"# ---- {name}\n{inspect.getsource(obj)}\n")
            except Exception as e:
                f.write(f"# ---- {name}: {type(e).__name__} {e}\n")


def make_case(root, name, cfg):
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        second = model(input_ids=ids[:, :20], attention_mask=mask[:, :20]).logits
    d = os.path.join(root, name)
    model.save_pretrained(os.path.join(d, "model"))
    save_file({"input_ids": ids, "attention_mask": mask, "logits": o.logits.contiguous(),
               "hidden_states": torch.stack(o.hidden_states).contiguous(), "logits_second": second.contiguous()},
              os.path.join(d, "reference.safetensors"))
    print(name, "ok", o.logits.shape, "tied:", model.lm_head.weight is model.model.embed_tokens.weight)


def main():
    out = sys.argv[1]
    root = tempfile.mkdtemp()
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else None
    if len(sys.argv) > 3:
        write_sources(sys.argv[3])
    for name, cfg in CASES.items():
        if only and name not in only:
            continue
        try:  # one case's failure (a config or rotary transformers refuses) leaves the others
            make_case(root, name, cfg)
        except Exception as e:
            print(name, "FAILED", type(e).__name__, e)
    with tarfile.open(out, "w") as t:
        t.add(root, arcname="rope_fixtures")


if __name__ == "__main__":
    main()
