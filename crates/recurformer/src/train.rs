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

use crate::hybrid::{named_tensors, save_checkpoint};
use crate::llama::{
    Attention, AttentionImpl, AttnObservation, DecoderLayer, ForwardOptions, Linear, Mlp, Model,
    RmsNorm, Rope,
};
use crate::loader::LoadedModel;
use crate::mamba::{MambaMixer, PARAM_NAMES};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor, Var, D,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Version of `train_state.json`.
pub const STATE_FORMAT_VERSION: u32 = 1;
pub const TRAIN_STATE_FILE: &str = "train_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const LOG_FILE: &str = "train_log.jsonl";
pub const LOSS_PLOT_FILE: &str = "loss.png";

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Layer-local alignment of each mixer to the heads it replaced.
    Align,
    /// End-to-end distillation from the base model's next-token distributions.
    Distill,
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Align => "align",
            Stage::Distill => "distill",
        }
    }

    /// What the stage's loss is, for logs and provenance.
    pub fn loss_name(&self) -> &'static str {
        match self {
            Stage::Align => "normalised MSE of the replaced heads' pre-o_proj outputs",
            Stage::Distill => {
                "KL(teacher || student) per token (+ ce_weight x cross-entropy, + hidden_weight x layer-input NMSE)"
            }
        }
    }
}

/// Which tensors of the student the distillation stage trains (alignment always trains the mixers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainScope {
    /// The Mamba mixers only.
    Mixers,
    /// The mixers and the o_proj of every layer that has one: the mixer writes into o_proj's input
    /// slots of the replaced heads, and a trainable o_proj lets the layer re-mix those outputs.
    MixersOproj,
    /// Every tensor of the student.
    All,
}

impl TrainScope {
    /// Whether the tensor `name` trains; `mixer_layers` holds the `model.layers.{i}` prefixes of the
    /// layers with a mixer.
    pub fn trains(self, name: &str, mixer_layers: &[String]) -> bool {
        match self {
            TrainScope::All => true,
            TrainScope::Mixers => name.contains(".mixer."),
            TrainScope::MixersOproj => {
                name.contains(".mixer.")
                    || name
                        .strip_suffix(".self_attn.o_proj.weight")
                        .is_some_and(|layer| mixer_layers.iter().any(|p| p == layer))
            }
        }
    }
}

fn default_base_lr_ratio() -> f64 {
    0.1
}

/// `base_lr_ratio` of a checkpoint written before the setting existed: those runs trained every
/// tensor at the full learning rate, and a resume keeps doing so.
fn legacy_base_lr_ratio() -> f64 {
    1.0
}

/// Steps timed before a time-only budget fixes the schedule's horizon (at least the warmup).
const HORIZON_PROBE: u64 = 4;

/// When to stop. Each given limit applies; the schedule's horizon is the step count the step and
/// token limits allow, or, with only a time limit, an estimate from the median duration of the
/// first steps (after warmup, at least [`HORIZON_PROBE`] steps; the very first step excluded).
/// With two stages, `align_share` of each limit goes to alignment and the rest to distillation
/// (time: whatever alignment left).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Budget {
    pub max_steps: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_minutes: Option<f64>,
}

/// Everything that decides the numbers a run computes. Saved in `train_state.json`; a resume must
/// use the same values (only `budget.max_minutes` may change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Stages to run, in order (align before distill).
    pub stages: Vec<Stage>,
    /// Tokens per window.
    pub seq_len: usize,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub accum: usize,
    /// Peak learning rate of distillation.
    pub lr: f64,
    /// Peak learning rate of alignment.
    pub align_lr: f64,
    /// The cosine decays to `min_lr_ratio` x the peak.
    pub min_lr_ratio: f64,
    /// Linear warmup steps (each stage).
    pub warmup: u64,
    pub adamw: AdamWConfig,
    /// Maximum gradient norm (global in distill, per layer in align); 0 disables clipping.
    pub clip: f64,
    /// Weight of the cross-entropy term in distillation.
    pub ce_weight: f64,
    /// Weight of the hidden-state term in distillation: the mean over layers (from the first
    /// converted layer on, and the final norm) of the normalised MSE between the student's and the
    /// teacher's normalised layer inputs, each model on its own forward. Absent from older
    /// checkpoints' state, which trained without it.
    #[serde(default)]
    pub hidden_weight: f64,
    pub scope: TrainScope,
    /// Learning rate of the trained tensors that are not mixer parameters (pretrained weights under
    /// `MixersOproj` / `All`), as a fraction of the stage's learning rate: pretrained weights sit
    /// near a good optimum and move less than freshly initialised mixers.
    #[serde(default = "legacy_base_lr_ratio")]
    pub base_lr_ratio: f64,
    pub seed: u64,
    pub budget: Budget,
    /// Share of each budget that goes to alignment when both stages run.
    pub align_share: f64,
    /// Held-out windows evaluated (at most).
    pub eval_windows: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            stages: vec![Stage::Align, Stage::Distill],
            seq_len: 512,
            batch: 1,
            accum: 1,
            lr: 3e-4,
            align_lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup: 10,
            adamw: AdamWConfig::default(),
            clip: 1.0,
            ce_weight: 0.0,
            hidden_weight: 0.0,
            scope: TrainScope::Mixers,
            base_lr_ratio: default_base_lr_ratio(),
            seed: 0,
            budget: Budget::default(),
            align_share: 0.25,
            eval_windows: 8,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.stages.is_empty(), "no training stage selected");
        ensure!(
            self.stages == [Stage::Align]
                || self.stages == [Stage::Distill]
                || self.stages == [Stage::Align, Stage::Distill],
            "stages {:?}: expected align, distill, or align then distill",
            self.stages
        );
        ensure!(
            self.seq_len >= 2,
            "seq_len {} is too short (at least 2 tokens)",
            self.seq_len
        );
        ensure!(
            self.batch >= 1 && self.accum >= 1,
            "batch {} and accum {} must be at least 1",
            self.batch,
            self.accum
        );
        for (what, lr) in [
            ("lr", self.lr),
            ("align_lr", self.align_lr),
            ("base_lr_ratio", self.base_lr_ratio),
        ] {
            ensure!(
                lr.is_finite() && lr > 0.0,
                "{what} {lr} must be a positive number"
            );
        }
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "min_lr_ratio {} is outside [0, 1]",
            self.min_lr_ratio
        );
        ensure!(
            self.clip.is_finite() && self.clip >= 0.0,
            "clip {} must be >= 0",
            self.clip
        );
        for (what, w) in [
            ("ce_weight", self.ce_weight),
            ("hidden_weight", self.hidden_weight),
        ] {
            ensure!(w.is_finite() && w >= 0.0, "{what} {w} must be >= 0");
        }
        let a = &self.adamw;
        ensure!(
            (0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2) && a.eps > 0.0,
            "AdamW betas ({}, {}) must lie in [0, 1) and eps {} be positive",
            a.beta1,
            a.beta2,
            a.eps
        );
        ensure!(
            a.weight_decay.is_finite() && a.weight_decay >= 0.0,
            "weight decay {} must be >= 0",
            a.weight_decay
        );
        if self.stages.len() == 2 {
            ensure!(
                self.align_share > 0.0 && self.align_share < 1.0,
                "align_share {} must lie strictly between 0 and 1 when both stages run",
                self.align_share
            );
        }
        ensure!(self.eval_windows >= 1, "eval_windows must be at least 1");
        let b = &self.budget;
        ensure!(
            b.max_steps.is_some() || b.max_tokens.is_some() || b.max_minutes.is_some(),
            "no budget: give max steps, max tokens or max minutes"
        );
        ensure!(
            b.max_steps != Some(0) && b.max_tokens != Some(0),
            "a budget of 0 steps or tokens trains nothing"
        );
        if let Some(m) = b.max_minutes {
            ensure!(
                m.is_finite() && m > 0.0,
                "max_minutes {m} must be a positive number"
            );
        }
        Ok(())
    }

    /// Training tokens of one optimiser step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.seq_len * self.batch * self.accum) as u64
    }

    /// Settings that differ from `other`, as "name: ours vs theirs", ignoring
    /// `budget.max_minutes` (a time limit does not change what a step computes).
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let strip = |c: &TrainConfig| -> Value {
            let mut v = serde_json::to_value(c).expect("config serialises");
            v["budget"]["max_minutes"] = Value::Null;
            v
        };
        let (a, b) = (strip(self), strip(other));
        let mut out = Vec::new();
        flat_diff("", &a, &b, &mut out);
        out
    }

    fn stage_lr(&self, stage: Stage) -> f64 {
        match stage {
            Stage::Align => self.align_lr,
            Stage::Distill => self.lr,
        }
    }
}

fn flat_diff(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                let vb = y.get(k).unwrap_or(&Value::Null);
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flat_diff(&name, va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{prefix}: {a} vs {b}")),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// One document as token ids.
#[derive(Debug, Clone)]
pub struct TokenDocument {
    pub source: String,
    pub ids: Vec<u32>,
}

/// FNV-1a, 64 bit: a stable hash for fingerprints and cache keys (not for security).
pub fn fnv64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fnv64_u32(ids: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Reads documents from text / JSONL files or directories (as `data::collect_files`). A JSONL
/// record with an `"ids"` array is taken as pre-tokenised (how test models without a tokenizer are
/// fed); one with `"text"`, and any other file, is tokenised with `tok` (no special tokens).
/// With `cache_dir`, token ids are cached per (tokenizer, text) so a corpus is tokenised once.
pub fn load_token_documents(
    paths: &[PathBuf],
    tok: Option<&Tokenizer>,
    cache_dir: Option<&Path>,
) -> Result<Vec<TokenDocument>> {
    let tok_key = match tok {
        Some(t) => {
            let j = t
                .inner
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            Some(fnv64(j.as_bytes(), 0))
        }
        None => None,
    };
    let encode = |text: &str, source: &str| -> Result<Vec<u32>> {
        let (t, key) = match (tok, tok_key) {
            (Some(t), Some(k)) => (t, k),
            _ => bail!(
                "{source} is text but the model has no tokenizer: give pre-tokenised JSONL \
                 records ({{\"ids\": [...]}})"
            ),
        };
        let h = fnv64(text.as_bytes(), key);
        let cached = cache_dir.map(|d| d.join(format!("{h:016x}.u32")));
        if let Some(p) = &cached {
            if let Ok(bytes) = std::fs::read(p) {
                if bytes.len() % 4 == 0 {
                    return Ok(bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect());
                }
            }
        }
        let ids = t
            .encode(text, false)
            .with_context(|| format!("tokenizing {source}"))?;
        if let Some(p) = &cached {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            crate::io::write_atomic(p, &bytes)
                .with_context(|| format!("writing the token cache {}", p.display()))?;
        }
        Ok(ids)
    };
    let mut docs = Vec::new();
    for f in crate::data::collect_files(paths)? {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("reading {} (is it UTF-8 text?)", f.display()))?;
        if f.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let source = format!("{}:{}", f.display(), i + 1);
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{source}: not valid JSON"))?;
                let ids = if let Some(arr) = v.get("ids").and_then(|x| x.as_array()) {
                    arr.iter()
                        .map(|x| {
                            x.as_u64()
                                .filter(|&n| n <= u32::MAX as u64)
                                .map(|n| n as u32)
                                .with_context(|| {
                                    format!("{source}: \"ids\" holds {x}, not a token id")
                                })
                        })
                        .collect::<Result<Vec<u32>>>()?
                } else if let Some(t) = v.get("text").and_then(|x| x.as_str()) {
                    encode(t, &source)?
                } else {
                    bail!("{source}: record has neither \"ids\" (token ids) nor \"text\"");
                };
                docs.push(TokenDocument { source, ids });
            }
        } else {
            let source = f.display().to_string();
            let ids = encode(&text, &source)?;
            docs.push(TokenDocument { source, ids });
        }
    }
    Ok(docs)
}

/// Splits `docs` into (train, held-out) by document: round(`fraction` x documents), at least one
/// and at most all but one, chosen by a seeded shuffle. For when no held-out files are named.
pub fn split_documents(
    docs: Vec<TokenDocument>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<TokenDocument>, Vec<TokenDocument>)> {
    let n = docs.len();
    ensure!(
        n >= 2,
        "holding out documents needs at least 2 documents, got {n}; name held-out files instead"
    );
    ensure!(
        (0.0..1.0).contains(&fraction),
        "held-out fraction {fraction} is outside [0, 1)"
    );
    let k = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(mix(seed, 0x4845_4c44)); // "HELD"
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let held: std::collections::BTreeSet<usize> = order[..k].iter().copied().collect();
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if held.contains(&i) {
            heldout.push(d);
        } else {
            train.push(d);
        }
    }
    Ok((train, heldout))
}

/// The token streams a run trains and evaluates on.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// Training documents, each followed by EOS when the model has one.
    pub train: Vec<u32>,
    /// Held-out documents, likewise.
    pub heldout: Vec<u32>,
    pub train_sources: Vec<String>,
    pub heldout_sources: Vec<String>,
    /// How the caller chose the documents (files, fraction...), recorded in `train_state.json`
    /// so a resume can find them again; free-form.
    pub inputs: Value,
}

/// Identifies the token streams (paths may differ between machines; the tokens may not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub train_tokens: u64,
    pub train_hash: String,
    pub heldout_tokens: u64,
    pub heldout_hash: String,
}

impl TrainData {
    pub fn new(train: &[TokenDocument], heldout: &[TokenDocument], eos: Option<u32>) -> Self {
        let pack = |docs: &[TokenDocument]| -> Vec<u32> {
            let mut s = Vec::new();
            for d in docs {
                s.extend_from_slice(&d.ids);
                if let Some(e) = eos {
                    s.push(e);
                }
            }
            s
        };
        TrainData {
            train: pack(train),
            heldout: pack(heldout),
            train_sources: train.iter().map(|d| d.source.clone()).collect(),
            heldout_sources: heldout.iter().map(|d| d.source.clone()).collect(),
            inputs: Value::Null,
        }
    }

    pub fn fingerprint(&self) -> DataFingerprint {
        DataFingerprint {
            train_tokens: self.train.len() as u64,
            train_hash: format!("{:016x}", fnv64_u32(&self.train)),
            heldout_tokens: self.heldout.len() as u64,
            heldout_hash: format!("{:016x}", fnv64_u32(&self.heldout)),
        }
    }

    fn check(&self, seq_len: usize, vocab: usize) -> Result<()> {
        ensure!(
            self.train.len() >= seq_len,
            "the training data has {} tokens, fewer than one window of {seq_len}",
            self.train.len()
        );
        ensure!(
            self.heldout.len() >= seq_len,
            "the held-out data has {} tokens, fewer than one window of {seq_len}",
            self.heldout.len()
        );
        for (what, s) in [("training", &self.train), ("held-out", &self.heldout)] {
            if let Some(&bad) = s.iter().find(|&&i| i as usize >= vocab) {
                bail!("the {what} data holds token id {bad}, outside the vocabulary of {vocab}");
            }
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, portable, and fully determined by its seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (modulo bias below 2^-40 for the sizes used here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn mix(a: u64, b: u64) -> u64 {
    SplitMix64(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next()
}

/// The seed of a stage's data order.
fn stage_seed(seed: u64, stage: Stage) -> u64 {
    mix(
        seed,
        match stage {
            Stage::Align => 1,
            Stage::Distill => 2,
        },
    )
}

/// The deterministic order in which a stage reads training windows: window g (g = 0, 1, ...) is
/// a pure function of (stream length, seq_len, seed, g).
pub struct WindowOrder {
    stream_len: usize,
    len: usize,
    seed: u64,
    epoch: u64,
    /// Global index of the first window of `epoch`.
    epoch_first: u64,
    offset: usize,
    perm: Vec<u32>,
}

impl WindowOrder {
    pub fn new(stream_len: usize, len: usize, seed: u64) -> Result<Self> {
        ensure!(
            len >= 1 && stream_len >= len,
            "a stream of {stream_len} tokens holds no window of {len}"
        );
        let mut w = WindowOrder {
            stream_len,
            len,
            seed,
            epoch: 0,
            epoch_first: 0,
            offset: 0,
            perm: Vec::new(),
        };
        w.setup_epoch(0);
        Ok(w)
    }

    fn setup_epoch(&mut self, e: u64) {
        let mut rng = SplitMix64(mix(self.seed, e));
        // A random start below seq_len so epochs cut the stream at different places.
        let room = (self.stream_len - self.len + 1).min(self.len) as u64;
        self.offset = rng.below(room) as usize;
        let n = (self.stream_len - self.offset) / self.len;
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        self.epoch = e;
        self.perm = perm;
    }

    /// Start offset in the stream of window `g`, and its (epoch, index within the epoch).
    pub fn window(&mut self, g: u64) -> (usize, u64, u64) {
        if g < self.epoch_first {
            self.epoch_first = 0;
            self.setup_epoch(0);
        }
        while g >= self.epoch_first + self.perm.len() as u64 {
            self.epoch_first += self.perm.len() as u64;
            let e = self.epoch + 1;
            self.setup_epoch(e);
        }
        let i = g - self.epoch_first;
        (
            self.offset + self.perm[i as usize] as usize * self.len,
            self.epoch,
            i,
        )
    }
}

/// Up to `k` windows of `len` tokens, evenly spaced over `stream` (always the same ones).
pub fn heldout_windows(stream: &[u32], len: usize, k: usize) -> Result<Vec<&[u32]>> {
    let n = stream.len() / len.max(1);
    ensure!(
        n >= 1,
        "the held-out data has {} tokens, fewer than one window of {len}",
        stream.len()
    );
    let k = k.clamp(1, n);
    Ok((0..k)
        .map(|i| {
            let w = i * n / k;
            &stream[w * len..(w + 1) * len]
        })
        .collect())
}

fn ids_tensor(windows: &[&[u32]], dev: &Device) -> Result<Tensor> {
    let t = windows[0].len();
    let flat: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (windows.len(), t), dev)?) // (b, t)
}

// ---------------------------------------------------------------------------------------------
// The student: trainable copies and the differentiable forward

fn map_linear(
    f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>,
    name: &str,
    l: &Linear,
) -> Result<Linear> {
    let weight = f(&format!("{name}.weight"), &l.weight)?;
    let bias = match &l.bias {
        Some(b) => Some(f(&format!("{name}.bias"), b)?),
        None => None,
    };
    Ok(Linear { weight, bias })
}

/// `m` rebuilt with every tensor replaced by `f(name, tensor)`, names as in
/// `hybrid::named_tensors` (a tied `lm_head` stays the embedding). Used to make parameters
/// trainable and to convert dtypes.
pub fn map_model(m: &Model, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Model> {
    let embed_tokens = f("model.embed_tokens.weight", &m.embed_tokens)?;
    let lm_head = if m.cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        f("lm_head.weight", &m.lm_head)?
    };
    let norm = RmsNorm {
        weight: f("model.norm.weight", &m.norm.weight)?,
        eps: m.norm.eps,
    };
    let mut layers = Vec::with_capacity(m.layers.len());
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut base = l.clone();
        base.input_layernorm = RmsNorm {
            weight: f(
                &format!("{p}.input_layernorm.weight"),
                &l.input_layernorm.weight,
            )?,
            eps: l.input_layernorm.eps,
        };
        base.post_attention_layernorm = RmsNorm {
            weight: f(
                &format!("{p}.post_attention_layernorm.weight"),
                &l.post_attention_layernorm.weight,
            )?,
            eps: l.post_attention_layernorm.eps,
        };
        let self_attn = match &l.self_attn {
            Some(a) => Some(Attention {
                q_proj: map_linear(f, &format!("{p}.self_attn.q_proj"), &a.q_proj)?,
                k_proj: map_linear(f, &format!("{p}.self_attn.k_proj"), &a.k_proj)?,
                v_proj: map_linear(f, &format!("{p}.self_attn.v_proj"), &a.v_proj)?,
                n_heads: a.n_heads,
                n_kv_heads: a.n_kv_heads,
                head_dim: a.head_dim,
            }),
            None => None,
        };
        base.o_proj = map_linear(f, &format!("{p}.self_attn.o_proj"), &l.o_proj)?;
        base.mlp = Mlp {
            gate_proj: map_linear(f, &format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj)?,
            up_proj: map_linear(f, &format!("{p}.mlp.up_proj"), &l.mlp.up_proj)?,
            down_proj: map_linear(f, &format!("{p}.mlp.down_proj"), &l.mlp.down_proj)?,
        };
        let mixer = match &l.mixer {
            Some(mx) => {
                let mut params = Vec::with_capacity(PARAM_NAMES.len());
                for (name, t) in PARAM_NAMES.iter().zip(mx.params()) {
                    params.push(f(&format!("{p}.mixer.{name}"), t)?);
                }
                Some(MambaMixer::from_params(&mx.cfg, params)?)
            }
            None => None,
        };
        // with_split rebuilds the reordered o_proj from the mapped one.
        layers.push(DecoderLayer::with_split(
            &base,
            self_attn,
            mixer,
            l.split.clone(),
            m.cfg.head_dim,
        )?);
    }
    Ok(Model {
        embed_tokens,
        layers,
        norm,
        lm_head,
        ..m.clone()
    })
}

/// A copy of `m` in `dtype` (f64 for finite-difference checks).
pub fn model_to_dtype(m: &Model, dtype: DType) -> Result<Model> {
    map_model(m, &mut |_, t| Ok(t.to_dtype(dtype)?))
}

/// A copy of `m` whose trained tensors are fresh `Var`s (copies: `m` is left untouched), with the
/// vars under their checkpoint names, in `named_tensors` order; [`TrainScope::trains`] picks them.
pub fn make_trainable(m: &Model, scope: TrainScope) -> Result<(Model, Vec<(String, Var)>)> {
    let mixer_layers: Vec<String> = m
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.mixer.is_some())
        .map(|(i, _)| format!("model.layers.{i}"))
        .collect();
    let mut vars = Vec::new();
    let model = map_model(m, &mut |name, t| {
        if scope.trains(name, &mixer_layers) {
            // detach() so that an existing Var is copied rather than shared.
            let v = Var::from_tensor(&t.detach())?;
            let out = v.as_tensor().clone();
            vars.push((name.to_string(), v));
            Ok(out)
        } else {
            Ok(t.clone())
        }
    })?;
    ensure!(
        !vars.is_empty(),
        "nothing to train: the model has no Mamba mixers (is it a converted RecurFormer?)"
    );
    Ok((model, vars))
}

/// o_proj with its input columns in [kept heads..., replaced heads...] order, as the forward
/// concatenates them (llama.rs keeps the same matrix precomputed; here it is rebuilt from `o_proj`
/// so that a trained o_proj is used and gradients reach it through `index_select`).
fn o_proj_in_run_order(layer: &DecoderLayer, hd: usize) -> Result<Linear> {
    let order: Vec<usize> = layer
        .split
        .attention_heads
        .iter()
        .chain(&layer.split.mamba_heads)
        .copied()
        .collect();
    if order.iter().copied().eq(0..order.len()) {
        return Ok(layer.o_proj.clone());
    }
    let cols: Vec<u32> = order
        .iter()
        .flat_map(|&h| (h * hd..(h + 1) * hd).map(|c| c as u32))
        .collect();
    let idx = Tensor::new(cols.as_slice(), layer.o_proj.weight.device())?;
    Ok(Linear {
        weight: layer.o_proj.weight.index_select(&idx, 1)?,
        bias: layer.o_proj.bias.clone(),
    })
}

/// x @ W^T for a weight W (out, in) that does not train. candle's matmul backward computes the
/// gradients of both operands, and for a frozen weight that is a second GEMM as large as the
/// forward's, thrown away (the output projection alone: 14.5 GFLOP per 256 tokens on SmolLM2).
/// This op's backward computes only the input's gradient, grad @ W.
struct FrozenMatmul {
    w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        let (out, w_in) = self.w.dims2()?;
        if w_in != inp {
            candle_core::bail!("frozen-matmul: input has {inp} columns, the weight {w_in}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("frozen-matmul runs on the CPU only");
        };
        let y = s.matmul(wc, (1, rows, out, inp), l, &wl.transpose(0, 1)?)?; // (rows, out)
        Ok((y, Shape::from((rows, out))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        g.matmul(&self.w).map(Some) // (rows, out) @ (out, in)
    }
}

/// `Linear::forward` for training: a frozen weight goes through `FrozenMatmul`, a trained one
/// (or an input outside the graph) through the plain matmul.
fn linear_train(l: &Linear, x: &Tensor) -> Result<Tensor> {
    if l.weight.track_op() || !x.track_op() {
        return l.forward(x);
    }
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x
        .reshape((rows, inp))?
        .contiguous()?
        .apply_op1(FrozenMatmul {
            w: l.weight.contiguous()?,
        })?; // (rows, out)
    let y = match &l.bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty dims") = l.weight.dim(0)?;
    Ok(y.reshape(out)?)
}

/// `Model::logits` for training: hidden states (b, t, d) -> logits (b, t, v) through
/// `linear_train`.
pub fn logits_train(m: &Model, h: &Tensor) -> Result<Tensor> {
    linear_train(
        &Linear {
            weight: m.lm_head.clone(),
            bias: None,
        },
        h,
    )
}

/// Additive causal mask (t, t) in `dtype`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(m, (t, t), dev)?.to_dtype(dtype)?)
}

/// The kept heads of one layer over a whole window from an empty cache, with differentiable ops
/// only: h (b, t, d) -> (b, t, nh_kept*hd). Same computation as `Attention::heads_forward` on the
/// eager path, without the KV cache (whose `slice_set` stops gradients).
fn attention_train(
    a: &Attention,
    rope: &Rope,
    h: &Tensor,
    cos_sin: (&Tensor, &Tensor),
    mask: &Tensor,
    opts: &ForwardOptions,
) -> Result<Tensor> {
    let (b, t, _) = h.dims3()?;
    let (nh, nkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
    let g = nh / nkv;
    let q = linear_train(&a.q_proj, h)?
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?; // (b, nh, t, hd)
    let k = linear_train(&a.k_proj, h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?; // (b, nkv, t, hd)
    let v = linear_train(&a.v_proj, h)?
        .reshape((b, t, nkv, hd))?
        .transpose(1, 2)?; // (b, nkv, t, hd)
    let q = rope.apply(&q, cos_sin.0, cos_sin.1, opts)?;
    let k = rope.apply(&k, cos_sin.0, cos_sin.1, opts)?;
    // Repeat each KV head for its g query heads (transformers `repeat_kv`).
    let rep = |x: &Tensor| -> Result<Tensor> {
        Ok(x.unsqueeze(2)?
            .broadcast_as((b, nkv, g, t, hd))?
            .reshape((b, nh, t, hd))?) // (b, nh, t, hd)
    };
    let (k, v) = (rep(&k)?, rep(&v)?);
    let scores = (q.contiguous()?.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (b, nh, t, t)
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?;
    let o = probs.matmul(&v)?; // (b, nh, t, hd)
    Ok(o.transpose(1, 2)?.reshape((b, t, nh * hd))?) // (b, t, nh*hd)
}

/// The training forward of a (hybrid) model: `ids` (b, t) from an empty state -> final normalised
/// hidden states (b, t, d), every op recording a backward pass (eager attention, `rms_norm_slow`,
/// `rope_slow`, the mixer's graph scan). Works in the model's dtype (f32, or f64 for checks).
/// Equal to `Model::forward_hidden` on the eager path (tested), but gradients flow through the
/// kept heads' keys and values too.
pub fn forward_train(m: &Model, ids: &Tensor) -> Result<Tensor> {
    Ok(forward_train_states(m, ids, false)?.0)
}

/// [`forward_train`], also returning every layer's normalised input (b, t, d) when `collect` is
/// set (empty otherwise), in layer order.
pub fn forward_train_states(
    m: &Model,
    ids: &Tensor,
    collect: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, t) = ids.dims2()?;
    ensure!(t >= 1, "forward called with no tokens");
    let max_id = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
    ensure!(
        (max_id as usize) < m.cfg.vocab_size,
        "token id {max_id} is outside the vocabulary of {}",
        m.cfg.vocab_size
    );
    let d = m.cfg.hidden_size;
    let dtype = m.embed_tokens.dtype();
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: true,
    };
    let mut x = m
        .embed_tokens
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))?; // (b, t, d)
    let (cos, sin) = m.rope.tables(0, t, &m.device)?; // (t, hd/2)
    let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
    let mask = causal_mask(t, dtype, &m.device)?;
    let mut states = Vec::with_capacity(if collect { m.layers.len() } else { 0 });
    for layer in &m.layers {
        let h = layer.input_layernorm.forward(&x, &opts)?; // (b, t, d)
        if collect {
            states.push(h.clone());
        }
        let mut parts = Vec::with_capacity(2);
        if let Some(a) = &layer.self_attn {
            parts.push(attention_train(a, &m.rope, &h, (&cos, &sin), &mask, &opts)?);
        }
        if let Some(mx) = &layer.mixer {
            parts.push(mx.forward_seq(&h, None, &opts)?.0); // (b, t, n*hd)
        }
        let o_in = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 2)?
        }; // (b, t, nh*hd), [kept..., replaced...]
        let o = linear_train(&o_proj_in_run_order(layer, m.cfg.head_dim)?, &o_in)?;
        x = (x + o)?;
        let h = layer.post_attention_layernorm.forward(&x, &opts)?;
        let mlp = &layer.mlp;
        let gate = linear_train(&mlp.gate_proj, &h)?.silu()?;
        let up = linear_train(&mlp.up_proj, &h)?;
        x = (&x + linear_train(&mlp.down_proj, &(gate * up)?)?)?;
    }
    Ok((m.norm.forward(&x, &opts)?, states))
}

// ---------------------------------------------------------------------------------------------
// Losses

/// A converted layer of the student: its index and the base model's query heads its mixer
/// replaced, in mixer output order.
#[derive(Debug, Clone)]
struct Converted {
    layer: usize,
    heads: Tensor, // (n) u32
    n: usize,
}

fn converted_layers(student: &Model) -> Result<Vec<Converted>> {
    let mut out = Vec::new();
    for (i, l) in student.layers.iter().enumerate() {
        if l.mixer.is_some() {
            let h: Vec<u32> = l.split.mamba_heads.iter().map(|&h| h as u32).collect();
            out.push(Converted {
                layer: i,
                heads: Tensor::new(h.as_slice(), &student.device)?,
                n: h.len(),
            });
        }
    }
    ensure!(
        !out.is_empty(),
        "the student has no Mamba mixers: nothing to align"
    );
    Ok(out)
}

/// The teacher's eager forward over `ids` (b, t): per converted layer, its normalised input
/// (b, t, d) and the replaced heads' outputs before o_proj (b, t, n*hd), in `conv` order.
fn teacher_activations(
    teacher: &Model,
    conv: &[Converted],
    ids: &Tensor,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (b, t) = ids.dims2()?;
    let hd = teacher.cfg.head_dim;
    let mut slot: Vec<Option<usize>> = vec![None; teacher.layers.len()];
    for (i, c) in conv.iter().enumerate() {
        slot[c.layer] = Some(i);
    }
    let mut out: Vec<Option<(Tensor, Tensor)>> = vec![None; conv.len()];
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    {
        let mut observer = |o: &AttnObservation| -> Result<()> {
            if let Some(i) = slot[o.layer] {
                let c = &conv[i];
                let y = o
                    .heads_out
                    .index_select(&c.heads, 1)? // (b, n, t, hd)
                    .transpose(1, 2)?
                    .reshape((b, t, c.n * hd))?; // (b, t, n*hd)
                out[i] = Some((o.input.detach(), y.detach()));
            }
            Ok(())
        };
        let mut cache = teacher.new_cache(b, t);
        teacher.forward_hidden(ids, &mut cache, &opts, Some(&mut observer))?;
    }
    out.into_iter()
        .zip(conv)
        .map(|(o, c)| {
            o.with_context(|| format!("the teacher's layer {} was not observed", c.layer))
        })
        .collect()
}

/// ||y - y*||² / ||y*||² as a scalar tensor.
fn normalised_mse(y: &Tensor, target: &Tensor) -> Result<Tensor> {
    let num = (y - target)?.sqr()?.sum_all()?;
    let den = target.sqr()?.sum_all()?;
    Ok((num / den)?)
}

/// Teacher logits (b, t, v) on the fast inference path (no graph).
fn teacher_logits(teacher: &Model, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let mut cache = teacher.new_cache(b, t);
    let h = teacher.forward_hidden(ids, &mut cache, &ForwardOptions::default(), None)?;
    Ok(teacher.logits(&h)?.detach())
}

/// KL(teacher ‖ student) and the student's cross-entropy from both models' logits in one pass
/// over the vocabulary, with a hand-written backward. Composed from candle ops the same losses
/// allocate about ten (rows x v) tensors forward and backward (50 MB each at 256 tokens of a 49K
/// vocabulary) and cost more than the student's backward through all its layers.
///
/// Per row r (one position): ls = s - logsumexp(s), lt = t - logsumexp(t), p = exp(lt),
/// q = exp(ls); KL_r = sum_j p_j (lt_j - ls_j); CE_r = -ls_{target}. Output [sum_r KL_r / n_kl,
/// sum_{r with a target} CE_r / n_ce]. Gradients with respect to s: d KL / d s_j = (q_j P - p_j)
/// / n_kl with P = sum_j p_j (1 up to rounding), d CE / d s_j = (q_j - [j = target]) / n_ce.
/// Sums run in f64 in row order; rows are processed in parallel, each by one thread, so the
/// result does not depend on the thread count.
struct DistillLossOp {
    /// Target token of each row, or None (the last position of a window has none).
    targets: Vec<Option<u32>>,
    n_kl: f64,
    n_ce: f64,
    /// Per row (logsumexp(s), logsumexp(t), P), from the forward pass for the backward.
    stash: std::sync::Mutex<Vec<(f64, f64, f64)>>,
}

/// exp in the working precision: f32 inputs use f32's exp (the sums stay f64).
fn exp_in(x: f64, single: bool) -> f64 {
    if single {
        (x as f32).exp() as f64
    } else {
        x.exp()
    }
}

/// Contiguous rows of a (rows, v) f32 or f64 storage, as f64 closures' input.
fn float_rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(FloatSlice<'a>, usize)> {
    let (_, v) = l.shape().dims2()?;
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("distill-loss needs contiguous inputs");
    };
    let sl = match s {
        CpuStorage::F32(x) => FloatSlice::F32(&x[start..end]),
        CpuStorage::F64(x) => FloatSlice::F64(&x[start..end]),
        _ => candle_core::bail!("distill-loss takes f32 or f64 logits"),
    };
    Ok((sl, v))
}

#[derive(Clone, Copy)]
enum FloatSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl FloatSlice<'_> {
    fn row(&self, r: usize, v: usize) -> Vec<f64> {
        match self {
            FloatSlice::F32(x) => x[r * v..(r + 1) * v].iter().map(|&a| a as f64).collect(),
            FloatSlice::F64(x) => x[r * v..(r + 1) * v].to_vec(),
        }
    }
}

fn logsumexp(x: &[f64], single: bool) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + x.iter().map(|&a| exp_in(a - m, single)).sum::<f64>().ln()
}

impl CustomOp2 for DistillLossOp {
    fn name(&self) -> &'static str {
        "distill-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (st, v) = float_rows(s1, l1)?;
        let (tt, v2) = float_rows(s2, l2)?;
        let rows = l1.shape().dims2()?.0;
        if v != v2 || l2.shape().dims2()?.0 != rows || self.targets.len() != rows {
            candle_core::bail!(
                "distill-loss: student {:?}, teacher {:?}, {} targets",
                l1.shape(),
                l2.shape(),
                self.targets.len()
            );
        }
        let single = matches!(st, FloatSlice::F32(_));
        let per_row: Vec<(f64, f64, (f64, f64, f64))> = (0..rows)
            .into_par_iter()
            .map(|r| {
                let (s, t) = (st.row(r, v), tt.row(r, v));
                let (lse_s, lse_t) = (logsumexp(&s, single), logsumexp(&t, single));
                let (mut kl, mut mass) = (0f64, 0f64);
                for (a, b) in s.iter().zip(&t) {
                    let lt = b - lse_t;
                    let p = exp_in(lt, single);
                    kl += p * (lt - (a - lse_s));
                    mass += p;
                }
                let ce = match self.targets[r] {
                    Some(j) => lse_s - s[j as usize],
                    None => 0.0,
                };
                (kl, ce, (lse_s, lse_t, mass))
            })
            .collect();
        let kl = per_row.iter().map(|x| x.0).sum::<f64>() / self.n_kl;
        let ce = per_row.iter().map(|x| x.1).sum::<f64>() / self.n_ce.max(1.0);
        *self.stash.lock().expect("stash lock") = per_row.into_iter().map(|x| x.2).collect();
        let out = if single {
            CpuStorage::F32(vec![kl as f32, ce as f32])
        } else {
            CpuStorage::F64(vec![kl, ce])
        };
        Ok((out, Shape::from(2)))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let g = grad.to_dtype(DType::F64)?.to_vec1::<f64>()?; // [d/dKL, d/dCE]
        let (g_kl, g_ce) = (g[0] / self.n_kl, g[1] / self.n_ce.max(1.0));
        let stash = self.stash.lock().expect("stash lock").clone();
        let (rows, v) = student.dims2()?;
        let single = student.dtype() == DType::F32;
        let (ss, sl) = student.storage_and_layout();
        let (ts, tl) = teacher.storage_and_layout();
        let (Storage::Cpu(sc), Storage::Cpu(tc)) = (&*ss, &*ts) else {
            candle_core::bail!("distill-loss runs on the CPU only");
        };
        let (st, _) = float_rows(sc, sl)?;
        let (tt, _) = float_rows(tc, tl)?;
        let mut out = vec![0f64; rows * v];
        out.par_chunks_mut(v).enumerate().for_each(|(r, o)| {
            let (lse_s, lse_t, mass) = stash[r];
            let (s, t) = (st.row(r, v), tt.row(r, v));
            let g_ce = if self.targets[r].is_some() { g_ce } else { 0.0 };
            for j in 0..v {
                let q = exp_in(s[j] - lse_s, single);
                let p = exp_in(t[j] - lse_t, single);
                o[j] = g_kl * (q * mass - p) + g_ce * q;
            }
            if let Some(j) = self.targets[r] {
                o[j as usize] -= g_ce;
            }
        });
        let gs = Tensor::from_vec(out, (rows, v), student.device())?.to_dtype(student.dtype())?;
        Ok((Some(gs), None))
    }
}

/// Distillation losses of student logits (b, t, v) against the teacher's logits (same shape):
/// KL(teacher ‖ student) summed over the vocabulary and averaged over the b*t positions, and the
/// student's cross-entropy on the next tokens of `ids` (b*(t-1) predictions), as scalar tensors
/// that backpropagate into the student's logits (see `DistillLossOp`).
pub fn distill_losses(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    ids: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (b, t, v) = student_logits.dims3()?;
    let ids_v: Vec<Vec<u32>> = ids.to_vec2()?;
    let targets: Vec<Option<u32>> = ids_v
        .iter()
        .flat_map(|w| (0..t).map(move |i| w.get(i + 1).copied()))
        .collect();
    let op = DistillLossOp {
        targets,
        n_kl: (b * t) as f64,
        n_ce: (b * (t - 1)) as f64,
        stash: std::sync::Mutex::new(Vec::new()),
    };
    let s2 = student_logits.reshape((b * t, v))?.contiguous()?; // (b*t, v)
    let t2 = teacher_logits
        .to_dtype(student_logits.dtype())?
        .reshape((b * t, v))?
        .contiguous()?
        .detach();
    let out = s2.apply_op2(&t2, op)?; // (2): [KL, CE]
    Ok((
        out.narrow(0, 0, 1)?.squeeze(0)?,
        out.narrow(0, 1, 1)?.squeeze(0)?,
    ))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// One micro-batch's losses and gradients (in slot order).
struct MicroResult {
    loss: f64,
    /// align: per converted layer; distill: [kl, ce].
    parts: Vec<f64>,
    grads: Vec<Tensor>,
}

fn grads_in_order(
    store: &candle_core::backprop::GradStore,
    vars: &[(String, Var)],
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(_, v)| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            // A tensor the loss does not depend on (cannot happen for mixers): zero gradient.
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// Stage 1 on one micro-batch: every converted layer's mixer against the teacher's heads.
fn align_micro(
    teacher: &Model,
    student: &Model,
    conv: &[Converted],
    ids: &Tensor,
    vars: Option<&[(String, Var)]>,
) -> Result<MicroResult> {
    let acts = teacher_activations(teacher, conv, ids)?;
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: true,
    };
    let mut total: Option<Tensor> = None;
    let mut parts = Vec::with_capacity(conv.len());
    for (c, (u, target)) in conv.iter().zip(&acts) {
        let mixer = student.layers[c.layer]
            .mixer
            .as_ref()
            .context("converted layer without mixer")?;
        let (y, _) = mixer.forward_seq(&u.to_dtype(mixer.x_proj.dtype())?, None, &opts)?;
        let l = normalised_mse(&y, &target.to_dtype(y.dtype())?)?;
        parts.push(scalar(&l)?);
        total = Some(match total {
            Some(s) => (s + l)?,
            None => l,
        });
    }
    let total = total.context("no converted layer")?;
    let loss = parts.iter().sum::<f64>() / parts.len() as f64;
    let grads = match vars {
        Some(v) if loss.is_finite() => grads_in_order(&total.backward()?, v)?,
        _ => Vec::new(),
    };
    Ok(MicroResult { loss, parts, grads })
}

/// Mean normalised MSE between the student's and the teacher's normalised layer inputs, from the
/// layer after the first converted one to the final norm's output (earlier layers see identical
/// inputs in both models). Matching the residual stream at every depth gives each mixer a direct
/// signal besides the one that reaches it through the logits, in the spirit of the hidden-state
/// stage of MOHAWK (Bick et al. 2024, "Transformers to SSMs"), except that here each model runs
/// on its own inputs end to end instead of the student's block on the teacher's input.
pub fn hidden_state_loss(
    student: &Model,
    s_states: &[Tensor],
    s_final: &Tensor,
    t_states: &[Tensor],
    t_final: &Tensor,
) -> Result<Tensor> {
    let start = student
        .layers
        .iter()
        .position(|l| l.mixer.is_some())
        .map_or(0, |f| f + 1);
    let mut terms = vec![normalised_mse(
        s_final,
        &t_final.to_dtype(s_final.dtype())?,
    )?];
    for (s, t) in s_states.iter().zip(t_states).skip(start) {
        terms.push(normalised_mse(s, &t.to_dtype(s.dtype())?)?);
    }
    let n = terms.len() as f64;
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / n)?)
}

/// Stage 2 on one micro-batch: parts [KL, CE, hidden-state NMSE (0 when its weight is 0)].
fn distill_micro(
    teacher: &Model,
    student: &Model,
    ids: &Tensor,
    ce_weight: f64,
    hidden_weight: f64,
    vars: Option<&[(String, Var)]>,
) -> Result<MicroResult> {
    let with_hidden = hidden_weight > 0.0;
    let (tl, t_hidden) = if with_hidden {
        // The teacher on the same eager path as the student, keeping its layer inputs.
        let (h, states) = forward_train_states(teacher, ids, true)?;
        let states: Vec<Tensor> = states.iter().map(|s| s.detach()).collect();
        (teacher.logits(&h)?.detach(), Some((h.detach(), states)))
    } else {
        (teacher_logits(teacher, ids)?, None)
    };
    let (h, s_states) = forward_train_states(student, ids, with_hidden)?;
    let logits = logits_train(student, &h)?;
    let (kl, ce) = distill_losses(&logits, &tl, ids)?;
    let hidden = t_hidden
        .map(|(t_final, t_states)| hidden_state_loss(student, &s_states, &h, &t_states, &t_final))
        .transpose()?;
    let (klv, cev) = (scalar(&kl)?, scalar(&ce)?);
    let hv = hidden.as_ref().map(scalar).transpose()?.unwrap_or(0.0);
    let loss = klv + ce_weight * cev + hidden_weight * hv;
    let grads = match vars {
        Some(v) if loss.is_finite() => {
            let mut total = kl;
            if ce_weight > 0.0 {
                total = (total + (ce * ce_weight)?)?;
            }
            if let Some(x) = hidden {
                total = (total + (x * hidden_weight)?)?;
            }
            grads_in_order(&total.backward()?, v)?
        }
        _ => Vec::new(),
    };
    Ok(MicroResult {
        loss,
        parts: vec![klv, cev, hv],
        grads,
    })
}

/// Held-out figures of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// The stage's loss (align: mean normalised MSE over layers; distill: KL + ce_weight x CE).
    pub loss: f64,
    /// distill: KL(teacher ‖ student) per token.
    pub kl: Option<f64>,
    /// distill: the student's cross-entropy (nats per token; exp gives perplexity).
    pub ce: Option<f64>,
    /// distill with a hidden-state weight: the mean normalised MSE of the layer inputs.
    #[serde(default)]
    pub hidden: Option<f64>,
}

/// The stage's loss on fixed held-out windows (no gradients).
pub fn evaluate(
    stage: Stage,
    teacher: &Model,
    student: &Model,
    windows: &[&[u32]],
    batch: usize,
    ce_weight: f64,
    hidden_weight: f64,
) -> Result<EvalResult> {
    let conv = match stage {
        Stage::Align => converted_layers(student)?,
        Stage::Distill => Vec::new(),
    };
    let (mut loss, mut kl, mut ce, mut hid, mut n) = (0f64, 0f64, 0f64, 0f64, 0usize);
    for chunk in windows.chunks(batch.max(1)) {
        let ids = ids_tensor(chunk, &student.device)?;
        let r = match stage {
            Stage::Align => align_micro(teacher, student, &conv, &ids, None)?,
            Stage::Distill => {
                distill_micro(teacher, student, &ids, ce_weight, hidden_weight, None)?
            }
        };
        let w = chunk.len() as f64;
        loss += r.loss * w;
        if stage == Stage::Distill {
            kl += r.parts[0] * w;
            ce += r.parts[1] * w;
            hid += r.parts[2] * w;
        }
        n += chunk.len();
    }
    let n = n as f64;
    Ok(EvalResult {
        loss: loss / n,
        kl: (stage == Stage::Distill).then_some(kl / n),
        ce: (stage == Stage::Distill).then_some(ce / n),
        hidden: (stage == Stage::Distill && hidden_weight > 0.0).then_some(hid / n),
    })
}

// ---------------------------------------------------------------------------------------------
// State, checkpoints, resume

/// A finished stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    pub stage: Stage,
    pub steps: u64,
    pub horizon: u64,
    pub tokens: u64,
    pub elapsed_s: f64,
    /// "steps" (the horizon was reached) or "time".
    pub stopped_by: String,
    pub last_train_loss: Option<f64>,
    pub heldout_start: Option<EvalResult>,
    pub heldout_end: Option<EvalResult>,
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Index into `config.stages` of the stage in progress; equal to its length when finished.
    pub stage_index: usize,
    /// Optimiser steps done in this stage.
    pub step: u64,
    /// The stage's schedule length, once known.
    pub horizon: Option<u64>,
    /// Training windows consumed in this stage: the data position.
    pub windows: u64,
    pub tokens: u64,
    /// Wall time spent in this stage (over all invocations, up to the checkpoint).
    pub elapsed_s: f64,
    pub last_train_loss: Option<f64>,
    pub heldout_start: Option<EvalResult>,
    pub done: Vec<StageSummary>,
}

impl Progress {
    fn fresh() -> Self {
        Progress {
            stage_index: 0,
            step: 0,
            horizon: None,
            windows: 0,
            tokens: 0,
            elapsed_s: 0.0,
            last_train_loss: None,
            heldout_start: None,
            done: Vec::new(),
        }
    }
}

/// The data-order generator's state: SplitMix64 reseeded per (stage, epoch), so the window
/// counter determines it; written out for people reading the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub algorithm: String,
    pub stage_seed: u64,
    pub epoch: u64,
    pub index_in_epoch: u64,
}

/// Identifies the teacher's weights (hash of a few tensors: a moved file is fine, other weights
/// are not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub path: String,
    pub fingerprint: String,
}

/// `train_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub config: TrainConfig,
    pub progress: Progress,
    pub data: DataFingerprint,
    pub data_sources: Value,
    pub teacher: TeacherInfo,
    /// Tensor-op threads of the run that wrote the checkpoint (bit-exact resume assumes the same).
    pub threads: usize,
    /// The input model's `provenance.training` before this run.
    pub training_before: Vec<Value>,
    /// Tensors the stage in progress trains, with shapes: the content of optimizer.safetensors.
    pub optimizer_params: Vec<(String, Vec<usize>)>,
    pub optimizer_steps: u64,
    pub rng: Option<RngState>,
    pub recurformer_version: String,
}

impl TrainState {
    pub fn finished(&self) -> bool {
        self.progress.stage_index >= self.config.stages.len()
    }
}

/// A checkpoint to continue from, read by [`read_resume_point`].
pub struct ResumePoint {
    pub dir: PathBuf,
    pub state: TrainState,
    /// The AdamW moments of the stage in progress (empty at a stage boundary).
    pub optimizer: HashMap<String, Tensor>,
    /// Log records up to the checkpoint.
    pub log: Vec<Value>,
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(parent.join(format!(
        ".{}.{tag}{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Position of a log record, (stage index, step), for cutting a log back to a checkpoint.
fn record_pos(r: &Value) -> (u64, u64) {
    (
        r["stage_index"].as_u64().unwrap_or(0),
        r["step"].as_u64().unwrap_or(0),
    )
}

fn read_log(path: &Path) -> Result<Vec<Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str::<Value>(l) {
            Ok(v) => out.push(v),
            // A run killed while appending leaves a partial last line; anything else is damage.
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => bail!("{}:{}: not valid JSON ({e})", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Opens a training checkpoint to resume: its model, `train_state.json`, the optimiser state and
/// the log. Refuses, with the reason, a directory that is not a training checkpoint or is damaged.
pub fn read_resume_point(dir: &Path) -> Result<(LoadedModel, ResumePoint)> {
    if !dir.exists() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(rd) = std::fs::read_dir(parent) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with(&format!(".{name}.old"))
                    && e.path().join(TRAIN_STATE_FILE).exists()
                {
                    bail!(
                        "{} does not exist, but {} holds the checkpoint before it (the run was \
                         stopped while replacing it): rename that directory to {} and resume",
                        dir.display(),
                        e.path().display(),
                        dir.display()
                    );
                }
            }
        }
        bail!("resume directory {} does not exist", dir.display());
    }
    let sp = dir.join(TRAIN_STATE_FILE);
    if !sp.exists() {
        bail!(
            "{} is not a training checkpoint: it has no {TRAIN_STATE_FILE} (to train a converted \
             model, pass it as --model instead of --resume)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?;
    let raw: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON (damaged checkpoint)", sp.display()))?;
    if raw["format_version"].as_u64() != Some(STATE_FORMAT_VERSION as u64) {
        bail!(
            "{} has format_version {}, this build reads {STATE_FORMAT_VERSION}",
            sp.display(),
            raw["format_version"]
        );
    }
    let state: TrainState = serde_json::from_value(raw)
        .with_context(|| format!("{} is malformed (damaged checkpoint)", sp.display()))?;
    state
        .config
        .validate()
        .with_context(|| format!("{} holds an invalid configuration", sp.display()))?;
    let p = &state.progress;
    ensure!(
        p.stage_index <= state.config.stages.len(),
        "{}: stage index {} but only {} stages",
        sp.display(),
        p.stage_index,
        state.config.stages.len()
    );
    ensure!(
        p.done.len() == p.stage_index,
        "{}: {} finished stage summaries for stage index {} (damaged checkpoint)",
        sp.display(),
        p.done.len(),
        p.stage_index
    );
    ensure!(
        state.optimizer_steps == p.step,
        "{}: optimizer at step {} but progress at step {} (damaged checkpoint)",
        sp.display(),
        state.optimizer_steps,
        p.step
    );
    let loaded = crate::loader::load(dir)
        .with_context(|| format!("loading the model of checkpoint {}", dir.display()))?;
    ensure!(
        loaded.model.recurformer.is_some(),
        "{} holds a base model, not a RecurFormer",
        dir.display()
    );
    let mut optimizer = HashMap::new();
    if !state.finished() && p.step > 0 {
        let op = dir.join(OPTIMIZER_FILE);
        if !op.exists() {
            bail!(
                "{} has no {OPTIMIZER_FILE} although {TRAIN_STATE_FILE} is at step {} of stage {}",
                dir.display(),
                p.step,
                state.config.stages[p.stage_index].name()
            );
        }
        optimizer = candle_core::safetensors::load(&op, &Device::Cpu)
            .with_context(|| format!("{} is not a valid safetensors file", op.display()))?;
        for (name, shape) in &state.optimizer_params {
            for kind in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{kind}.{name}");
                let t = optimizer
                    .get(&key)
                    .with_context(|| format!("{} has no tensor {key}", op.display()))?;
                ensure!(
                    t.dims() == shape.as_slice(),
                    "{}: {key} has shape {:?}, expected {:?}",
                    op.display(),
                    t.dims(),
                    shape
                );
            }
        }
        ensure!(
            optimizer.len() == 2 * state.optimizer_params.len(),
            "{} holds {} tensors, expected {} (2 per trained tensor)",
            op.display(),
            optimizer.len(),
            2 * state.optimizer_params.len()
        );
    }
    let here = (p.stage_index as u64, p.step);
    let log = read_log(&dir.join(LOG_FILE))?
        .into_iter()
        .filter(|r| record_pos(r) <= here)
        .collect();
    let rp = ResumePoint {
        dir: dir.to_path_buf(),
        state,
        optimizer,
        log,
    };
    Ok((loaded, rp))
}

/// Hash of a few of the model's tensors (norm, the first embedding row, the first q_proj row).
pub fn model_fingerprint(m: &Model) -> Result<String> {
    let mut h = 0u64;
    let mut add = |t: &Tensor| -> Result<()> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        h = fnv64(&bytes, h);
        Ok(())
    };
    add(&m.norm.weight)?;
    add(&m.embed_tokens.narrow(0, 0, 1)?)?;
    if let Some(a) = m.layers.first().and_then(|l| l.self_attn.as_ref()) {
        add(&a.q_proj.weight.narrow(0, 0, 1)?)?;
    }
    Ok(format!("{h:016x}"))
}

/// The teacher must be a base model of the student's shape.
fn check_teacher(student: &Model, teacher: &Model) -> Result<()> {
    ensure!(
        teacher.recurformer.is_none(),
        "the teacher is a RecurFormer; it must be the base model"
    );
    ensure!(
        student.recurformer.is_some(),
        "the student is a base model; convert it first (recurformer convert)"
    );
    let (s, t) = (&student.cfg, &teacher.cfg);
    let shape = |c: &crate::config::ModelConfig| {
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
    };
    ensure!(
        shape(s) == shape(t),
        "teacher and student differ: (vocab, hidden, layers, heads, kv heads, head_dim) = {:?} vs {:?}",
        shape(t),
        shape(s)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The loop

/// What a run trains with.
pub struct Session<'a> {
    /// The hybrid to train (for a resume: the checkpoint's model).
    pub student: &'a Model,
    pub tokenizer: Option<&'a Tokenizer>,
    pub teacher: &'a Model,
    /// Recorded in the state and the provenance.
    pub teacher_path: String,
    pub data: &'a TrainData,
    /// The checkpoint directory (written atomically; the final model).
    pub out: PathBuf,
}

/// Settings that may change between invocations without changing the result.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Evaluate on held-out windows every N steps (0: only at the start and end of a stage).
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0: only at stage ends).
    pub save_every: u64,
}

pub enum Start {
    Fresh(TrainConfig),
    Resume(Box<ResumePoint>),
}

/// One optimiser step, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub stage: Stage,
    pub stage_index: usize,
    pub step: u64,
    pub horizon: Option<u64>,
    pub loss: f64,
    /// align: normalised MSE per converted layer; distill: [KL, CE, hidden-state NMSE].
    pub parts: Vec<f64>,
    pub grad_norm: f64,
    pub lr: f64,
    /// Training tokens of this stage so far.
    pub tokens: u64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// What the loop reports to its caller (progress bars, tests).
pub enum Event<'a> {
    StageStart {
        stage: Stage,
        step: u64,
        horizon: Option<u64>,
    },
    /// The horizon became known (time-only budgets, after warmup).
    Horizon {
        stage: Stage,
        horizon: u64,
    },
    Step(&'a StepRecord),
    Eval {
        stage: Stage,
        step: u64,
        result: &'a EvalResult,
    },
    Checkpoint {
        stage: Stage,
        step: u64,
    },
}

pub struct TrainOutcome {
    /// False when the caller stopped the run (ControlFlow::Break).
    pub finished: bool,
    pub state: TrainState,
    pub log: Vec<Value>,
}

/// Per-stage limits derived from the budget.
struct StageBudget {
    steps: Option<u64>,
    seconds: Option<f64>,
}

fn stage_budget(cfg: &TrainConfig, stage_index: usize, done: &[StageSummary]) -> StageBudget {
    let stage = cfg.stages[stage_index];
    let share = if cfg.stages.len() == 1 {
        1.0
    } else if stage == Stage::Align {
        cfg.align_share
    } else {
        1.0 - cfg.align_share
    };
    let b = &cfg.budget;
    let from_steps = b
        .max_steps
        .map(|s| ((s as f64 * share).round() as u64).max(1));
    let from_tokens = b
        .max_tokens
        .map(|t| ((t as f64 * share / cfg.tokens_per_step() as f64).floor() as u64).max(1));
    let steps = match (from_steps, from_tokens) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let seconds = b.max_minutes.map(|m| {
        let total = m * 60.0;
        if cfg.stages.len() == 1 {
            total
        } else if stage == Stage::Align {
            total * share
        } else {
            (total - done.iter().map(|s| s.elapsed_s).sum::<f64>()).max(0.0)
        }
    });
    StageBudget { steps, seconds }
}

/// Mutable context of a run.
struct Run<'s, 'a, 'e> {
    s: &'s Session<'a>,
    st: TrainState,
    log: Vec<Value>,
    opts: RunOptions,
    on_event: &'e mut dyn FnMut(Event) -> ControlFlow<()>,
    /// Whether `out` is this run's checkpoint (so live log lines may be appended to it).
    out_is_ours: bool,
}

enum StageEnd {
    Done(StageSummary),
    Stopped,
}

/// Trains `s.student` from `start` until the budget is spent or `on_event` breaks, writing
/// checkpoints to `s.out`. Errors name the stage and step; a non-finite loss or gradient stops
/// before the update, so the last checkpoint stays the last good state.
pub fn train(
    s: &Session,
    start: Start,
    opts: RunOptions,
    on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
) -> Result<TrainOutcome> {
    check_teacher(s.student, s.teacher)?;
    let teacher = TeacherInfo {
        path: s.teacher_path.clone(),
        fingerprint: model_fingerprint(s.teacher)?,
    };
    let fp = s.data.fingerprint();
    let (st, log, out_is_ours) = match start {
        Start::Fresh(cfg) => {
            cfg.validate()?;
            if s.out.exists() {
                bail!(
                    "{} already exists: resume it with --resume {}, or choose another --out",
                    s.out.display(),
                    s.out.display()
                );
            }
            let training_before = s
                .student
                .recurformer
                .as_ref()
                .map(|r| r.provenance.training.clone())
                .unwrap_or_default();
            let st = TrainState {
                format_version: STATE_FORMAT_VERSION,
                config: cfg,
                progress: Progress::fresh(),
                data: fp,
                data_sources: json!({"inputs": s.data.inputs, "train": s.data.train_sources,
                    "heldout": s.data.heldout_sources}),
                teacher,
                threads: candle_core::utils::get_num_threads(),
                training_before,
                optimizer_params: Vec::new(),
                optimizer_steps: 0,
                rng: None,
                recurformer_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            (st, Vec::new(), false)
        }
        Start::Resume(rp) => {
            let rp = *rp;
            if rp.state.data != fp {
                bail!(
                    "the training data differ from the checkpoint's: now {} train tokens (hash {}) \
                     and {} held-out tokens (hash {}), the checkpoint was trained on {} (hash {}) \
                     and {} (hash {})",
                    fp.train_tokens,
                    fp.train_hash,
                    fp.heldout_tokens,
                    fp.heldout_hash,
                    rp.state.data.train_tokens,
                    rp.state.data.train_hash,
                    rp.state.data.heldout_tokens,
                    rp.state.data.heldout_hash
                );
            }
            if rp.state.teacher.fingerprint != teacher.fingerprint {
                bail!(
                    "the teacher {} (weights {}) is not the checkpoint's teacher {} (weights {})",
                    teacher.path,
                    teacher.fingerprint,
                    rp.state.teacher.path,
                    rp.state.teacher.fingerprint
                );
            }
            let same_dir = rp.dir == s.out
                || (rp.dir.canonicalize().ok().is_some()
                    && rp.dir.canonicalize().ok() == s.out.canonicalize().ok());
            if !same_dir && s.out.exists() {
                bail!(
                    "{} already exists; resume into the checkpoint directory itself or a new one",
                    s.out.display()
                );
            }
            let mut st = rp.state;
            st.threads = candle_core::utils::get_num_threads();
            st.teacher.path = teacher.path;
            if same_dir {
                // Drop live log lines written after the checkpoint.
                let text: String = rp.log.iter().map(|r| format!("{r}\n")).collect();
                crate::io::write_atomic(&s.out.join(LOG_FILE), text.as_bytes())?;
            }
            let mut log = rp.log;
            log.push(
                json!({"kind": "resume", "stage_index": st.progress.stage_index,
                "step": st.progress.step, "from": rp.dir.display().to_string()}),
            );
            return Run {
                s,
                st,
                log,
                opts,
                on_event,
                out_is_ours: same_dir,
            }
            .run(rp.optimizer);
        }
    };
    Run {
        s,
        st,
        log,
        opts,
        on_event,
        out_is_ours,
    }
    .run(HashMap::new())
}

impl Run<'_, '_, '_> {
    fn run(mut self, mut optimizer: HashMap<String, Tensor>) -> Result<TrainOutcome> {
        self.s
            .data
            .check(self.st.config.seq_len, self.s.student.cfg.vocab_size)?;
        let mut student = self.s.student.clone();
        while !self.st.finished() {
            let opt_state = std::mem::take(&mut optimizer);
            match self.run_stage(&mut student, opt_state)? {
                StageEnd::Stopped => {
                    return Ok(TrainOutcome {
                        finished: false,
                        state: self.st,
                        log: self.log,
                    })
                }
                StageEnd::Done(summary) => {
                    let p = &mut self.st.progress;
                    p.done.push(summary);
                    p.stage_index += 1;
                    p.step = 0;
                    p.horizon = None;
                    p.windows = 0;
                    p.tokens = 0;
                    p.elapsed_s = 0.0;
                    p.last_train_loss = None;
                    p.heldout_start = None;
                    self.st.optimizer_params.clear();
                    self.st.optimizer_steps = 0;
                    self.st.rng = None;
                    let last = self.st.finished();
                    self.checkpoint(&student, None, last)?;
                }
            }
        }
        Ok(TrainOutcome {
            finished: true,
            state: self.st,
            log: self.log,
        })
    }

    fn emit(&mut self, e: Event) -> ControlFlow<()> {
        (self.on_event)(e)
    }

    fn record(&mut self, v: Value) -> Result<()> {
        if self.out_is_ours {
            use std::io::Write;
            let p = self.s.out.join(LOG_FILE);
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("appending to {}", p.display()))?;
            writeln!(f, "{v}")?;
        }
        self.log.push(v);
        Ok(())
    }

    /// The model to save: the student's current tensors with `provenance.training` updated.
    fn provenance_entries(&self) -> Vec<Value> {
        let cfg = &self.st.config;
        let p = &self.st.progress;
        let common = |stage: Stage| {
            json!({
                "stage": stage.name(),
                "loss": stage.loss_name(),
                "teacher": self.st.teacher.path,
                "seq_len": cfg.seq_len, "batch": cfg.batch, "accum": cfg.accum,
                "lr": cfg.stage_lr(stage), "min_lr_ratio": cfg.min_lr_ratio, "warmup": cfg.warmup,
                "adamw": cfg.adamw, "clip": cfg.clip,
                "ce_weight": if stage == Stage::Distill { cfg.ce_weight } else { 0.0 },
                "hidden_weight": if stage == Stage::Distill { cfg.hidden_weight } else { 0.0 },
                "scope": if stage == Stage::Align { TrainScope::Mixers } else { cfg.scope },
                "base_lr_ratio": cfg.base_lr_ratio,
                "seed": cfg.seed,
                "data": {"train": self.s.data.train_sources, "heldout": self.s.data.heldout_sources,
                         "train_tokens": self.st.data.train_tokens,
                         "heldout_tokens": self.st.data.heldout_tokens},
                "recurformer_version": env!("CARGO_PKG_VERSION"),
            })
        };
        let mut out = self.st.training_before.clone();
        for d in &p.done {
            let mut e = common(d.stage);
            e["finished"] = json!(true);
            e["summary"] = serde_json::to_value(d).unwrap_or(Value::Null);
            out.push(e);
        }
        if !self.st.finished() && p.step > 0 {
            let stage = cfg.stages[p.stage_index];
            let mut e = common(stage);
            e["finished"] = json!(false);
            e["steps"] = json!(p.step);
            e["horizon"] = json!(p.horizon);
            e["tokens"] = json!(p.tokens);
            out.push(e);
        }
        out
    }

    /// Writes the checkpoint: model (via `save_checkpoint`), optimiser state, train state and log
    /// into a staging directory, then swaps it in for `out`.
    fn checkpoint(&mut self, student: &Model, opt: Option<&AdamW>, last: bool) -> Result<()> {
        let (stage_name, step) = match self.st.config.stages.get(self.st.progress.stage_index) {
            Some(s) => (*s, self.st.progress.step),
            None => (
                *self.st.config.stages.last().expect("validated"),
                self.st.progress.done.last().map_or(0, |d| d.steps),
            ),
        };
        if let Some(o) = opt {
            self.st.optimizer_params = o
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.var.as_tensor().dims().to_vec()))
                .collect();
            self.st.optimizer_steps = o.steps();
        }
        self.log
            .push(json!({"kind": "checkpoint", "stage": stage_name.name(),
            "stage_index": self.st.progress.stage_index, "step": self.st.progress.step}));
        let mut m = student.clone();
        let mut section = m
            .recurformer
            .clone()
            .context("the student has no recurformer section")?;
        section.provenance.training = self.provenance_entries();
        m.recurformer = Some(section);

        let out = &self.s.out;
        let staging = sibling(out, "staging")?;
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        save_checkpoint(&m, self.s.tokenizer, &staging)?;
        if let Some(o) = opt {
            let t: HashMap<String, Tensor> = o.state_tensors().into_iter().collect();
            candle_core::safetensors::save(&t, staging.join(OPTIMIZER_FILE))
                .with_context(|| format!("writing {}", staging.join(OPTIMIZER_FILE).display()))?;
        }
        std::fs::write(
            staging.join(TRAIN_STATE_FILE),
            serde_json::to_string_pretty(&self.st)?,
        )?;
        if last {
            // A missing font must not lose a finished run: the failure goes to the log instead.
            if let Err(e) = plot_losses(&self.log, &staging.join(LOSS_PLOT_FILE)) {
                let w = json!({"kind": "warning", "stage_index": self.st.progress.stage_index,
                    "step": self.st.progress.step, "message": format!("no loss curve: {e:#}")});
                self.log.push(w);
            }
        }
        let text: String = self.log.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(staging.join(LOG_FILE), text)?;
        if out.exists() {
            let old = sibling(out, "old")?;
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(out, &old)
                .with_context(|| format!("moving the previous {} aside", out.display()))?;
            std::fs::rename(&staging, out)
                .with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
            std::fs::remove_dir_all(&old)?;
        } else {
            std::fs::rename(&staging, out)
                .with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
        }
        self.out_is_ours = true;
        let _ = self.emit(Event::Checkpoint {
            stage: stage_name,
            step,
        });
        Ok(())
    }

    fn eval_now(
        &mut self,
        stage: Stage,
        student: &Model,
        windows: &[&[u32]],
    ) -> Result<(EvalResult, ControlFlow<()>)> {
        let cfg = &self.st.config;
        let r = evaluate(
            stage,
            self.s.teacher,
            student,
            windows,
            cfg.batch,
            cfg.ce_weight,
            cfg.hidden_weight,
        )?;
        let step = self.st.progress.step;
        self.record(json!({"kind": "eval", "stage": stage.name(),
            "stage_index": self.st.progress.stage_index, "step": step,
            "heldout_loss": r.loss, "heldout_kl": r.kl, "heldout_ce": r.ce,
            "heldout_hidden": r.hidden}))?;
        let flow = self.emit(Event::Eval {
            stage,
            step,
            result: &r,
        });
        Ok((r, flow))
    }

    fn run_stage(
        &mut self,
        student: &mut Model,
        opt_state: HashMap<String, Tensor>,
    ) -> Result<StageEnd> {
        let cfg = self.st.config.clone();
        let si = self.st.progress.stage_index;
        let stage = cfg.stages[si];
        let scope = match stage {
            Stage::Align => TrainScope::Mixers,
            Stage::Distill => cfg.scope,
        };
        let (model_t, vars) = make_trainable(student, scope)?;
        let mut opt = AdamW::new(vars.clone(), cfg.adamw)?;
        opt.set_lr_scales(|name| {
            if name.contains(".mixer.") {
                1.0
            } else {
                cfg.base_lr_ratio
            }
        });
        if self.st.progress.step > 0 {
            opt.load_state(opt_state, self.st.optimizer_steps)
                .context("the checkpoint's optimizer state does not fit the model")?;
        }
        // Clipping groups: per converted layer in align (independent problems), all in distill.
        let groups: Vec<Vec<usize>> = match stage {
            Stage::Align => {
                let mut by_layer: std::collections::BTreeMap<String, Vec<usize>> =
                    Default::default();
                for (i, (name, _)) in vars.iter().enumerate() {
                    let key = name.split(".mixer.").next().unwrap_or(name).to_string();
                    by_layer.entry(key).or_default().push(i);
                }
                by_layer.into_values().collect()
            }
            Stage::Distill => vec![(0..vars.len()).collect()],
        };
        let conv = match stage {
            Stage::Align => converted_layers(&model_t)?,
            Stage::Distill => Vec::new(),
        };
        let budget = stage_budget(&cfg, si, &self.st.progress.done);
        if self.st.progress.horizon.is_none() {
            self.st.progress.horizon = budget.steps;
        }
        let data = self.s.data;
        let sseed = stage_seed(cfg.seed, stage);
        let mut order = WindowOrder::new(data.train.len(), cfg.seq_len, sseed)?;
        let heldout = heldout_windows(&data.heldout, cfg.seq_len, cfg.eval_windows)?;
        if self
            .emit(Event::StageStart {
                stage,
                step: self.st.progress.step,
                horizon: self.st.progress.horizon,
            })
            .is_break()
        {
            return Ok(StageEnd::Stopped);
        }
        if self.st.progress.step == 0 && self.st.progress.heldout_start.is_none() {
            let (r, flow) = self.eval_now(stage, &model_t, &heldout)?;
            self.st.progress.heldout_start = Some(r);
            if flow.is_break() {
                return Ok(StageEnd::Stopped);
            }
        }
        let t_run = Instant::now();
        let elapsed0 = self.st.progress.elapsed_s;
        let mut last_eval: Option<(u64, EvalResult)> = None;
        // Durations of the steps run by this process in this stage (for the time-only horizon).
        let mut step_times: Vec<f64> = Vec::new();
        let stopped_by;
        loop {
            let p = &self.st.progress;
            if let Some(h) = p.horizon {
                if p.step >= h {
                    stopped_by = "steps";
                    break;
                }
            }
            if let Some(sec) = budget.seconds {
                if elapsed0 + t_run.elapsed().as_secs_f64() >= sec {
                    stopped_by = "time";
                    break;
                }
            }
            let step_no = p.step + 1;
            let t0 = Instant::now();
            let mut windows = p.windows;
            let mut acc: Option<Vec<Tensor>> = None;
            let (mut loss, mut parts) = (0f64, Vec::<f64>::new());
            for a in 0..cfg.accum {
                let mut ws: Vec<&[u32]> = Vec::with_capacity(cfg.batch);
                for _ in 0..cfg.batch {
                    let (start, _, _) = order.window(windows);
                    ws.push(&data.train[start..start + cfg.seq_len]);
                    windows += 1;
                }
                let ids = ids_tensor(&ws, &model_t.device)?;
                let r = match stage {
                    Stage::Align => {
                        align_micro(self.s.teacher, &model_t, &conv, &ids, Some(vars.as_slice()))?
                    }
                    Stage::Distill => distill_micro(
                        self.s.teacher,
                        &model_t,
                        &ids,
                        cfg.ce_weight,
                        cfg.hidden_weight,
                        Some(vars.as_slice()),
                    )?,
                };
                if !r.loss.is_finite() {
                    bail!(
                        "{}",
                        self.failure(
                            stage,
                            step_no,
                            &format!(
                                "non-finite loss ({}) in micro-batch {} of {}",
                                r.loss,
                                a + 1,
                                cfg.accum
                            )
                        )
                    );
                }
                loss += r.loss / cfg.accum as f64;
                if parts.is_empty() {
                    parts = vec![0.0; r.parts.len()];
                }
                for (x, y) in parts.iter_mut().zip(&r.parts) {
                    *x += y / cfg.accum as f64;
                }
                acc = Some(match acc {
                    None => r.grads,
                    Some(prev) => prev
                        .iter()
                        .zip(&r.grads)
                        .map(|(x, y)| Ok((x + y)?))
                        .collect::<Result<Vec<_>>>()?,
                });
            }
            let mut grads = acc.context("no micro-batch")?;
            if cfg.accum > 1 {
                let k = 1.0 / cfg.accum as f64;
                grads = grads
                    .iter()
                    .map(|g| Ok((g * k)?))
                    .collect::<Result<Vec<_>>>()?;
            }
            let mut sq = 0f64;
            for grp in &groups {
                let mut gg: Vec<Tensor> = grp.iter().map(|&i| grads[i].clone()).collect();
                let norm = clip_grad_norm(&mut gg, cfg.clip)?;
                if !norm.is_finite() {
                    let names = if groups.len() > 1 {
                        format!(
                            " ({})",
                            vars[grp[0]].0.split(".mixer.").next().unwrap_or("")
                        )
                    } else {
                        String::new()
                    };
                    bail!(
                        "{}",
                        self.failure(stage, step_no, &format!("non-finite gradient norm{names}"))
                    );
                }
                sq += norm * norm;
                for (&i, g) in grp.iter().zip(gg) {
                    grads[i] = g;
                }
            }
            let grad_norm = sq.sqrt();
            let sched = LrSchedule {
                peak: cfg.stage_lr(stage),
                min_ratio: cfg.min_lr_ratio,
                warmup: cfg.warmup,
                horizon: self.st.progress.horizon.unwrap_or(u64::MAX),
            };
            let lr = sched.lr(self.st.progress.step);
            opt.step(&grads, lr)?;
            let step_s = t0.elapsed().as_secs_f64();
            {
                let p = &mut self.st.progress;
                p.step = step_no;
                p.windows = windows;
                p.tokens += cfg.tokens_per_step();
                p.elapsed_s = elapsed0 + t_run.elapsed().as_secs_f64();
                p.last_train_loss = Some(loss);
            }
            let (_, epoch, idx) = order.window(windows);
            self.st.rng = Some(RngState {
                algorithm: "splitmix64, reseeded per (stage, epoch)".into(),
                stage_seed: sseed,
                epoch,
                index_in_epoch: idx,
            });
            step_times.push(step_s);
            if self.st.progress.horizon.is_none()
                && step_times.len() as u64 >= HORIZON_PROBE.max(cfg.warmup)
            {
                // Time-only budget: the steps that fit in the remaining time at the median pace of
                // the steps so far, the first excluded (it pays for allocations and cold caches,
                // and a single slow step would shorten the whole schedule). Decided at the end of
                // warmup at the earliest, so no learning rate used so far depended on it.
                let sec = budget.seconds.unwrap_or(0.0);
                let left = (sec - self.st.progress.elapsed_s).max(0.0);
                let pace = crate::bench::median(&mut step_times[1..].to_vec());
                let h = step_no + (left / pace.max(1e-9)).floor() as u64;
                self.st.progress.horizon = Some(h.max(step_no));
                if self.emit(Event::Horizon { stage, horizon: h }).is_break() {
                    return Ok(StageEnd::Stopped);
                }
            }
            let p = &self.st.progress;
            let rec = StepRecord {
                stage,
                stage_index: si,
                step: p.step,
                horizon: p.horizon,
                loss,
                parts,
                grad_norm,
                lr,
                tokens: p.tokens,
                step_s,
                tokens_per_s: cfg.tokens_per_step() as f64 / step_s.max(1e-9),
                elapsed_s: p.elapsed_s,
            };
            let mut v = serde_json::to_value(&rec)?;
            v["kind"] = json!("step");
            self.record(v)?;
            if self.emit(Event::Step(&rec)).is_break() {
                return Ok(StageEnd::Stopped);
            }
            let step = self.st.progress.step;
            let at_end = self.st.progress.horizon == Some(step);
            if self.opts.eval_every > 0 && step % self.opts.eval_every == 0 && !at_end {
                let (r, flow) = self.eval_now(stage, &model_t, &heldout)?;
                last_eval = Some((step, r));
                if flow.is_break() {
                    return Ok(StageEnd::Stopped);
                }
            }
            if self.opts.save_every > 0 && step % self.opts.save_every == 0 && !at_end {
                self.checkpoint(&model_t, Some(&opt), false)?;
            }
        }
        let cur = self.st.progress.step;
        let end = match last_eval {
            Some((s, r)) if s == cur => r,
            _ => self.eval_now(stage, &model_t, &heldout)?.0,
        };
        let p = &self.st.progress;
        let summary = StageSummary {
            stage,
            steps: p.step,
            horizon: p.horizon.unwrap_or(p.step),
            tokens: p.tokens,
            elapsed_s: p.elapsed_s,
            stopped_by: stopped_by.to_string(),
            last_train_loss: p.last_train_loss,
            heldout_start: p.heldout_start.clone(),
            heldout_end: Some(end),
        };
        *student = model_t;
        Ok(StageEnd::Done(summary))
    }

    fn failure(&self, stage: Stage, step: u64, what: &str) -> String {
        let out = &self.s.out;
        let kept = if out.join(TRAIN_STATE_FILE).exists() && self.out_is_ours {
            match std::fs::read_to_string(out.join(TRAIN_STATE_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<TrainState>(&t).ok())
            {
                Some(s) => format!(
                    "the last good checkpoint {} (stage {}, step {}) is kept",
                    out.display(),
                    s.config
                        .stages
                        .get(s.progress.stage_index)
                        .map_or("finished", |x| x.name()),
                    s.progress.step
                ),
                None => format!("the last checkpoint {} is kept", out.display()),
            }
        } else {
            "no checkpoint had been written yet".to_string()
        };
        format!(
            "training stopped at {} step {step}: {what}; {kept}. Lower the learning rate \
             (--lr / --align-lr) or tighten --clip",
            stage.name()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Loss curve

use crate::plot::{draw_err, render_png, FONT};

/// Size of the loss-curve PNG: one 640 x 420 panel per stage in the log, side by side.
pub fn loss_plot_size(stages: usize) -> (u32, u32) {
    (640 * stages.max(1) as u32, 420)
}

/// Draws train loss (per step) and held-out loss (per evaluation) of each stage in `log`, one
/// panel per stage, log-scale y when every value is positive; written atomically as PNG.
pub fn plot_losses(log: &[Value], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut stages: Vec<(u64, String)> = Vec::new();
    for r in log
        .iter()
        .filter(|r| r["kind"] == "step" || r["kind"] == "eval")
    {
        if let (Some(si), Some(name)) = (r["stage_index"].as_u64(), r["stage"].as_str()) {
            if !stages.iter().any(|(i, _)| *i == si) {
                stages.push((si, name.to_string()));
            }
        }
    }
    stages.sort();
    let size = loss_plot_size(stages.len());
    render_png(path, size, |root| {
        let panels = root.split_evenly((1, stages.len().max(1)));
        for ((si, name), panel) in stages.iter().zip(panels.iter()) {
            let pick = |kind: &str, field: &str| -> Vec<(f64, f64)> {
                log.iter()
                    .filter(|r| r["kind"] == kind && r["stage_index"].as_u64() == Some(*si))
                    .filter_map(|r| Some((r["step"].as_f64()?, r[field].as_f64()?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect()
            };
            let train = pick("step", "loss");
            let held = pick("eval", "heldout_loss");
            let all: Vec<f64> = train.iter().chain(&held).map(|p| p.1).collect();
            if all.is_empty() {
                continue;
            }
            let xmax = train
                .iter()
                .chain(&held)
                .map(|p| p.0)
                .fold(1.0f64, f64::max);
            let (lo, hi) = all
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            let what = if name == "align" {
                "normalised MSE"
            } else {
                "KL(teacher || student)"
            };
            let caption = format!("{name}: {what}");
            let mut builder = ChartBuilder::on(panel);
            builder
                .caption(caption, (FONT, 16))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70);
            // One drawing routine for both axis kinds.
            macro_rules! draw {
                ($chart:expr) => {{
                    let mut chart = $chart;
                    chart
                        .configure_mesh()
                        .x_desc("step")
                        .y_desc("loss")
                        .label_style((FONT, 12))
                        .axis_desc_style((FONT, 14))
                        .y_label_formatter(&|v| format!("{v:.3}"))
                        .draw()
                        .map_err(draw_err)?;
                    let blue = RGBColor(31, 119, 180);
                    let red = RGBColor(214, 39, 40);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            train.clone(),
                            blue.stroke_width(1),
                        )))
                        .map_err(draw_err)?
                        .label("train")
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(2))
                        });
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            held.clone(),
                            red.stroke_width(2),
                        )))
                        .map_err(draw_err)?
                        .label("held-out")
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], red.stroke_width(2))
                        });
                    chart
                        .draw_series(held.iter().map(|&p| Circle::new(p, 3, red.filled())))
                        .map_err(draw_err)?;
                    chart
                        .configure_series_labels()
                        .label_font((FONT, 12))
                        .background_style(WHITE.mix(0.8))
                        .border_style(BLACK)
                        .draw()
                        .map_err(draw_err)?;
                }};
            }
            if lo > 0.0 && hi / lo > 3.0 {
                draw!(builder
                    .build_cartesian_2d(0f64..xmax, (lo * 0.9..hi * 1.1).log_scale())
                    .map_err(draw_err)?);
            } else {
                let pad = ((hi - lo) * 0.08).max(1e-6);
                draw!(builder
                    .build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad))
                    .map_err(draw_err)?);
            }
        }
        Ok(())
    })
}

/// Names of the tensors `named_tensors` would save for `m` (used by tests to compare checkpoints).
pub fn tensor_names(m: &Model) -> Vec<String> {
    named_tensors(m).into_iter().map(|(n, _)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
        let mut r = SplitMix64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| (r.next() >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0)
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        Ok(a.iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
            / scale)
    }

    /// The fused loss equals the losses composed from candle ops, values and gradients.
    #[test]
    fn fused_distill_loss_matches_the_composed_one() -> Result<()> {
        for dtype in [DType::F64, DType::F32] {
            let (b, t, v) = (3, 5, 11);
            let s = Var::from_tensor(&rand(&[b, t, v], 1, dtype)?)?;
            let teacher = rand(&[b, t, v], 2, dtype)?;
            let ids_v: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
            let ids = Tensor::from_vec(ids_v, (b, t), &Device::Cpu)?;
            let (kl, ce) = distill_losses(s.as_tensor(), &teacher, &ids)?;
            let fused = (&kl + (&ce * 0.7)?)?;
            let g_fused = fused
                .backward()?
                .get(s.as_tensor())
                .context("grad")?
                .clone();
            // Composed reference.
            let ls = candle_nn::ops::log_softmax(s.as_tensor(), D::Minus1)?;
            let lt = candle_nn::ops::log_softmax(&teacher, D::Minus1)?;
            let kl_ref = ((lt.exp()? * (&lt - &ls)?)?.sum_all()? / (b * t) as f64)?;
            let tg = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?;
            let picked = ls.narrow(1, 0, t - 1)?.contiguous()?.gather(&tg, 2)?;
            let ce_ref = (picked.sum_all()? * (-1.0 / (b * (t - 1)) as f64))?;
            let reference = (&kl_ref + (&ce_ref * 0.7)?)?;
            let g_ref = reference
                .backward()?
                .get(s.as_tensor())
                .context("grad")?
                .clone();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (what, x, y) in [("kl", &kl, &kl_ref), ("ce", &ce, &ce_ref)] {
                let e = max_rel(x, y)?;
                assert!(e <= tol, "{dtype:?} {what}: {e}");
            }
            let e = max_rel(&g_fused, &g_ref)?;
            println!("{dtype:?}: fused vs composed gradient, max relative difference {e:.1e}");
            assert!(e <= tol, "{dtype:?} gradient: {e}");
        }
        Ok(())
    }

    /// The frozen-weight linear gives the plain matmul's output and input gradient.
    #[test]
    fn frozen_linear_matches_the_plain_one() -> Result<()> {
        let x = Var::from_tensor(&rand(&[2, 7, 5], 3, DType::F32)?)?;
        let l = Linear {
            weight: rand(&[4, 5], 4, DType::F32)?,
            bias: Some(rand(&[4], 5, DType::F32)?),
        };
        let r = rand(&[2, 7, 4], 6, DType::F32)?;
        let y1 = linear_train(&l, x.as_tensor())?;
        let y2 = l.forward(x.as_tensor())?;
        assert!(max_rel(&y1, &y2)? <= 1e-6);
        let g1 = (y1 * &r)?.sum_all()?.backward()?;
        let g2 = (y2 * &r)?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(x.as_tensor()).context("g1")?,
            g2.get(x.as_tensor()).context("g2")?,
        );
        assert!(max_rel(a, b)? <= 1e-6);
        Ok(())
    }

    #[test]
    fn window_order_is_a_function_of_the_counter() -> Result<()> {
        let mut a = WindowOrder::new(1000, 64, 7)?;
        let seq: Vec<usize> = (0..40).map(|g| a.window(g).0).collect();
        // Random access, backwards too, gives the same windows.
        let mut b = WindowOrder::new(1000, 64, 7)?;
        for g in (0..40).rev() {
            assert_eq!(b.window(g).0, seq[g as usize]);
        }
        // Each epoch visits distinct, in-range windows.
        let mut c = WindowOrder::new(1000, 64, 7)?;
        let (_, e0, _) = c.window(0);
        let first: Vec<usize> = (0..c.perm.len() as u64).map(|g| c.window(g).0).collect();
        let mut s = first.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), first.len());
        assert!(first.iter().all(|&x| x + 64 <= 1000));
        assert_eq!(e0, 0);
        // Another seed, another order.
        let mut d = WindowOrder::new(1000, 64, 8)?;
        let other: Vec<usize> = (0..40).map(|g| d.window(g).0).collect();
        assert_ne!(seq, other);
        Ok(())
    }

    #[test]
    fn config_differences_ignore_the_time_limit() {
        let a = TrainConfig {
            budget: Budget {
                max_steps: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut b = a.clone();
        b.budget.max_minutes = Some(5.0);
        assert!(a.differences(&b).is_empty());
        b.seq_len = 128;
        b.adamw.beta2 = 0.99;
        let d = a.differences(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d.iter().any(|x| x.starts_with("seq_len: 512 vs 128")),
            "{d:?}"
        );
        assert!(d.iter().any(|x| x.starts_with("adamw.beta2")), "{d:?}");
    }

    #[test]
    fn budgets_split_between_stages() {
        let cfg = TrainConfig {
            seq_len: 100,
            batch: 2,
            accum: 2,
            align_share: 0.25,
            budget: Budget {
                max_steps: Some(100),
                max_tokens: Some(40_000),
                max_minutes: Some(10.0),
            },
            ..Default::default()
        };
        let a = stage_budget(&cfg, 0, &[]);
        // 25 steps by count, 40000 * 0.25 / 400 = 25 by tokens.
        assert_eq!(a.steps, Some(25));
        assert_eq!(a.seconds, Some(150.0));
        let done = [StageSummary {
            stage: Stage::Align,
            steps: 25,
            horizon: 25,
            tokens: 10_000,
            elapsed_s: 100.0,
            stopped_by: "steps".into(),
            last_train_loss: None,
            heldout_start: None,
            heldout_end: None,
        }];
        let d = stage_budget(&cfg, 1, &done);
        assert_eq!(d.steps, Some(75));
        assert_eq!(d.seconds, Some(500.0));
    }
}
