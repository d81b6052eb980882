#!/usr/bin/env python3
"""Write the reference fixtures in fixtures/ with an implementation independent of the Rust code.

    reference/.venv/bin/python reference/make_fixtures.py            # everything
    reference/.venv/bin/python reference/make_fixtures.py --only tiny   # just the tiny checkpoints

Part a) fixtures/smollm2/: the default GGUF (data/models/smollm2-135m-instruct-q4_1.gguf, fetched by
scripts/setup.sh) loaded by transformers' own GGUF support, which dequantises the weights and
undoes llama.cpp's q/k row permutation itself. Records prompt ids, last-position logits, 32 greedy
tokens, a 512-token perplexity on Persuasion, tokenizer cases compared with llama.cpp, chat
template renderings, special tokens and the GGUF metadata.

Part b) fixtures/tiny-{llama,llama3,qwen2}/: tiny random-weight HF checkpoints with the logits of
the transformers forward on 12 random ids.

Everything runs in float32 on CPU with 2 threads. See fixtures/README.md.
"""

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import forward_cached  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
MODEL_REL = "data/models/smollm2-135m-instruct-q4_1.gguf"
PERSUASION_REL = "data/text/austen/persuasion.txt"
N_GREEDY = 32
PPL_TOKENS = 512


def versions():
    import gguf
    import transformers

    try:
        import llama_cpp

        llama_v = llama_cpp.__version__
    except ImportError:
        llama_v = None
    from importlib.metadata import version

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": version("gguf"),
        "safetensors": version("safetensors"),
        "tokenizers": version("tokenizers"),
        "llama_cpp_python": llama_v,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def produced_by():
    v = versions()
    return {
        "command": " ".join(["reference/.venv/bin/python", "reference/make_fixtures.py", *sys.argv[1:]]),
        **v,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
    }


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def save_tensors(path, tensors):
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files 0600
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# a) SmolLM2 from the GGUF
# ------------------------------------------------------------------------------------------------
PROMPTS = [
    # plain English
    "The capital of France is",
    # code
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    # chat-formatted (rendered by hand in the template's format; special tokens parsed)
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n",
    # digits
    "Compute: 1234 + 5678 = 6912, 99 * 3 = 297, and 2^10 = ",
    # a long-ish paragraph (100 tokens); chosen so that no greedy step is a near-tie (min top-2 gap 0.08)
    "The lighthouse keeper kept a careful log of every ship that passed the headland. Each morning he "
    "climbed the spiral stairs, polished the great lens until it shone, and trimmed the wick of the lamp. "
    "In winter the storms came in from the west and the waves broke over the rocks below the tower, "
    "throwing spray as high as the gallery rail. One night in December, during the worst gale anyone "
    "could remember, he saw a light flickering far out at sea, and he knew at once that",
]

TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé façade Ångström",
    "Grüße aus München, señor!",
    "日本語のテキストです。",
    "中文分词测试",
    "안녕하세요",
    "emoji: 🙂🚀👍🏽 and ❤️",
    "12345 and 3.14159",
    "a   b\n\n\tc",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "don't I'll we're they've she'd",
    "DON'T SHOUT",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>text after<|im_end|>",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "import numpy as np  # comment\nx = np.zeros((3, 4))",
    "Mr. Darcy's £10,000 a year—\"indeed!\"",
    "\n",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the tallest mountain in Europe?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Who wrote Persuasion?"},
        {"role": "assistant", "content": "Jane Austen wrote Persuasion."},
        {"role": "user", "content": "When was it published?"},
    ],
]


def jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    return v


def gguf_info(path):
    """Scalar metadata, array summaries and the tensor list, read with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    scalars, arrays = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            arrays[key] = {"element_type": field.types[-1].name, "length": len(field.data)}
            if len(field.data) <= 16:  # small arrays (e.g. general.languages) in full
                arrays[key]["values"] = [jsonable(x) for x in field.contents()]
        else:
            scalars[key] = jsonable(field.contents())
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "shape_gguf": [int(s) for s in t.shape]}
        for t in reader.tensors
    ]
    return scalars, arrays, tensors, reader


@torch.no_grad()
def greedy(model, ids, n):
    """n greedy tokens: argmax over the full vocabulary (EOS included) at every step, no stopping."""
    out, margins = [], []
    res, cache = forward_cached(model, torch.tensor([ids]), None)
    logits = res.logits[0, -1]
    for _ in range(n):
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        out.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        res, cache = forward_cached(model, torch.tensor([[nxt]]), cache)
        logits = res.logits[0, -1]
    return out, margins


def make_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.join(ROOT, MODEL_REL)
    if not os.path.exists(gguf_path):
        sys.exit(f"make_fixtures: {gguf_path} not found; run scripts/setup.sh first")
    out_dir = os.path.join(FIXTURES, "smollm2")
    os.makedirs(out_dir, exist_ok=True)
    model_dir, model_name = os.path.split(gguf_path)

    t = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_name)
    # eager attention: the plain softmax(QK^T)V path (sdpa agrees to ~1e-6 on the tiny models)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    print(f"[smollm2] loaded GGUF in transformers ({time.time() - t:.1f} s): "
          f"{type(model).__name__}, tokenizer {type(tok).__name__}", flush=True)

    # llama.cpp tokenizer (vocab only) as a second, independent tokenizer
    try:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)

        def lc_tokenize(text):
            return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
    except ImportError:
        llm = None

        def lc_tokenize(text):
            return None

    mismatches = []

    def note_mismatch(where, text, a, b):
        if b is not None and a != b:
            mismatches.append({"where": where, "text": text, "ids_transformers": a, "ids_llama_cpp": b})
            print(f"[smollm2] TOKENIZER MISMATCH in {where}: {text!r}\n  transformers {a}\n  llama.cpp    {b}",
                  flush=True)

    tensors = {}
    prompts = []
    for i, text in enumerate(PROMPTS):
        ids = tok(text).input_ids  # the tokenizer's default special-token handling
        note_mismatch(f"prompt_{i}", text, tok(text, add_special_tokens=False).input_ids, lc_tokenize(text))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        key = f"prompt_{i}"
        tensors[key] = logits.clone()
        g, margins = greedy(model, ids, N_GREEDY)
        # cross-check the hand-written loop against transformers' own greedy search
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N_GREEDY,
                                pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        eos = tok.eos_token_id
        agree = hf == g[: len(hf)] and (len(hf) == N_GREEDY or (hf and hf[-1] == eos))
        if not agree:
            print(f"[smollm2] warning: model.generate disagrees with the greedy loop on prompt {i}", flush=True)
        prompts.append({
            "text": text,
            "ids": ids,
            "logits_key": key,
            "greedy_ids": g,
            "greedy_text": tok.decode(g),
            "greedy_top2_margins": [round(m, 5) for m in margins],
            "generate_agrees": agree,
        })
        print(f"[smollm2] prompt {i}: {len(ids)} ids, greedy {tok.decode(g)!r} "
              f"(min top-2 margin {min(margins):.3f})", flush=True)

    # perplexity over a fixed 512-token passage: the start of Persuasion, chapter 3
    text = open(os.path.join(ROOT, PERSUASION_REL), encoding="utf-8").read()
    char_start = text.index("Chapter 3\n")
    window = text[char_start:char_start + 8 * PPL_TOKENS]
    ppl_ids = tok(window, add_special_tokens=False).input_ids[:PPL_TOKENS]
    assert len(ppl_ids) == PPL_TOKENS, len(ppl_ids)
    passage = tok.decode(ppl_ids)
    assert window.startswith(passage), "decoded passage is not a prefix of the source text"
    with torch.no_grad():
        logits = model(torch.tensor([ppl_ids])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits.double(), dim=-1)  # f64 from the f32 logits
    nll = -logp[torch.arange(PPL_TOKENS - 1), torch.tensor(ppl_ids[1:])]  # (T-1,)
    mean_nll = float(nll.mean())
    tensors["perplexity_token_nll"] = nll.float()
    perplexity = {
        "source": PERSUASION_REL,
        "char_start": char_start,
        "char_end": char_start + len(passage),
        "ids": ppl_ids,
        "predictions": PPL_TOKENS - 1,
        "bos_prepended": False,
        "mean_nll": mean_nll,
        "ppl": math.exp(mean_nll),
        "token_nll_key": "perplexity_token_nll",
    }
    print(f"[smollm2] perplexity on Persuasion ch. 3 ({PPL_TOKENS} tokens): {math.exp(mean_nll):.4f} "
          f"(mean nll {mean_nll:.6f})", flush=True)

    tok_cases = []
    for text in TOKENIZER_CASES:
        ids_tf = tok(text, add_special_tokens=False).input_ids
        ids_lc = lc_tokenize(text)
        note_mismatch("tokenizer", text, ids_tf, ids_lc)
        tok_cases.append({"text": text, "ids_llama_cpp": ids_lc, "ids_transformers": ids_tf})

    chats = []
    for messages in CHATS:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False).input_ids
        ids_tpl = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids_tpl, "keys"):  # transformers 5 returns a BatchEncoding
            ids_tpl = ids_tpl["input_ids"]
        if ids_tpl != ids:
            print("[smollm2] warning: apply_chat_template(tokenize=True) differs from tokenizing its text", flush=True)
        note_mismatch("chat", rendered, ids, lc_tokenize(rendered))
        chats.append({"messages": messages, "add_generation_prompt": True, "text": rendered, "ids": ids,
                      "ids_llama_cpp": lc_tokenize(rendered)})

    scalars, arrays, gtensors, reader = gguf_info(gguf_path)
    tokens_field = reader.fields["tokenizer.ggml.tokens"]

    def tok_str(i):
        return None if i is None else tokens_field.contents(i)

    special = {}
    for name in ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "cls", "mask"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in scalars:
            special[name] = scalars[key]
            special[name + "_token"] = tok_str(scalars[key])
    if "bos" not in special:
        special["bos"] = None
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"):
        if key in scalars:
            special[key.split(".")[-1]] = scalars[key]
    token_types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    special["control_tokens"] = {str(i): tok_str(i) for i, tt in enumerate(token_types) if tt == 3}
    special["transformers"] = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                               "unk_token": tok.unk_token}

    ref = {
        "produced_by": produced_by(),
        "model": MODEL_REL,
        "model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "notes": [
            "Model and tokenizer loaded by transformers from the GGUF (AutoModelForCausalLM / AutoTokenizer "
            "with gguf_file=...), dequantised to float32, eager attention; transformers undoes the q/k row "
            "permutation.",
            "prompts[].ids = tokenizer(text).input_ids (the GGUF says add_bos_token=false, so no BOS).",
            "logits: last position, float32 [vocab], in logits.safetensors under logits_key.",
            "greedy_ids: argmax over the full vocabulary at every step with the KV cache, EOS included, "
            "no stopping; greedy_top2_margins is the top-1 minus top-2 logit gap at each step.",
            "perplexity: ids = tokenizer(text[char_start:...], add_special_tokens=False)[:512], no BOS; "
            "mean_nll over the 511 next-token predictions, log_softmax in float64 of float32 logits; "
            "per-token nll (float32) under token_nll_key.",
            "tokenizer cases: no BOS, special tokens parsed (llama.cpp: tokenize(add_bos=False, special=True); "
            "transformers: tokenizer(text, add_special_tokens=False)).",
        ],
        "prompts": prompts,
        "perplexity": perplexity,
        "tokenizer": tok_cases,
        "tokenizer_mismatches": mismatches,
        "chat": chats,
        "special_tokens": special,
        "gguf_metadata": scalars,
        "gguf_arrays": arrays,
        "gguf_tensors": gtensors,
    }
    write_json(os.path.join(out_dir, "reference.json"), ref)
    save_tensors(os.path.join(out_dir, "logits.safetensors"), tensors)
    print(f"[smollm2] wrote {out_dir}/reference.json and logits.safetensors; "
          f"{len(mismatches)} tokenizer mismatches", flush=True)


# ------------------------------------------------------------------------------------------------
# b) tiny random-weight checkpoints
# ------------------------------------------------------------------------------------------------
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
SEQ = 12


def rope_kwargs(params):
    """Rope settings in the form this transformers version takes (5.x: rope_parameters)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": params}
    legacy = dict(params)
    theta = legacy.pop("rope_theta")
    if legacy.get("rope_type", "default") == "default":
        return {"rope_theta": theta}
    legacy["type"] = legacy["rope_type"]
    return {"rope_theta": theta, "rope_scaling": legacy}


@torch.no_grad()
def init_weights(model, seed):
    """Random weights large enough that every block visibly changes the logits.

    Linear weights ~ N(0, 1/fan_in) keep activations O(1), so attention scores are far from
    uniform and RoPE matters; the embedding has std 1 (0.25 when tied, then it is also the output
    head), norm weights 1 + N(0, 0.1^2) so a missing norm scale shows, biases N(0, 0.5^2).
    """
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            std = 0.25 if tied else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            raise ValueError(f"unexpected parameter {name} {tuple(p.shape)}")


def make_tiny(name, config, seed, save_kwargs=None):
    from transformers import AutoModelForCausalLM

    out_dir = os.path.join(FIXTURES, name)
    tmp_dir = out_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=g, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids).logits.float()  # (1, SEQ, vocab)
    model.save_pretrained(tmp_dir, **(save_kwargs or {}))
    save_tensors(os.path.join(tmp_dir, "expected.safetensors"), {"input_ids": input_ids, "logits": logits})

    # Reload from disk and check the saved checkpoint reproduces the logits (catches tying/sharding slips).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        again = reloaded(input_ids).logits.float()
    diff = (again - logits).abs().max().item()
    assert diff < 1e-5, f"{name}: reloaded checkpoint differs by {diff}"
    # sdpa vs eager, for information: the Rust side may compare against either
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        diff_sdpa = (sdpa(input_ids).logits.float() - logits).abs().max().item()

    for fn in os.listdir(tmp_dir):
        os.chmod(os.path.join(tmp_dir, fn), 0o644)  # safetensors writes 0600
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    files = sorted(os.listdir(out_dir))
    print(f"[{name}] logits std {logits.std().item():.3f}, max |logit| {logits.abs().max().item():.3f}; "
          f"reload diff {diff:.2e}, sdpa-vs-eager {diff_sdpa:.2e}; files {files}", flush=True)
    return {"logits_std": logits.std().item(), "reload_max_abs_diff": diff, "sdpa_vs_eager_max_abs_diff": diff_sdpa}


def make_tiny_all():
    from transformers import LlamaConfig, Qwen2Config

    stats = {}
    cfg = LlamaConfig(**TINY, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      **rope_kwargs({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    stats["tiny-llama"] = make_tiny("tiny-llama", cfg, seed=1)

    # original_max_position_embeddings = 32 (not 16): with head_dim 16 the rotary wavelengths are
    # 6.3, 19.9, 62.8, ... tokens; 32 / high_freq_factor = 8 and 32 / low_freq_factor = 32 then put
    # one frequency in each llama3 branch (kept, smoothly interpolated, divided by factor).
    cfg = LlamaConfig(**TINY, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      **rope_kwargs({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                     "rope_theta": 10000.0}))
    stats["tiny-llama3"] = make_tiny("tiny-llama3", cfg, seed=2)

    cfg = Qwen2Config(**TINY, tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False,
                      **rope_kwargs({"rope_type": "default", "rope_theta": 1000000.0}))
    stats["tiny-qwen2"] = make_tiny("tiny-qwen2", cfg, seed=3, save_kwargs={"max_shard_size": "100KB"})
    shards = [f for f in os.listdir(os.path.join(FIXTURES, "tiny-qwen2")) if f.startswith("model-")]
    assert len(shards) >= 2, f"tiny-qwen2 is not sharded: {shards}"
    write_json(os.path.join(FIXTURES, "tiny_produced_by.json"),
               {"produced_by": produced_by(), "seq_len": SEQ, "stats": stats})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["smollm2", "tiny"], help="make only one part")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    os.makedirs(FIXTURES, exist_ok=True)
    t0 = time.time()
    if args.only in (None, "tiny"):
        make_tiny_all()
    if args.only in (None, "smollm2"):
        make_smollm2()
    print(f"make_fixtures: done in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
