//! Configuration of a training run: stages, what trains, budgets and hyper-parameters, and the
//! comparison a resume makes against the configuration it was started with.

use crate::train::optim::AdamWConfig;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

pub(super) fn default_base_lr_ratio() -> f64 {
    0.1
}

/// `base_lr_ratio` of a checkpoint written before the setting existed: those runs trained every
/// tensor at the full learning rate, and a resume keeps doing so.
pub(super) fn legacy_base_lr_ratio() -> f64 {
    1.0
}

/// Steps timed before a time-only budget fixes the schedule's horizon (at least the warmup).
pub(super) const HORIZON_PROBE: u64 = 4;

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
    /// Share of the training windows of both stages rewritten into retrieval exercises (facts
    /// in prose, key: value lists, repeated spans; `retrieval.rs`). 0 (the default, and what
    /// older checkpoints trained with) trains on the text alone.
    #[serde(default)]
    pub retrieval_share: f64,
    /// Distillation loss weight of the answer tokens of retrieval windows (KL and cross-entropy
    /// of the rows that predict them; other rows weigh 1).
    #[serde(default = "one")]
    pub answer_weight: f64,
}

fn one() -> f64 {
    1.0
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
            retrieval_share: 0.0,
            answer_weight: 1.0,
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
        ensure!(
            (0.0..=1.0).contains(&self.retrieval_share),
            "retrieval_share {} is outside [0, 1]",
            self.retrieval_share
        );
        ensure!(
            self.answer_weight.is_finite() && self.answer_weight > 0.0,
            "answer_weight {} must be a positive number",
            self.answer_weight
        );
        if self.retrieval_share > 0.0 {
            ensure!(
                self.seq_len >= 64,
                "retrieval windows need seq_len >= 64, got {}",
                self.seq_len
            );
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

    pub(super) fn stage_lr(&self, stage: Stage) -> f64 {
        match stage {
            Stage::Align => self.align_lr,
            Stage::Distill => self.lr,
        }
    }
}

pub(super) fn flat_diff(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
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
