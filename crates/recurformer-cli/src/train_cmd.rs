//! `recurformer train`: continual training of a converted RecurFormer (stage 1 layer-local
//! alignment, stage 2 distillation from the base model), with checkpoints and exact resume.
//! The loop lives in `recurformer::train`; this file turns flags into its inputs and shows
//! progress.

use anyhow::{bail, Context, Result};
use recurformer::train::{
    load_token_documents, read_resume_point, split_documents, Event, ResumePoint, RunOptions,
    Session, Stage, Start, TrainConfig, TrainData, TrainScope, TrainState,
};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageArg {
    /// Layer-local alignment only.
    Align,
    /// End-to-end distillation only.
    Distill,
    /// Alignment, then distillation.
    Both,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeArg {
    /// Only the Mamba mixers (the default).
    Mixers,
    /// The mixers and the o_proj of each converted layer.
    MixersOproj,
    /// Every tensor of the student (distillation only; alignment always trains the mixers).
    All,
}

/// Train a RecurFormer: each mixer first learns to reproduce the attention heads it replaced
/// (align), then the whole hybrid is distilled from the base model's next-token distributions
/// (distill). Writes a model directory that generate, info and eval accept, with optimizer state,
/// train_state.json, train_log.jsonl and loss.png; --resume continues a checkpoint exactly.
///
/// Settings marked "fresh runs" are saved in the checkpoint; on --resume they may be omitted and,
/// when given, must equal the saved ones (only --max-minutes may change).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The RecurFormer checkpoint to train (a directory written by `recurformer convert`).
    /// Required for fresh runs; with --resume the checkpoint's model is used.
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// The base model that supplies targets (checkpoint directory or GGUF). Defaults to the
    /// checkpoint's `provenance.base_model`, or for --resume to the teacher recorded there.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Training text: plain-text files, JSONL files ("text" field, or "ids" for pre-tokenised
    /// records) or directories of them. Without it, the text domains of data/text/ in the
    /// proportions of --mix; for --resume, the saved inputs.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Training mix of the text domains under data/text/ when no --data is given, as
    /// `name=share,...` (domains: fiction, essays, scripture, technical, code, encyclopedic):
    /// each domain's training documents, in a seeded order, take that share of the training
    /// tokens. Default: fiction=0.4,scripture=0.15,technical=0.15,code=0.15,encyclopedic=0.15
    /// (fresh runs; on --resume the saved mix).
    #[arg(long, conflicts_with = "data")]
    pub mix: Option<String>,
    /// Held-out text for the held-out loss (documents never trained on). Defaults to Persuasion
    /// with the default data; with --data alone, --heldout-fraction of its documents.
    #[arg(long, num_args = 1..)]
    pub heldout: Vec<PathBuf>,
    /// Fraction of the --data documents held out when no --heldout files are named (at least one
    /// document, chosen by --seed).
    #[arg(long, default_value_t = 0.1)]
    pub heldout_fraction: f64,
    /// Which stages to run (fresh runs; default both).
    #[arg(long, value_enum)]
    pub stage: Option<StageArg>,
    /// Output directory: the checkpoint, replaced atomically at every save, and the final model.
    /// Must not exist for a fresh run; defaults to the --resume directory when resuming.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the training checkpoint in this directory exactly where it stopped.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Tokens per training window (fresh runs; default 512).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Windows per micro-batch (fresh runs; default 1).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches accumulated per optimizer step (fresh runs; default 1).
    #[arg(long)]
    pub accum: Option<usize>,
    /// Peak learning rate of distillation (fresh runs; default 3e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Peak learning rate of alignment (fresh runs; default 1e-3).
    #[arg(long)]
    pub align_lr: Option<f64>,
    /// The cosine schedule ends at this fraction of the peak learning rate (fresh runs; default
    /// 0.1).
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    /// Linear warmup steps at the start of each stage (fresh runs; default 10).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// AdamW decoupled weight decay on projection matrices (fresh runs; default 0).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip gradients to this global norm, per layer in alignment; 0 disables (fresh runs;
    /// default 1.0).
    #[arg(long)]
    pub clip: Option<f64>,
    /// Stop after this many optimizer steps in all (shared between stages by --align-share).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop after this many training tokens in all (shared between stages by --align-share).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Stop after this many minutes of training in all; alignment gets --align-share of it.
    /// May change on --resume.
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Share of each budget given to alignment when both stages run (fresh runs; default 0.25).
    #[arg(long)]
    pub align_share: Option<f64>,
    /// Evaluate the held-out loss every N steps (besides the start and end of each stage);
    /// 0: only there.
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out windows evaluated, evenly spaced over the held-out text (fresh runs; default 8).
    #[arg(long)]
    pub eval_windows: Option<usize>,
    /// Write a checkpoint every N steps (besides the end of each stage); 0: only there.
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Weight of the cross-entropy on the text added to the distillation KL (fresh runs;
    /// default 0).
    #[arg(long)]
    pub ce_weight: Option<f64>,
    /// Weight of a hidden-state term added to the distillation loss: the normalised MSE between
    /// the student's and the teacher's normalised input of every layer after the first converted
    /// one, and of the final norm (fresh runs; default 0).
    #[arg(long)]
    pub hidden_weight: Option<f64>,
    /// Share of the training windows rewritten into retrieval exercises built on the window's own
    /// text: facts spliced into the prose and asked for at the end, a key: value list looked up
    /// again, or a span repeated (fresh runs; default 0). Wordings and key formats differ from
    /// `eval --tasks needle`. Needs the model's tokenizer and --seq-len >= 64.
    #[arg(long)]
    pub retrieval_share: Option<f64>,
    /// Distillation weight of the answer tokens of retrieval windows (KL and cross-entropy of the
    /// positions that predict them; other positions weigh 1; fresh runs; default 1).
    #[arg(long)]
    pub answer_weight: Option<f64>,
    /// What distillation trains: the mixers, the mixers and the converted layers' o_proj, or every
    /// tensor of the model (fresh runs; default mixers).
    #[arg(long, value_enum)]
    pub train: Option<ScopeArg>,
    /// Learning rate of the trained pretrained tensors (o_proj, ...) as a fraction of --lr
    /// (fresh runs; default 0.1).
    #[arg(long)]
    pub base_lr_ratio: Option<f64>,
    /// Seed of the data order and of the held-out split (fresh runs; default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub threads: crate::ThreadArgs,
    /// Directory caching token ids per (tokenizer, document), so a corpus is tokenised once
    /// (default: data/cache/tokens in the repository).
    #[arg(long)]
    pub token_cache: Option<PathBuf>,
    /// Do not read or write the token cache.
    #[arg(long)]
    pub no_token_cache: bool,
}

/// Overlays the settings given on the command line onto `cfg`.
fn apply_flags(cfg: &mut TrainConfig, a: &TrainArgs) {
    if let Some(s) = a.stage {
        cfg.stages = match s {
            StageArg::Align => vec![Stage::Align],
            StageArg::Distill => vec![Stage::Distill],
            StageArg::Both => vec![Stage::Align, Stage::Distill],
        };
    }
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = a.$field {
                cfg.$field = v;
            }
        };
    }
    set!(seq_len);
    set!(batch);
    set!(accum);
    set!(lr);
    set!(align_lr);
    set!(min_lr_ratio);
    set!(warmup);
    set!(clip);
    set!(ce_weight);
    set!(hidden_weight);
    set!(retrieval_share);
    set!(answer_weight);
    set!(base_lr_ratio);
    set!(seed);
    set!(align_share);
    set!(eval_windows);
    if let Some(w) = a.weight_decay {
        cfg.adamw.weight_decay = w;
    }
    if let Some(t) = a.train {
        cfg.scope = match t {
            ScopeArg::Mixers => TrainScope::Mixers,
            ScopeArg::MixersOproj => TrainScope::MixersOproj,
            ScopeArg::All => TrainScope::All,
        };
    }
    if a.max_steps.is_some() {
        cfg.budget.max_steps = a.max_steps;
    }
    if a.max_tokens.is_some() {
        cfg.budget.max_tokens = a.max_tokens;
    }
    if a.max_minutes.is_some() {
        cfg.budget.max_minutes = a.max_minutes;
    }
}

fn default_heldout_files() -> Vec<PathBuf> {
    recurformer::formats::domains::default_heldout_files(&recurformer::formats::domains::text_root())
}

/// The training text: files, or a mix of the text domains (`--mix`).
#[derive(Debug, Clone)]
enum TrainText {
    Files(Vec<PathBuf>),
    Mix(String),
}

/// The documents to train and evaluate on, with the inputs recorded for a later resume.
fn build_data(
    text: &TrainText,
    heldout_files: &[PathBuf],
    heldout_fraction: f64,
    seed: u64,
    tok: Option<&recurformer::formats::tokenizer::Tokenizer>,
    eos: Option<u32>,
    cache: Option<&Path>,
) -> Result<TrainData> {
    use recurformer::formats::domains;
    let (train_files, docs) = match text {
        TrainText::Files(files) => {
            domains::check_not_heldout(files, "train --data")?;
            (files.clone(), load_token_documents(files, tok, cache)?)
        }
        TrainText::Mix(spec) => {
            let root = domains::text_root();
            let mut files = Vec::new();
            let mut parts = Vec::new();
            for (d, share) in domains::parse_mix(spec)? {
                let paths = d.train_paths(&root);
                for p in &paths {
                    if !p.exists() {
                        bail!(
                            "training mix: {} (the {} domain's training text) is missing; run \
                             scripts/setup.sh",
                            p.display(),
                            d.name
                        );
                    }
                }
                domains::check_not_heldout(&paths, "train --mix")?;
                let docs = load_token_documents(&paths, tok, cache)?;
                files.extend(paths);
                parts.push((d.name.to_string(), share, docs));
            }
            (files, recurformer::train::mix_documents(parts, seed)?)
        }
    };
    let train_files = &train_files;
    let (train, held) = if heldout_files.is_empty() {
        split_documents(docs, heldout_fraction, seed)?
    } else {
        let canon = |ps: &[PathBuf]| -> Result<std::collections::BTreeSet<PathBuf>> {
            Ok(recurformer::formats::text::collect_files(ps)?
                .into_iter()
                .map(|p| p.canonicalize().unwrap_or(p))
                .collect())
        };
        let both: Vec<PathBuf> = canon(train_files)?
            .intersection(&canon(heldout_files)?)
            .cloned()
            .collect();
        if !both.is_empty() {
            bail!(
                "{} is both training and held-out data",
                both.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        (docs, load_token_documents(heldout_files, tok, cache)?)
    };
    let mut data = TrainData::new(&train, &held, eos);
    data.inputs = serde_json::json!({
        "mix": match text { TrainText::Mix(m) => Some(m.as_str()), TrainText::Files(_) => None },
        "train_files": train_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "heldout_files": heldout_files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "heldout_fraction": heldout_fraction,
        "eos": eos,
    });
    Ok(data)
}

/// The files a saved run was given, from `train_state.json`'s `data_sources.inputs`.
fn saved_inputs(st: &TrainState) -> Result<(TrainText, Vec<PathBuf>, f64)> {
    let inp = &st.data_sources["inputs"];
    let files = |key: &str| -> Vec<PathBuf> {
        inp[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(PathBuf::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let train = match inp["mix"].as_str() {
        Some(m) => TrainText::Mix(m.to_string()),
        None => {
            let train = files("train_files");
            if train.is_empty() {
                bail!(
                    "the checkpoint does not record its training files; pass --data (and --heldout)"
                );
            }
            TrainText::Files(train)
        }
    };
    Ok((
        train,
        files("heldout_files"),
        inp["heldout_fraction"].as_f64().unwrap_or(0.1),
    ))
}

fn stage_bar(stage: Stage, horizon: Option<u64>, step: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(horizon.unwrap_or(0));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>7} [{bar:28}] {pos}/{len} {msg} {elapsed_precise} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_prefix(stage.name());
    pb.set_position(step);
    pb.reset_eta();
    pb
}

pub fn run(args: TrainArgs) -> Result<()> {
    args.threads.apply();
    let cache_dir = args
        .token_cache
        .clone()
        .unwrap_or_else(|| recurformer::repo_root().join("data/cache/tokens"));
    let cache = (!args.no_token_cache).then_some(cache_dir.as_path());

    // The student, the configuration and where training starts.
    let (loaded, start_cfg, resume, teacher_default): (
        recurformer::checkpoint::loader::LoadedModel,
        TrainConfig,
        Option<ResumePoint>,
        PathBuf,
    ) = match &args.resume {
        Some(dir) => {
            if args.model.is_some() {
                bail!("--model and --resume exclude each other: a resumed run trains the checkpoint's model");
            }
            let (loaded, rp) = read_resume_point(dir)?;
            let saved = rp.state.config.clone();
            let mut requested = saved.clone();
            apply_flags(&mut requested, &args);
            let diff = saved.differences(&requested);
            if !diff.is_empty() {
                bail!(
                    "these settings differ from the checkpoint's (saved vs given), which would \
                     break exact resume: {}",
                    diff.join("; ")
                );
            }
            let threads = candle_core::utils::get_num_threads();
            if rp.state.threads != threads {
                eprintln!(
                    "warning: the checkpoint was written with {} threads, this run uses {threads}; \
                     results may differ in the last bits from an uninterrupted run (--threads {})",
                    rp.state.threads, rp.state.threads
                );
            }
            let teacher = PathBuf::from(&rp.state.teacher.path);
            (loaded, requested, Some(rp), teacher)
        }
        None => {
            let path = args.model.clone().context(
                "give the RecurFormer checkpoint to train with --model (or --resume DIR)",
            )?;
            let loaded = recurformer::checkpoint::loader::load(&path)?;
            let section = loaded.model.recurformer.as_ref().with_context(|| {
                format!(
                    "{} is a base model, not a RecurFormer: run `recurformer convert` first",
                    path.display()
                )
            })?;
            let teacher = PathBuf::from(&section.provenance.base_model);
            let mut cfg = TrainConfig::default();
            apply_flags(&mut cfg, &args);
            cfg.validate()?;
            (loaded, cfg, None, teacher)
        }
    };
    let out = match (&args.out, &args.resume) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => r.clone(),
        (None, None) => bail!("give the output directory with --out"),
    };
    let teacher_path = args.teacher.clone().unwrap_or(teacher_default);
    if !teacher_path.exists() {
        bail!(
            "teacher {} does not exist{}; pass --teacher BASE_MODEL",
            teacher_path.display(),
            if args.teacher.is_none() {
                " (taken from the checkpoint's provenance)"
            } else {
                ""
            }
        );
    }
    eprintln!("train: loading the teacher {}", teacher_path.display());
    let teacher = recurformer::checkpoint::loader::load(&teacher_path)?;

    // Data.
    let (train_text, heldout_files, fraction) = if !args.data.is_empty() {
        (
            TrainText::Files(args.data.clone()),
            args.heldout.clone(),
            args.heldout_fraction,
        )
    } else if let Some(rp) = &resume {
        let saved = saved_inputs(&rp.state)?;
        if let Some(m) = &args.mix {
            let same = matches!(&saved.0, TrainText::Mix(s) if s == m);
            if !same {
                bail!(
                    "--mix {m:?} differs from the checkpoint's training text ({:?}); a resume \
                     continues on the saved data",
                    saved.0
                );
            }
        }
        saved
    } else {
        let h = if args.heldout.is_empty() {
            default_heldout_files()
        } else {
            args.heldout.clone()
        };
        let mix = args
            .mix
            .clone()
            .unwrap_or_else(|| recurformer::formats::domains::DEFAULT_MIX.to_string());
        (TrainText::Mix(mix), h, args.heldout_fraction)
    };
    let t0 = std::time::Instant::now();
    let eos = loaded.model.cfg.eos_token_ids.first().copied();
    let data = build_data(
        &train_text,
        &heldout_files,
        fraction,
        start_cfg.seed,
        loaded.tokenizer.as_ref(),
        eos,
        cache,
    )?;
    eprintln!(
        "train: {} training documents ({} tokens), {} held-out ({} tokens), read in {:.1} s",
        data.train_sources.len(),
        data.train.len(),
        data.heldout_sources.len(),
        data.heldout.len(),
        t0.elapsed().as_secs_f64()
    );
    let c = &start_cfg;
    let scope = match c.scope {
        TrainScope::Mixers => "mixers".to_string(),
        s => format!("{s:?} (pretrained tensors at {} x lr)", c.base_lr_ratio),
    };
    eprintln!(
        "train: stages {:?}, seq_len {}, batch {} x accum {} = {} tokens/step, lr {:.1e} (align {:.1e}), \
         warmup {}, clip {}, ce_weight {}, hidden_weight {}, retrieval windows {} (answer weight {}), \
         train {}, seed {}, budget {:?}",
        c.stages.iter().map(|s| s.name()).collect::<Vec<_>>(),
        c.seq_len,
        c.batch,
        c.accum,
        c.tokens_per_step(),
        c.lr,
        c.align_lr,
        c.warmup,
        c.clip,
        c.ce_weight,
        c.hidden_weight,
        c.retrieval_share,
        c.answer_weight,
        scope,
        c.seed,
        c.budget
    );

    let session = Session {
        student: &loaded.model,
        tokenizer: loaded.tokenizer.as_ref(),
        teacher: &teacher.model,
        teacher_path: teacher_path.display().to_string(),
        data: &data,
        out: out.clone(),
    };
    let start = match resume {
        Some(mut rp) => {
            if let Some(m) = args.max_minutes {
                rp.state.config.budget.max_minutes = Some(m);
            }
            let p = &rp.state.progress;
            if rp.state.finished() {
                println!(
                    "{} holds a finished run ({} stages); nothing to do",
                    rp.dir.display(),
                    p.done.len()
                );
                return Ok(());
            }
            eprintln!(
                "train: resuming {} at {} step {}",
                rp.dir.display(),
                rp.state.config.stages[p.stage_index].name(),
                p.step
            );
            Start::Resume(Box::new(rp))
        }
        None => Start::Fresh(start_cfg),
    };
    let opts = RunOptions {
        eval_every: args.eval_every,
        save_every: args.save_every,
    };
    let mut bar: Option<indicatif::ProgressBar> = None;
    let on_event: &mut dyn FnMut(Event) -> ControlFlow<()> = &mut |e| {
        match e {
            Event::StageStart {
                stage,
                step,
                horizon,
            } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                bar = Some(stage_bar(stage, horizon, step));
            }
            Event::Horizon { horizon, .. } => {
                if let Some(b) = &bar {
                    b.set_length(horizon);
                }
            }
            Event::Step(r) => {
                if let Some(b) = &bar {
                    b.set_position(r.step);
                    b.set_message(format!(
                        "loss {:.4} | {:.0} tok/s | lr {:.1e}",
                        r.loss, r.tokens_per_s, r.lr
                    ));
                }
            }
            Event::Eval {
                stage,
                step,
                result,
            } => {
                let line = match (result.kl, result.ce) {
                    (Some(kl), Some(ce)) => format!(
                        "{} step {step}: held-out KL {kl:.4}, CE {ce:.4} (ppl {:.2}){}",
                        stage.name(),
                        ce.exp(),
                        result
                            .hidden
                            .map(|h| format!(", hidden NMSE {h:.4}"))
                            .unwrap_or_default()
                    ),
                    _ => format!(
                        "{} step {step}: held-out normalised MSE {:.4}",
                        stage.name(),
                        result.loss
                    ),
                };
                match &bar {
                    Some(b) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Checkpoint { .. } => {}
        }
        ControlFlow::Continue(())
    };
    let outcome = recurformer::train::train(&session, start, opts, on_event)?;
    if let Some(b) = bar.take() {
        b.finish_and_clear();
    }
    for d in &outcome.state.progress.done {
        let fmt = |r: &Option<recurformer::train::EvalResult>| {
            r.as_ref()
                .map(|r| format!("{:.4}", r.loss))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:>7}: {} steps ({} by {}), {} tokens in {:.1} s ({:.0} tok/s); held-out loss {} -> {}",
            d.stage.name(),
            d.steps,
            d.horizon,
            d.stopped_by,
            d.tokens,
            d.elapsed_s,
            d.tokens as f64 / d.elapsed_s.max(1e-9),
            fmt(&d.heldout_start),
            fmt(&d.heldout_end)
        );
    }
    println!(
        "wrote {} (train_log.jsonl, loss.png, train_state.json)",
        out.display()
    );
    Ok(())
}
