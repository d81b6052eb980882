"""Golden recency statistics for the default model, computed independently of the Rust code.

transformers loads the same GGUF (dequantised, q/k un-permuted by transformers itself), runs the
eager attention with output_attentions=True on a fixed 256-token passage (the first 256 ids of the
perplexity passage in fixtures/smollm2/reference.json), and computes per layer and query head, for
window w = 32 and query positions t >= w:
  recency  = mean_t sum_{j=t-w+1..t} A[t, j]
  sink     = mean_t sum_{j<4} A[t, j]
  distance = mean_t sum_j A[t, j] (t - j)
in float64 from the float32 probabilities. Writes fixtures/smollm2/recency_golden.json.

Run: reference/.venv/bin/python reference/make_recency_fixture.py
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = 32
SINK = 4
LENGTH = 256


def main():
    torch.set_num_threads(2)
    ref = json.load(open(os.path.join(ROOT, "fixtures/smollm2/reference.json")))
    ids = ref["perplexity"]["ids"][:LENGTH]
    gguf = os.path.join(ROOT, "data/models/smollm2-135m-instruct-q4_1.gguf")
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32,
        attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    layers = []
    t_idx = torch.arange(LENGTH, dtype=torch.float64)
    for l, att in enumerate(out.attentions):
        a = att[0].to(torch.float64)  # (heads, T, T)
        heads = []
        for h in range(a.shape[0]):
            rec, sink, dist = [], [], []
            for t in range(WINDOW, LENGTH):
                row = a[h, t, : t + 1]
                rec.append(row[t - WINDOW + 1:].sum().item())
                sink.append(row[:SINK].sum().item())
                dist.append((row * (t - t_idx[: t + 1])).sum().item())
            n = len(rec)
            heads.append({"head": h, "recency": sum(rec) / n, "sink": sum(sink) / n, "distance": sum(dist) / n})
        layers.append({"layer": l, "heads": heads})
    import transformers
    doc = {
        "produced_by": {
            "command": "reference/.venv/bin/python reference/make_recency_fixture.py",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "attn_implementation": "eager", "dtype": "float32, statistics in float64",
        },
        "ids": ids, "window": WINDOW, "sink_tokens": SINK, "layers": layers,
    }
    path = os.path.join(ROOT, "fixtures/smollm2/recency_golden.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    main()
