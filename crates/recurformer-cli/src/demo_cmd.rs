//! `recurformer demo`: the whole pipeline on one base model, analyze -> plan -> convert -> train ->
//! eval (perplexity; needle + HashHop) -> bench, then REPORT.md with the plots.
//!
//! Every stage runs this same binary's subcommand in a child process (so its progress bar,
//! memory peak and failure are its own, and the printed command can be rerun by hand). Finished
//! stages are recorded in `<out>/demo_state.json` with their exact arguments; a later run reuses a
//! stage whose arguments are unchanged and whose outputs exist, reruns it otherwise, and then
//! reruns everything after it. An interrupted training stage is resumed from its last checkpoint.

use crate::human_bytes;
use anyhow::{bail, Context, Result};
use clap::Args;
use recurformer::formats::io::shown_path;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Report directory: every stage writes under it, REPORT.md at its top.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Base model (HF directory or GGUF). Defaults to SmolLM2-135M-Instruct from scripts/setup.sh.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Share of KV groups to replace by Mamba mixers (at least one attention group is kept per
    /// layer).
    #[arg(long, default_value_t = 0.5)]
    fraction: f64,
    /// How the plan fills its budget (`plan --rank`). `harm`: the 60 most recency-aware groups are
    /// each restricted alone to the window in the base model and those that cost its passkey
    /// answers least are replaced (~23 minutes on 2 cores; at 50 % its untrained conversion finds
    /// 56 of 60 needles against 51 for `recency`, BENCHMARKS.md, "Groups ranked by causal harm").
    /// `recency`: the most recency-aware groups (seconds).
    #[arg(long, value_enum, default_value_t = crate::plan_cmd::Rank::Harm)]
    rank: crate::plan_cmd::Rank,
    /// Training budget in minutes (a quarter alignment, the rest distillation). Quality grows with
    /// it: see BENCHMARKS.md for 17- and 58-minute runs.
    #[arg(long, default_value_t = 10.0)]
    train_minutes: f64,
    /// Weight of the cross-entropy on the training text beside the KL to the base model in
    /// distillation. 0.5 lowered the held-out cross-entropy by 0.05 nats after 40 steps at a KL
    /// cost of 0.01 (BENCHMARKS.md, "Distillation recipe"); 0 is pure distillation.
    #[arg(long, default_value_t = 0.5)]
    ce_weight: f64,
    /// Weight of the hidden-state term in distillation: the normalised MSE between the student's
    /// and the base model's input to every layer (BENCHMARKS.md, "Hidden-state term in
    /// distillation"); 0 turns it off.
    #[arg(long, default_value_t = HIDDEN_WEIGHT)]
    hidden_weight: f64,
    /// Keep the replaced heads as attention over 4 sink tokens plus this many recent keys beside
    /// each mixer (`convert --local-window`); 0 replaces them by the mixer alone. Default 32: on
    /// the 50 % plan the untrained conversion then keeps 17 of 20 needles and 1.20x the base's
    /// perplexity at 2K, where the mixer alone starts at 17x and, trained for 58 minutes, still
    /// finds no needle (BENCHMARKS.md, "The causal ceiling and windowed heads beside the mixer").
    #[arg(long, default_value_t = 32)]
    local_window: usize,
    /// Share of the training windows rewritten into retrieval exercises (`train
    /// --retrieval-share`); 0 trains on the text alone.
    #[arg(long, default_value_t = 0.0)]
    retrieval_share: f64,
    /// Distillation weight of the retrieval windows' answer tokens (`train --answer-weight`).
    #[arg(long, default_value_t = 4.0)]
    answer_weight: f64,
    #[command(flatten)]
    threads: crate::ThreadArgs,
    /// Smoke run with tiny sizes everywhere (a few minutes; checks the pipeline, the numbers mean
    /// nothing).
    #[arg(long)]
    quick: bool,
    /// Rerun every stage even when a finished one could be reused.
    #[arg(long)]
    fresh: bool,
}

/// The demo's hidden-state weight: 4 lowered the held-out cross-entropy most of 0, 1, 4 and 16 after
/// 40 distillation steps (BENCHMARKS.md, "Hidden-state term in distillation").
const HIDDEN_WEIGHT: f64 = 4.0;

/// One pipeline stage: a subcommand of this binary, what it writes, and how long it is expected
/// to take on a 2-core machine (measured; shown up front).
struct Stage {
    name: &'static str,
    what: &'static str,
    args: Vec<String>,
    /// Paths (under the report directory) the stage writes; all must exist for reuse, and they are
    /// removed before a rerun.
    outputs: Vec<PathBuf>,
    estimate_s: f64,
}

/// One stage's command line, built flag by flag: the subcommand, then `--flag value...` pairs, the
/// flags that differ between a full and a `--quick` run, and `--threads` where the demo was given it.
struct StageArgs {
    args: Vec<String>,
    quick: bool,
}

impl StageArgs {
    fn new(subcommand: &str, quick: bool) -> Self {
        StageArgs {
            args: vec![subcommand.to_string()],
            quick,
        }
    }

    /// `flag` followed by each of `values` (`--contexts 1024 4096`; one value for most flags).
    fn flag<T: std::fmt::Display>(mut self, flag: &str, values: &[T]) -> Self {
        self.args.push(flag.to_string());
        self.args.extend(values.iter().map(|v| v.to_string()));
        self
    }

    /// `flag path`.
    fn path(self, flag: &str, path: &Path) -> Self {
        self.flag(flag, &[shown_path(path)])
    }

    /// `-m model` for each model, in order.
    fn models(self, models: &[&Path]) -> Self {
        models.iter().fold(self, |a, m| a.path("-m", m))
    }

    /// The words of `full` in a full run, those of `quick` in a `--quick` run.
    fn sizes(mut self, full: &[&str], quick: &[&str]) -> Self {
        let words = if self.quick { quick } else { full };
        self.args.extend(words.iter().map(|w| w.to_string()));
        self
    }

    /// `flag` followed by `values` when `on`, nothing otherwise.
    fn flag_if<T: std::fmt::Display>(self, on: bool, flag: &str, values: &[T]) -> Self {
        if on {
            self.flag(flag, values)
        } else {
            self
        }
    }

    /// `--threads n` when the demo was given a thread count.
    fn threads(self, threads: crate::ThreadArgs) -> Self {
        match threads.threads {
            Some(n) => self.flag("--threads", &[n]),
            None => self,
        }
    }

    fn build(self) -> Vec<String> {
        self.args
    }
}

struct Paths {
    recency: PathBuf,
    plan: PathBuf,
    plan_png: PathBuf,
    converted: PathBuf,
    trained: PathBuf,
    eval_ppl: PathBuf,
    eval_domains: PathBuf,
    eval_tasks: PathBuf,
    bench: PathBuf,
}

impl Paths {
    fn new(out: &Path) -> Self {
        Paths {
            recency: out.join("recency.json"),
            plan: out.join("plan.json"),
            plan_png: out.join("plan.png"),
            converted: out.join("converted"),
            trained: out.join("trained"),
            eval_ppl: out.join("eval_perplexity"),
            eval_domains: out.join("eval_domains"),
            eval_tasks: out.join("eval_retrieval"),
            bench: out.join("bench"),
        }
    }
}

fn stages(a: &DemoArgs, base: &Path, ps: &Paths) -> Vec<Stage> {
    let q = a.quick;
    let cmd = |sub: &str| StageArgs::new(sub, q);
    vec![
        Stage {
            name: "analyze",
            what: "recency and retrieval probes of every attention head (Persuasion held out)",
            args: cmd("analyze")
                .path("--model", base)
                .sizes(
                    &["--sequences", "8", "--seq-len", "1024"],
                    &[
                        "--sequences",
                        "2",
                        "--seq-len",
                        "128",
                        "--repeat-sequences",
                        "2",
                        "--copy-prompts",
                        "2",
                        "--copy-prompt-len",
                        "128",
                    ],
                )
                .path("--out", &ps.recency)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.recency.clone()],
            estimate_s: if q { 5.0 } else { 110.0 },
        },
        Stage {
            name: "plan",
            what: if a.rank == crate::plan_cmd::Rank::Harm {
                "keep the retrieval heads' groups, replace the recency-aware groups whose loss costs passkeys least"
            } else {
                "keep the retrieval heads' groups, replace the most recency-aware of the rest"
            },
            args: cmd("plan")
                .path("--recency", &ps.recency)
                .flag("--replace-fraction", &[a.fraction])
                .flag("--min-attention-groups-per-layer", &[1])
                .flag(
                    "--rank",
                    &[match a.rank {
                        crate::plan_cmd::Rank::Harm => "harm",
                        crate::plan_cmd::Rank::Recency => "recency",
                    }],
                )
                .path("--out", &ps.plan)
                .path("--heatmap", &ps.plan_png)
                // The causal check: chat-framed passkeys with the planned groups restricted to the
                // window the windowed heads will keep. It reports the ceiling without swap trials:
                // on this model single swaps answered none of the prompts the plan misses while
                // their copy-mass pass costs minutes (BENCHMARKS.md, "A check that sees the loss").
                .path("--check-model", base)
                .flag(
                    "--check-window",
                    &[if a.local_window > 0 {
                        a.local_window
                    } else {
                        32
                    }],
                )
                .sizes(
                    &["--max-swaps", "0"],
                    &[
                        "--check-prompts",
                        "2",
                        "--check-context",
                        "256",
                        "--max-swaps",
                        "1",
                        "--rank-prompts",
                        "1",
                        "--rank-context",
                        "256",
                    ],
                )
                .threads(a.threads)
                .build(),
            outputs: vec![ps.plan.clone(), ps.plan_png.clone()],
            estimate_s: match (q, a.rank) {
                (true, _) => 10.0,
                (false, crate::plan_cmd::Rank::Harm) => 150.0 + 1400.0,
                (false, crate::plan_cmd::Rank::Recency) => 150.0,
            },
        },
        Stage {
            name: "convert",
            what: "replace them by Mamba mixers initialised from the heads",
            args: cmd("convert")
                .path("--model", base)
                .path("--plan", &ps.plan)
                .flag_if(a.local_window > 0, "--local-window", &[a.local_window])
                .path("--out", &ps.converted)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.converted.clone()],
            estimate_s: 10.0,
        },
        Stage {
            name: "train",
            what: "alignment, then distillation from the base model",
            // 256-token windows and held-out evaluations / checkpoints every 100 steps: at 50 % of
            // the groups and 58 minutes this reached 1.035x the base's perplexity at 2K against
            // 1.10x with 512 and 25 (BENCHMARKS.md, "256-token windows for 58 minutes").
            args: cmd("train")
                .path("--model", &ps.converted)
                .path("--teacher", base)
                .path("--out", &ps.trained)
                .flag("--ce-weight", &[a.ce_weight])
                .flag("--hidden-weight", &[a.hidden_weight])
                .flag("--retrieval-share", &[a.retrieval_share])
                .flag("--answer-weight", &[a.answer_weight])
                .sizes(
                    &[
                        "--max-minutes",
                        &a.train_minutes.to_string(),
                        "--seq-len",
                        "256",
                        "--lr",
                        "1e-3",
                        "--eval-every",
                        "100",
                        "--save-every",
                        "100",
                    ],
                    &[
                        "--max-steps",
                        "4",
                        "--seq-len",
                        "64",
                        "--eval-windows",
                        "1",
                        "--warmup",
                        "1",
                    ],
                )
                .threads(a.threads)
                .build(),
            outputs: vec![ps.trained.clone()],
            estimate_s: if q {
                30.0
            } else {
                a.train_minutes * 60.0 + 60.0
            },
        },
        Stage {
            name: "eval-perplexity",
            what: "held-out perplexity (Persuasion) and cache: base, untrained, trained",
            args: cmd("eval")
                .models(&[base, &ps.converted, &ps.trained])
                .flag("--tasks", &["perplexity,cache"])
                .sizes(
                    &["--context", "512", "2048", "--limit", "8"],
                    &["--context", "128", "--limit", "1"],
                )
                .path("--out", &ps.eval_ppl)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.eval_ppl.join("eval.json")],
            estimate_s: if q { 10.0 } else { 270.0 },
        },
        Stage {
            name: "eval-domains",
            what: "held-out perplexity per text domain: base, untrained, trained",
            // Two 2K windows from the start of each domain's held-out stream (4,096 tokens per
            // domain and model); BENCHMARKS.md "Held-out perplexity per domain" uses eight.
            args: cmd("eval")
                .models(&[base, &ps.converted, &ps.trained])
                .flag("--tasks", &["perplexity"])
                .flag("--domains", &[] as &[&str])
                .sizes(
                    &["--context", "2048", "--limit", "2"],
                    &["--context", "128", "--limit", "1"],
                )
                .path("--out", &ps.eval_domains)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.eval_domains.join("eval.json")],
            estimate_s: if q { 15.0 } else { 200.0 },
        },
        Stage {
            name: "eval-retrieval",
            what: "needle (105 cases), HashHop and the induction probe: base vs trained",
            // Teacher-forced needle over 3 contexts x 5 depths x 7 samples = 105 cases per model:
            // a Wilson interval of about +-8 points near 80 % (+-3.5 at 0 or 100 %) where 9 cases
            // gave +-30. A case costs one prefill: 3.3, 6.0 and 14.2 s at 1K, 2K and 4K for the
            // base on an idle machine, 2.1, 4.6 and 11.3 s for the trained 50 % model (the
            // committed demo report); 35 cases per context and model make 1,450 s, HashHop (one
            // case per cell) ~85 s and the induction probe ~25 s (BENCHMARKS.md, "Retrieval
            // measured with enough cases").
            args: cmd("eval")
                .models(&[base, &ps.trained])
                .flag("--tasks", &["needle,hashhop,induction"])
                .sizes(
                    &[
                        "--task-context",
                        "1024",
                        "2048",
                        "4096",
                        "--depths",
                        "0",
                        "0.25",
                        "0.5",
                        "0.75",
                        "1",
                        "--samples",
                        "7",
                        "--hops",
                        "1",
                        "2",
                        "--hashhop-samples",
                        "1",
                    ],
                    &[
                        "--task-context",
                        "256",
                        "--depths",
                        "0.5",
                        "--hops",
                        "1",
                        "--induction-sequences",
                        "2",
                        "--induction-span",
                        "16",
                    ],
                )
                .path("--out", &ps.eval_tasks)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.eval_tasks.join("eval.json")],
            estimate_s: if q { 20.0 } else { 1560.0 },
        },
        Stage {
            name: "bench",
            what: "time to first token, decode speed, cache and memory at 1K/4K/8K",
            args: cmd("bench")
                .models(&[base, &ps.trained])
                .flag("--reference", &["none"])
                .sizes(
                    &["--contexts", "1024", "4096", "8192"],
                    // Above the break-even length: the 50 % hybrid's constant f32 state (3.0 MiB
                    // with the windowed heads) outweighs the KV bytes it saves per token (11.25 KiB
                    // with the default f16 cache, 22.5 KiB in f32) below ~275 tokens.
                    &["--contexts", "512", "768", "--decode-steps", "4"],
                )
                .path("--out", &ps.bench)
                .threads(a.threads)
                .build(),
            outputs: vec![ps.bench.join("bench.json")],
            estimate_s: if q { 10.0 } else { 230.0 },
        },
    ]
}

/// `<out>/demo_state.json`: per stage, its arguments, status ("started" or "done") and seconds.
fn load_state(path: &Path) -> Result<Value> {
    if !path.exists() {
        return Ok(json!({"stages": {}}));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not valid JSON (delete it, or pass --fresh, to start over)",
            path.display()
        )
    })?;
    if !v["stages"].is_object() {
        bail!(
            "{}: no \"stages\" object (delete it, or pass --fresh)",
            path.display()
        );
    }
    Ok(v)
}

fn save_state(path: &Path, v: &Value) -> Result<()> {
    recurformer::formats::io::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

fn remove_outputs(st: &Stage) -> Result<()> {
    for o in &st.outputs {
        if o.is_dir() {
            std::fs::remove_dir_all(o).with_context(|| format!("removing {}", o.display()))?;
        } else if o.exists() {
            std::fs::remove_file(o).with_context(|| format!("removing {}", o.display()))?;
        }
    }
    Ok(())
}

fn minutes(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 90.0 {
        format!("{secs:.0} s")
    } else {
        format!("{:.1} min", secs / 60.0)
    }
}

pub(crate) fn run(a: DemoArgs) -> Result<()> {
    if !(a.fraction > 0.0 && a.fraction <= 1.0) {
        bail!("--fraction {}: expected a share in (0, 1]", a.fraction);
    }
    for (flag, w) in [
        ("--ce-weight", a.ce_weight),
        ("--hidden-weight", a.hidden_weight),
        ("--answer-weight", a.answer_weight),
    ] {
        if !(w >= 0.0 && w.is_finite()) {
            bail!("{flag} {w}: expected a number >= 0");
        }
    }
    if !(a.train_minutes > 0.0 && a.train_minutes.is_finite()) {
        bail!(
            "--train-minutes {}: expected a positive number",
            a.train_minutes
        );
    }
    let base = a
        .model
        .clone()
        .unwrap_or_else(recurformer::default_model_path);
    if !base.exists() {
        bail!(
            "base model {} not found (run `bash scripts/setup.sh` to fetch the default model, or pass --model)",
            base.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let ps = Paths::new(&a.out);
    let stages = stages(&a, &base, &ps);
    let state_path = a.out.join("demo_state.json");
    let mut state = if a.fresh {
        json!({"stages": {}})
    } else {
        load_state(&state_path)?
    };

    // Which stages can be reused: recorded done with the same arguments, outputs present, and no
    // earlier stage rerun.
    let mut reuse = Vec::new();
    let mut dirty = false;
    for st in &stages {
        let rec = &state["stages"][st.name];
        let same = rec["args"] == json!(st.args) && rec["status"] == "done";
        let ok = !dirty && same && st.outputs.iter().all(|o| o.exists());
        dirty |= !ok;
        reuse.push(ok);
    }
    let todo: f64 = stages
        .iter()
        .zip(&reuse)
        .filter(|(_, r)| !**r)
        .map(|(s, _)| s.estimate_s)
        .sum();
    eprintln!(
        "recurformer demo: {} -> {} ({} of KV groups to Mamba), report in {}",
        shown_path(&base),
        if a.quick {
            "quick smoke run"
        } else {
            "RecurFormer"
        },
        format!("{:.0}%", 100.0 * a.fraction),
        a.out.display()
    );
    eprintln!(
        "expected time on a 2-core CPU: about {} for the {} stage(s) to run{}",
        minutes(todo),
        reuse.iter().filter(|r| !**r).count(),
        if reuse.iter().any(|r| *r) {
            " (the others are reused from a previous run)"
        } else {
            ""
        }
    );
    for (i, (st, r)) in stages.iter().zip(&reuse).enumerate() {
        eprintln!(
            "  {}. {:<16} {:>9}  {}",
            i + 1,
            st.name,
            if *r {
                "reused".to_string()
            } else {
                format!("~{}", minutes(st.estimate_s))
            },
            st.what
        );
    }

    let exe = std::env::current_exe().context("locating the recurformer binary")?;
    let t_all = Instant::now();
    let mut left = todo;
    for (i, (st, r)) in stages.iter().zip(&reuse).enumerate() {
        if *r {
            continue;
        }
        let rec = state["stages"][st.name].clone();
        // An interrupted training run with the same settings continues from its checkpoint.
        let resume = st.name == "train"
            && rec["args"] == json!(st.args)
            && rec["status"] == "started"
            && ps.trained.join("train_state.json").exists();
        let args: Vec<String> = if resume {
            StageArgs::new("train", a.quick)
                .path("--resume", &ps.trained)
                .sizes(&["--max-minutes", &a.train_minutes.to_string()], &[])
                .threads(a.threads)
                .build()
        } else {
            remove_outputs(st)?;
            st.args.clone()
        };
        eprintln!(
            "\n[{}/{}] {} ({}; ~{} of ~{} left){}\n$ recurformer {}",
            i + 1,
            stages.len(),
            st.name,
            st.what,
            minutes(st.estimate_s),
            minutes(left),
            if resume { ", resuming" } else { "" },
            args.join(" ")
        );
        state["stages"][st.name] = json!({"args": st.args, "status": "started"});
        save_state(&state_path, &state)?;
        let t0 = Instant::now();
        let status = std::process::Command::new(&exe)
            .args(&args)
            .status()
            .with_context(|| format!("running stage {}", st.name))?;
        if !status.success() {
            bail!(
                "stage {} failed ({status}); fix the cause and run the demo again: finished stages \
                 are reused{}",
                st.name,
                if st.name == "train" {
                    " and training resumes from its last checkpoint"
                } else {
                    ""
                }
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        let prev = if resume {
            rec["seconds"].as_f64().unwrap_or(0.0)
        } else {
            0.0
        };
        state["stages"][st.name] = json!({"args": st.args, "status": "done",
            "seconds": prev + secs, "finished": now_utc(), "finished_unix": unix_now()});
        save_state(&state_path, &state)?;
        left -= st.estimate_s;
        eprintln!(
            "[{}/{}] {} done in {}",
            i + 1,
            stages.len(),
            st.name,
            minutes(secs)
        );
    }
    let report = report(&a, &base, &ps, &stages, &reuse, &state)?;
    let report_path = a.out.join("REPORT.md");
    recurformer::formats::io::write_atomic(&report_path, report.as_bytes())?;
    eprintln!(
        "\ndemo finished in {}; report: {}",
        minutes(t_all.elapsed().as_secs_f64()),
        report_path.display()
    );
    Ok(())
}

/// Seconds since the Unix epoch (sub-second), to tell runs of a stage apart.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The current UTC time as `YYYY-MM-DD HH:MM` (civil-from-days; no time-zone data needed).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// CPU model, logical cores and memory, from /proc (Linux); "unknown" parts elsewhere.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown memory".into());
    format!(
        "{model}, {cores} logical cores, {mem}, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A path relative to the report directory, for links in REPORT.md.
fn rel(out: &Path, path: &Path) -> String {
    path.strip_prefix(out).unwrap_or(path).display().to_string()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    }
}

/// The per-domain perplexity table of `eval --domains` with base, untrained and trained models.
fn domain_table(ev: &Value) -> String {
    let res = ev["results"].as_array().cloned().unwrap_or_default();
    let at = |mi: usize, di: usize, k: &str| {
        res.get(mi)
            .and_then(|r| r["perplexity_domains"][di]["perplexity"][0][k].as_f64())
    };
    let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let mut md = String::from(
        "\nHeld-out perplexity per text domain (documents held out of every training and \
         calibration set; README, \"Text domains\"):\n\n\
         | domain | context | windows | base | converted, untrained | trained | trained vs base |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let domains = res
        .first()
        .and_then(|r| r["perplexity_domains"].as_array().cloned())
        .unwrap_or_default();
    for (di, d) in domains.iter().enumerate() {
        let p = &d["perplexity"][0];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | **{}** |\n",
            d["domain"].as_str().unwrap_or("-"),
            p["context"],
            p["windows"],
            f(at(0, di, "ppl")),
            f(at(1, di, "ppl")),
            f(at(2, di, "ppl")),
            ratio(at(2, di, "ppl"), at(0, di, "ppl")),
        ));
    }
    md
}

fn report(
    a: &DemoArgs,
    base: &Path,
    ps: &Paths,
    stages: &[Stage],
    reuse: &[bool],
    state: &Value,
) -> Result<String> {
    let out = &a.out;
    let plan = read_json(&ps.plan)?;
    let ppl = read_json(&ps.eval_ppl.join("eval.json"))?;
    let tasks = read_json(&ps.eval_tasks.join("eval.json"))?;
    let bench = read_json(&ps.bench.join("bench.json"))?;
    let train = read_json(&ps.trained.join("train_state.json"))?;
    let mut md = String::new();
    let cmd: Vec<String> = std::env::args().collect();
    let cmd = format!(
        "recurformer {}",
        cmd.iter().skip(1).cloned().collect::<Vec<_>>().join(" ")
    );
    let total: f64 = stages
        .iter()
        .map(|st| state["stages"][st.name]["seconds"].as_f64().unwrap_or(0.0))
        .sum();
    md.push_str(&format!(
        "# RecurFormer demo report\n\n\
         Base model `{}`; {:.0} % of its KV groups replaced by Mamba mixers, trained for {}.\n\n\
         - command: `{cmd}`{}\n- machine: {}{}\n- finished: {}; stage wall time in all {}\n\n",
        shown_path(base),
        100.0 * a.fraction,
        if a.quick {
            "4 steps (--quick: a smoke run, the numbers mean nothing)".to_string()
        } else {
            format!("{} minutes", a.train_minutes)
        },
        if a.quick { " (quick smoke run)" } else { "" },
        machine(),
        a.threads
            .threads
            .map(|t| format!(", {t} threads"))
            .unwrap_or_default(),
        now_utc(),
        minutes(total)
    ));

    // ---- Answers first.
    md.push_str("## The answers\n\n");
    let groups_total = plan["shape"]["num_layers"].as_u64().unwrap_or(0)
        * plan["shape"]["num_key_value_heads"].as_u64().unwrap_or(0);
    let replaced: u64 = plan["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["mamba_groups"].as_array().map(|g| g.len()).unwrap_or(0) as u64)
        .sum();
    md.push_str(&format!(
        "**Cache.** {replaced} of {groups_total} KV groups are Mamba mixers; their KV cache is \
         replaced by a constant recurrent state.\n\n\
         | context | base KV cache | RecurFormer cache (KV + state) | ratio | saved |\n|---|---|---|---|---|\n"
    ));
    for c in plan["predicted_cache"].as_array().into_iter().flatten() {
        let (b, t) = (
            c["base_kv_bytes"].as_f64().unwrap_or(0.0),
            c["total_bytes"].as_f64().unwrap_or(0.0),
        );
        let k = c["tokens"].as_u64().unwrap_or(0);
        let bold = k == 8192 || k == 32768;
        let (o, e) = if bold { ("**", "**") } else { ("", "") };
        md.push_str(&format!(
            "| {}{} | {} | {} | {o}{:.3}{e} | {o}{}{e} |\n",
            if k % 1024 == 0 { k / 1024 } else { k },
            if k % 1024 == 0 { "K" } else { "" },
            human_bytes(b),
            human_bytes(t),
            t / b,
            human_bytes(b - t)
        ));
    }
    md.push_str(&format!(
        "\nThe plan's prediction for an f32 cache, batch 1. The eval and bench stages run with the \
         default `--kv {}` cache{}, and bench measures its bytes in the running engine (table below).\n\n",
        crate::DEFAULT_KV,
        if crate::DEFAULT_KV == "f16" { " (half these KV bytes)" } else { "" }
    ));

    // Perplexity: base, untrained, trained at each context.
    let res = ppl["results"].as_array().cloned().unwrap_or_default();
    let ppl_at =
        |mi: usize, ci: usize, k: &str| res.get(mi).and_then(|r| r["perplexity"][ci][k].as_f64());
    md.push_str(
        "**Quality.** Held-out perplexity on *Persuasion* (never used for calibration or training):\n\n\
         | context | windows | base | converted, untrained | trained | trained vs base | 2nd half: base | 2nd half: trained | vs base |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let contexts = ppl["contexts"].as_array().cloned().unwrap_or_default();
    for (ci, c) in contexts.iter().enumerate() {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | **{}** | {} | {} | {} |\n",
            c,
            res.first()
                .map(|r| r["perplexity"][ci]["windows"].to_string())
                .unwrap_or_default(),
            f(ppl_at(0, ci, "ppl")),
            f(ppl_at(1, ci, "ppl")),
            f(ppl_at(2, ci, "ppl")),
            ratio(ppl_at(2, ci, "ppl"), ppl_at(0, ci, "ppl")),
            f(ppl_at(0, ci, "second_half_ppl")),
            f(ppl_at(2, ci, "second_half_ppl")),
            ratio(
                ppl_at(2, ci, "second_half_ppl"),
                ppl_at(0, ci, "second_half_ppl")
            ),
        ));
    }
    md.push_str(&domain_table(&read_json(
        &ps.eval_domains.join("eval.json"),
    )?));
    let tres = tasks["results"].as_array().cloned().unwrap_or_default();
    // Exact match with its Wilson interval; the McNemar test of the trained model against the base.
    let acc = |mi: usize, task: &str| {
        tres.get(mi)
            .map(|r| crate::eval_cmd::fmt_rate(&r[task]["summary"]["exact_match"]))
            .unwrap_or_else(|| "-".into())
    };
    let cases = |task: &str| {
        tres.first()
            .map(|r| r[task]["summary"]["exact_match"]["trials"].to_string())
            .unwrap_or_else(|| "-".into())
    };
    let mcnemar = |task: &str| {
        tres.get(1)
            .map(|r| crate::eval_cmd::fmt_mcnemar(&r[task]["mcnemar_vs_first"]))
            .unwrap_or_else(|| "-".into())
    };
    let induction = |mi: usize| {
        tres.get(mi)
            .map(|r| crate::eval_cmd::fmt_rate(&r["induction"]["overall"]))
            .unwrap_or_else(|| "-".into())
    };
    let task_ctx: Vec<String> = tasks["task_contexts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.to_string())
        .collect();
    md.push_str(&format!(
        "\nRetrieval at contexts {} tokens ({} scoring; exact match with its Wilson 95 % \
         interval, and the exact McNemar test of trained against base on the same cases: p, then \
         the cases only the base got right vs only the trained model; every table below): \
         needle-in-a-haystack over {} cases base **{}**, trained **{}**, McNemar {}; HashHop over \
         {} cases base **{}**, trained **{}**, McNemar {}. Induction (copying a repeated span of \
         random tokens, repeats 2-4): base **{}**, trained **{}**.\n\n",
        task_ctx.join(", "),
        tasks["scoring"].as_str().unwrap_or("-"),
        cases("needle"),
        acc(0, "needle"),
        acc(1, "needle"),
        mcnemar("needle"),
        cases("hashhop"),
        acc(0, "hashhop"),
        acc(1, "hashhop"),
        mcnemar("hashhop"),
        induction(0),
        induction(1),
    ));

    // Speed.
    let pts = bench["recurformer"].as_array().cloned().unwrap_or_default();
    md.push_str(
        "**Speed.** Decode speed (median over steps) and time to first token, same engine as `generate`:\n\n\
         | context | base decode tok/s | trained decode tok/s | ratio | base first token | trained first token | cache: base | cache: trained |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let bctx = bench["contexts"].as_array().cloned().unwrap_or_default();
    for (ci, c) in bctx.iter().enumerate() {
        let g = |mi: usize, k: &str| pts.get(mi).and_then(|m| m[ci][k].as_f64());
        let secs = |x: Option<f64>| x.map(|v| format!("{v:.2} s")).unwrap_or_else(|| "-".into());
        md.push_str(&format!(
            "| {} | {} | {} | **{}** | {} | {} | {} | {} |\n",
            c,
            g(0, "decode_tok_s")
                .map(|v| format!("{v:.2}"))
                .unwrap_or_default(),
            g(1, "decode_tok_s")
                .map(|v| format!("{v:.2}"))
                .unwrap_or_default(),
            ratio(g(1, "decode_tok_s"), g(0, "decode_tok_s")),
            secs(g(0, "ttft_s")),
            secs(g(1, "ttft_s")),
            g(0, "cache_bytes").map(human_bytes).unwrap_or_default(),
            g(1, "cache_bytes").map(human_bytes).unwrap_or_default(),
        ));
    }
    md.push_str(&format!(
        "\n![decode speed]({})\n![cache bytes]({})\n",
        rel(out, &ps.bench.join("decode_speed.png")),
        rel(out, &ps.bench.join("cache_bytes.png"))
    ));

    // ---- Pipeline.
    md.push_str(
        "\n## Stages\n\n| # | stage | wall time | this run | command |\n|---|---|---|---|---|\n",
    );
    for (i, (st, r)) in stages.iter().zip(reuse).enumerate() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | `recurformer {}` |\n",
            i + 1,
            st.name,
            state["stages"][st.name]["seconds"]
                .as_f64()
                .map(minutes)
                .unwrap_or_else(|| "-".into()),
            if *r { "reused" } else { "ran" },
            st.args.join(" ")
        ));
    }

    md.push_str(&format!(
        "\n## 1. Which heads are recency-aware\n\n`analyze` measured each head's attention mass on \
         the 32 most recent keys; `plan` took the highest-scoring KV groups (framed below).\n\n\
         ![recency heatmap with the plan]({})\n",
        rel(out, &ps.plan_png)
    ));
    if let Ok(c) =
        serde_json::from_value::<recurformer::model::plan::CeilingCheck>(plan["ceiling"].clone())
    {
        let st = &c.settings;
        md.push_str(&format!(
            "\nCausal check before training: the base model with the planned groups restricted to \
             {} sink tokens + {} recent keys answers {} of {} held-out {} passkeys of {} \
             tokens exactly (base {}); {} trade(s) tried, {} kept ({} with the plan as chosen).\n",
            st.sinks,
            st.window,
            c.final_correct,
            st.prompts,
            if st.chat { "chat-framed" } else { "plain-text" },
            st.prompt_len,
            c.base_correct,
            c.swaps.len(),
            c.swaps.iter().filter(|t| t.accepted).count(),
            c.planned_correct
        ));
    }

    md.push_str("\n## 2. Training\n\n| stage | steps | tokens | wall | tokens/s | held-out loss | held-out KL |\n|---|---|---|---|---|---|---|\n");
    for d in train["progress"]["done"].as_array().into_iter().flatten() {
        let (tok, el) = (
            d["tokens"].as_f64().unwrap_or(0.0),
            d["elapsed_s"].as_f64().unwrap_or(0.0),
        );
        let kl = match (
            d["heldout_start"]["kl"].as_f64(),
            d["heldout_end"]["kl"].as_f64(),
        ) {
            (Some(a), Some(b)) => format!("{a:.3} -> {b:.3}"),
            _ => String::new(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.3} -> {:.3} | {} |\n",
            d["stage"].as_str().unwrap_or(""),
            d["steps"],
            d["tokens"],
            minutes(el),
            if el > 0.0 { tok / el } else { 0.0 },
            d["heldout_start"]["loss"].as_f64().unwrap_or(f64::NAN),
            d["heldout_end"]["loss"].as_f64().unwrap_or(f64::NAN),
            kl
        ));
    }
    md.push_str(&format!(
        "\nAlignment loss: normalised MSE of each mixer against the replaced heads' outputs; \
         distillation loss: KL(base || RecurFormer) per token + {} x the cross-entropy on the text \
         + {} x the normalised MSE of every layer's input (KL alone in its own column). Held-out \
         figures are on windows of the training length.\n\n![loss curves]({})\n",
        a.ce_weight,
        a.hidden_weight,
        rel(out, &ps.trained.join("loss.png"))
    ));

    md.push_str("\n## 3. Quality, every table\n\n");
    md.push_str(&crate::eval_cmd::markdown(&res));
    md.push_str(&crate::eval_cmd::markdown(&tres));
    for (i, r) in tres.iter().enumerate() {
        if let Some(png) = r["needle_png"].as_str() {
            md.push_str(&format!(
                "![needle, {}]({})\n",
                if i == 0 { "base" } else { "trained" },
                rel(out, &ps.eval_tasks.join(png))
            ));
        }
    }
    md.push_str("\n## 4. Speed and memory, every figure\n\n");
    let bench_md = std::fs::read_to_string(ps.bench.join("bench.md")).unwrap_or_default();
    md.push_str(&bench_md);
    if ps.bench.join("ttft.png").exists() {
        md.push_str(&format!(
            "\n![time to first token]({})\n",
            rel(out, &ps.bench.join("ttft.png"))
        ));
    }
    md.push_str(
        "\nThe base model's cache grows by its full KV bytes per token; the RecurFormer's by the \
         kept groups' only, plus a state of constant size. A decode step reads all weights (fixed \
         cost) and the whole KV cache (grows with context), so halving the cache matters more the \
         longer the context.\n",
    );
    Ok(md)
}
