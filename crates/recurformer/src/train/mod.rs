//! Continual training of a RecurFormer (DESIGN.md, "Continual training"; `recurformer train`).
//!
//! Two stages, each an AdamW loop with linear warmup and cosine decay, gradient clipping and
//! accumulation (see `optim.rs`):
//!
//! 1. **align** (layer-local alignment): the frozen base model (the teacher) runs its eager path
//!    over a batch of windows; for every converted layer l the observer hands over the layer's
//!    normalised input u_l (b, t, d) and the outputs of the heads the mixer replaced, gathered from
//!    `heads_out` (b, nh, t, hd) at `split.mamba_heads` in that order (the mixer's output head i
//!    fills the o_proj slots of `split.mamba_heads[i]`), as y*_l (b, t, n*hd). Each mixer learns
//!    y_l = mixer_l(u_l) ≈ y*_l under the normalised MSE ||y_l - y*_l||² / ||y*_l||². The layers
//!    are independent problems: their losses are summed for one backward pass, and gradients are
//!    clipped per layer. Activations live for one micro-batch only, so memory is bounded by one
//!    batch of windows whatever the data size.
//! 2. **distill** (end-to-end distillation): student = the hybrid, teacher = the base model;
//!    loss = KL(p_teacher ‖ p_student) over next-token distributions, averaged over positions,
//!    plus `ce_weight` × the student's cross-entropy on the text. By default only the mixers
//!    train (`TrainScope::Mixers`); `TrainScope::All` trains every tensor of the student.
//!
//! The student's training forward is [`forward_train`], not `Model::forward_hidden`: the KV cache
//! appends keys and values with `slice_set`, which records no backward pass, so gradients through
//! the kept attention heads of the layers above a mixer would silently be lost (the finite
//! difference test in `tests/train.rs` catches exactly that).
//!
//! **Speed.** Two hand-written backward passes (custom ops) keep the distillation step near
//! forward + backward of the activations only: `FrozenMatmul` (candle's matmul backward also
//! computes the gradient of the frozen weight, a second GEMM as large as the forward's) and
//! `DistillLossOp` (KL and cross-entropy over the 49K vocabulary in one pass instead of ten
//! full-size tensors). On SmolLM2 at 256 tokens they cut the backward from about 4 s to 1.7 s.
//!
//! **Data.** Token windows, not text: [`TrainData`] holds a training and a held-out token stream
//! (documents concatenated, each followed by EOS), split by document by the caller. Window g of a
//! stage is drawn by [`WindowOrder`]: epoch e starts at a random offset below `seq_len` and visits
//! its windows in a random permutation, both from SplitMix64 seeded by (seed, stage, e) — a
//! portable generator whose whole state is the window counter, so the data position saved in a
//! checkpoint is one integer. Held-out loss is measured on fixed, evenly spaced windows of the
//! held-out stream. [`load_token_documents`] is the thin text layer above (tokenise once, cache).
//!
//! **Checkpoints and exact resume.** A checkpoint is the directory `save_checkpoint` writes (so
//! `generate`, `info`, `eval` accept it; `provenance.training` records the stages) plus
//! `optimizer.safetensors` (AdamW moments), `train_state.json` (configuration, stage, step, data
//! position, schedule horizon, data and teacher fingerprints) and `train_log.jsonl`, all written
//! into a staging directory that then replaces `--out` by rename. Resuming reloads the parameters
//! and moments bit for bit, recomputes the data order from the seed and the window counter, and
//! the schedule from the step; every operation is deterministic for a fixed thread count, so a run
//! killed and resumed ends with the same parameters, bit for bit, as an uninterrupted one.
//!
//! Glossary: b batch (windows per micro-batch), t = seq_len, d hidden size, nh query heads,
//! hd head dim, n replaced heads of a layer, v vocabulary, `accum` micro-batches per step,
//! horizon = the schedule's length in steps.

mod config;
mod data;
mod forward;
mod loss;
pub mod optim;
mod profile;
mod retrieval;
mod run;
mod state;
mod step;
#[cfg(test)]
mod tests;

pub use config::*;
pub use data::*;
pub use forward::*;
pub use loss::*;
pub use profile::*;
pub use retrieval::*;
pub use run::*;
pub use state::*;
pub use step::*;
