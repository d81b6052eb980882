//! `recurformer eval`: every model on the same inputs (held-out perplexity per context length, on
//! --data or per held-out text domain with --domains, cache bytes, needle-in-a-haystack, HashHop,
//! the induction probe), one progress bar over the whole run, one table, eval.json + eval.md (+ a
//! needle heatmap per model). Retrieval is reported as exact match with a Wilson 95 % interval,
//! per-digit accuracy, mean answer log-probability, and an exact McNemar test of each model against
//! the first on the same cases.

use crate::bench_cmd::short_name;
use crate::human_bytes;
use anyhow::{bail, Result};
use clap::Args;
use recurformer::formats::io::shown_path;
use recurformer::model::cache::KvDtype;
use recurformer::model::quant::WeightFormat;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Models to compare (the first is the reference for ratios); repeat the flag. Defaults to
    /// the default model.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    pub threads: crate::ThreadArgs,
    /// Tasks, comma-separated: perplexity, cache, needle, hashhop, induction.
    #[arg(long, value_delimiter = ',', default_value = "perplexity,cache")]
    pub tasks: Vec<String>,
    /// Context lengths for needle and hashhop (default: the --context lengths).
    #[arg(long, num_args = 1..)]
    pub task_context: Vec<usize>,
    /// Needle depths in [0, 1].
    #[arg(long, num_args = 1.., default_values_t = [0.0, 0.25, 0.5, 0.75, 1.0])]
    pub depths: Vec<f64>,
    /// HashHop hop counts.
    #[arg(long, num_args = 1.., default_values_t = [1usize, 2])]
    pub hops: Vec<usize>,
    /// Cases per needle / hashhop cell.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Cases per HashHop cell, when it should differ from --samples.
    #[arg(long)]
    pub hashhop_samples: Option<usize>,
    /// Seed of the needle values, haystack offsets, hashes and induction spans.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How needle and HashHop cases are scored: `teacher-forced` (the default: prompt + expected
    /// answer in one forward pass, exact match = every answer token is the argmax; also gives
    /// per-digit accuracy and the answer's log-probability, and costs a prefill, no decode steps)
    /// or `generate` (greedy decoding, the answer anywhere in the output as a whole word; also
    /// accepts answers written in another form).
    #[arg(long, default_value = "teacher-forced")]
    pub scoring: recurformer::eval::tasks::Scoring,
    /// Induction probe: sequences (one forward each).
    #[arg(long, default_value_t = 16)]
    pub induction_sequences: usize,
    /// Induction probe: random tokens per span (each sequence is the span repeated 4 times).
    #[arg(long, default_value_t = 64)]
    pub induction_span: usize,
    /// Context lengths for perplexity and cache.
    #[arg(long, num_args = 1.., default_values_t = [512usize, 2048, 4096, 8192])]
    pub context: Vec<usize>,
    /// Held-out text for perplexity (default: Persuasion, held out from calibration and training).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Perplexity on each text domain's held-out documents instead of on --data, in one table
    /// (a row per domain and context, a column per model, ratios to the first model). Alone:
    /// every domain that holds documents out (fiction = Persuasion, scripture = 9 books of the
    /// King James Bible, technical = man pages, code = networkx source, encyclopedic = FOLDOC;
    /// placed by scripts/setup.sh); or the domains named, comma-separated.
    #[arg(long, num_args = 0.., value_delimiter = ',', value_name = "DOMAIN", conflicts_with = "data")]
    pub domains: Option<Vec<String>>,
    /// At most this many windows per context length (a quick run); all windows by default.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Directory for eval.json, eval.md and needle_<i>.png.
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
    /// A plan whose replaced groups `--kv-window` restricts in the first model (a base model):
    /// the plan's causal ceiling (DESIGN.md, "Retrieval-aware selection").
    #[arg(long, requires = "kv_window")]
    pub kv_window_plan: Option<PathBuf>,
    /// Recent-key windows: for each, the first model with the plan's groups restricted to the
    /// sinks plus that many recent keys is evaluated after the models given, as one more model.
    #[arg(long, num_args = 1.., requires = "kv_window_plan")]
    pub kv_window: Vec<usize>,
    /// Sink tokens the restricted groups keep seeing beside their window.
    #[arg(long, default_value_t = 4)]
    pub kv_sinks: usize,
    /// Weight formats (`generate --weights`): every model is evaluated once per format, model by
    /// model, so the quality of quantised weights sits beside f32 in one table.
    #[arg(long, num_args = 1.., default_values_t = [WeightFormat::F32], value_parser = crate::parse_weights)]
    pub weights: Vec<WeightFormat>,
    /// KV-cache element types (`generate --kv`): every model and weight format is evaluated
    /// once per type, so an f16 cache's perplexity sits beside f32's; the cache table is in each
    /// entry's own type.
    #[arg(long, num_args = 1.., default_values = [crate::DEFAULT_KV], value_parser = crate::parse_kv)]
    pub kv: Vec<KvDtype>,
}

/// One model to evaluate: a path, or the first model restricted to a window on a plan's groups,
/// in a weight format.
struct ModelEntry {
    path: PathBuf,
    window: Option<usize>,
    weights: WeightFormat,
    /// Whether names show the weight format (several formats evaluated).
    show_weights: bool,
    kv: KvDtype,
    /// Whether names show the KV-cache type (several evaluated).
    show_kv: bool,
}

impl ModelEntry {
    /// The name reports use.
    fn name(&self) -> String {
        self.tagged(shown_path(&self.path), " on plan")
    }

    fn short(&self) -> String {
        self.tagged(short_name(&self.path), "")
    }

    /// `path` with the window (`[window W<on_plan>]`) and, when several are evaluated, the
    /// weight format.
    fn tagged(&self, path: String, on_plan: &str) -> String {
        let mut n = match self.window {
            None => path,
            Some(w) => format!("{path} [window {w}{on_plan}]"),
        };
        if self.show_weights {
            n.push_str(&format!(" [{}]", self.weights));
        }
        if self.show_kv {
            n.push_str(&format!(" [{} KV]", self.kv));
        }
        n
    }
}

const TASKS: [&str; 5] = ["perplexity", "cache", "needle", "hashhop", "induction"];

pub(crate) fn eval_cmd(a: EvalArgs) -> Result<()> {
    use recurformer::eval::tasks::{HashHopConfig, InductionConfig, NeedleConfig};
    use recurformer::formats::text::{load_documents, token_stream};
    a.threads.apply();
    let paths = if a.models.is_empty() {
        vec![recurformer::default_model_path()]
    } else {
        a.models.clone()
    };
    if a.weights.is_empty() {
        bail!("--weights: give at least one weight format");
    }
    let show_weights = a.weights.len() > 1;
    if a.kv.is_empty() {
        bail!("--kv: give at least one KV-cache type");
    }
    let show_kv = a.kv.len() > 1;
    let mut models: Vec<ModelEntry> = Vec::new();
    let sources = paths
        .iter()
        .map(|p| (p.clone(), None))
        .chain(a.kv_window.iter().map(|&w| (paths[0].clone(), Some(w))));
    for (path, window) in sources {
        for &weights in &a.weights {
            for &kv in &a.kv {
                models.push(ModelEntry {
                    path: path.clone(),
                    window,
                    weights,
                    show_weights,
                    kv,
                    show_kv,
                });
            }
        }
    }
    for t in &a.tasks {
        if !TASKS.contains(&t.as_str()) {
            bail!("unknown task {t:?} (available: {})", TASKS.join(", "));
        }
    }
    let has = |t: &str| a.tasks.iter().any(|x| x == t);
    let data = if a.data.is_empty() {
        vec![recurformer::repo_root().join("data/text/austen/persuasion.txt")]
    } else {
        a.data.clone()
    };
    // The perplexity texts: --data as one unnamed text, or each held-out domain by name.
    let texts: Vec<PplText> = match &a.domains {
        None => vec![PplText {
            domain: None,
            docs: load_documents(&data)?,
            paths: data.clone(),
        }],
        Some(names) => {
            let root = recurformer::formats::domains::text_root();
            let chosen = if names.is_empty() {
                recurformer::formats::domains::heldout_domains()
            } else {
                names
                    .iter()
                    .map(|n| recurformer::formats::domains::domain(n))
                    .collect::<Result<Vec<_>>>()?
            };
            let mut texts = Vec::new();
            for d in chosen {
                if d.heldout.is_empty() {
                    bail!("--domains: the {} domain holds no documents out", d.name);
                }
                let paths = d.heldout_paths(&root);
                let docs = load_documents(&paths).map_err(|e| {
                    anyhow::anyhow!("--domains: {} ({e:#}; run scripts/setup.sh)", d.name)
                })?;
                texts.push(PplText {
                    domain: Some(d.name),
                    docs,
                    paths,
                });
            }
            texts
        }
    };
    let task_contexts = if a.task_context.is_empty() {
        a.context.clone()
    } else {
        a.task_context.clone()
    };
    let needle_cfg = NeedleConfig {
        contexts: task_contexts.clone(),
        depths: a.depths.clone(),
        samples: a.samples,
        seed: a.seed,
        scoring: a.scoring,
        ..Default::default()
    };
    let hashhop_cfg = HashHopConfig {
        contexts: task_contexts.clone(),
        hops: a.hops.clone(),
        samples: a.hashhop_samples.unwrap_or(a.samples),
        seed: a.seed,
        scoring: a.scoring,
        ..Default::default()
    };
    let induction_cfg = InductionConfig {
        sequences: a.induction_sequences,
        span: a.induction_span,
        seed: a.seed,
        ..Default::default()
    };
    std::fs::create_dir_all(&a.out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", a.out.display()))?;

    // One progress bar over every model and task, counted in tokens processed (a perplexity window
    // or a needle / HashHop case of C tokens counts C), so its ETA weighs long contexts properly.
    // Window counts come from the first model's tokenizer and are corrected if another differs.
    let ppl_windows = |n_tokens: usize| -> Vec<usize> {
        a.context
            .iter()
            .map(|&c| (n_tokens / c).min(a.limit.unwrap_or(usize::MAX)))
            .collect()
    };
    let ppl_tokens =
        |w: &[usize]| -> u64 { w.iter().zip(&a.context).map(|(w, c)| (w * c) as u64).sum() };
    let per_case: u64 = task_contexts.iter().map(|&c| c as u64).sum();
    let task_tokens = (has("needle") as u64) * per_case * (a.depths.len() * a.samples) as u64
        + (has("hashhop") as u64) * per_case * (a.hops.len() * hashhop_cfg.samples) as u64
        + (has("induction") as u64)
            * (induction_cfg.sequences * induction_cfg.span * induction_cfg.repeats) as u64;
    let mut first = Some(recurformer::checkpoint::loader::load(&models[0].path)?);
    let window_plan = match &a.kv_window_plan {
        Some(p) => {
            let cfg = &first.as_ref().expect("loaded above").model.cfg;
            Some(recurformer::model::plan::Plan::load(p, cfg)?)
        }
        None => None,
    };
    // Windows per text and context length.
    let assumed_windows: Vec<Vec<usize>> = if has("perplexity") {
        let f = first.as_ref().expect("loaded above");
        texts
            .iter()
            .map(|t| {
                Ok(ppl_windows(
                    token_stream(&t.docs, f.tokenizer()?, None)?.len(),
                ))
            })
            .collect::<Result<_>>()?
    } else {
        vec![]
    };
    let assumed_tokens: u64 = assumed_windows.iter().map(|w| ppl_tokens(w)).sum();
    let total = models.len() as u64 * (assumed_tokens + task_tokens);
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {percent}% of {len} tokens, {elapsed_precise} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let mut results = Vec::new();
    for (mi, me) in models.iter().enumerate() {
        let path = &me.path;
        let mut loaded = match first.take() {
            Some(l) => l,
            None => recurformer::checkpoint::loader::load(path)?,
        };
        if let (Some(w), Some(plan)) = (me.window, window_plan.as_ref()) {
            loaded.model = loaded.model.with_kv_window(plan, a.kv_sinks, w)?;
        }
        crate::WeightArgs {
            weights: me.weights,
            kv: crate::KvArgs { kv: me.kv },
        }
        .apply(&mut loaded.model)?;
        let m = &loaded.model;
        let short = me.short();
        let mut entry = json!({"model": me.name()});
        if has("perplexity") {
            let mut per_domain = Vec::new();
            for (text, assumed) in texts.iter().zip(&assumed_windows) {
                let tokens = token_stream(&text.docs, loaded.tokenizer()?, None)?;
                let w = ppl_windows(tokens.len());
                if w != *assumed {
                    let (now, assumed) = (ppl_tokens(&w), ppl_tokens(assumed));
                    pb.set_length(pb.length().unwrap_or(0) + now - assumed.min(now));
                }
                let on = text.domain.map(|d| format!(" on {d}")).unwrap_or_default();
                let mut ppl = Vec::new();
                for &c in &a.context {
                    pb.set_message(format!(
                        "[{}/{}] {short}: perplexity{on} at {c}",
                        mi + 1,
                        models.len()
                    ));
                    let r = recurformer::eval::perplexity::perplexity(
                        m,
                        &tokens,
                        c,
                        a.limit,
                        &mut |n| pb.inc(n as u64),
                    )
                    .map_err(|e| match text.domain {
                        Some(_) => e.context(format!("perplexity{on} at {c}")),
                        None => e,
                    })?;
                    ppl.push(r);
                }
                match text.domain {
                    None => entry["perplexity"] = serde_json::to_value(&ppl)?,
                    Some(d) => per_domain
                        .push(json!({"domain": d, "perplexity": serde_json::to_value(&ppl)?})),
                }
            }
            if a.domains.is_some() {
                entry["perplexity_domains"] = Value::Array(per_domain);
            }
        }
        if has("needle") {
            pb.set_message(format!("[{}/{}] {short}: needle", mi + 1, models.len()));
            let r = recurformer::eval::tasks::run_needle(
                m,
                loaded.tokenizer()?,
                &needle_cfg,
                &mut |n| pb.inc(n as u64),
            )?;
            let png = a.out.join(format!("needle_{mi}.png"));
            recurformer::report::needle_heatmap(&r, &me.name(), &png)?;
            entry["needle"] = serde_json::to_value(&r)?;
            entry["needle_png"] = json!(png.file_name().map(|f| f.to_string_lossy()));
        }
        if has("hashhop") {
            pb.set_message(format!("[{}/{}] {short}: hashhop", mi + 1, models.len()));
            let r = recurformer::eval::tasks::run_hashhop(
                m,
                loaded.tokenizer()?,
                &hashhop_cfg,
                &mut |n| pb.inc(n as u64),
            )?;
            entry["hashhop"] = serde_json::to_value(&r)?;
        }
        if has("induction") {
            pb.set_message(format!("[{}/{}] {short}: induction", mi + 1, models.len()));
            let r = recurformer::eval::tasks::run_induction(
                m,
                loaded.tokenizer()?,
                &induction_cfg,
                &mut |n| pb.inc(n as u64),
            )?;
            entry["induction"] = serde_json::to_value(&r)?;
        }
        if has("cache") {
            let (kv_tok, state) = m.cache_bytes_per_token_and_state();
            let cache: Vec<Value> = a
                .context
                .iter()
                .map(|&c| json!({"context": c, "kv_dtype": me.kv.name(), "kv_bytes": kv_tok * c, "recurrent_bytes": state, "total_bytes": kv_tok * c + state}))
                .collect();
            entry["cache"] = Value::Array(cache);
        }
        results.push(entry);
    }
    pb.finish_and_clear();
    add_mcnemar(&mut results)?;
    let table = markdown(&results);
    print!("{table}");
    let mut json = json!({"data": data.iter().map(|d| shown_path(d)).collect::<Vec<_>>(),
        "limit": a.limit, "contexts": a.context, "task_contexts": task_contexts, "tasks": a.tasks,
        "scoring": a.scoring, "results": results});
    if a.domains.is_some() {
        // The held-out text of each domain instead of --data.
        json["data"] = Value::Array(vec![]);
        json["domains"] = texts
            .iter()
            .map(|t| {
                json!({"domain": t.domain, "heldout": t.paths.iter().map(|p| shown_path(p)).collect::<Vec<_>>(),
                    "documents": t.docs.len()})
            })
            .collect();
    }
    recurformer::formats::io::write_atomic(
        &a.out.join("eval.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    recurformer::formats::io::write_atomic(&a.out.join("eval.md"), table.as_bytes())?;
    eprintln!("wrote {}/eval.json and eval.md", a.out.display());
    Ok(())
}

/// One text that perplexity is measured on: --data, or a domain's held-out documents.
struct PplText {
    /// The domain's name; None for --data.
    domain: Option<&'static str>,
    docs: Vec<recurformer::formats::text::Document>,
    paths: Vec<PathBuf>,
}

/// Adds `mcnemar_vs_first` to the needle and HashHop results of every model after the first: the
/// exact McNemar test on the cases both ran (the same grid, so the same cases in the same order).
fn add_mcnemar(results: &mut [Value]) -> Result<()> {
    let outcomes = |r: &Value, task: &str| -> Option<Vec<bool>> {
        r[task]["cases"]
            .as_array()
            .map(|c| c.iter().map(|x| x["correct"] == json!(true)).collect())
    };
    for task in ["needle", "hashhop"] {
        let Some(first) = results.first().and_then(|r| outcomes(r, task)) else {
            continue;
        };
        for r in results.iter_mut().skip(1) {
            if let Some(other) = outcomes(r, task) {
                let m = recurformer::eval::stats::mcnemar(&first, &other)
                    .map_err(|e| anyhow::anyhow!("{task}: {e}"))?;
                r[task]["mcnemar_vs_first"] = serde_json::to_value(m)?;
            }
        }
    }
    Ok(())
}

/// "61.9% [52.4%, 70.6%]" for a `Proportion` in eval.json (one decimal: an induction probe's
/// interval over thousands of positions is narrower than a point).
pub(crate) fn fmt_rate(p: &Value) -> String {
    match (p["rate"].as_f64(), p["low"].as_f64(), p["high"].as_f64()) {
        (Some(r), Some(l), Some(h)) => {
            format!("{:.1}% [{:.1}%, {:.1}%]", 100.0 * r, 100.0 * l, 100.0 * h)
        }
        _ => "-".into(),
    }
}

/// "p = 0.039 (2 vs 10)" for a `McNemar` in eval.json: the p-value, then the cases only the first
/// model got right against those only this one got right.
pub(crate) fn fmt_mcnemar(m: &Value) -> String {
    match m["p_value"].as_f64() {
        Some(p) => format!(
            "p = {} ({} vs {})",
            if p < 0.001 {
                format!("{p:.1e}")
            } else {
                format!("{p:.3}")
            },
            m["reference_only"],
            m["other_only"]
        ),
        None => "-".into(),
    }
}

/// The retrieval summary table (needle, HashHop) and the induction table.
fn retrieval_markdown(results: &[Value]) -> String {
    let name = |r: &Value| r["model"].as_str().unwrap_or("").to_string();
    let mut md = String::new();
    let tasks: Vec<&str> = ["needle", "hashhop"]
        .into_iter()
        .filter(|t| results.iter().any(|r| r[*t]["summary"].is_object()))
        .collect();
    if !tasks.is_empty() {
        md.push_str(
            "Retrieval summary: exact match with its Wilson 95 % interval; per-digit accuracy \
             (answer tokens holding a digit or letter that were the argmax) and mean \
             log-probability of the answer tokens (teacher-forced scoring only); exact McNemar \
             test against the first model on the same cases (cases only the first got right vs \
             only this one)\n\n\
             | model | task | scoring | cases | exact match [95 % CI] | per-digit acc. | mean answer log-prob | McNemar vs first |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for task in tasks {
            for r in results.iter().filter(|r| r[task]["summary"].is_object()) {
                let s = &r[task]["summary"];
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    name(r),
                    task,
                    r[task]["scoring"].as_str().unwrap_or("-"),
                    s["exact_match"]["trials"],
                    fmt_rate(&s["exact_match"]),
                    fmt_opt(s["digit_accuracy"].as_f64(), |x| format!(
                        "{:.1}%",
                        100.0 * x
                    )),
                    fmt_opt(s["mean_answer_logprob"].as_f64(), |x| format!("{x:.3}")),
                    if r[task]["mcnemar_vs_first"].is_object() {
                        fmt_mcnemar(&r[task]["mcnemar_vs_first"])
                    } else {
                        "-".into()
                    }
                ));
            }
        }
        md.push('\n');
    }
    if let Some(i0) = results.iter().find_map(|r| r["induction"].as_object()) {
        let reps = i0["per_repeat"].as_array().map_or(0, Vec::len);
        md.push_str(&format!(
            "Induction probe: {} sequences of a span of {} random tokens (ids {}..={}) repeated {} \
             times; share of positions in repeats 2..{} whose argmax is the span's next token\n\n\
             | model |",
            i0["sequences"],
            i0["span"],
            i0["pool_first"],
            i0["pool_last"],
            i0["repeats"],
            i0["repeats"]
        ));
        for k in 0..reps {
            md.push_str(&format!(" repeat {} |", k + 2));
        }
        md.push_str(" overall [95 % CI] |\n|---|");
        md.push_str(&"---|".repeat(reps + 1));
        md.push('\n');
        for r in results.iter().filter(|r| r["induction"].is_object()) {
            let i = &r["induction"];
            md.push_str(&format!("| {} |", name(r)));
            for p in i["per_repeat"].as_array().into_iter().flatten() {
                md.push_str(&format!(
                    " {} |",
                    fmt_opt(p["rate"].as_f64(), |x| format!("{:.1}%", 100.0 * x))
                ));
            }
            md.push_str(&format!(" {} |\n", fmt_rate(&i["overall"])));
        }
        md.push('\n');
    }
    md
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// The Markdown tables of an eval.json `results` array: perplexity, cache, needle and HashHop,
/// each only when some model has it; ratios are against the first model.
pub(crate) fn markdown(results: &[Value]) -> String {
    let mut md = String::new();
    let name = |r: &Value| r["model"].as_str().unwrap_or("").to_string();
    let first = &results[0];
    if results.iter().any(|r| r["perplexity"].is_array()) {
        md.push_str(
            "| model | context | windows | ppl (all) | vs first | ppl (2nd half) | vs first |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for r in results {
            for (i, p) in r["perplexity"].as_array().into_iter().flatten().enumerate() {
                let f = &first["perplexity"][i];
                let ratio = |k: &str| match (p[k].as_f64(), f[k].as_f64()) {
                    (Some(x), Some(y)) if y > 0.0 => format!("{:.3}x", x / y),
                    _ => "-".into(),
                };
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    name(r),
                    p["context"],
                    p["windows"],
                    fmt_opt(p["ppl"].as_f64(), |x| format!("{x:.3}")),
                    ratio("ppl"),
                    fmt_opt(p["second_half_ppl"].as_f64(), |x| format!("{x:.3}")),
                    ratio("second_half_ppl"),
                ));
            }
        }
        md.push('\n');
    }
    md.push_str(&domain_markdown(results));
    if results.iter().any(|r| r["cache"].is_array()) {
        md.push_str(
            "| model | context | KV cache (type) | recurrent state (f32) | total | vs first |\n\
             |---|---|---|---|---|---|\n",
        );
        for r in results {
            for (i, c) in r["cache"].as_array().into_iter().flatten().enumerate() {
                let tot = c["total_bytes"].as_f64();
                md.push_str(&format!(
                    "| {} | {} | {} ({}) | {} | {} | {} |\n",
                    name(r),
                    c["context"],
                    fmt_opt(c["kv_bytes"].as_f64(), human_bytes),
                    c["kv_dtype"].as_str().unwrap_or("f32"),
                    fmt_opt(c["recurrent_bytes"].as_f64(), human_bytes),
                    fmt_opt(tot, human_bytes),
                    match (tot, first["cache"][i]["total_bytes"].as_f64()) {
                        (Some(x), Some(y)) if y > 0.0 => format!("{:.3}", x / y),
                        _ => "-".into(),
                    }
                ));
            }
        }
        md.push('\n');
    }
    // Needle: a row per model and context, a column per depth.
    if let Some(n0) = results.iter().find_map(|r| r["needle"].as_object()) {
        let depths: Vec<f64> = n0["depths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_f64())
            .collect();
        md.push_str("Needle in a haystack (exact match of the passkey; correct / cases per cell)\n\n| model | context |");
        for d in &depths {
            md.push_str(&format!(" depth {:.0}% |", 100.0 * d));
        }
        md.push_str(" overall |\n|---|---|");
        md.push_str(&"---|".repeat(depths.len() + 1));
        md.push('\n');
        for r in results.iter().filter(|r| r["needle"].is_object()) {
            let n = &r["needle"];
            for c in n["contexts"].as_array().into_iter().flatten() {
                let cells: Vec<&Value> = n["cells"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| x["context"] == *c)
                    .collect();
                md.push_str(&format!("| {} | {} |", name(r), c));
                let (mut ok, mut all) = (0, 0);
                for d in &depths {
                    match cells.iter().find(|x| x["depth"].as_f64() == Some(*d)) {
                        Some(x) => {
                            let (k, s) = (
                                x["correct"].as_u64().unwrap_or(0),
                                x["samples"].as_u64().unwrap_or(0),
                            );
                            ok += k;
                            all += s;
                            md.push_str(&format!(" {k}/{s} |"));
                        }
                        None => md.push_str(" - |"),
                    }
                }
                md.push_str(&format!(" {ok}/{all} |\n"));
            }
        }
        md.push_str(&overall(results, "needle"));
    }
    if let Some(h0) = results.iter().find_map(|r| r["hashhop"].as_object()) {
        let hops: Vec<u64> = h0["hops"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64())
            .collect();
        md.push_str("HashHop (exact match of the final hash; correct / cases per cell)\n\n| model | context |");
        for h in &hops {
            md.push_str(&format!(" {h} hop{} |", if *h == 1 { "" } else { "s" }));
        }
        md.push_str("\n|---|---|");
        md.push_str(&"---|".repeat(hops.len()));
        md.push('\n');
        for r in results.iter().filter(|r| r["hashhop"].is_object()) {
            let h = &r["hashhop"];
            for c in h["contexts"].as_array().into_iter().flatten() {
                md.push_str(&format!("| {} | {} |", name(r), c));
                for k in &hops {
                    let cell = h["cells"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|x| x["context"] == *c && x["hops"].as_u64() == Some(*k));
                    match cell {
                        Some(x) => md.push_str(&format!(" {}/{} |", x["correct"], x["samples"])),
                        None => md.push_str(" - |"),
                    }
                }
                md.push('\n');
            }
        }
        md.push_str(&overall(results, "hashhop"));
    }
    md.push_str(&retrieval_markdown(results));
    md
}

/// The per-domain perplexity table of `eval --domains` (empty without it): a row per domain and
/// context length, a column per model, each cell the perplexity over all positions and, after the
/// first model, its ratio to the first model's.
fn domain_markdown(results: &[Value]) -> String {
    let Some(first) = results.first() else {
        return String::new();
    };
    let Some(rows) = first["perplexity_domains"].as_array() else {
        return String::new();
    };
    let mut md = String::from(
        "Held-out perplexity per domain (all positions of each window; ratio to the first model)\n\n\
         | domain | context | windows |",
    );
    for r in results {
        md.push_str(&format!(" {} |", r["model"].as_str().unwrap_or("")));
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(results.len()));
    md.push('\n');
    // The cell of `r` for `domain` at the i-th context (looked up by name: every model runs the
    // same domains in the same order, but a lookup does not depend on it).
    let cell = |r: &Value, domain: &Value, i: usize| -> Value {
        r["perplexity_domains"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["domain"] == *domain)
            .map(|d| d["perplexity"][i].clone())
            .unwrap_or(Value::Null)
    };
    for row in rows {
        let domain = &row["domain"];
        for (i, p0) in row["perplexity"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            md.push_str(&format!(
                "| {} | {} | {} |",
                domain.as_str().unwrap_or("-"),
                p0["context"],
                p0["windows"]
            ));
            for (mi, r) in results.iter().enumerate() {
                let p = cell(r, domain, i);
                let mut c = fmt_opt(p["ppl"].as_f64(), |x| format!("{x:.3}"));
                if mi > 0 {
                    if let (Some(x), Some(y)) = (p["ppl"].as_f64(), p0["ppl"].as_f64()) {
                        if y > 0.0 {
                            c.push_str(&format!(" ({:.3}x)", x / y));
                        }
                    }
                }
                if p["windows"] != p0["windows"] && p.is_object() {
                    c.push_str(&format!(" [{} windows]", p["windows"]));
                }
                md.push_str(&format!(" {c} |"));
            }
            md.push('\n');
        }
    }
    md.push('\n');
    md
}

/// "\nOverall: a 60%, b 40%\n\n" for a task's accuracy over all its cases.
fn overall(results: &[Value], task: &str) -> String {
    let parts: Vec<String> = results
        .iter()
        .filter_map(|r| {
            Some(format!(
                "{} {:.0}%",
                r["model"].as_str()?,
                100.0 * r[task]["accuracy"].as_f64()?
            ))
        })
        .collect();
    format!("\nOverall: {}\n\n", parts.join(", "))
}
