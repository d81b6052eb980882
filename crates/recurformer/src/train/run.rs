//! The loop: stages in order, steps with accumulation, clipping, schedule, held-out evaluation,
//! checkpoints written atomically, events for the CLI, and the time or step budget of each stage.

use super::*;
use crate::checkpoint::save::{replace_dir_with, write_checkpoint_files};
use crate::formats::io;
use crate::formats::tokenizer::Tokenizer;
use crate::model::llama::Model;
use crate::report::plot_losses;
use crate::train::optim::{clip_grad_norm, AdamW, LrSchedule};
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

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
pub(super) struct StageBudget {
    pub(super) steps: Option<u64>,
    pub(super) seconds: Option<f64>,
}

pub(super) fn stage_budget(
    cfg: &TrainConfig,
    stage_index: usize,
    done: &[StageSummary],
) -> StageBudget {
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
pub(super) struct Run<'s, 'a, 'e> {
    pub(super) s: &'s Session<'a>,
    pub(super) st: TrainState,
    pub(super) log: Vec<Value>,
    pub(super) opts: RunOptions,
    pub(super) on_event: &'e mut dyn FnMut(Event) -> ControlFlow<()>,
    /// Whether `out` is this run's checkpoint (so live log lines may be appended to it).
    pub(super) out_is_ours: bool,
}

pub(super) enum StageEnd {
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
                crate::formats::io::write_atomic(&s.out.join(LOG_FILE), text.as_bytes())?;
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
            let mut f = io::FileWriter::append(&self.s.out.join(LOG_FILE))?;
            f.put(format!("{v}\n").as_bytes())?;
            f.finish()?;
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

        // Staged beside `out` and swapped in whole; a failed write (a full disk) removes the
        // staging directory and leaves the previous checkpoint as it was.
        let (st, log, tokenizer) = (&self.st, &mut self.log, self.s.tokenizer);
        replace_dir_with(&self.s.out, "staging", |staging| {
            write_checkpoint_files(&m, tokenizer, staging)?;
            if let Some(o) = opt {
                let t: Vec<(String, Tensor)> = o.state_tensors().into_iter().collect();
                io::write_safetensors(&t, &staging.join(OPTIMIZER_FILE))?;
            }
            io::write_file(
                &staging.join(TRAIN_STATE_FILE),
                serde_json::to_string_pretty(st)?.as_bytes(),
            )?;
            if last {
                // A missing font must not lose a finished run: the failure goes to the log instead.
                if let Err(e) = plot_losses(log, &staging.join(LOSS_PLOT_FILE)) {
                    let w = json!({"kind": "warning", "stage_index": st.progress.stage_index,
                        "step": st.progress.step, "message": format!("no loss curve: {e:#}")});
                    log.push(w);
                }
            }
            let text: String = log.iter().map(|r| format!("{r}\n")).collect();
            io::write_file(&staging.join(LOG_FILE), text.as_bytes())
        })?;
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
        let retrieval = if cfg.retrieval_share > 0.0 {
            let tok = self.s.tokenizer.context(
                "retrieval windows (retrieval_share > 0) are built from text: the model needs a \
                 tokenizer",
            )?;
            let starts = data.retrieval_starts(cfg.seq_len);
            let total: usize = starts.iter().map(|r| r.len()).sum();
            ensure!(
                total > 0,
                "retrieval windows need a training document of at least {} tokens outside the \
                 evaluation's needle haystack ({})",
                cfg.seq_len,
                crate::eval::tasks::PAUL_GRAHAM_DIR
            );
            Some((RetrievalWindows::new(tok)?, starts, total))
        } else {
            None
        };
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
                let mut owned: Vec<Vec<u32>> = Vec::with_capacity(cfg.batch);
                let n_weights = if retrieval.is_some() {
                    cfg.batch * cfg.seq_len
                } else {
                    0
                };
                let mut weights: Vec<f64> = Vec::with_capacity(n_weights);
                for _ in 0..cfg.batch {
                    let (start, _, _) = order.window(windows);
                    let base = &data.train[start..start + cfg.seq_len];
                    match &retrieval {
                        Some((rw, starts, total))
                            if is_retrieval_window(sseed, windows, cfg.retrieval_share) =>
                        {
                            // The exercise is built on its own text, drawn from the documents
                            // it may use (not the evaluation's haystack).
                            let s0 = retrieval_start(starts, *total, sseed, windows);
                            let w = rw.build(&data.train[s0..s0 + cfg.seq_len], sseed, windows)?;
                            weights.extend(w.row_weights(cfg.answer_weight));
                            owned.push(w.ids);
                        }
                        Some(_) => {
                            weights.extend(std::iter::repeat_n(1.0, cfg.seq_len));
                            owned.push(base.to_vec());
                        }
                        None => owned.push(base.to_vec()),
                    }
                    windows += 1;
                }
                let ws: Vec<&[u32]> = owned.iter().map(Vec::as_slice).collect();
                // Without retrieval windows no weights: the loss is computed exactly as before.
                let weights = retrieval.as_ref().map(|_| weights.as_slice());
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
                        weights,
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
                let pace = crate::eval::bench::median(&mut step_times[1..].to_vec());
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
