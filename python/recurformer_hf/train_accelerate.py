"""Continue the distillation of a RecurFormer checkpoint with PyTorch and Hugging Face accelerate
(DDP, FSDP or DeepSpeed, one machine or many), and write a checkpoint the Rust engine loads back.

The losses are those of the Rust trainer (`crates/recurformer/src/train/loss.rs`, stage 2 of
DESIGN.md "Continual training"):
- KL(teacher || student) of the next-token distributions, summed over the vocabulary and averaged
  over the b*t positions;
- `--ce-weight` x the student's cross-entropy on the next token (b*(t-1) predictions);
- `--hidden-weight` x the hidden-state term: the mean, over the final norm's output and the
  normalised input of every layer after the first converted one, of the normalised MSE
  ||s - t||^2 / ||t||^2 between the student's and the teacher's tensors, each model on its own
  forward.
By default only the mixers train (`--train mixers`, the Rust trainer's default scope); AdamW
(beta 0.9 / 0.95, eps 1e-8, no weight decay), linear warmup then cosine decay to
`--min-lr-ratio` x the peak, global gradient-norm clipping, gradient accumulation.

    accelerate launch --num_processes 8 python/recurformer_hf/train_accelerate.py \
        --student runs/rf50 --teacher data/models/smollm2-135m-instruct-q4_1.gguf \
        --data data/text/austen/emma.txt --steps 1000 --seq-len 1024 --out runs/rf50_pt

The teacher is a transformers checkpoint directory or a GGUF file (dequantised to f32 by
transformers). `--data` files are tokenised with the student's tokenizer; `--byte-text` reads
bytes as token ids (the tiny test models have a 256-token vocabulary and no tokenizer).
The output directory is written atomically (staging directory, then renamed), like
`checkpoint::save::replace_dir_with`: the student's config.json with a training entry appended to
`recurformer.provenance.training`, `model.safetensors` with exactly the tensor names and shapes of
the student's, the tokenizer files, and the modeling files.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from recurformer_hf.modeling_recurformer import RecurformerForCausalLM  # noqa: E402

CODE_FILES = ("configuration_recurformer.py", "modeling_recurformer.py")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="RecurFormer checkpoint directory to continue from")
    ap.add_argument("--teacher", required=True, help="base model: transformers directory or GGUF file")
    ap.add_argument("--out", required=True, help="output checkpoint directory (replaced atomically)")
    ap.add_argument("--data", nargs="*", default=[], help="text files, tokenised with the student's tokenizer")
    ap.add_argument("--byte-text", nargs="*", default=[], help="text files whose bytes are the token ids")
    ap.add_argument("--steps", type=int, default=100, help="optimiser steps")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    ap.add_argument("--batch", type=int, default=1, help="windows per micro-batch per process")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to this x the peak")
    ap.add_argument("--clip", type=float, default=1.0, help="max global gradient norm; 0 disables clipping")
    ap.add_argument("--ce-weight", type=float, default=0.0, help="weight of the cross-entropy term")
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state term")
    ap.add_argument("--train", choices=("mixers", "mixers-oproj", "all"), default="mixers", help="what trains")
    ap.add_argument("--seed", type=int, default=0, help="data order and nothing else")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    ap.add_argument("--log", default=None, help="JSONL step log (main process)")
    return ap.parse_args(argv)


# ---- losses (`train/loss.rs`) ----------------------------------------------------------------


def distill_losses(student_logits, teacher_logits, ids):
    """KL(teacher || student) per position and the student's next-token cross-entropy."""
    b, t, v = student_logits.shape
    ls = F.log_softmax(student_logits.float(), dim=-1)
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()  # sum over v, mean over b*t
    ce = F.nll_loss(ls[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))  # mean over b*(t-1)
    return kl, ce


def normalised_mse(s, t):
    return (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum()


def hidden_state_loss(first_mixer_layer, s_states, s_final, t_states, t_final):
    start = 0 if first_mixer_layer is None else first_mixer_layer + 1
    terms = [normalised_mse(s_final, t_final)]
    terms += [normalised_mse(s, t) for s, t in list(zip(s_states, t_states))[start:]]
    return torch.stack(terms).mean()


class LayerInputs:
    """Collects the output of every layer's input_layernorm (the normalised layer inputs) and of
    the final norm, through forward hooks."""

    def __init__(self, decoder):
        self.states, self.final = [], None
        self.hooks = [l.input_layernorm.register_forward_hook(self._layer) for l in decoder.layers]
        self.hooks.append(decoder.norm.register_forward_hook(self._final))

    def _layer(self, _m, _i, out):
        self.states.append(out)

    def _final(self, _m, _i, out):
        self.final = out

    def take(self):
        s, f = self.states, self.final
        self.states, self.final = [], None
        return s, f


# ---- data ------------------------------------------------------------------------------------


def token_stream(args, student_dir):
    ids = []
    for p in args.byte_text:
        with open(p, "rb") as f:
            ids.extend(f.read())
    if args.data:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(student_dir)
        for p in args.data:
            with open(p, encoding="utf-8") as f:
                ids.extend(tok(f.read(), add_special_tokens=False).input_ids)
    if not ids:
        raise SystemExit("no training data: pass --data or --byte-text")
    return torch.tensor(ids, dtype=torch.long)


def windows(stream, seq_len, seed):
    """Non-overlapping windows of the stream in a seeded order."""
    n = stream.numel() // seq_len
    if n == 0:
        raise SystemExit(f"the data holds {stream.numel()} tokens, fewer than one window of {seq_len}")
    w = stream[: n * seq_len].view(n, seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return w[order]


def lr_at(step, args):
    """Linear warmup to the peak, then cosine to min_lr_ratio x the peak (step counts from 0)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    progress = min(1.0, (step - args.warmup) / span)
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * progress))


def trains(name, scope, mixer_layers):
    if scope == "all":
        return True
    if ".mixer." in name:
        return True
    if scope == "mixers-oproj" and name.endswith(".self_attn.o_proj.weight"):
        return name[: -len(".self_attn.o_proj.weight")] in mixer_layers
    return False


# ---- the checkpoint --------------------------------------------------------------------------


def write_checkpoint(out_dir, student_dir, state, train_entry):
    """Writes the checkpoint into a staging sibling and swaps it in (`replace_dir_with`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(os.path.join(student_dir, "model.safetensors"), "pt") as f:
        expected = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    got = {k: list(v.shape) for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(got))
    if missing or got != expected:
        bad = [k for k in got if got[k] != expected[k]]
        raise RuntimeError(f"trained tensors do not match the student's: missing {missing[:5]}, shapes differ {bad[:5]}")
    tensors = {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in expected}
    with open(os.path.join(student_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["recurformer"]["provenance"].setdefault("training", []).append(train_entry)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for fn in COPIED_FILES:
            if os.path.exists(os.path.join(student_dir, fn)):
                shutil.copyfile(os.path.join(student_dir, fn), os.path.join(staging, fn))
        for fn in CODE_FILES:  # this package's code, the same the Rust side embeds
            shutil.copyfile(os.path.join(HERE, fn), os.path.join(staging, fn))
        for fn in os.listdir(staging):
            with open(os.path.join(staging, fn), "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = os.path.join(parent, f".{name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old)
    else:
        os.rename(staging, out_dir)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_teacher(path):
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32, "attn_implementation": "eager"}
    if os.path.isfile(path):  # a GGUF file: transformers dequantises it
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), **kw)
    return AutoModelForCausalLM.from_pretrained(path, **kw)


# ---- training --------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    from accelerate import Accelerator

    # Without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) join a gloo
    # group on the CPU (accelerate's MULTI_CPU needs `cpu=True` for that).
    acc = Accelerator(gradient_accumulation_steps=args.accum, cpu=not torch.cuda.is_available())
    student = RecurformerForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = load_teacher(args.teacher).to(acc.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.gradient_checkpointing:  # renamed activation_checkpointing_enable in transformers 5
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
    layers = student.model.layers
    mixer_layers = {f"model.layers.{i}" for i, l in enumerate(layers) if l.mixer is not None}
    first_mixer = next((i for i, l in enumerate(layers) if l.mixer is not None), None)
    names = []
    for n, p in student.named_parameters():
        p.requires_grad_(trains(n, args.train, mixer_layers))
        if p.requires_grad:
            names.append(n)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise SystemExit(f"--train {args.train}: nothing to train in {args.student}")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    student.train()
    s_hooks, t_hooks = LayerInputs(student.model), LayerInputs(teacher.model)
    student, opt = acc.prepare(student, opt)

    data = windows(token_stream(args, args.student), args.seq_len, args.seed)
    per_step = args.batch * acc.num_processes
    acc.print(
        f"training {len(names)} tensors ({sum(p.numel() for p in params)} parameters) on {acc.num_processes} "
        f"process(es), {data.shape[0]} windows of {args.seq_len} tokens"
    )
    log = open(args.log, "w") if (args.log and acc.is_main_process) else None
    t0 = time.time()
    cursor = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        sums = torch.zeros(4, device=acc.device)  # loss, kl, ce, hidden
        for _ in range(args.accum):
            idx = [(cursor + acc.process_index * args.batch + i) % data.shape[0] for i in range(args.batch)]
            cursor += per_step
            ids = data[idx].to(acc.device)  # (b, t)
            with acc.accumulate(student):
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                t_states, t_final = t_hooks.take()
                s_hooks.take()  # drop what a checkpointed backward's recompute left
                s_logits = student(input_ids=ids, use_cache=False).logits
                s_states, s_final = s_hooks.take()
                kl, ce = distill_losses(s_logits, t_logits, ids)
                loss = kl + args.ce_weight * ce
                hid = torch.zeros((), device=acc.device)
                if args.hidden_weight > 0:
                    hid = hidden_state_loss(first_mixer, s_states, s_final, t_states, t_final)
                    loss = loss + args.hidden_weight * hid
                acc.backward(loss)  # divided by the accumulation steps inside
                if acc.sync_gradients and args.clip > 0:
                    acc.clip_grad_norm_(params, args.clip)
                opt.step()
                opt.zero_grad()
            sums += torch.stack([loss.detach(), kl.detach(), ce.detach(), hid.detach()]) / args.accum
        sums = acc.reduce(sums, reduction="mean")
        rec = {
            "step": step + 1,
            "loss": float(sums[0]),
            "kl": float(sums[1]),
            "ce": float(sums[2]),
            "hidden": float(sums[3]),
            "lr": lr_at(step, args),
            "seconds": round(time.time() - t0, 2),
        }
        acc.print(json.dumps(rec))
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
    state = acc.get_state_dict(student)  # gathers FSDP / DeepSpeed shards
    if acc.is_main_process:
        entry = {
            "stage": "distill",
            "trainer": "python/recurformer_hf/train_accelerate.py",
            "steps": args.steps,
            "seq_len": args.seq_len,
            "batch": args.batch * acc.num_processes,
            "accum": args.accum,
            "lr": args.lr,
            "ce_weight": args.ce_weight,
            "hidden_weight": args.hidden_weight,
            "train": args.train,
            "seed": args.seed,
            "processes": acc.num_processes,
            "teacher": args.teacher,
            "final_loss": rec["loss"],
        }
        write_checkpoint(args.out, args.student, state, entry)
        acc.print(f"wrote {args.out}")
    acc.wait_for_everyone()
    if log:
        log.close()
    acc.end_training()


if __name__ == "__main__":
    main()
