"""Load the files `moelora plan` writes with the real libraries, on a machine that has them.

Run from the repo root with plan folders in .plancheck/<name>/ (accelerate_config.yaml, deepspeed_config.json,
adapter_config.json, moelora_plan.json):

    python3 tools/plan_check/check_plan_files.py .plancheck $OUT/plan_check.json

For every folder it checks that accelerate parses the YAML into its cluster config, that DeepSpeed (when installed)
accepts the JSON, and that PEFT's LoraConfig.from_pretrained reads adapter_config.json and, applied with
get_peft_model to the model built on the meta device from the catalog config, trains exactly the parameter count the
plan states.
"""
import json
import os
import sys
import traceback

import torch
import transformers
import peft
import accelerate
from accelerate.commands.config.config_args import load_config_from_file
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

CATALOG = "src/MoeLora.Core/Catalog/configs"


def build(model_id):
    import shutil
    import tempfile
    path = os.path.join(CATALOG, model_id.replace("/", "__") + ".json")
    with open(path) as f:
        raw = json.load(f)
    # As from a checkpoint folder: config.json in a directory, AutoConfig.from_pretrained.
    d = tempfile.mkdtemp()
    shutil.copy(path, os.path.join(d, "config.json"))
    config = AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        if raw.get("model_type") == "llama4":
            return transformers.Llama4ForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(config)


def check(folder):
    result = {"folder": os.path.basename(folder)}
    plan = json.load(open(os.path.join(folder, "moelora_plan.json")))
    result["model"] = plan["model"]
    try:
        cfg = load_config_from_file(os.path.join(folder, "accelerate_config.yaml"))
        result["accelerate"] = {"ok": True, "class": type(cfg).__name__, "distributed_type": str(cfg.distributed_type),
                                "num_processes": cfg.num_processes, "mixed_precision": str(cfg.mixed_precision)}
    except Exception as e:
        result["accelerate"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        import deepspeed  # noqa: F401
        from deepspeed.runtime.config import DeepSpeedConfig
        ds = DeepSpeedConfig(os.path.join(folder, "deepspeed_config.json"))
        result["deepspeed"] = {"ok": True, "zero_stage": ds.zero_optimization_stage, "train_batch_size": ds.train_batch_size}
    except ImportError as e:
        ds_json = json.load(open(os.path.join(folder, "deepspeed_config.json")))
        result["deepspeed"] = {"ok": None, "error": f"deepspeed not installed ({e}); parsed as JSON only",
                               "zero_stage": ds_json.get("zero_optimization", {}).get("stage")}
    except Exception as e:
        result["deepspeed"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        lora = LoraConfig.from_pretrained(folder)
        model = build(plan["model"])
        pm = get_peft_model(model, lora)
        trainable, total = pm.get_nb_trainable_parameters()
        result["peft"] = {"ok": trainable == plan["trainable_parameters"], "trainable": trainable,
                          "planned_trainable": plan["trainable_parameters"], "total": total}
    except Exception as e:
        result["peft"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    return result


def main():
    root, out = sys.argv[1], sys.argv[2]
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "accelerate": accelerate.__version__},
               "plans": [check(os.path.join(root, d)) for d in sorted(os.listdir(root))]}
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
