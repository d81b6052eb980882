#!/usr/bin/env python3
"""Benchmark `recurformer serve`: aggregate decode throughput, time to first token and time per
output token with 1, 2, 4 and 8 concurrent streams, and the server's peak memory, for each model.

Standard library only (HTTP and server-sent events by hand), so it needs no virtualenv:

    python3 scripts/bench_serve.py --binary target/release/recurformer \
        --model data/models/smollm2-135m-instruct-q4_1.gguf --model runs/rf50 \
        --streams 1 2 4 8 --prompt-tokens 256 --max-tokens 64 --threads 2 --out runs/bench_serve.json \
        --llama-cpp reference/.venv/bin/python    # llama.cpp's server on the first model (a GGUF)

Every stream sends a different prompt of about --prompt-tokens tokens (Austen text, so no prefix
is shared) and asks for exactly --max-tokens tokens (greedy; `ignore_eos` is not part of the API,
so prompts that end mid-sentence keep the model talking; short answers are reported).
Per concurrency level: aggregate decode tokens/s = tokens generated after each stream's first
token / wall time from the first first-token to the last token; TTFT p50/p95 (request sent ->
first content chunk); TPOT p50/p95 (per stream, (last - first token time) / (tokens - 1)).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_server(binary, model, threads, parallel, extra):
    cmd = [binary, "serve", "--model", model, "--port", "0", "--threads", str(threads),
           "--parallel", str(parallel)] + extra
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    addr = None
    for line in p.stderr:
        sys.stderr.write("[server] " + line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            addr = m.group(1)
            break
    if addr is None:
        raise SystemExit(f"server did not start: {cmd}")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(addr + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.time() > deadline:
            raise SystemExit("server never became healthy")
        time.sleep(0.2)
    return p, addr


def start_llama_cpp(python, gguf, threads, n_ctx):
    """llama.cpp's server as llama-cpp-python ships it (`python -m llama_cpp.server`, the
    `[server]` extras, installed by reference/setup_venv.sh), on the same GGUF and thread count.
    It serves one request at a time (requests queue behind a lock; `--interrupt_requests False`
    so that a new request waits instead of cutting off the running one)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(n_ctx), "--interrupt_requests", "False", "--verbose", "False"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [sys.stderr.write("[llama.cpp] " + line)
                                     for line in p.stderr], daemon=True).start()
    addr = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(addr + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if p.poll() is not None:
            raise SystemExit(f"llama.cpp server exited with {p.returncode}: {cmd}")
        if time.time() > deadline:
            raise SystemExit("llama.cpp server never answered")
        time.sleep(0.5)
    return p, addr


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def stream_once(addr, model_id, prompt, max_tokens):
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(addr + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times = []
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return t0, times


def prompts(n, tokens, seed_text):
    # About 0.75 words per token for English prose; each stream starts elsewhere in the text.
    words = seed_text.split()
    per = int(tokens * 0.75)
    step = max(len(words) // (n + 1), per)
    return [" ".join(words[i * step:i * step + per]) for i in range(n)]


def run_level(addr, model_id, n, prompt_tokens, max_tokens, text):
    ps = prompts(n, prompt_tokens, text)
    results = [None] * n

    def go(i):
        results[i] = stream_once(addr, model_id, ps[i], max_tokens)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = [ts[0] - t0 for t0, ts in results if ts]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for _, ts in results if len(ts) > 1]
    first = min(ts[0] for _, ts in results if ts)
    last = max(ts[-1] for _, ts in results if ts)
    decoded = sum(len(ts) - 1 for _, ts in results if ts)
    return {
        "streams": n,
        "chunks_per_stream": [len(ts) for _, ts in results],
        "aggregate_decode_tok_s": decoded / max(last - first, 1e-9),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p95_s": percentile(tpot, 95),
    }


def metric(addr, name):
    with urllib.request.urlopen(addr + "/metrics") as r:
        text = r.read().decode()
    return float(re.search(rf"^{name} (\S+)", text, re.M).group(1))


def capacity(addr, model_id, tokens, requests):
    """How many sequences of `tokens` tokens the server admits at once under its --cache-memory:
    `requests` streams with a short prompt and max_tokens = tokens - prompt (the reservation is
    prompt + max_tokens, the same as a prompt of that length), held open, then closed."""
    import http.client
    host, port = addr.split("//")[1].split(":")
    conns = []
    for i in range(requests):
        c = http.client.HTTPConnection(host, int(port), timeout=600)
        c.request("POST", "/v1/completions", json.dumps({
            "model": model_id, "prompt": f"Story number {i}:", "max_tokens": tokens - 8,
            "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
        conns.append(c)
    deadline = time.time() + 120
    while metric(addr, "recurformer_active_sequences") + metric(addr, "recurformer_queue_length") < requests:
        if time.time() > deadline:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    admitted = int(metric(addr, "recurformer_active_sequences"))
    waiting = int(metric(addr, "recurformer_queue_length"))
    for c in conns:
        c.close()
    while metric(addr, "recurformer_active_sequences") > 0 and time.time() < deadline + 60:
        time.sleep(0.1)
    return admitted, waiting


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="target/release/recurformer")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="data/text/austen/emma.txt")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `serve` (repeat)")
    ap.add_argument("--capacity-tokens", type=int, default=0,
                    help="also count the sequences of this many tokens admitted at once "
                         "(start the server with --server-arg=--cache-memory=...)")
    ap.add_argument("--capacity-requests", type=int, default=16)
    ap.add_argument("--llama-cpp", metavar="PYTHON",
                    help="also run llama.cpp's server (llama-cpp-python[server]) with this Python "
                         "(e.g. reference/.venv/bin/python) on the first --model, which must be "
                         "a GGUF, with the same threads, prompts and streams, after ours")
    ap.add_argument("--llama-cpp-ctx", type=int, default=4096,
                    help="llama.cpp's context size (it serves one request at a time)")
    ap.add_argument("--out")
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()
    report = {"command": " ".join(sys.argv), "load_average_at_start": os.getloadavg(), "models": []}
    for model in a.model:
        parallel = max(max(a.streams), a.capacity_requests if a.capacity_tokens else 0)
        p, addr = start_server(a.binary, model, a.threads, parallel, a.server_arg)
        try:
            with urllib.request.urlopen(addr + "/v1/models") as r:
                model_id = json.load(r)["data"][0]["id"]
            run_level(addr, model_id, 1, 32, 4, text)  # warm-up
            levels = []
            for n in a.streams:
                lv = run_level(addr, model_id, n, a.prompt_tokens, a.max_tokens, text)
                levels.append(lv)
                print(f"{model} streams {n}: {lv['aggregate_decode_tok_s']:.1f} tok/s aggregate, "
                      f"TTFT p50 {lv['ttft_p50_s']:.2f} s p95 {lv['ttft_p95_s']:.2f} s, "
                      f"TPOT p50 {1000 * lv['tpot_p50_s']:.1f} ms p95 {1000 * lv['tpot_p95_s']:.1f} ms",
                      flush=True)
            with urllib.request.urlopen(addr + "/metrics") as r:
                metrics = r.read().decode()
            steps = float(re.search(r"^recurformer_decode_steps_total (\S+)", metrics, re.M).group(1))
            rows = float(re.search(r"^recurformer_decode_sequence_steps_total (\S+)", metrics, re.M).group(1))
            entry = {
                "model": model, "levels": levels, "peak_rss_bytes": peak_rss(p.pid),
                "mean_decode_batch": rows / max(steps, 1),
            }
            if a.capacity_tokens:
                admitted, waiting = capacity(addr, model_id, a.capacity_tokens, a.capacity_requests)
                entry["capacity"] = {"tokens": a.capacity_tokens, "admitted": admitted,
                                     "waiting": waiting}
                print(f"{model}: {admitted} sequences of {a.capacity_tokens} tokens admitted at "
                      f"once ({waiting} waiting) under {a.server_arg}", flush=True)
            report["models"].append(entry)
            print(f"{model}: peak RSS {peak_rss(p.pid) / 2**20:.0f} MiB, mean decode batch "
                  f"{rows / max(steps, 1):.2f}", flush=True)
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait()
    if a.llama_cpp:
        gguf = a.model[0]
        if not gguf.endswith(".gguf"):
            raise SystemExit(f"--llama-cpp needs the first --model to be a GGUF, got {gguf}")
        p, addr = start_llama_cpp(a.llama_cpp, gguf, a.threads, a.llama_cpp_ctx)
        try:
            with urllib.request.urlopen(addr + "/v1/models") as r:
                model_id = json.load(r)["data"][0]["id"]
            run_level(addr, model_id, 1, 32, 4, text)  # warm-up
            levels = []
            for n in a.streams:
                lv = run_level(addr, model_id, n, a.prompt_tokens, a.max_tokens, text)
                levels.append(lv)
                print(f"llama.cpp {gguf} streams {n}: {lv['aggregate_decode_tok_s']:.1f} tok/s "
                      f"aggregate, TTFT p50 {lv['ttft_p50_s']:.2f} s p95 {lv['ttft_p95_s']:.2f} s, "
                      f"TPOT p50 {1000 * lv['tpot_p50_s']:.1f} ms p95 {1000 * lv['tpot_p95_s']:.1f} ms",
                      flush=True)
            report["llama_cpp"] = {"model": gguf, "levels": levels,
                                   "peak_rss_bytes": peak_rss(p.pid)}
            print(f"llama.cpp: peak RSS {peak_rss(p.pid) / 2**20:.0f} MiB", flush=True)
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    report["load_average_at_end"] = os.getloadavg()
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    runs = [(m["model"], m["levels"]) for m in report["models"]]
    if "llama_cpp" in report:
        runs.append(("llama.cpp " + report["llama_cpp"]["model"], report["llama_cpp"]["levels"]))
    for name, levels in runs:
        one = next((lv for lv in levels if lv["streams"] == 1), None)
        if one:
            for lv in levels:
                print(f"{name}: {lv['streams']} streams = "
                      f"{lv['aggregate_decode_tok_s'] / one['aggregate_decode_tok_s']:.2f}x one stream")


if __name__ == "__main__":
    main()
