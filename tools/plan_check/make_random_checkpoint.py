#!/usr/bin/env python3
"""A random-weight checkpoint of a catalog config, for measuring a plan folder's memory on a host with no network:

    python3 tools/plan_check/make_random_checkpoint.py CONFIG.json OUT_DIR TOKENIZER.json

The model is built from config.json on the GPU in bfloat16 (seed 0, as bench/gpu/peft_step.py) and saved with
save_pretrained; TOKENIZER.json (any tokenizer whose ids are below the model's vocabulary, e.g. the tiny preset's
byte-level one) is copied next to it so train.py can tokenise. Weights do not change a step's memory, only shapes do.
"""
import json
import os
import shutil
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    config_path, out, tokenizer = sys.argv[1:4]
    config = AutoConfig.for_model(**json.load(open(config_path)))
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    shutil.copy(tokenizer, os.path.join(out, "tokenizer.json"))
    print(f"{out}: {params:,} parameters (bf16) from {config_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
