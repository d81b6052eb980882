//! The `recurformer` binary: one subcommand per pipeline stage.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use recurformer::formats::io::shown_path;
use recurformer::formats::tokenizer::ChatMessage;
use recurformer::model::generate::{
    end_tokens, generate, GenerateRequest, Sampler, SamplingParams,
};
use std::io::{Read, Write};
use std::path::PathBuf;

mod bench_cmd;
mod demo_cmd;
mod eval_cmd;
mod plan_cmd;
mod serve;
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

/// The thread count, shared by every subcommand that runs tensor ops.
#[derive(Args, Clone, Copy, Debug, Default)]
pub(crate) struct ThreadArgs {
    /// CPU threads for tensor ops (default: all cores). Bit-exact `train --resume` needs the
    /// count the run started with.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ThreadArgs {
    /// Sets the thread count for this process; call before the first tensor op.
    pub(crate) fn apply(&self) {
        if let Some(n) = self.threads {
            // candle sizes its rayon pool from this variable on first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}

/// Options shared by every subcommand that loads one model.
#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a GGUF
    /// file. Defaults to the SmolLM2-135M-Instruct GGUF fetched by scripts/setup.sh.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    #[command(flatten)]
    threads: ThreadArgs,
}

impl ModelArgs {
    pub(crate) fn path(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(recurformer::default_model_path)
    }
    pub(crate) fn apply_threads(&self) {
        self.threads.apply()
    }
}

/// The precision of an inference run: weight format (`model::quant`) and KV-cache element type
/// (`model::cache::KvDtype`).
#[derive(Args, Clone, Debug)]
pub(crate) struct WeightArgs {
    /// Weights of the linear layers and the LM head at inference: `f32`, or a GGML block format
    /// made on load (`q8_0`, `q4_0`, `q4_k`, `q5_k`, `q6_k`); a layer whose input size is not a
    /// multiple of the format's block stays f32. Speed and perplexity of each: BENCHMARKS.md.
    #[arg(long, default_value = "f32", value_parser = parse_weights)]
    pub(crate) weights: recurformer::model::quant::WeightFormat,
    #[command(flatten)]
    pub(crate) kv: KvArgs,
}

/// The KV-cache element type of a run (`model::cache::KvDtype`).
#[derive(Args, Clone, Copy, Debug)]
pub(crate) struct KvArgs {
    /// Element type of the KV cache of the kept attention heads: `f16` (half the bytes; keys and
    /// values rounded once when cached, attention still sums in f32) or `f32`. The mixers'
    /// conv / SSM state and the windowed heads' bounded cache stay f32. Perplexity and speed of
    /// each: BENCHMARKS.md.
    #[arg(long, default_value = DEFAULT_KV, value_parser = parse_kv)]
    pub(crate) kv: recurformer::model::cache::KvDtype,
}

/// The default `--kv`, chosen by measurement (BENCHMARKS.md, "An f16 KV cache").
pub(crate) const DEFAULT_KV: &str = "f16";

pub(crate) fn parse_kv(s: &str) -> Result<recurformer::model::cache::KvDtype, String> {
    recurformer::model::cache::KvDtype::parse(s).map_err(|e| e.to_string())
}

impl KvArgs {
    pub(crate) fn apply(&self, model: &mut recurformer::model::llama::Model) {
        model.set_kv_dtype(self.kv);
    }
}

pub(crate) fn parse_weights(s: &str) -> Result<recurformer::model::quant::WeightFormat, String> {
    recurformer::model::quant::WeightFormat::parse(s).map_err(|e| e.to_string())
}

impl WeightArgs {
    /// Quantises `model` as asked, saying what it did on stderr, and sets its KV-cache type. The
    /// commands that take these options only run inference, so the f32 copies of quantised
    /// weights are freed layer by layer as they are quantised (`Model::quantize_for_inference`):
    /// memory then never holds both copies of the whole model. For a model read from a file,
    /// [`WeightArgs::load`] does better (the f32 weights never coexist at all).
    pub(crate) fn apply(&self, model: &mut recurformer::model::llama::Model) -> Result<()> {
        self.kv.apply(model);
        let (s, freed) = model.quantize_for_inference(self.weights)?;
        self.report(&s, freed);
        Ok(())
    }

    /// Loads the model at `path` for inference in these settings: each layer is quantised as it
    /// is read and its f32 copy freed (`loader::load_quantized`), so that the load is not the
    /// peak of memory; says what it did on stderr and sets the KV-cache type.
    pub(crate) fn load(
        &self,
        path: &std::path::Path,
    ) -> Result<recurformer::checkpoint::loader::LoadedModel> {
        let (mut loaded, s) = recurformer::checkpoint::loader::load_quantized(path, self.weights)?;
        self.kv.apply(&mut loaded.model);
        self.report(&s, s.freed);
        Ok(loaded)
    }

    fn report(&self, s: &recurformer::model::quant::QuantSummary, freed: usize) {
        if s.quantized > 0 || !s.kept_f32.is_empty() {
            eprintln!(
                "weights: {} matrices in {} ({} of matmul weights read per token, {} in f32; \
                 {} of f32 copies freed){}",
                s.quantized,
                self.weights,
                human_bytes(s.bytes_after as f64),
                human_bytes(s.bytes_f32 as f64),
                human_bytes(freed as f64),
                if s.kept_f32.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} left in f32 (input size not a multiple of the block): {}",
                        s.kept_f32.len(),
                        s.kept_f32.join(", ")
                    )
                }
            );
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's architecture, parameter count, heads and KV-cache bytes per token.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        kv: KvArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt (argument or stdin), streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streamed or
    /// not): concurrent sequences decoded as one batch, a bounded queue, a cache-memory budget.
    Serve(serve::ServeArgs),
    /// Measure time to first token, decode speed (beside its physical limit: bytes read per
    /// token over the measured memory bandwidth), cache bytes and peak memory at several context
    /// lengths for one or more models (ratios against the first), beside the PyTorch +
    /// transformers reference on the same weights and thread count; tables, JSON and plots.
    Bench(bench_cmd::BenchArgs),
    #[command(hide = true)]
    BenchWorker(bench_cmd::BenchWorkerArgs),
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
    /// and Markdown): held-out perplexity per context length, cache bytes, needle-in-a-haystack
    /// and HashHop retrieval.
    Eval(eval_cmd::EvalArgs),
    /// The whole pipeline on the default model in one command: analyze -> plan (50 % of KV
    /// groups) -> convert -> train (short budget) -> eval and bench against the base model,
    /// writing a report directory (REPORT.md + plots). A second run reuses finished stages.
    Demo(demo_cmd::DemoArgs),
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
    /// Keep the replaced heads as attention over the sinks plus this many recent keys beside each
    /// mixer (a bounded cache); the mixer starts silent and learns what lies beyond the window.
    /// Off by default (the mixer alone replaces the heads).
    #[arg(long)]
    local_window: Option<usize>,
    /// Sink tokens the windowed heads keep seeing (with --local-window).
    #[arg(long, default_value_t = 4, requires = "local_window")]
    local_sinks: usize,
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
    /// (`<out stem>.png`, `<out stem>_distribution.png`), and one heatmap per head probe
    /// (`<out stem>_<probe>.png`).
    #[arg(long, default_value = "recency.json")]
    out: PathBuf,
    #[command(flatten)]
    probes: ProbeArgs,
}

/// Sizes of the head probes `analyze` runs beside the recency score (induction, echo and
/// previous-token scores on repeated random tokens; copy scores on passkey prompts), which `plan`
/// reads to keep retrieval heads as attention. Seeded by --seed.
#[derive(Args)]
struct ProbeArgs {
    /// Skip all head probes (the report then holds recency statistics only).
    #[arg(long)]
    no_probes: bool,
    /// Sequences of repeated random tokens for the induction / echo / previous-token scores;
    /// 0 skips that probe.
    #[arg(long, default_value_t = 8)]
    repeat_sequences: usize,
    /// Distinct random tokens per span (L), drawn from the middle of the vocabulary.
    #[arg(long, default_value_t = 50)]
    repeat_span: usize,
    /// Copies of the span per sequence (R); scores average over copies 2..R.
    #[arg(long, default_value_t = 4)]
    repeats: usize,
    /// Teacher-forced passkey prompts (haystack: the calibration text) for the copy scores;
    /// 0 skips that probe.
    #[arg(long, default_value_t = 8)]
    copy_prompts: usize,
    /// Tokens per passkey prompt before the answer.
    #[arg(long, default_value_t = 512)]
    copy_prompt_len: usize,
    /// Digits of each pass key.
    #[arg(long, default_value_t = 5)]
    copy_key_digits: usize,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    weights: WeightArgs,
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
    recurformer::memory::reuse_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model, kv, json } => info(&model, kv, json),
        Command::Generate(args) => generate_cmd(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench_cmd::bench_cmd(args),
        Command::BenchWorker(args) => bench_cmd::bench_worker(args),
        Command::Analyze(args) => analyze_cmd(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::RecencyDiff(args) => plan_cmd::recency_diff(args),
        Command::Convert(args) => convert_cmd(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Eval(args) => eval_cmd::eval_cmd(args),
        Command::Demo(args) => demo_cmd::run(args),
    }
}

/// Bytes in binary units; the library's formatter, taking the f64 figures JSON hands us.
pub(crate) fn human_bytes(b: f64) -> String {
    recurformer::model::plan::human_bytes(b.max(0.0) as usize)
}

fn info(args: &ModelArgs, kv: KvArgs, json: bool) -> Result<()> {
    args.apply_threads();
    let path = args.path();
    let mut loaded = recurformer::checkpoint::loader::load(&path)?;
    kv.apply(&mut loaded.model);
    let m = &loaded.model;
    let c = &m.cfg;
    let (per_tok, state_bytes) = m.cache_bytes_per_token_and_state();
    // The base model's KV cache in the same element type, so ratios compare like with like.
    let base_per_tok = c.kv_bytes_per_token() / 4 * kv.kv.size();
    let v = serde_json::json!({
        "path": shown_path(&path),
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
        "kv_cache_dtype": kv.kv.name(),
        "kv_cache_bytes_per_token": per_tok,
        "recurrent_state_bytes": state_bytes,
        "base_kv_cache_bytes_per_token": base_per_tok,
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
                recurformer::model::hybrid::Init::Attention => "attention",
                recurformer::model::hybrid::Init::Random => "random",
            },
            s.provenance.base_model
        );
    }
    println!(
        "KV cache ({})   {} per token (base model: {})",
        kv.kv,
        human_bytes(per_tok as f64),
        human_bytes(base_per_tok as f64)
    );
    println!(
        "recurrent state  {} per sequence, constant (f32)",
        human_bytes(state_bytes as f64)
    );
    for n in [1024usize, 8192, 32768, 131072] {
        let total = per_tok * n + state_bytes;
        println!(
            "  at {:>6} tok  {} ({:.3} of the base model's {} KV cache)",
            n,
            human_bytes(total as f64),
            total as f64 / (base_per_tok * n) as f64,
            kv.kv
        );
    }
    Ok(())
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    a.model.apply_threads();
    let path = a.model.path();
    let loaded = a.weights.load(&path)?;
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
    let eos = end_tokens(&loaded.model.cfg.eos_token_ids, tok, a.chat);
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
        "[prefill {} tokens: {:.1} tok/s | decode {} tokens: {:.1} tok/s | cache {} (KV {} in {}, recurrent {}){}]",
        stats.prompt_tokens,
        stats.prefill_tok_s(),
        stats.generated_tokens,
        stats.decode_tok_s(),
        human_bytes(stats.cache.total() as f64),
        human_bytes(stats.cache.kv as f64),
        a.weights.kv.kv,
        human_bytes(stats.cache.recurrent as f64),
        if stats.stopped_at_eos { ", stopped at EOS" } else { "" }
    );
    Ok(())
}

fn default_calibration_files() -> Vec<PathBuf> {
    recurformer::formats::domains::default_calibration_files(
        &recurformer::formats::domains::text_root(),
    )
}

pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
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
    use recurformer::formats::text::{load_documents, sample_windows, token_stream};
    a.model.apply_threads();
    let path = a.model.path();
    let files = if a.data.is_empty() {
        default_calibration_files()
    } else {
        a.data.clone()
    };
    recurformer::formats::domains::check_not_heldout(&files, "analyze --data")?;
    let loaded = recurformer::checkpoint::loader::load(&path)?;
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
    let calibration = recurformer::convert::recency::Calibration {
        data: files.iter().map(|f| shown_path(f)).collect(),
        sequences: a.sequences,
        seq_len: a.seq_len,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let mut report = recurformer::convert::analyze::analyze(
        &loaded.model,
        &seqs,
        a.window,
        calibration,
        &shown_path(&path),
        &mut |n| pb.set_position(n as u64),
    )?;
    pb.finish_and_clear();
    let recency_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    report.probes = run_probes(&a.probes, a.seed, &loaded, &stream, &files)?;
    if report.probes.is_some() {
        eprintln!(
            "analyze: recency {recency_s:.1} s, probes {:.1} s",
            t1.elapsed().as_secs_f64()
        );
    }
    report.validate()?;
    recurformer::formats::io::write_atomic(
        &a.out,
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    eprintln!(
        "analyze: {:.1} s, peak RSS {}",
        t0.elapsed().as_secs_f64(),
        human_bytes(recurformer::eval::bench::peak_rss_bytes() as f64)
    );
    let heat = a.out.with_extension("png");
    let stem = a
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "recency".into());
    let dist = a.out.with_file_name(format!("{stem}_distribution.png"));
    recurformer::report::recency_heatmap(&report, &heat)?;
    recurformer::report::recency_distribution(&report, &dist)?;
    println!(
        "wrote {}, {}, {}",
        a.out.display(),
        heat.display(),
        dist.display()
    );
    // Most and least recency-aware groups, so the terminal shows the gist.
    let mut groups = report.group_scores();
    groups.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
    println!(
        "most recency-aware KV groups:  {}",
        show_groups(&groups[..groups.len().min(8)])
    );
    println!(
        "least recency-aware KV groups: {}",
        show_groups(&groups[groups.len().saturating_sub(8)..])
    );
    if let Some(probes) = &report.probes {
        if let Some(c) = &probes.copy {
            println!(
                "passkey prompts: the model's own argmax is right on {:.1}% of {} answer tokens, \
                 {} of {} keys exact",
                100.0 * c.model_token_accuracy,
                c.answer_tokens,
                c.model_exact,
                c.prompts
            );
        }
        let mut pngs = Vec::new();
        for p in probes.probes() {
            let png = a.out.with_file_name(format!("{stem}_{}.png", p.name()));
            recurformer::report::probe_heatmap(&report, p, None, &png)?;
            pngs.push(png.display().to_string());
            let mut g = probes.group_scores(p);
            g.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
            println!(
                "top KV groups by {:<15} {}",
                format!("{}:", p.name()),
                show_groups(&g[..g.len().min(8)])
            );
        }
        println!("wrote {}", pngs.join(", "));
    }
    Ok(())
}

/// `L<layer>G<group>=<score>` for each entry.
fn show_groups(g: &[(usize, usize, f64)]) -> String {
    g.iter()
        .map(|(l, k, s)| format!("L{l}G{k}={s:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the head probes `a` asks for on `model`; None when they are all off.
fn run_probes(
    a: &ProbeArgs,
    seed: u64,
    loaded: &recurformer::checkpoint::loader::LoadedModel,
    haystack: &[u32],
    haystack_files: &[PathBuf],
) -> Result<Option<recurformer::convert::probes::ProbeReport>> {
    use recurformer::convert::passkey::{passkey_cases, PasskeyOptions};
    use recurformer::convert::probes::{probe_heads, RepeatSet};
    if a.no_probes || (a.repeat_sequences == 0 && a.copy_prompts == 0) {
        return Ok(None);
    }
    let model = &loaded.model;
    let repeat = if a.repeat_sequences > 0 {
        Some(RepeatSet::generate(
            model.cfg.vocab_size,
            a.repeat_sequences,
            a.repeat_span,
            a.repeats,
            seed,
        )?)
    } else {
        None
    };
    let copy = if a.copy_prompts > 0 {
        let opts = PasskeyOptions {
            prompts: a.copy_prompts,
            prompt_len: a.copy_prompt_len,
            key_digits: a.copy_key_digits,
            seed,
            haystack_files: haystack_files.iter().map(|f| shown_path(f)).collect(),
            chat: false,
            depth: recurformer::convert::passkey::PASSKEY_DEPTH,
        };
        let eos = model.cfg.eos_token_ids.first().copied();
        Some(passkey_cases(loaded.tokenizer()?, haystack, eos, &opts)?)
    } else {
        None
    };
    eprintln!(
        "probes: {} sequences of {} random tokens x {}, {} passkey prompts of {} tokens",
        a.repeat_sequences, a.repeat_span, a.repeats, a.copy_prompts, a.copy_prompt_len
    );
    let n = repeat.as_ref().map_or(0, |r| r.sequences.len())
        + copy.as_ref().map_or(0, |c| c.cases.len());
    let pb = progress_bar(n as u64, "probes");
    let report = probe_heads(model, repeat.as_ref(), copy.as_ref(), &mut |i| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    Ok(Some(report))
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    use recurformer::checkpoint::save::save_checkpoint;
    use recurformer::convert::init::{convert, ConvertOptions};
    use recurformer::model::hybrid::{Init, Provenance};
    a.model.apply_threads();
    let path = a.model.path();
    let loaded = recurformer::checkpoint::loader::load(&path)?;
    let plan = recurformer::model::plan::Plan::load(&a.plan, &loaded.model.cfg)?;
    let recency_path = a
        .recency
        .clone()
        .or_else(|| plan.rule.recency_file.as_ref().map(PathBuf::from));
    let recency = match &recency_path {
        Some(p) => Some(recurformer::convert::recency::RecencyReport::load(p)?),
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
            local: a
                .local_window
                .map(|window| recurformer::model::hybrid::LocalWindow {
                    sinks: a.local_sinks,
                    window,
                }),
        },
    )?;
    save_checkpoint(&hybrid, loaded.tokenizer.as_ref(), &a.out)?;
    let (kv, state) = hybrid.cache_bytes_per_token_and_state();
    println!(
        "wrote {}: {} of {} KV groups replaced, KV {} per token in f32 (base {}), recurrent state {}",
        a.out.display(),
        plan.replaced_groups(),
        plan.kept_groups() + plan.replaced_groups(),
        human_bytes(kv as f64),
        human_bytes(loaded.model.cfg.kv_bytes_per_token() as f64),
        human_bytes(state as f64)
    );
    Ok(())
}
