#!/usr/bin/env python3
"""Merges a discover_moe.py run made for a few types (--only) into the repository's oracle data:
their entries in moe_tiny_models.json.gz and moe_tiny_peft.json.gz are replaced (or added), and their moe_types.json
records take the run's heads, conversion facts and listing (the default config itself is not kept, as before).
  python3 tools/oracle/merge_discover.py RUN_DIR
"""
import gzip
import json
import os
import sys

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "MoeLora.Core.Tests", "Data", "oracle-moe")


def load_gz(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def save_gz(path, data):
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def main():
    run = sys.argv[1]
    for name in ("moe_tiny_models.json.gz", "moe_tiny_peft.json.gz"):
        new = load_gz(os.path.join(run, name))
        path = os.path.join(DATA, name)
        old = load_gz(path)
        if new.get("versions") != old.get("versions"):
            sys.exit(f"{name}: versions differ ({new.get('versions')} vs {old.get('versions')}); not merged")
        for t, v in new["models"].items():
            old["models"][t] = v
            print(f"{name}: {t} {'error: ' + v['error'] if isinstance(v, dict) and 'error' in v else 'merged'}")
        save_gz(path, old)
    types_path = os.path.join(DATA, "moe_types.json")
    with open(types_path) as f:
        types = json.load(f)
    with open(os.path.join(run, "moe_types.json")) as f:
        new_types = json.load(f)["types"]
    for t, rec in new_types.items():
        types["types"][t] = {k: v for k, v in rec.items() if k in ("heads", "conversion", "listed")}
    tmp = types_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(types, f, indent=0, separators=(",", ":"))  # the file's own format: one key per line
    os.replace(tmp, types_path)


if __name__ == "__main__":
    main()
