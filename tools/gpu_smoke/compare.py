#!/usr/bin/env python3
"""Compares `moelora hidden-states` output with a fixture's transformers reference.

Usage: compare.py OUT.safetensors REFERENCE.safetensors TOLERANCE

The error is MoeLora's MaskedRelError (tests/MoeLora.Torch.Tests/Fixtures.cs): max |out - ref| over the real tokens
(attention_mask == 1) divided by max |ref| there, for `logits` and for every hidden state. Standard library only, so it
runs anywhere; prints one line and exits 1 when a tensor is over TOLERANCE.
"""
import json
import struct
import sys
from array import array

FORMATS = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8), "I32": ("i", 4)}


def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        dtype = meta["dtype"]
        if dtype == "BF16":  # widen to fp32 bit patterns
            raw = array("H", data[begin:end])
            values = array("f", struct.unpack(f"<{len(raw)}f", b"".join(struct.pack("<I", v << 16) for v in raw)))
        elif dtype in FORMATS:
            values = array(FORMATS[dtype][0], data[begin:end])
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {dtype}, which this script does not read")
        tensors[name] = (meta["shape"], values)
    return tensors


def masked_rel_error(out, ref, mask, features):
    """out/ref: flat [..., B*S*features]; mask: flat [B*S]."""
    diff = scale = 0.0
    per_state = len(mask) * features
    for base in range(0, len(ref), per_state):
        for t, m in enumerate(mask):
            if m != 1:
                continue
            start = base + t * features
            for i in range(start, start + features):
                diff = max(diff, abs(out[i] - ref[i]))
                scale = max(scale, abs(ref[i]))
    return diff / max(scale, 1e-12)


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    out, ref, tol = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3])
    mask = ref["attention_mask"][1]
    worst = []
    # Hidden states come stacked, or one key per state (hidden_states.N) where their shapes differ (hyper-connection
    # streams [B, S, n, H] before the normed [B, S, H]): each such state's per-token features are all its trailing dims.
    per_key = sorted((k for k in ref if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
    for name in ["logits"] + (per_key if "hidden_states" not in ref else ["hidden_states"]):
        if name not in out:
            print(f"FAIL {name}: missing from the output")
            sys.exit(1)
        (oshape, o), (rshape, r) = out[name], ref[name]
        if oshape != rshape:
            print(f"FAIL {name}: shape {oshape} vs reference {rshape}")
            sys.exit(1)
        features = rshape[-1]
        if name.startswith("hidden_states."):
            features = 1
            for d in rshape[2:]:
                features *= d
        worst.append((masked_rel_error(o, r, mask, features), name))
    err, name = max(worst)
    status = "ok  " if err < tol else "FAIL"
    print(f"{status} max masked relative error {err:.2e} ({name}; tolerance {tol:g}): " +
          ", ".join(f"{n} {e:.2e}" for e, n in worst))
    sys.exit(0 if err < tol else 1)


if __name__ == "__main__":
    main()
