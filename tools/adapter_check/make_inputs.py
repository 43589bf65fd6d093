#!/usr/bin/env python3
"""Writes tools/adapter_check/inputs/<model>/<case> with `moelora adapter convert` (standard library only).

Run from the repository root after `dotnet build src/MoeLora.Cli -c Release`:

    python3 tools/adapter_check/make_inputs.py

Cases, from the PEFT 0.21 fixture adapter tests/MoeLora.Torch.Tests/Data/hf-tiny/<model>/attn_plus_experts:
  per-expert          `--to per-expert` (the checkpoint's per-expert names: PEFT <= 0.18's keys)
  peft-v5             per-expert converted back (byte-identical to the fixture)
  vllm                `--to vllm` (Llama 4 is refused: PEFT stores its expert LoRA transposed)
  per-expert-own-a    per-expert with each up LoRA's A doubled and B halved: own gate/up factors, the same ΔW
  peft-v5-blockdiag   per-expert-own-a fused (A stacked, B block-diagonal, rank and alpha doubled)
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "MoeLora.Torch.Tests", "Data", "hf-tiny")
INPUTS = os.path.join(ROOT, "tools", "adapter_check", "inputs")
MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss"]


def moelora(*args: str) -> subprocess.CompletedProcess:
    cmd = ["dotnet", "run", "--project", os.path.join(ROOT, "src", "MoeLora.Cli"), "-c", "Release", "--no-build", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def read_safetensors(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_safetensors(path: str, header: dict, tensors: dict[str, bytes]) -> None:
    names = sorted(k for k in header if k != "__metadata__")
    out_header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        out_header[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"], "data_offsets": [offset, offset + len(tensors[k])]}
        offset += len(tensors[k])
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(tensors[k] for k in names))


def own_a(src: str, dst: str) -> None:
    """Up LoRAs (up_proj / w3) get A·2 and B/2: exact in binary floating point, ΔW unchanged, A no longer shared."""
    shutil.copytree(src, dst)
    header, body = read_safetensors(os.path.join(src, "adapter_model.safetensors"))
    tensors = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        raw = body[v["data_offsets"][0]:v["data_offsets"][1]]
        module = k.rsplit(".lora_", 1)[0]
        if module.endswith((".up_proj", ".w3")):
            assert v["dtype"] == "F32", k
            factor = 2.0 if ".lora_A." in k else 0.5
            values = struct.unpack(f"<{len(raw) // 4}f", raw)
            raw = struct.pack(f"<{len(values)}f", *(x * factor for x in values))
        tensors[k] = raw
    write_safetensors(os.path.join(dst, "adapter_model.safetensors"), header, tensors)


def main() -> int:
    shutil.rmtree(INPUTS, ignore_errors=True)
    for model in MODELS:
        fixture = os.path.join(FIXTURES, model, "attn_plus_experts")
        out = os.path.join(INPUTS, model)
        os.makedirs(out)
        steps = [
            (fixture, "per-expert", "per-expert"),
            (os.path.join(out, "per-expert"), "peft-v5", "peft-v5"),
            (fixture, "vllm", "vllm"),
        ]
        for src, to, case in steps:
            r = moelora("adapter", "convert", src, "--to", to, "-o", os.path.join(out, case))
            print(f"{model}/{case}: {(r.stdout or r.stderr).strip()}")
        own_a(os.path.join(out, "per-expert"), os.path.join(out, "per-expert-own-a"))
        r = moelora("adapter", "convert", os.path.join(out, "per-expert-own-a"), "--to", "peft-v5", "-o", os.path.join(out, "peft-v5-blockdiag"))
        print(f"{model}/peft-v5-blockdiag: {(r.stdout or r.stderr).strip()}")
        if r.returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
