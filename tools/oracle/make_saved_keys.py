"""What save_pretrained writes for every tiny config of make_oracle.py (transformers 5.17, default
save_original_format=True): checkpoint keys and shapes in the legacy (v4) naming, which MoeLora's v4 trees must match.

    python3 tools/oracle/make_saved_keys.py $OUT/tiny_saved_keys.json.gz
"""
import gzip
import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_oracle as mo  # noqa: E402


def main():
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in mo.TINY_CONFIGS.items():
        try:
            config = mo.load_config(cfg)
            torch.manual_seed(0)
            if config.model_type == "llama4":
                from transformers import Llama4ForConditionalGeneration
                model = Llama4ForConditionalGeneration._from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                keys = []
                for f in sorted(x for x in os.listdir(d) if x.endswith(".safetensors")):
                    with safe_open(os.path.join(d, f), "pt") as s:
                        for k in s.keys():
                            keys.append([k, list(s.get_slice(k).get_shape())])
            out[name] = {"saved": sorted(keys)}
            print(name, len(keys), flush=True)
        except Exception as e:  # record and go on
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            print(name, "ERROR", e, flush=True)
    with gzip.open(sys.argv[1], "wt") as f:
        json.dump({"models": out}, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
