"""Why a type's small config does not build: for each type, the oracle's shrunk config (discover_moe.shrink plus its
OVERRIDES) is built on the meta device as discover_moe builds it (the causal-LM class, else image-text-to-text, else the
multimodal-LM class); a failure prints its whole traceback with the source lines around each modeling-file frame.
Also writes each type's default config and shrunk config as JSON (for crafting overrides offline).
  python3 tools/oracle/probe_build.py OUT_DIR TYPE...
"""
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import discover_moe as dm  # noqa: E402
import make_oracle as mo  # noqa: E402


def build_any(config, heads):
    """discover_moe.build (the causal-LM class, else image-text-to-text), else the multimodal-LM class."""
    import transformers

    cls = heads.get("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES")
    if cls and not ({"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"} & set(heads)):
        return getattr(transformers, cls)._from_config(config), "multimodal_lm:" + cls
    return dm.build(config, heads)


def context(tb):
    out = []
    for fr in traceback.extract_tb(tb):
        if "/transformers/models/" in fr.filename:
            try:
                lines = open(fr.filename).read().splitlines()
            except OSError:
                continue
            lo, hi = max(0, fr.lineno - 12), min(len(lines), fr.lineno + 4)
            out.append(f"--- {fr.filename.split('/transformers/')[-1]}:{fr.lineno}")
            out += [f"{i + 1:5d}{'>' if i + 1 == fr.lineno else ' '} {lines[i]}" for i in range(lo, hi)]
    return "\n".join(out)


def main():
    import torch
    from transformers import CONFIG_MAPPING

    out, types = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    import tarfile
    import tempfile

    src = tempfile.mkdtemp()
    dm.copy_sources(types, os.path.join(src, "src"))
    with tarfile.open(os.path.join(out, "probe_sources.tar.gz"), "w:gz") as tf:
        tf.add(os.path.join(src, "src"), arcname="src")
    for t in types:
        print(f"===== {t}", flush=True)
        try:
            d = CONFIG_MAPPING[t]().to_dict()
        except Exception as e:
            print("default config fails:", mo.err_str(e))
            continue
        heads = dm.auto_heads(t)
        cfg = dm.shrink(mo.jsonable(d), "oracle")
        dm.apply_overrides(cfg, dm.OVERRIDES.get(t, {}))
        cfg["model_type"] = t
        with open(os.path.join(out, f"{t}.json"), "w") as f:
            json.dump({"heads": heads, "default": mo.jsonable(d), "shrunk": cfg}, f, indent=1)
        try:
            config = mo.load_config(cfg)
            with torch.device("meta"):
                model, head = build_any(config, heads)
            n = sum(1 for _ in model.named_parameters())
            print(f"builds as {head}: {type(model).__name__}, {n} parameters")
        except Exception as e:
            print("FAILS:", mo.err_str(e))
            print(context(e.__traceback__))


if __name__ == "__main__":
    main()
