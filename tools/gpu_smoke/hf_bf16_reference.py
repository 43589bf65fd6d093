#!/usr/bin/env python3
"""transformers' own bfloat16 output for a fixture, on the GPU, in the fixture's reference layout (runs on the GPU host).

    python3 tools/gpu_smoke/hf_bf16_reference.py FIXTURE_DIR OUT.safetensors

Writes attention_mask, logits and hidden states (stacked as `hidden_states`, or `hidden_states.N` where their shapes
differ, as the reference does) in float32, so that tools/gpu_smoke/compare.py can hold MoeLora's bf16 output against
transformers' bf16 output. The parity stage uses it where MoeLora's bf16 error against the fp32 reference is over the
stated bound: on random tiny models a router decision that flips in bf16 moves the output far from fp32 in transformers
too, so the fair check there is MoeLora's bf16 against transformers' bf16.
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_cuda_check import hf_run  # noqa: E402 - the same transformers forward as the full check


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    fixture, out = sys.argv[1], sys.argv[2]
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    res = hf_run(os.path.join(fixture, "model"), ref, torch.bfloat16)
    tensors = {"attention_mask": ref["attention_mask"].contiguous(), "logits": res["logits"].contiguous()}
    states = res["states"]
    if "hidden_states" in ref:
        tensors["hidden_states"] = torch.stack(states).contiguous()
    else:
        tensors.update({f"hidden_states.{i}": s.contiguous() for i, s in enumerate(states)})
    save_file(tensors, out)


if __name__ == "__main__":
    main()
