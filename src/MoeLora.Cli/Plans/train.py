#!/usr/bin/env python3
"""LoRA and circuit-breaker training with PyTorch + PEFT + accelerate, written by `moelora plan MODEL -o DIR`.

    accelerate launch --config_file accelerate_config.yaml train.py [--data DIR] [--output DIR] [--max-steps N] [--seed N]

This file is the same for every plan; what differs (model, dtype, batch, lengths, target layers, truncation, steps,
learning rate, ...) is in train_settings.json next to it, the LoraConfig is the plan's adapter_config.json, and the
memory the plan predicted is in moelora_plan.json. accelerate_config.yaml decides DDP / FSDP / DeepSpeed.

mode "circuit-breaker": representation rerouting exactly as MoeLora's C# trainer (`moelora train`) and the reference
(GraySwanAI/circuit-breakers, `compute_loss`): per step, frozen passes with the adapters disabled (all hidden states of
the retain batch, the target layers of the circuit-breaker batch), then the adapted passes;
    loss = c_retain * mean ||m*h_lora - m*h_orig||  (all hidden states, pads counted)
         + c_cb * sum ReLU(cos(h_lora, h_orig)) * m / sum m  (target layers, real tokens)
with c_retain = a*t/2T, c_cb = a*(1 - t/2T) ("dual"), the model truncated to max(target)+1 blocks and LoRA on those.
mode "lora": causal-LM cross-entropy on the retain set.

Data (JSONL, as `moelora train` reads it): circuit-breaker rows {"prompt", "output"}; retain rows {"messages": [...]}
or {"prompt", "response"}; optional refusal rows {"prompt", "refusal"} added to the retain set. The order of the
examples equals the C# trainer's for the same seed (its System.Random is reproduced below), so one process on the
same weights gives the same losses.

Writes to the output folder: adapter_config.json + adapter_model.safetensors (a PEFT adapter of the whole model, which
`moelora eval/hidden-states --adapter` and PEFT load) and metrics.jsonl: one line per step with the C# trainer's keys,
then one {"memory": ...} line with every GPU's peak torch.cuda.max_memory_allocated() next to the plan's prediction.
No checkpoints or resume here: for those, use `moelora train`.
"""
import argparse
import copy
import json
import math
import os
import re
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # only the data-order helpers work without torch (MoeLora's own tests check them against .NET)
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# MOELORA_MEMTRACE: 1 prints each phase's memory (memtrace), 2 also the blocks alive at the first step's peak
# (memory_peak_report).
MEMTRACE = {"1": 1, "2": 2}.get(os.environ.get("MOELORA_MEMTRACE", ""), 0)


class UserError(Exception):
    """A bad input: reported as one line, exit code 1."""


# ---------------------------------------------------------------------------------------------------------------------
# Data order: .NET's System.Random(seed), so that batches hold the same examples as in the C# trainer.

class DotNetRandom:
    """System.Random(int seed) of .NET (Knuth's subtractive generator, the seeded legacy implementation)."""
    MBIG = 2**31 - 1
    MSEED = 161803398

    def __init__(self, seed):
        i32 = self._i32
        seed = i32(seed)
        mj = i32(self.MSEED - (self.MBIG if seed == -2**31 else abs(seed)))
        a = [0] * 56
        a[55] = mj
        mk, ii = 1, 0
        for i in range(1, 55):
            ii = (ii + 21) % 55
            a[ii] = mk
            mk = i32(mj - mk)
            if mk < 0:
                mk += self.MBIG
            mj = a[ii]
        for _ in range(4):
            for i in range(1, 56):
                n = (i + 30) % 55
                a[i] = i32(a[i] - a[1 + n])
                if a[i] < 0:
                    a[i] += self.MBIG
        self._a, self._inext, self._inextp = a, 0, 21

    @staticmethod
    def _i32(v):
        return (v + 2**31) % 2**32 - 2**31

    def _sample(self):
        self._inext = self._inext + 1 if self._inext < 55 else 1
        self._inextp = self._inextp + 1 if self._inextp < 55 else 1
        v = self._i32(self._a[self._inext] - self._a[self._inextp])
        if v == self.MBIG:
            v -= 1
        if v < 0:
            v += self.MBIG
        self._a[self._inext] = v
        return v * (1.0 / self.MBIG)

    def next(self, max_value):
        return int(self._sample() * max_value)

    def next_double(self):
        return self._sample()


def shuffled(n, rng):
    """Fisher-Yates from the end, as the C# trainer: the original index of every shuffled position."""
    items = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.next(i + 1)
        items[i], items[j] = items[j], items[i]
    return items


class BatchOrder:
    """Which rows micro-batch `index` takes (the C# CbDataset): each list is shuffled once with Random(seed); per epoch
    a permutation of 0..length-1 with Random(seed * 1000003 + epoch); batch k of an epoch is its k-th slice.
    length = min of the list sizes (circuit-breaker and retain are paired)."""

    def __init__(self, sizes, batch_size, seed):
        rng = DotNetRandom(seed & 0x7FFFFFFF)
        self.lists = [shuffled(n, rng) for n in sizes]
        self.length, self.batch_size, self.seed = min(sizes), batch_size, seed
        if self.length < batch_size:
            raise UserError(f"batch size {batch_size} is larger than the data set ({self.length} examples per list)")
        self.per_epoch = self.length // batch_size
        self._perms = {}

    def rows(self, index):
        epoch, k = divmod(index, self.per_epoch)
        if epoch not in self._perms:
            self._perms[epoch] = shuffled(self.length, DotNetRandom((self.seed * 1_000_003 + epoch) & 0x7FFFFFFF))
        picked = self._perms[epoch][k * self.batch_size:(k + 1) * self.batch_size]
        return [[order[r] for r in picked] for order in self.lists]


# ---------------------------------------------------------------------------------------------------------------------
# Data: the JSONL formats and the tokenisation of the reference (request left-padded + response right-padded for the
# circuit-breaker set; the joined one-shot string or the conversation, left-padded, for the retain set).

def read_jsonl(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: not a JSON object")
            yield n, row


def first_text(row, *keys):
    return next((row[k] for k in keys if isinstance(row.get(k), str)), None)


class Tokeniser:
    def __init__(self, tokenizer, template, lengths):
        self.tok, self.t, self.lengths = tokenizer, template, lengths
        # Pad ids never reach a loss (pads are masked everywhere), only the tensor shape matters.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, text, special):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def pad(self, ids, length, left):
        ids = ids[:length]  # right truncation, HF's default side
        fill = length - len(ids)
        if left:
            return [self.pad_id] * fill + ids, [0] * fill + [1] * len(ids)
        return ids + [self.pad_id] * fill, [1] * len(ids) + [0] * fill

    def request(self, prompt):
        return self.t["user_tag"] + prompt + self.t["assistant_tag"]

    def circuit_breaker(self, prompt, completion):
        req = self.request(prompt) if prompt is not None else self.t["user_tag"] + self.t["assistant_tag"]
        ri, rm = self.pad(self.encode(req, True), self.lengths["request"], left=True)
        si, sm = self.pad(self.encode(completion, False), self.lengths["response"], left=False)
        return ri + si, rm + sm

    def retain(self, row, where):
        if isinstance(row.get("messages"), list):
            parts = []
            for m in row["messages"]:
                role = m.get("role")
                if role not in self.t["messages"]:
                    raise UserError(f"{where}: message role {role!r} is not one of {', '.join(self.t['messages'])}")
                parts.append(self.t["messages"][role].replace("{content}", m.get("content") or ""))
            text = self.t["conversation_prefix"] + "".join(parts)
        else:
            prompt = first_text(row, "prompt", "instruction")
            response = first_text(row, "response", "output", "completion", "refusal", "llama3_output")
            if prompt is None or response is None:
                raise UserError(f"{where}: needs \"messages\" or \"prompt\" + \"response\"")
            text = self.request(prompt) + self.t["sep"] + response
        return self.pad(self.encode(text, True), self.lengths["retain"], left=True)

    def load_circuit_breaker(self, path, drop_prompt, seed):
        rng = DotNetRandom((seed & 0x7FFFFFFF) ^ 0x5BD1E995)
        rows = []
        for n, row in read_jsonl(path):
            prompt = first_text(row, "prompt", "instruction")
            output = first_text(row, "output", "completion", "response")
            if prompt is None or output is None:
                raise UserError(f"{path}:{n}: needs \"prompt\" and \"output\" (the harmful completion)")
            drop = drop_prompt > 0 and rng.next_double() < drop_prompt
            rows.append(self.circuit_breaker(None if drop else prompt, output))
        return rows

    def load_retain(self, path):
        return [self.retain(row, f"{path}:{n}") for n, row in read_jsonl(path)]


class Batches:
    """Micro-batch `index` as (input_ids, attention_mask) pairs, one per list (circuit-breaker and retain, or retain)."""

    def __init__(self, lists, batch_size, seed):
        if any(len(rows) == 0 for rows in lists):
            raise UserError("a data set is empty")
        self.lists, self.order = lists, BatchOrder([len(rows) for rows in lists], batch_size, seed)

    def get(self, index, device):
        out = []
        for rows, picked in zip(self.lists, self.order.rows(index)):
            ids = torch.tensor([rows[r][0] for r in picked], dtype=torch.long, device=device)
            mask = torch.tensor([rows[r][1] for r in picked], dtype=torch.long, device=device)
            out.append((ids, mask))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Losses (MoeLora.Torch.Training.CircuitBreakerLoss), coefficient and learning-rate schedules.

def layer_mask(mask, layers):
    return mask.unsqueeze(0).repeat(layers, 1, 1).unsqueeze(-1)


def reroute_loss(lora, orig, mask):
    """sum ReLU(cos) over target layers x real tokens / their count; norms in fp32. lora/orig: [T,B,S,H]."""
    m = layer_mask(mask, lora.shape[0])
    n_lora = lora / torch.norm(lora, dim=-1, keepdim=True, dtype=torch.float)
    n_orig = orig / torch.norm(orig, dim=-1, keepdim=True, dtype=torch.float)
    return torch.relu((n_lora * n_orig * m).sum(dim=-1)).sum() / m.sum()


def mean_cosine(lora, orig, mask):
    """The logged rerouting metric: per-token cosine (not floored) over real tokens."""
    m = mask.unsqueeze(0).repeat(lora.shape[0], 1, 1).float()
    return (F.cosine_similarity(lora.float(), orig.float(), dim=-1) * m).sum() / m.sum()


def retain_loss(lora_masked, orig_masked):
    """nanmean over all hidden states x batch x positions (pads zeroed but counted) of the fp32 L2 distance."""
    return torch.norm(lora_masked - orig_masked, dim=-1, p=2, dtype=torch.float).nanmean()


def coefficients(kind, alpha, step, total):
    """(c_retain, c_cb) at optimizer step `step` (1-based), as MoeLora's CoefficientSchedule."""
    if kind == "constant":
        return alpha, alpha
    if kind == "linear":
        return alpha * step / total, alpha * (1 - step / total)
    return alpha * step / (2.0 * total), alpha * (1 - step / (2.0 * total))


def learning_rate(s, step):
    """Learning rate of optimizer step `step` (0-based): optional linear warm-up, then constant / linear / cosine."""
    peak, warmup, total = s["lr"], s["warmup_steps"], s["total_steps"]
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if s["lr_schedule"] == "linear":
        return peak * max(0.0, 1 - progress)
    if s["lr_schedule"] == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak


def hidden(model, batch):
    # use_cache=False: FSDP's activation checkpointing (unlike gradient_checkpointing_enable) leaves transformers'
    # use_cache on, and the recompute then appends its keys to the first pass's cache (keys twice the queries).
    return model(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True, use_cache=False).hidden_states


def memtrace(label):
    """MOELORA_MEMTRACE >= 1: this GPU's allocated and peak-so-far memory after a phase (rank 0 only), to see which phase
    sets the peak that the plan predicts."""
    if MEMTRACE < 1 or not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        return
    gib = 2**30
    print(f"memtrace {label}: allocated {torch.cuda.memory_allocated() / gib:.2f} GiB, "
          f"peak so far {torch.cuda.max_memory_allocated() / gib:.2f} GiB", flush=True)


def circuit_breaker_step(model, peft_model, cb, retain, targets, c_retain, c_cb):
    """One micro-batch of the reference compute_loss: returns (loss tensor, retain loss, rr loss, cosine)."""
    orig_retain = orig_cb = None
    with peft_model.disable_adapter():  # adapters off = the original model; no second copy is loaded
        model.eval()
        with torch.no_grad():
            if c_retain > 0:
                h = torch.stack(hidden(model, retain)).detach()
                orig_retain = h * layer_mask(retain[1], h.shape[0])
            if c_cb > 0:
                hs = hidden(model, cb)
                if max(targets) >= len(hs):
                    raise UserError(f"target layer {max(targets)} is out of range: hidden_states has {len(hs)} entries")
                orig_cb = torch.stack([hs[layer] for layer in targets]).detach()
                del hs
    memtrace("frozen passes")
    model.train()
    total = torch.zeros((), device=cb[0].device)
    r_value = c_value = 0.0
    cosine = float("nan")
    if c_retain > 0:
        hs = hidden(model, retain)
        loss = retain_loss(torch.stack(hs) * layer_mask(retain[1], len(hs)), orig_retain)
        r_value = loss.item()
        total = total + c_retain * loss
        memtrace("adapted retain pass")
    if c_cb > 0:
        hs = hidden(model, cb)
        lora = torch.stack([hs[layer] for layer in targets])
        loss = reroute_loss(lora, orig_cb, cb[1])
        c_value = loss.item()
        with torch.no_grad():
            cosine = mean_cosine(lora, orig_cb, cb[1]).item()
        total = total + c_cb * loss
        memtrace("adapted cb pass")
    return total, r_value, c_value, cosine


def causal_lm_step(model, batch):
    ids, mask = batch
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False).loss


# ---------------------------------------------------------------------------------------------------------------------
# Model, adapter and saving.

def load_model(s, model_path, accelerator):
    """The base model (truncated to max(target)+1 blocks for circuit breakers) in the plan's dtype."""
    import transformers
    from accelerate.utils import DistributedType
    from transformers import AutoConfig, AutoModelForCausalLM

    whole = AutoConfig.from_pretrained(model_path)
    config = copy.deepcopy(whole)
    blocks = s.get("truncate_to_blocks")
    if blocks:
        text = config.get_text_config()  # the decoder's config (multimodal models nest it)
        text.num_hidden_layers = blocks
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:blocks]
    dtype = getattr(torch, DTYPES[s["dtype"]])
    kwargs = dict(config=config, dtype=dtype, attn_implementation=s["attention"])
    if s["quantization"] != "none":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if s["quantization"] == "int8" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    # One whole copy per process (ddp) loads straight onto its GPU; FSDP and DeepSpeed shard it in prepare().
    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU):
        kwargs["device_map"] = {"": accelerator.device}
    cls = getattr(transformers, s["model_class"], None) or AutoModelForCausalLM
    model = cls.from_pretrained(model_path, **kwargs)
    if s["gradient_checkpointing"] and accelerator.distributed_type != DistributedType.FSDP:
        # (FSDP: accelerate's fsdp_activation_checkpointing in the config does it instead.)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, whole, cls


def lora_config(s, plan_dir):
    from peft import LoraConfig
    config = LoraConfig.from_pretrained(plan_dir)
    config.inference_mode = False
    # As the C# trainer: LoRA on the kept blocks 0..max(target) unless the config says which.
    if s.get("truncate_to_blocks") and config.layers_to_transform is None:
        config.layers_to_transform = list(range(s["truncate_to_blocks"]))
    return config


def beyond(key, blocks):
    m = re.search(r"\.layers\.(\d+)\.", key)
    return blocks is not None and m is not None and int(m.group(1)) >= blocks


def load_initial_adapter(peft_model, path, blocks):
    """Start from the LoRA weights of a PEFT adapter (e.g. one `moelora train` wrote), to compare the two trainers."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise UserError(f"--init-adapter: {file} not found")
    state = {k: v for k, v in load_file(file).items() if not beyond(k, blocks)}
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise UserError(f"--init-adapter {path} does not match this LoRA: "
                        f"{(result.unexpected_keys + ['missing ' + k for k in missing])[:4]}")


def save_adapter(accelerator, model, s, plan_dir, whole, cls, out):
    """save_pretrained of the trained adapter; a truncated run also writes the whole model's untrained LoRA tensors
    (A as PEFT initialises it, B = 0: the identity), so the file loads on the whole model as PEFT wraps it there."""
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    state = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
    peft_model = accelerator.unwrap_model(model)
    peft_model.save_pretrained(out, state_dict=state, is_main_process=accelerator.is_main_process,
                               save_function=accelerator.save, safe_serialization=True)
    if not accelerator.is_main_process or not s.get("truncate_to_blocks"):
        return
    with torch.device("meta"):
        skeleton = cls(whole) if cls is not AutoModelForCausalLM else cls.from_config(whole)
        skeleton = get_peft_model(skeleton, lora_config(s, plan_dir))  # a fresh LoraConfig: PEFT edits the one it is given
    file = os.path.join(out, "adapter_model.safetensors")
    saved = load_file(file)
    for key, meta in get_peft_model_state_dict(skeleton).items():
        if key in saved:
            continue
        if ".lora_B." in key:
            saved[key] = torch.zeros(meta.shape, dtype=torch.float32)
        elif ".lora_A." in key:
            saved[key] = (torch.rand(meta.shape) * 2 - 1) / math.sqrt(meta.shape[-1])
        else:
            raise UserError(f"cannot write an untrained value for {key} (truncate less, or adapt only LoRA A/B)")
    save_file(saved, file + ".tmp", metadata={"format": "pt"})
    os.replace(file + ".tmp", file)


# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="Train the plan's LoRA (settings: train_settings.json next to this file).")
    p.add_argument("--settings", default=os.path.join(HERE, "train_settings.json"), help="settings file (default: next to train.py)")
    p.add_argument("--data", help="folder with cb_train.jsonl, retain_train.jsonl and optionally refusal.jsonl (default: the settings' files)")
    p.add_argument("--output", help="where the adapter and metrics.jsonl go (default: the settings' output)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the settings' total_steps; the schedule follows)")
    p.add_argument("--seed", type=int, help="seed of data order and LoRA init (default: the settings' seed)")
    p.add_argument("--model", help="local weights or Hub id (default: the settings' model)")
    p.add_argument("--init-adapter", help="start from this PEFT adapter's LoRA weights instead of PEFT's init")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in the output folder")
    return p.parse_args(argv)


def load_settings(args):
    if not os.path.isfile(args.settings):
        raise UserError(f"--settings {args.settings} not found")
    with open(args.settings, encoding="utf-8") as f:
        s = json.load(f)
    if s.get("schema") != "moelora.train/1":
        raise UserError(f"{args.settings} is not a moelora.train/1 settings file")
    base = os.path.dirname(os.path.abspath(args.settings))
    if args.max_steps is not None:
        s["total_steps"] = args.max_steps
    if args.seed is not None:
        s["seed"] = args.seed
    for key in ("cb", "retain", "refusal"):
        if args.data is not None:  # the same file names in another folder; refusal.jsonl only if it is there
            path = os.path.join(os.path.abspath(args.data), os.path.basename(s["data"][key] or key + ".jsonl"))
            s["data"][key] = path if key != "refusal" or os.path.isfile(path) else None
        elif s["data"][key] is not None:
            s["data"][key] = os.path.join(base, s["data"][key])  # relative to the settings file
    s["output"] = os.path.abspath(args.output) if args.output else os.path.join(base, s["output"])
    if args.model:
        s["model"] = args.model
    if s["total_steps"] < 1 or s["batch_size"] < 1 or s["gradient_accumulation"] < 1:
        raise UserError("total_steps, batch_size and gradient_accumulation must be at least 1")
    return s, base


def memory_peak_report(top=12):
    """MOELORA_MEMTRACE=2: replays the allocator's recorded history of the first step and prints the blocks alive at
    its peak, largest first, with the Python line that allocated each (to see what a plan's memory terms miss)."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, used, best, best_live = {}, 0, -1, {}
    for event in (e for trace in snap.get("device_traces", []) for e in trace):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            used += event["size"]
            if used > best:
                best, best_live = used, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            used -= live.pop(event["addr"])["size"]

    def where(event):
        frames = [f for f in event.get("frames", []) if f.get("filename", "").endswith(".py")]
        return "; ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in frames[:3]) or "?"

    gib = 2**30
    print(f"memtrace peak of recorded allocations: {best / gib:.2f} GiB above the recording's start", flush=True)
    for event in sorted(best_live.values(), key=lambda e: -e["size"])[:top]:
        print(f"memtrace   {event['size'] / gib:7.3f} GiB  {where(event)}", flush=True)


def predicted_peak(base):
    path = os.path.join(base, "moelora_plan.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("memory", {}).get("per_gpu_bytes")


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from peft import get_peft_model
    from transformers import AutoTokenizer

    args = parse_args(argv)
    s, base = load_settings(args)
    # LoRA on a part a text batch never reaches (a vision tower) gets no gradient: DDP must look for such parameters.
    # Gradient accumulation is done by hand below, as in the C# trainer.
    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    say = accelerator.print
    if accelerator.distributed_type == DistributedType.DEEPSPEED and s["gradient_accumulation"] != 1:
        # accelerate steps the DeepSpeed engine inside every backward(); accumulation belongs in its JSON config.
        raise UserError("gradient_accumulation must be 1 under DeepSpeed (set gradient_accumulation_steps in deepspeed_config.json)")
    out = s["output"]
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")) and not args.overwrite:
        raise UserError(f"--output {out} already holds an adapter; pass --overwrite or choose another folder")
    cb_mode = s["mode"] == "circuit-breaker"
    targets = s["cb_target_layers"] or []

    # Tokenised data first: a bad file fails before any weight is loaded.
    try:
        tokenizer = AutoTokenizer.from_pretrained(s["model"])
    except (OSError, ValueError, KeyError, TypeError):
        local = os.path.join(s["model"], "tokenizer.json")  # a folder with tokenizer.json alone (no tokenizer_config)
        if not os.path.isfile(local):
            raise
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=local)
    tok = Tokeniser(tokenizer, s["chat_template"], s["lengths"])
    retain = tok.load_retain(s["data"]["retain"])
    if cb_mode:
        if s["data"].get("refusal"):
            retain += tok.load_retain(s["data"]["refusal"])
        cb = tok.load_circuit_breaker(s["data"]["cb"], s["data"].get("cb_drop_prompt", 0.0), s["seed"])
        data = Batches([cb, retain], s["batch_size"], s["seed"])
        say(f"data: {len(cb)} circuit-breaker, {len(retain)} retain examples ({data.order.per_epoch} batches per epoch)")
    else:
        data = Batches([retain], s["batch_size"], s["seed"])
        say(f"data: {len(retain)} examples ({data.order.per_epoch} batches per epoch)")

    set_seed(s["seed"])  # LoRA init (PEFT draws from torch's generator)
    model, whole, cls = load_model(s, s["model"], accelerator)
    lora = lora_config(s, base)
    model = get_peft_model(model, lora)
    if args.init_adapter:
        load_initial_adapter(model, args.init_adapter, s.get("truncate_to_blocks"))
    trainable, total = model.get_nb_trainable_parameters()
    say(f"model: {s['model']} ({s['model_class']}, {s['dtype']}), blocks kept: {s.get('truncate_to_blocks') or 'all'}; "
        f"trainable {trainable:,} of {total:,}; {accelerator.num_processes} process(es), {accelerator.distributed_type}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["lr"],
                                  weight_decay=s["weight_decay"])  # betas (0.9, 0.999), eps 1e-8: as the C# AdamW
    model, optimizer = accelerator.prepare(model, optimizer)
    # With mixed_precision bf16/fp16 accelerate wraps forward in autocast and converts every output to fp32: a second,
    # fp32 copy of the logits and of each hidden state (measured on an H100: 3 GiB over the plan's prediction for a
    # Qwen1.5-MoE circuit-breaker step). The weights are already in the plan's dtype and PEFT casts around its fp32
    # adapters itself, as the C# trainer does: drop that wrapper (FSDP's own mixed-precision policy stays).
    peft_model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    params = [p for p in model.parameters() if p.requires_grad]
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "metrics.jsonl"), "w").close()
    accelerator.wait_for_everyone()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the plan predicts a training step's peak, not loading
        if MEMTRACE >= 2 and accelerator.is_main_process:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    steps, accum, ranks = s["total_steps"], s["gradient_accumulation"], accelerator.num_processes
    model.train()  # from_pretrained returns eval mode, where dropout and gradient checkpointing are off
    for step in range(steps):
        t0 = time.perf_counter()
        c_retain, c_cb = coefficients(s["loss_weighting"], s["cb_alpha"], step + 1, steps) if cb_mode else (0.0, 0.0)
        lr = learning_rate(s, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # loss, retain, rr, cosine: means over micro-batches, in float64 as the C# trainer sums them
        parts = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        for micro in range(accum):
            # Process r of n takes micro-batch index*n + r: one process sees exactly the C# trainer's batches.
            batches = data.get((step * accum + micro) * ranks + accelerator.process_index, accelerator.device)
            if cb_mode:
                loss, r, c, cos = circuit_breaker_step(model, peft_model, batches[0], batches[1], targets, c_retain, c_cb)
                value = c_retain * r + c_cb * c
                parts += torch.tensor([value, r, c, 0.0 if math.isnan(cos) else cos], dtype=parts.dtype, device=parts.device) / accum
            else:
                loss = causal_lm_step(model, batches[0])
                parts[0] += loss.item() / accum
            memtrace("forward")
            accelerator.backward(loss / accum)
            memtrace("backward")
        max_norm = s["max_grad_norm"] if s["max_grad_norm"] > 0 else float("inf")  # inf: measure, do not clip
        norm = accelerator.clip_grad_norm_(params, max_norm)  # None under DeepSpeed (it clips per its config)
        measured = norm is not None
        norm = float(norm) if measured else float("nan")
        parts = accelerator.reduce(parts, reduction="mean")
        if not math.isfinite(parts[0].item()) or (measured and not math.isfinite(norm)):
            raise UserError(f"step {step + 1}: loss {parts[0].item()}, gradient norm {norm}: training diverged "
                            "(lower the lr, keep clipping on, or use fp32)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memtrace(f"step {step + 1} optimizer")
        if step == 0 and MEMTRACE >= 2 and accelerator.is_main_process and torch.cuda.is_available():
            memory_peak_report()
        row = dict(step=step + 1, loss=parts[0].item(), retain_loss=parts[1].item(), cb_loss=parts[2].item(),
                   retain_coeff=c_retain, cb_coeff=c_cb, cb_cosine=parts[3].item() if c_cb > 0 else None,
                   grad_norm=norm if math.isfinite(norm) else None, lr=lr, seconds=round(time.perf_counter() - t0, 4))
        if accelerator.is_main_process:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if step == 0 or (step + 1) % max(1, steps // 15) == 0 or step + 1 == steps:
            parts_text = (f"  retain {row['retain_loss']:.4f} (c {c_retain:.2f})  rr {row['cb_loss']:.4f} (c {c_cb:.2f})"
                          if cb_mode else "")
            say(f"step {step + 1:4}/{steps}  loss {row['loss']:.4f}{parts_text}  |g| {norm:.3f}")

    # Peak memory of every GPU, next to what the plan predicted for one.
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()] if torch.cuda.is_available()
                         else [0, 0], dtype=torch.float64, device=accelerator.device)
    peaks = accelerator.gather(peaks.unsqueeze(0)).view(-1, 2)
    predicted = predicted_peak(base)
    memory = dict(per_gpu_peak_allocated_bytes=[int(x) for x in peaks[:, 0].tolist()],
                  per_gpu_peak_reserved_bytes=[int(x) for x in peaks[:, 1].tolist()],
                  predicted_per_gpu_bytes=predicted, distributed_type=str(accelerator.distributed_type),
                  processes=ranks, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    if predicted:
        memory["measured_over_predicted"] = max(memory["per_gpu_peak_allocated_bytes"]) / predicted
    save_adapter(accelerator, model, s, base, whole, cls, out)
    if accelerator.is_main_process:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"memory": memory}) + "\n")
        gib = 2**30
        peaks = ", ".join(f"{b / gib:.2f}" for b in memory["per_gpu_peak_allocated_bytes"])
        say(f"peak allocated per GPU: {peaks} GiB; plan: " + (f"{predicted / gib:.2f} GiB" if predicted else "no moelora_plan.json"))
        say(f"done: PEFT adapter and metrics.jsonl in {out}")
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
