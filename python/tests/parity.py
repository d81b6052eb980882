"""PyTorch side of the parity checks between the transformers implementation of a RecurFormer
(`python/recurformer_hf/`, copied into every checkpoint) and the Rust engine (issue 23).

Driven by `crates/recurformer/tests/pytorch_parity.rs`, which writes each case directory:
a RecurFormer checkpoint (as `convert` / `train` write it) plus `rust.safetensors` with
  input_ids  I64 (1, t)    the prompt,
  logits     F32 (1, t, v) the Rust engine's logits over it (full forward, f32),
  greedy     I64 (1, t+k)  the Rust engine's greedy continuation (KV / state cache),
  logits_f64 F64 (1, t, v) the Rust engine's logits with every weight in f64 (training forward),
and optionally `prompt.json` ({"text", "ids"}: the prompt and the Rust tokenizer's ids).
For every case this script loads the checkpoint the way a user would
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`), measures and prints
  - max |logits_pytorch - logits_rust| (full forward),
  - whether `generate(do_sample=False)` continues exactly as the Rust engine did,
  - max |cached - full| in PyTorch: prefill of part of the prompt, then a chunk of 3, then one
    token at a time, against one full forward,
  - max |chunked scan - sequential scan| in PyTorch,
  - the logit difference and cached vs full again with both models in f64,
and writes them to the JSON file named by --out; the Rust test asserts on them. Exit status 0
unless something could not run.

usage: python parity.py --out results.json CASE_DIR [CASE_DIR ...]
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


def cached_vs_full(model, ids, full, prefill):
    """Logits of a prefill, a chunk of 3 and single tokens through one cache, against `full`."""
    t = ids.shape[1]
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, parts, i = out.cache, [out.logits], prefill
    if i + 3 <= t:
        out = model(input_ids=ids[:, i : i + 3], cache=cache, use_cache=True)
        parts.append(out.logits)
        cache, i = out.cache, i + 3
    while i < t:
        out = model(input_ids=ids[:, i : i + 1], cache=cache, use_cache=True)
        parts.append(out.logits)
        cache, i = out.cache, i + 1
    return max_diff(torch.cat(parts, dim=1), full)


def checkpointing_grad_diff(model, ids):
    """Max difference between the gradients with and without activation checkpointing."""
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        if ckpt:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        logits = model(input_ids=ids, use_cache=False).logits
        torch.log_softmax(logits, -1)[..., 0].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.eval()
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.zero_grad()
    assert len(grads[0]) == len(grads[1]) > 0
    return max(max_diff(a, b) for a, b in zip(*grads))


def check(case):
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(case, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    load_s = time.time() - t0
    ref = load_file(f"{case}/rust.safetensors")
    ids, rust_logits, rust_greedy = ref["input_ids"].long(), ref["logits"], ref["greedy"].long()
    t = ids.shape[1]
    res = {"case": case, "class": type(model).__name__, "tokens": t, "load_s": round(load_s, 2)}
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        res["max_abs_logit_diff"] = max_diff(full, rust_logits)
        res["max_abs_logit"] = float(rust_logits.abs().max())
        new = rust_greedy.shape[1] - t
        # Plain argmax at every step like the Rust side: no end-of-sequence stop.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new)
        res["greedy_equal"] = gen.tolist() == rust_greedy.tolist()
        res["greedy_pytorch"] = gen[0, t:].tolist()
        res["greedy_rust"] = rust_greedy[0, t:].tolist()
        res["cached_vs_full"] = cached_vs_full(model, ids, full, max(1, t // 2))
        model.set_mixer_scan("sequential")
        seq = model(input_ids=ids, use_cache=False).logits
        model.set_mixer_scan("chunked")
        res["chunked_vs_sequential"] = max_diff(seq, full)
        res["mixers"] = sum(1 for l in model.model.layers if l.mixer is not None)
        res["windowed"] = sum(1 for l in model.model.layers if l.local_attn is not None)
    if sum(p.numel() for p in model.parameters()) < 10_000_000:
        res["checkpointing_grad_diff"] = checkpointing_grad_diff(model, ids[:, :24])
    try:
        tok = AutoTokenizer.from_pretrained(case)
        res["tokenizer"] = type(tok).__name__
        if os.path.exists(f"{case}/prompt.json"):
            with open(f"{case}/prompt.json") as f:
                p = json.load(f)
            res["tokenizer_ids_equal"] = tok(p["text"], add_special_tokens=False).input_ids == p["ids"]
    except (OSError, ValueError):
        res["tokenizer"] = None  # the tiny checkpoints have no tokenizer files
    if "logits_f64" in ref:
        # The same comparison in f64 on both sides: the functions themselves, without f32 rounding.
        model.double()
        with torch.no_grad():
            full64 = model(input_ids=ids, use_cache=False).logits
            res["max_abs_logit_diff_f64"] = max_diff(full64, ref["logits_f64"])
            res["cached_vs_full_f64"] = cached_vs_full(model, ids, full64, max(1, t // 2))
        model.float()
    res["seconds"] = round(time.time() - t0, 2)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("cases", nargs="+")
    a = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for case in a.cases:
        r = check(case)
        print(json.dumps(r), flush=True)
        results.append(r)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
