#!/usr/bin/env python3
"""The PyTorch + PEFT reference of the GPU step benchmark: one LoRA or circuit-breaker training step on a
random-initialised model built on the GPU, timed and with its peak GPU memory. Our side is bench/gpu/run_ours.sh
(`moelora report --load-model --measure-steps lora,cb`); bench/gpu/compare.py puts the two side by side.

Runs on the GPU host (torch 2.11, transformers 5.17, peft 0.21, no network):
    python3 bench/gpu/peft_step.py --config src/MoeLora.Core/Catalog/configs/Qwen__Qwen3-30B-A3B.json \
        --mode lora --batch 1 --tokens 1024 --steps 4 --out result.json

Both sides do the same work so that the numbers compare:
- the model is built from config.json with random weights directly on the GPU, in bfloat16;
- LoRA r=16, lora_alpha=16, lora_dropout=0 (PEFT's ParamWrapper refuses dropout) on the seed report's targets
  (q/k/v/o_proj and gate/up/down_proj; PEFT 0.21 rewrites the expert names onto the fused experts' gate_up_proj and
  down_proj parameters), adapters in float32 (PEFT's default autocast_adapter_dtype);
- lora: causal-LM cross-entropy on random tokens, backward, AdamW step (lr 1e-4, no weight decay);
- cb: the circuit-breaker step of the reference recipe on the truncated model (blocks 0..max(target), LoRA on those
  blocks only): frozen retain and CB passes with adapters disabled, then the adapted passes, retain loss over all
  hidden states plus RR loss on the target layers, backward, gradient clipping (max norm 1), AdamW step. Coefficients 0.5 / 4.5 (step 30 of
  alpha 5), so every pass runs.
No gradient checkpointing on either side unless --gradient-checkpointing (transformers' gradient_checkpointing_enable,
non-reentrant; ours: report --gradient-checkpointing, BENCH_CHECKPOINTING=1 in tools/gpu_smoke/run_gpu.sh). Peak memory is what the caching allocator reserved and what the device
reports in use (total - free, CUDA context included), the figure our C# side can also read.
"""
import argparse
import json
import statistics
import sys
import time

import torch


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def used_bytes():
    free, total = torch.cuda.mem_get_info()
    return total - free


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.load(open(args.config))
    config = AutoConfig.for_model(**raw)
    layers = config.num_hidden_layers
    if args.mode == "cb":
        layers = max(args.target_layers) + 1
        config.num_hidden_layers = layers  # the reference recipe's truncation (drop blocks after the last target)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(args.seed)
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    build_s = time.time() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=list(range(layers)) if args.mode == "cb" else None,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, config, dict(build_s=build_s, weight_bytes=weights, trainable_parameters=trainable, layers=layers,
                               experts_implementation=str(getattr(config, "_experts_implementation", None)),
                               attn_implementation=str(getattr(config, "_attn_implementation", None)))


def lora_step(model, vocab, args, gen):
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen, device="cpu").cuda()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    return out.loss.detach()


def cb_step(model, vocab, args, gen):
    def batch():
        ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen, device="cpu").cuda()
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)

    retain, cb = batch(), batch()
    targets = args.target_layers
    retain_coeff, cb_coeff = 0.5, 4.5
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            orig_retain = torch.stack(model(**retain)["hidden_states"]).detach()
            orig_retain *= retain["attention_mask"].repeat(len(orig_retain), 1, 1).unsqueeze(-1)
            cb_out = model(**cb)["hidden_states"]
            orig_cb = torch.stack([cb_out[l].detach() for l in targets])
            del cb_out
    model.train()
    mask_r = retain["attention_mask"]
    lora_retain = torch.stack(model(**retain)["hidden_states"]) * mask_r.repeat(len(orig_retain), 1, 1).unsqueeze(-1)
    retain_loss = torch.norm(lora_retain - orig_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    # One adapted CB pass whose target states are stacked, as the reference's compute_loss does. (Until 2026-12-07 this
    # line called the model inside the comprehension, once per target layer: an extra adapted pass, with its merged
    # expert weights kept for backward, in every PEFT circuit-breaker step measured before then.)
    cb_hidden = model(**cb)["hidden_states"]
    lora_cb = torch.stack([cb_hidden[l] for l in targets])
    del cb_hidden
    mask_cb = cb["attention_mask"].repeat(len(targets), 1, 1).unsqueeze(-1)
    n_lora = lora_cb / torch.norm(lora_cb, dim=-1, keepdim=True, dtype=torch.float)
    n_orig = orig_cb / torch.norm(orig_cb, dim=-1, keepdim=True, dtype=torch.float)
    inner = (n_lora * n_orig * mask_cb).sum(dim=-1)
    cb_loss = torch.relu(inner).sum() / mask_cb.sum()
    loss = retain_coeff * retain_loss + cb_coeff * cb_loss
    loss.backward()
    return loss.detach()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["lora", "cb"], default="lora")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--target-layers", default="10,20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.target_layers = [int(x) for x in args.target_layers.split(",")]
    res = dict(side="pytorch+peft", torch=torch.__version__, gpu=torch.cuda.get_device_name(0), mode=args.mode,
               batch=args.batch, tokens=args.tokens, rank=args.rank, config=args.config,
               gradient_checkpointing=args.gradient_checkpointing)
    try:
        import peft
        import transformers

        res.update(transformers=transformers.__version__, peft=peft.__version__)
        base_used = used_bytes()
        model, config, info = build(args)
        res.update(info)
        res["after_build_used_bytes"] = used_bytes()
        trainable = [p for p in model.parameters() if p.requires_grad]
        # weight_decay 0 as MoeLora's step (and the HF Trainer default the reference trains with); torch's AdamW
        # default is 0.01, one more multi-tensor multiply per step (until 2026-12-07 this side used it).
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(1)
        step = lora_step if args.mode == "lora" else cb_step
        times, losses = [], []
        for i in range(args.steps + 1):
            res["phase"] = f"step {i + 1}"
            torch.cuda.synchronize()
            t0 = time.time()
            loss = step(model, config.vocab_size, args, gen)
            if args.mode == "cb":
                # The circuit-breaker step clips as the trainer does (HF Trainer's max_grad_norm 1.0), as ours does
                # (added 2026-12-07; earlier PEFT circuit-breaker steps did not clip).
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            # Read after the optimizer is queued, as MoeLora's step does: reading it first would make the host wait
            # for backward before queueing AdamW (until 2026-12-07 this side read it first).
            losses.append(loss.item())
            torch.cuda.synchronize()
            times.append(time.time() - t0)
            log(f"{args.mode} step {i + 1}: {times[-1]:.3f} s, loss {losses[-1]:.4f}")
        res.pop("phase")
        step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
        tokens = args.batch * args.tokens * (2 if args.mode == "cb" else 1)
        res.update(ok=True, step_s=step_s, step_times_s=times, losses=losses, tokens_per_step=tokens,
                   tokens_per_s=tokens / step_s, base_used_bytes=base_used,
                   peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(), end_used_bytes=used_bytes())
    except torch.OutOfMemoryError as e:
        res.update(ok=False, oom=True, error=str(e).split("\n")[0][:400],
                   peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(), end_used_bytes=used_bytes())
    except Exception as e:  # recorded, not raised: the benchmark script compares whatever both sides produced
        res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    json.dump(res, open(args.out, "w"), indent=1)
    log(json.dumps({k: v for k, v in res.items() if k not in ("step_times_s", "losses")}))


if __name__ == "__main__":
    main()
