#!/usr/bin/env python3
"""Speed reference for the Rust bench: prefill and decode speed of PyTorch + transformers (f32) or
llama.cpp (the GGUF as it is, Q4_1) on the same model and prompts.

    reference/.venv/bin/python reference/bench_torch.py --gguf data/models/smollm2-135m-instruct-q4_1.gguf \
        --contexts 512 2048 8192 --decode-steps 32 --threads 2 [--engine pytorch|llama_cpp] [--isolate]

For each context length N: the prompt is the first N tokens of data/text/austen/emma.txt (the text
repeated if it is too short); the prefill is one forward over the N tokens with a fresh KV cache,
timed as a whole; then --decode-steps single-token steps continue greedily from it with the cache,
each timed alone. Reported per context: prefill tokens/s (N / prefill time), decode tokens/s
(1 / median step time) and peak RSS.

peak_rss_bytes is getrusage(RUSAGE_SELF).ru_maxrss, the peak of the whole process so far: with
several contexts in one process a later entry is at least the earlier one. --isolate runs each
context in a child process of its own so each peak is that context's alone.

Prints one JSON object on stdout (progress goes to stderr):
  {"engine": "pytorch", "threads": 2, "results": [{"context": 512, "prefill_tok_s": ..,
   "decode_tok_s": .., "peak_rss_bytes": ..}, ...], ...}
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(ROOT, "data", "text", "austen", "emma.txt")


def log(msg):
    print(f"[bench_torch] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prompt_tokens(all_ids, n):
    """The first n ids of the text, repeating the text when it is shorter than n."""
    if not all_ids:
        raise SystemExit("bench_torch: the prompt text tokenized to nothing")
    reps = -(-n // len(all_ids))
    return (all_ids * reps)[:n]


# --- PyTorch + transformers ----------------------------------------------------------------------
class TorchEngine:
    name = "pytorch"

    def __init__(self, gguf_path, threads, attn):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import cache_kwarg, forward_cached

        self.torch = torch
        self.forward_cached = forward_cached
        torch.set_num_threads(threads)
        model_dir, name = os.path.split(os.path.abspath(gguf_path))
        t = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=name)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=name, dtype=torch.float32,
                                                          attn_implementation=attn).eval()
        self.kwarg = cache_kwarg(self.model)
        self.n_ctx_train = getattr(self.model.config, "max_position_embeddings", None)
        self.load_s = time.perf_counter() - t
        import transformers

        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        self.settings = {"attn_implementation": attn, "dtype": "float32"}

    def tokenize(self, text):
        return self.tok(text, add_special_tokens=False).input_ids

    def run(self, ids, steps):
        torch = self.torch
        with torch.inference_mode():
            t = time.perf_counter()
            out, cache = self.forward_cached(self.model, torch.tensor([ids]), None, self.kwarg)
            nxt = int(out.logits[0, -1].argmax())
            prefill_s = time.perf_counter() - t
            step_s = []
            for _ in range(steps):
                t = time.perf_counter()
                out, cache = self.forward_cached(self.model, torch.tensor([[nxt]]), cache, self.kwarg)
                nxt = int(out.logits[0, -1].argmax())
                step_s.append(time.perf_counter() - t)
        return prefill_s, step_s


# --- llama.cpp -----------------------------------------------------------------------------------
class LlamaCppEngine:
    name = "llama_cpp"

    def __init__(self, gguf_path, threads, n_ctx):
        import llama_cpp
        import numpy as np

        self.np = np
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t
        self.n_ctx_train = self.llm._model.n_ctx_train()
        self.n_vocab = self.llm.n_vocab()
        self.versions = {"llama_cpp_python": llama_cpp.__version__}
        self.settings = {"n_ctx": self.llm.n_ctx(), "n_batch": 512, "weights": "as stored in the GGUF"}

    def tokenize(self, text):
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _argmax_last(self):
        # Without logits_all, Llama.eval() keeps no logits in Python; read the last output row from
        # the context (llama_get_logits: the logits of the last token of the last batch).
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(self.np.argmax(logits))

    def run(self, ids, steps):
        # n_tokens = 0: eval() first drops every cached position >= n_tokens, so the cache starts empty
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        nxt = self._argmax_last()
        prefill_s = time.perf_counter() - t
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            self.llm.eval([nxt])
            nxt = self._argmax_last()
            step_s.append(time.perf_counter() - t)
        return prefill_s, step_s


def bench(args):
    contexts = args.contexts
    if args.engine == "pytorch":
        engine = TorchEngine(args.gguf, args.threads, args.attn)
    else:
        engine = LlamaCppEngine(args.gguf, args.threads, n_ctx=max(contexts) + args.decode_steps + 16)
    log(f"{engine.name}: model loaded in {engine.load_s:.1f} s")
    for c in contexts:
        if engine.n_ctx_train and c + args.decode_steps > engine.n_ctx_train:
            log(f"warning: context {c} + {args.decode_steps} steps exceeds the trained context {engine.n_ctx_train}")

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    # tokenize only as much text as the longest context needs (about 4 characters per token, with slack)
    all_ids = engine.tokenize(text[: 6 * max(contexts) + 1000])

    # warm-up: first-call costs (allocator, thread pool, lazy init) stay out of the numbers
    engine.run(prompt_tokens(all_ids, 16), 2)

    results = []
    for c in contexts:
        ids = prompt_tokens(all_ids, c)
        prefill_s, step_s = engine.run(ids, args.decode_steps)
        med = statistics.median(step_s)
        r = {
            "context": c,
            "prefill_tok_s": round(c / prefill_s, 3),
            "decode_tok_s": round(1.0 / med, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "prefill_s": round(prefill_s, 4),
            "decode_step_median_s": round(med, 5),
            "decode_steps": len(step_s),
        }
        log(f"context {c}: prefill {r['prefill_tok_s']:.1f} tok/s ({prefill_s:.2f} s), "
            f"decode {r['decode_tok_s']:.2f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
        results.append(r)
    return {
        "engine": engine.name,
        "threads": args.threads,
        "results": results,
        "model": args.gguf,
        "prompt_text": os.path.relpath(args.text, ROOT) if args.text.startswith(ROOT) else args.text,
        "decode_steps": args.decode_steps,
        "load_s": round(engine.load_s, 2),
        "settings": engine.settings,
        "versions": engine.versions,
        "peak_rss_note": "getrusage ru_maxrss: process-lifetime peak" + (
            ", one process per context" if args.isolate else ", cumulative over the contexts listed before"),
    }


def bench_isolated(args):
    """Each context in a child process of its own, so each peak RSS is that context's alone."""
    merged = None
    for c in args.contexts:
        cmd = [sys.executable, os.path.abspath(__file__), "--gguf", args.gguf, "--contexts", str(c),
               "--decode-steps", str(args.decode_steps), "--threads", str(args.threads),
               "--engine", args.engine, "--attn", args.attn, "--text", args.text]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_torch: child for context {c} failed with exit code {proc.returncode}")
        out = json.loads(proc.stdout)
        if merged is None:
            merged = out
        else:
            merged["results"].extend(out["results"])
    merged["peak_rss_note"] = "getrusage ru_maxrss: process-lifetime peak, one process per context"
    return merged


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.path.join(ROOT, "data", "models", "smollm2-135m-instruct-q4_1.gguf"),
                    help="GGUF model file")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192], help="prompt lengths in tokens")
    ap.add_argument("--decode-steps", type=int, default=32, help="single-token decode steps timed per context")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--engine", choices=["pytorch", "llama_cpp"], default="pytorch")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa",
                    help="transformers attention implementation (pytorch engine)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text the prompts are cut from")
    ap.add_argument("--isolate", action="store_true", help="one child process per context (per-context peak RSS)")
    args = ap.parse_args()
    if not os.path.exists(args.gguf):
        raise SystemExit(f"bench_torch: {args.gguf} not found (run scripts/setup.sh)")
    if not os.path.exists(args.text):
        raise SystemExit(f"bench_torch: {args.text} not found (run scripts/setup.sh)")
    if any(c < 1 for c in args.contexts) or args.decode_steps < 1:
        raise SystemExit("bench_torch: contexts and --decode-steps must be positive")
    result = bench_isolated(args) if args.isolate and len(args.contexts) > 1 else bench(args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
