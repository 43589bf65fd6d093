"""Tiny checkpoints with reference outputs for rope variants and tied embeddings (transformers 5.17).

    python3 tools/rope_check/make_rope_fixtures.py $OUT/rope_fixtures.tar

Each case folder holds config.json + model.safetensors (save_pretrained) and reference.safetensors with input_ids,
attention_mask (row 1 left-padded by 3), logits and hidden_states [L+1, B, S, H], fp32, eager attention.
"""
import os
import sys
import tarfile
import tempfile

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, MistralConfig, Qwen2Config, AutoModelForCausalLM

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)

CASES = {
    "llama_rope_llama3": LlamaConfig(**BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_rope_linear": LlamaConfig(**BASE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "qwen2_tied": Qwen2Config(**BASE, tie_word_embeddings=True),
    "mistral_sliding": MistralConfig(**BASE, sliding_window=8),
}


def main():
    out = sys.argv[1]
    root = tempfile.mkdtemp()
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    for name, cfg in CASES.items():
        if only and name not in only:
            continue
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        d = os.path.join(root, name)
        model.save_pretrained(os.path.join(d, "model"))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
        mask = torch.ones(2, 24, dtype=torch.long)
        mask[1, :3] = 0
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        save_file({"input_ids": ids, "attention_mask": mask, "logits": o.logits.contiguous(),
                   "hidden_states": torch.stack(o.hidden_states).contiguous()}, os.path.join(d, "reference.safetensors"))
        print(name, "ok", o.logits.shape, "tied:", model.lm_head.weight is model.model.embed_tokens.weight)
    with tarfile.open(out, "w") as t:
        t.add(root, arcname="rope_fixtures")


if __name__ == "__main__":
    main()
