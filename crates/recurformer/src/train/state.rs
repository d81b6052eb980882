//! What a checkpoint of a run holds beyond the model (`train_state.json`, the log, AdamW moments),
//! and reading it back for an exact resume; fingerprints of the model and the data that a resume
//! checks.

use super::*;
use crate::checkpoint::loader::LoadedModel;
use crate::model::llama::Model;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    pub(super) fn fresh() -> Self {
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

/// Position of a log record, (stage index, step), for cutting a log back to a checkpoint.
pub(super) fn record_pos(r: &Value) -> (u64, u64) {
    (
        r["stage_index"].as_u64().unwrap_or(0),
        r["step"].as_u64().unwrap_or(0),
    )
}

pub(super) fn read_log(path: &Path) -> Result<Vec<Value>> {
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
    let text = crate::formats::io::read_text(&sp, crate::formats::io::JSON_FILE_LIMIT)?;
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
    let loaded = crate::checkpoint::loader::load(dir)
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
pub(super) fn check_teacher(student: &Model, teacher: &Model) -> Result<()> {
    ensure!(
        teacher.recurformer.is_none(),
        "the teacher is a RecurFormer; it must be the base model"
    );
    ensure!(
        student.recurformer.is_some(),
        "the student is a base model; convert it first (recurformer convert)"
    );
    let (s, t) = (&student.cfg, &teacher.cfg);
    let shape = |c: &crate::formats::config::ModelConfig| {
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
