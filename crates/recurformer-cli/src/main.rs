//! The `recurformer` binary: one subcommand per pipeline stage.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use recurformer::generate::{generate, GenerateRequest, Sampler, SamplingParams};
use recurformer::tokenizer::ChatMessage;
use std::io::{Read, Write};
use std::path::PathBuf;

mod plan_cmd;
mod train_cmd;

#[derive(Parser)]
#[command(
    name = "recurformer",
    version,
    about = "Convert Llama-family transformers into RecurFormers: \
recency-aware attention heads become Mamba mixers with a constant-size state."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by every subcommand that loads a model.
#[derive(Args, Clone)]
struct ModelArgs {
    /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a GGUF
    /// file. Defaults to the SmolLM2-135M-Instruct GGUF fetched by scripts/setup.sh.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// CPU threads for tensor ops (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    fn path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(recurformer::default_model_path)
    }
    fn apply_threads(&self) {
        if let Some(n) = self.threads {
            // candle sizes its rayon pool from this variable on first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's architecture, parameter count, heads and KV-cache bytes per token.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt (argument or stdin), streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Measure prefill and decode speed and peak memory at several context lengths, beside the
    /// PyTorch + transformers reference on the same weights and thread count.
    Bench(BenchArgs),
    #[command(hide = true)]
    BenchWorker(BenchWorkerArgs),
    /// Measure every attention head's recency score (attention mass on the last --window keys),
    /// sink mass, mean attention distance and output RMS on calibration text; writes recency.json
    /// and heatmap / distribution PNGs.
    Analyze(AnalyzeArgs),
    /// Choose the KV groups to convert to Mamba (whole groups), by recency threshold or by the
    /// fraction of groups to replace; writes plan.json and prints the predicted cache sizes.
    Plan(plan_cmd::PlanArgs),
    /// Compare two recency reports of one model (e.g. two calibration corpora): Spearman
    /// correlation of the scores and how the chosen groups change.
    RecencyDiff(plan_cmd::RecencyDiffArgs),
    /// Convert a base model into a RecurFormer checkpoint following a plan: replaced KV groups lose
    /// their q/k/v rows and gain a Mamba mixer (initialised from those rows, or randomly).
    Convert(ConvertArgs),
    /// Train a converted RecurFormer: layer-local alignment of the mixers, then distillation from
    /// the base model.
    Train(train_cmd::TrainArgs),
    /// Evaluate one or more models on the same inputs and print one table (also written as JSON
    /// and Markdown): held-out perplexity per context length, and cache bytes.
    Eval(EvalArgs),
}

#[derive(Args)]
struct EvalArgs {
    /// Models to compare (the first is the reference for ratios); repeat the flag. Defaults to
    /// the default model.
    #[arg(long = "model", short = 'm')]
    models: Vec<PathBuf>,
    /// CPU threads for tensor ops (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Tasks, comma-separated: perplexity, cache, needle, hashhop.
    #[arg(long, value_delimiter = ',', default_value = "perplexity,cache")]
    tasks: Vec<String>,
    /// Context lengths for needle and hashhop (default: the --context lengths).
    #[arg(long, num_args = 1..)]
    task_context: Vec<usize>,
    /// Needle depths in [0, 1].
    #[arg(long, num_args = 1.., default_values_t = [0.0, 0.25, 0.5, 0.75, 1.0])]
    depths: Vec<f64>,
    /// HashHop hop counts.
    #[arg(long, num_args = 1.., default_values_t = [1usize, 2])]
    hops: Vec<usize>,
    /// Cases per needle / hashhop cell.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Seed of the needle values, haystack offsets and hashes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Context lengths for perplexity and cache.
    #[arg(long, num_args = 1.., default_values_t = [512usize, 2048, 4096, 8192])]
    context: Vec<usize>,
    /// Held-out text for perplexity (default: Persuasion, held out from calibration and training).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// At most this many windows per context length (a quick run); all windows by default.
    #[arg(long)]
    limit: Option<usize>,
    /// Directory for eval.json and eval.md.
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// plan.json from `recurformer plan`.
    #[arg(long)]
    plan: PathBuf,
    /// recency.json from `recurformer analyze` (decay and output scale of the attention init);
    /// defaults to the report the plan was made from.
    #[arg(long)]
    recency: Option<PathBuf>,
    /// Mixer initialisation: `attention` (from the replaced heads' W_q/W_k/W_v) or `random`.
    #[arg(long, default_value = "attention")]
    init: String,
    /// Seed for random initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct AnalyzeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration text: plain-text or JSONL ("text" field) files, or directories of them.
    /// Defaults to the Austen novels without Persuasion (held out for evaluation).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Number of calibration sequences.
    #[arg(long, default_value_t = 16)]
    sequences: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    /// Recency window w: attention mass on the w most recent keys (the query's own included).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Seed for drawing the calibration windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output report. The heatmap and the per-layer distribution are written beside it
    /// (`<out stem>.png`, `<out stem>_distribution.png`).
    #[arg(long, default_value = "recency.json")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Models to measure (the first is the reference for ratios); repeat the flag. Defaults to
    /// the default model. Each runs in its own child process, so peak memory is its own.
    #[arg(long = "model", short = 'm')]
    models: Vec<PathBuf>,
    /// CPU threads for tensor ops (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Context lengths (tokens of prompt before decoding), run in this order.
    #[arg(long, num_args = 1.., default_values_t = [512usize, 2048, 8192])]
    contexts: Vec<usize>,
    /// Decode steps timed after each prefill; the median is reported.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Text the contexts are cut from (repeated when too short).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Reference engine run in the same command on the first model (a GGUF file): `pytorch`
    /// (reference/.venv, see reference/setup_venv.sh), `llama-cpp`, or `none`.
    #[arg(long, default_value = "pytorch")]
    reference: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Grow one cache through the contexts instead of prefilling each from scratch (much faster
    /// at long contexts; prefill tok/s is then per segment). Decode figures are unaffected.
    #[arg(long)]
    incremental: bool,
}

/// One model's measurements, run by `bench` in a child process (prints JSON).
#[derive(Args)]
struct BenchWorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, num_args = 1..)]
    contexts: Vec<usize>,
    #[arg(long)]
    decode_steps: usize,
    #[arg(long)]
    text: PathBuf,
    #[arg(long)]
    incremental: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt; read from stdin when absent.
    prompt: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    #[arg(long)]
    top_p: Option<f64>,
    /// Penalise tokens already in the text (1.0 = off, 1.1 is a common setting).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Do not add the BOS token the tokenizer asks for.
    #[arg(long)]
    no_bos: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model, json } => info(&model, json),
        Command::Generate(args) => generate_cmd(args),
        Command::Bench(args) => bench_cmd(args),
        Command::BenchWorker(args) => bench_worker(args),
        Command::Analyze(args) => analyze_cmd(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::RecencyDiff(args) => plan_cmd::recency_diff(args),
        Command::Convert(args) => convert_cmd(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Eval(args) => eval_cmd(args),
    }
}

/// Bytes in binary units; the library's formatter, taking the f64 figures JSON hands us.
pub(crate) fn human_bytes(b: f64) -> String {
    recurformer::plan::human_bytes(b.max(0.0) as usize)
}

fn info(args: &ModelArgs, json: bool) -> Result<()> {
    args.apply_threads();
    let path = args.path();
    let loaded = recurformer::loader::load(&path)?;
    let m = &loaded.model;
    let c = &m.cfg;
    let (per_tok, state_bytes) = recurformer::hybrid::cache_bytes_per_token_and_state(m);
    let v = serde_json::json!({
        "path": path.display().to_string(),
        "format": format!("{:?}", loaded.format),
        "architecture": c.architecture.name(),
        "parameters": m.num_parameters(),
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "query_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "kv_cache_bytes_per_token_f32": per_tok,
        "recurrent_state_bytes": state_bytes,
        "base_kv_cache_bytes_per_token_f32": c.kv_bytes_per_token(),
        "recurformer": m.recurformer.as_ref().map(|s| serde_json::json!({
            "replaced_groups": s.plan.replaced_groups(),
            "kept_groups": s.plan.kept_groups(),
            "init": s.init,
            "base_model": s.provenance.base_model,
        })),
        "chat_template": loaded.tokenizer.as_ref().map(|t| t.chat_template.is_some()),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model            {}", path.display());
    println!("format           {:?}", loaded.format);
    println!("architecture     {}", c.architecture.name());
    println!(
        "parameters       {} ({:.1} M)",
        m.num_parameters(),
        m.num_parameters() as f64 / 1e6
    );
    println!("layers           {}", c.num_hidden_layers);
    println!(
        "hidden / mlp     {} / {}",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads            {} query, {} KV (groups of {}), head_dim {}",
        c.num_attention_heads,
        c.num_key_value_heads,
        c.group_size(),
        c.head_dim
    );
    println!("vocabulary       {}", c.vocab_size);
    println!(
        "context          {} positions, rope theta {}, scaling {:?}",
        c.max_position_embeddings, c.rope_theta, c.rope_scaling
    );
    println!(
        "embeddings       {}",
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    );
    if let Some(s) = &m.recurformer {
        println!(
            "RecurFormer      {} of {} KV groups replaced by Mamba mixers ({} init), base {}",
            s.plan.replaced_groups(),
            s.plan.kept_groups() + s.plan.replaced_groups(),
            match s.init {
                recurformer::hybrid::Init::Attention => "attention",
                recurformer::hybrid::Init::Random => "random",
            },
            s.provenance.base_model
        );
    }
    println!(
        "KV cache (f32)   {} per token (base model: {})",
        human_bytes(per_tok as f64),
        human_bytes(c.kv_bytes_per_token() as f64)
    );
    println!(
        "recurrent state  {} per sequence, constant",
        human_bytes(state_bytes as f64)
    );
    for n in [1024usize, 8192, 32768, 131072] {
        let total = per_tok * n + state_bytes;
        println!(
            "  at {:>6} tok  {} ({:.3} of the base model's KV cache)",
            n,
            human_bytes(total as f64),
            total as f64 / (c.kv_bytes_per_token() * n) as f64
        );
    }
    Ok(())
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    a.model.apply_threads();
    let path = a.model.path();
    let loaded = recurformer::loader::load(&path)?;
    let tok = loaded.tokenizer()?;
    let prompt = match a.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    let (text, add_special) = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt,
        });
        // The template writes any BOS itself.
        (tok.apply_chat_template(&messages, true)?, false)
    } else {
        (prompt, !a.no_bos)
    };
    let ids = tok.encode(&text, add_special)?;
    let mut eos = loaded.model.cfg.eos_token_ids.clone();
    if a.chat {
        // Chat models end a turn with the template's end-of-turn token even when EOS differs.
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = tok.token_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
    }
    let mut sampler = Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    })?;
    let mut stream = tok.inner.decode_stream(true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut on_token = |t: u32| -> Result<()> {
        if let Some(piece) = stream
            .step(t)
            .map_err(|e| anyhow::anyhow!("decoding token {t}: {e}"))?
        {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    };
    let (_ids, stats) = generate(
        &loaded.model,
        &GenerateRequest {
            prompt: &ids,
            max_tokens: a.max_tokens,
            eos: &eos,
        },
        &mut sampler,
        &mut on_token,
    )?;
    drop(on_token);
    println!();
    eprintln!(
        "[prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.1} tok/s | cache {} (KV {}, recurrent {}){}]",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated_tokens,
        stats.decode_tok_s(),
        human_bytes(stats.cache.total() as f64),
        human_bytes(stats.cache.kv as f64),
        human_bytes(stats.cache.recurrent as f64),
        if stats.stopped_at_eos { ", stopped at EOS" } else { "" }
    );
    Ok(())
}

fn bench_worker(a: BenchWorkerArgs) -> Result<()> {
    use recurformer::bench::{bench_point, tokens_at_least};
    a.model.apply_threads();
    let loaded = recurformer::loader::load(&a.model.path())?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let max_ctx = a.contexts.iter().copied().max().unwrap_or(0);
    let ids = tokens_at_least(&loaded.tokenizer()?.encode(&text, false)?, max_ctx)?;
    // Warm-up: first-touch allocations and thread-pool start are not part of any figure.
    bench_point(&loaded.model, &ids, 16.min(max_ctx), 2)?;
    let points_all = if a.incremental {
        recurformer::bench::bench_series(&loaded.model, &ids, &a.contexts, a.decode_steps)?
    } else {
        a.contexts
            .iter()
            .map(|&c| bench_point(&loaded.model, &ids, c, a.decode_steps))
            .collect::<Result<Vec<_>>>()?
    };
    let mut points = Vec::new();
    for (&c, p) in a.contexts.iter().zip(points_all) {
        eprintln!(
            "  {} ctx {c}: prefill {:.1} tok/s, decode {:.2} tok/s, cache {}, peak RSS {}",
            a.model.path().display(),
            p.prefill_tok_s,
            p.decode_tok_s,
            human_bytes(p.cache_bytes as f64),
            human_bytes(p.peak_rss_bytes as f64)
        );
        points.push(p);
    }
    println!("{}", serde_json::to_string(&points)?);
    Ok(())
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    use recurformer::bench::BenchPoint;
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let models = if a.models.is_empty() {
        vec![recurformer::default_model_path()]
    } else {
        a.models.clone()
    };
    let text_path = a
        .text
        .clone()
        .unwrap_or_else(|| recurformer::repo_root().join("data/text/austen/emma.txt"));
    let exe = std::env::current_exe().context("locating the recurformer binary")?;
    let mut ours: Vec<Vec<BenchPoint>> = Vec::new();
    for m in &models {
        eprintln!("measuring {} ...", m.display());
        let out = std::process::Command::new(&exe)
            .arg("bench-worker")
            .arg("--model")
            .arg(m)
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--decode-steps")
            .arg(a.decode_steps.to_string())
            .arg("--text")
            .arg(&text_path)
            .args(if a.incremental {
                vec!["--incremental"]
            } else {
                vec![]
            })
            .arg("--contexts")
            .args(a.contexts.iter().map(|c| c.to_string()))
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the benchmark worker")?;
        if !out.status.success() {
            anyhow::bail!("benchmark of {} failed with {}", m.display(), out.status);
        }
        ours.push(serde_json::from_slice(&out.stdout).context("parsing the worker's output")?);
    }
    let first_is_gguf = models[0].extension().and_then(|e| e.to_str()) == Some("gguf");
    let reference: Option<serde_json::Value> = match a.reference.as_str() {
        "none" => None,
        _ if !first_is_gguf => {
            eprintln!("reference skipped: it loads a GGUF file and the first model is not one");
            None
        }
        engine @ ("pytorch" | "llama-cpp") => {
            let root = recurformer::repo_root();
            let py = root.join("reference/.venv/bin/python");
            if !py.exists() {
                eprintln!(
                    "reference skipped: {} is missing (run reference/setup_venv.sh)",
                    py.display()
                );
                None
            } else {
                eprintln!("reference ({engine}): running reference/bench_torch.py ...");
                let mut cmd = std::process::Command::new(&py);
                cmd.arg(root.join("reference/bench_torch.py"))
                    .arg("--gguf")
                    .arg(&models[0])
                    .arg("--decode-steps")
                    .arg(a.decode_steps.to_string())
                    .arg("--threads")
                    .arg(threads.to_string())
                    .arg("--text")
                    .arg(&text_path)
                    .arg("--contexts")
                    .args(a.contexts.iter().map(|c| c.to_string()));
                if engine == "llama-cpp" {
                    cmd.arg("--engine").arg("llama_cpp");
                }
                let out = cmd
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .context("running the reference benchmark")?;
                if !out.status.success() {
                    anyhow::bail!("reference benchmark failed with {}", out.status);
                }
                Some(
                    serde_json::from_slice(&out.stdout)
                        .context("parsing the reference's JSON output")?,
                )
            }
        }
        other => anyhow::bail!("--reference {other:?}: expected pytorch, llama-cpp or none"),
    };
    println!(
        "{} threads, {} decode steps (median); ratios against the first model",
        threads, a.decode_steps
    );
    println!(
        "{:>7} {:<44} {:>10} {:>10} {:>7} {:>11} {:>7} {:>10}",
        "context", "model", "prefill/s", "decode/s", "ratio", "cache", "ratio", "peak RSS"
    );
    for (ci, &c) in a.contexts.iter().enumerate() {
        let base = &ours[0][ci];
        for (m, pts) in models.iter().zip(&ours) {
            let p = &pts[ci];
            let name = m.display().to_string();
            let name = if name.len() > 44 {
                format!("...{}", &name[name.len() - 41..])
            } else {
                name
            };
            println!(
                "{:>7} {:<44} {:>10.1} {:>10.2} {:>6.2}x {:>11} {:>6.3}x {:>10}",
                c,
                name,
                p.prefill_tok_s,
                p.decode_tok_s,
                p.decode_tok_s / base.decode_tok_s,
                human_bytes(p.cache_bytes as f64),
                p.cache_bytes as f64 / base.cache_bytes as f64,
                human_bytes(p.peak_rss_bytes as f64)
            );
        }
        let r = reference.as_ref().and_then(|r| {
            r["results"]
                .as_array()?
                .iter()
                .find(|x| x["context"].as_u64() == Some(c as u64))
                .cloned()
        });
        if let Some(r) = r {
            let eng = reference
                .as_ref()
                .and_then(|x| x["engine"].as_str())
                .unwrap_or("reference");
            let (pf, dc) = (
                r["prefill_tok_s"].as_f64().unwrap_or(f64::NAN),
                r["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "{:>7} {:<44} {:>10.1} {:>10.2} {:>6.2}x {:>11} {:>7} {:>10}",
                c,
                format!("{eng} (first model, f32)"),
                pf,
                dc,
                dc / base.decode_tok_s,
                "-",
                "",
                r["peak_rss_bytes"]
                    .as_f64()
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "{:>7} first model vs {eng}: prefill {:.2}x, decode {:.2}x",
                "",
                base.prefill_tok_s / pf,
                base.decode_tok_s / dc
            );
        }
    }
    if let Some(j) = a.json {
        let v = serde_json::json!({"models": models.iter().map(|m| m.display().to_string()).collect::<Vec<_>>(),
            "threads": threads, "decode_steps": a.decode_steps, "contexts": a.contexts,
            "recurformer": ours, "reference": reference});
        recurformer::io::write_atomic(&j, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}

fn default_calibration_files() -> Vec<PathBuf> {
    let dir = recurformer::repo_root().join("data/text/austen");
    [
        "sense_and_sensibility",
        "pride_and_prejudice",
        "mansfield_park",
        "emma",
        "northanger_abbey",
    ]
    .iter()
    .map(|n| dir.join(format!("{n}.txt")))
    .collect()
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn analyze_cmd(a: AnalyzeArgs) -> Result<()> {
    use recurformer::data::{load_documents, sample_windows, token_stream};
    a.model.apply_threads();
    let path = a.model.path();
    let loaded = recurformer::loader::load(&path)?;
    let files = if a.data.is_empty() {
        default_calibration_files()
    } else {
        a.data.clone()
    };
    let docs = load_documents(&files)?;
    let eos = loaded.model.cfg.eos_token_ids.first().copied();
    let stream = token_stream(&docs, loaded.tokenizer()?, eos)?;
    let seqs = sample_windows(&stream, a.sequences, a.seq_len, a.seed)?;
    eprintln!(
        "analyze: {} documents, {} tokens; {} windows of {} tokens (seed {}), window w = {}",
        docs.len(),
        stream.len(),
        seqs.len(),
        a.seq_len,
        a.seed,
        a.window
    );
    let pb = progress_bar(seqs.len() as u64, "sequences");
    let calibration = recurformer::recency::Calibration {
        data: files.iter().map(|f| f.display().to_string()).collect(),
        sequences: a.sequences,
        seq_len: a.seq_len,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let report = recurformer::analyze::analyze(
        &loaded.model,
        &seqs,
        a.window,
        calibration,
        &path.display().to_string(),
        &mut |n| pb.set_position(n as u64),
    )?;
    pb.finish_and_clear();
    recurformer::io::write_atomic(&a.out, serde_json::to_string_pretty(&report)?.as_bytes())?;
    eprintln!(
        "analyze: {:.1} s, peak RSS {}",
        t0.elapsed().as_secs_f64(),
        human_bytes(recurformer::bench::peak_rss_bytes() as f64)
    );
    let heat = a.out.with_extension("png");
    let stem = a
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "recency".into());
    let dist = a.out.with_file_name(format!("{stem}_distribution.png"));
    recurformer::plot::recency_heatmap(&report, &heat)?;
    recurformer::plot::recency_distribution(&report, &dist)?;
    println!(
        "wrote {}, {}, {}",
        a.out.display(),
        heat.display(),
        dist.display()
    );
    // Most and least recency-aware groups, so the terminal shows the gist.
    let mut groups = report.group_scores();
    groups.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
    let show = |g: &[(usize, usize, f64)]| {
        g.iter()
            .map(|(l, k, s)| format!("L{l}G{k}={s:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "most recency-aware KV groups:  {}",
        show(&groups[..groups.len().min(8)])
    );
    println!(
        "least recency-aware KV groups: {}",
        show(&groups[groups.len().saturating_sub(8)..])
    );
    Ok(())
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    use recurformer::hybrid::{convert, save_checkpoint, ConvertOptions, Init, Provenance};
    a.model.apply_threads();
    let path = a.model.path();
    let loaded = recurformer::loader::load(&path)?;
    let plan = recurformer::plan::Plan::load(&a.plan, &loaded.model.cfg)?;
    let recency_path = a
        .recency
        .clone()
        .or_else(|| plan.rule.recency_file.as_ref().map(PathBuf::from));
    let recency = match &recency_path {
        Some(p) => Some(recurformer::recency::RecencyReport::load(p)?),
        None => None,
    };
    let init = match a.init.as_str() {
        "attention" => Init::Attention,
        "random" => Init::Random,
        other => anyhow::bail!("--init {other:?}: expected attention or random"),
    };
    let provenance = Provenance {
        base_model: path.display().to_string(),
        recency: recency_path.map(|p| p.display().to_string()),
        plan_file: Some(a.plan.display().to_string()),
        seed: a.seed,
        recurformer_version: env!("CARGO_PKG_VERSION").to_string(),
        training: vec![],
    };
    let hybrid = convert(
        &loaded.model,
        &ConvertOptions {
            plan: &plan,
            recency: recency.as_ref(),
            init,
            seed: a.seed,
            provenance,
        },
    )?;
    save_checkpoint(&hybrid, loaded.tokenizer.as_ref(), &a.out)?;
    let (kv, state) = recurformer::hybrid::cache_bytes_per_token_and_state(&hybrid);
    println!(
        "wrote {}: {} of {} KV groups replaced, KV {} per token (base {}), recurrent state {}",
        a.out.display(),
        plan.replaced_groups(),
        plan.kept_groups() + plan.replaced_groups(),
        human_bytes(kv as f64),
        human_bytes(loaded.model.cfg.kv_bytes_per_token() as f64),
        human_bytes(state as f64)
    );
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    use recurformer::data::{load_documents, token_stream};
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let models = if a.models.is_empty() {
        vec![recurformer::default_model_path()]
    } else {
        a.models.clone()
    };
    for t in &a.tasks {
        if !matches!(t.as_str(), "perplexity" | "cache" | "needle" | "hashhop") {
            anyhow::bail!("unknown task {t:?} (available: perplexity, cache, needle, hashhop)");
        }
    }
    let data = if a.data.is_empty() {
        vec![recurformer::repo_root().join("data/text/austen/persuasion.txt")]
    } else {
        a.data.clone()
    };
    let docs = load_documents(&data)?;
    let mut results = Vec::new();
    let mut table = String::new();
    let mut task_lines: Vec<String> = Vec::new();
    let ppl_task = a.tasks.iter().any(|t| t == "perplexity");
    let cache_task = a.tasks.iter().any(|t| t == "cache");
    for path in &models {
        let loaded = recurformer::loader::load(path)?;
        let m = &loaded.model;
        let (kv_tok, state) = recurformer::hybrid::cache_bytes_per_token_and_state(m);
        let mut entry = serde_json::json!({"model": path.display().to_string()});
        if ppl_task {
            let tokens = token_stream(&docs, loaded.tokenizer()?, None)?;
            let mut ppl = Vec::new();
            for &c in &a.context {
                let n = (tokens.len() / c).min(a.limit.unwrap_or(usize::MAX)) as u64;
                let pb = progress_bar(
                    n,
                    &format!(
                        "{} ctx {c}",
                        path.file_name()
                            .map(|f| f.to_string_lossy().to_string())
                            .unwrap_or_default()
                    ),
                );
                let r = recurformer::eval::perplexity(m, &tokens, c, a.limit, &mut || pb.inc(1))?;
                pb.finish_and_clear();
                ppl.push(r);
            }
            entry["perplexity"] = serde_json::to_value(&ppl)?;
        }
        let task_contexts = if a.task_context.is_empty() {
            a.context.clone()
        } else {
            a.task_context.clone()
        };
        let short = path
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        if a.tasks.iter().any(|t| t == "needle") {
            let cfg = recurformer::tasks::NeedleConfig {
                contexts: task_contexts.clone(),
                depths: a.depths.clone(),
                samples: a.samples,
                seed: a.seed,
                ..Default::default()
            };
            let pb = progress_bar(cfg.cases() as u64, &format!("{short} needle"));
            let r =
                recurformer::tasks::run_needle(m, loaded.tokenizer()?, &cfg, &mut || pb.inc(1))?;
            pb.finish_and_clear();
            let png = a.out.join(format!("needle_{}.png", results.len()));
            recurformer::plot::needle_heatmap(&r, &path.display().to_string(), &png)?;
            task_lines.push(format!(
                "needle   {}: accuracy {:.3} ({})",
                path.display(),
                r.accuracy,
                png.display()
            ));
            entry["needle"] = serde_json::to_value(&r)?;
        }
        if a.tasks.iter().any(|t| t == "hashhop") {
            let cfg = recurformer::tasks::HashHopConfig {
                contexts: task_contexts.clone(),
                hops: a.hops.clone(),
                samples: a.samples,
                seed: a.seed,
                ..Default::default()
            };
            let pb = progress_bar(cfg.cases() as u64, &format!("{short} hashhop"));
            let r =
                recurformer::tasks::run_hashhop(m, loaded.tokenizer()?, &cfg, &mut || pb.inc(1))?;
            pb.finish_and_clear();
            let cells: Vec<String> = r
                .cells
                .iter()
                .map(|c| format!("{}t/{}hop {}/{}", c.context, c.hops, c.correct, c.samples))
                .collect();
            task_lines.push(format!(
                "hashhop  {}: accuracy {:.3} [{}]",
                path.display(),
                r.accuracy,
                cells.join(", ")
            ));
            entry["hashhop"] = serde_json::to_value(&r)?;
        }
        if cache_task {
            let cache: Vec<serde_json::Value> = a
                .context
                .iter()
                .map(|&c| serde_json::json!({"context": c, "kv_bytes": kv_tok * c, "recurrent_bytes": state, "total_bytes": kv_tok * c + state}))
                .collect();
            entry["cache"] = serde_json::Value::Array(cache);
        }
        results.push(entry);
    }
    // One table: a row per model and context.
    if ppl_task || cache_task {
        table.push_str("| model | context | ppl (all) | ppl (2nd half) | cache bytes | cache vs first |\n|---|---|---|---|---|---|\n");
    }
    let first_cache: Vec<f64> = results[0]["cache"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|x| x["total_bytes"].as_f64().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    for r in results.iter().filter(|_| ppl_task || cache_task) {
        for (i, &c) in a.context.iter().enumerate() {
            let p = &r["perplexity"][i];
            let cb = r["cache"][i]["total_bytes"].as_f64();
            table.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r["model"].as_str().unwrap_or(""),
                c,
                p["ppl"]
                    .as_f64()
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "-".into()),
                p["second_half_ppl"]
                    .as_f64()
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(|| "-".into()),
                cb.map(human_bytes).unwrap_or_else(|| "-".into()),
                match (cb, first_cache.get(i)) {
                    (Some(x), Some(f)) if *f > 0.0 => format!("{:.3}", x / f),
                    _ => "-".into(),
                }
            ));
        }
    }
    for l in &task_lines {
        table.push_str(&format!("\n{l}\n"));
    }
    print!("{table}");
    let json = serde_json::json!({"data": data.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "limit": a.limit, "contexts": a.context, "tasks": a.tasks, "results": results});
    recurformer::io::write_atomic(
        &a.out.join("eval.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    recurformer::io::write_atomic(&a.out.join("eval.md"), table.as_bytes())?;
    eprintln!("wrote {}/eval.json and eval.md", a.out.display());
    Ok(())
}
