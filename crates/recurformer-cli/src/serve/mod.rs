//! `recurformer serve`: an OpenAI-compatible HTTP server over the same engine as `generate`
//! (DESIGN.md, "Serving"; issue 22).
//!
//! - `api`: the wire format, request validation and OpenAI-shaped errors;
//! - `http`: routes, authentication, body limits, server-sent events;
//! - `engine`: the worker thread that owns the sequences (slots, queue, cache budget,
//!   cancellation, chunked prefill, batched decode);
//! - `metrics`: counters, gauges and histograms in the Prometheus text format.
//!
//! The route of a request: `http` validates and tokenises it, `engine` admits it to a slot with
//! its own `HybridCache`, runs it step by step beside the others, and sends text back over a
//! channel that `http` turns into one JSON body or a stream of chunks.

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;
#[cfg(test)]
mod tests;

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use engine::Limits;
use http::{Ready, Shared};
use metrics::Metrics;
use recurformer::checkpoint::loader::LoadedModel;
use std::path::Path;
use std::sync::{Arc, OnceLock};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub weights: crate::WeightArgs,
    /// Address to listen on. The default answers only this machine; give 0.0.0.0 to expose the
    /// server (and then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences generated at once, each with its own cache; their decode steps run as one
    /// batched forward.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait for a slot; beyond them the server answers 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Budget for all sequences' caches together, in bytes (suffixes K, M, G: powers of 1024).
    /// A request is admitted only while the caches fit, counting for each sequence the KV bytes
    /// of its prompt + max_tokens plus its constant recurrent state. Unlimited by default.
    #[arg(long, value_parser = parse_bytes)]
    pub cache_memory: Option<usize>,
    /// Bytes of cache snapshots kept for prefix reuse (suffixes K, M, G); 0 turns it off. A
    /// request whose prompt extends a kept prompt or conversation (the next turn of a chat)
    /// prefills only its new tokens.
    #[arg(long, value_parser = parse_size_or_zero, default_value = "256M")]
    pub prefix_cache: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Model name clients send in `model` (default: the model's file or directory name).
    #[arg(long)]
    pub model_name: Option<String>,
}

/// "123", "64K", "512M", "2G" (binary multiples) -> bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, suffix) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], Some(c)),
        _ => (t, None),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a byte count (examples: 1500000000, 512M, 2G)"))?;
    let mult: usize = match suffix.map(|c| c.to_ascii_uppercase()) {
        None => 1,
        Some('K') => 1 << 10,
        Some('M') => 1 << 20,
        Some('G') => 1 << 30,
        Some(c) => return Err(format!("'{s}': unknown size suffix '{c}' (use K, M or G)")),
    };
    if !n.is_finite() || n <= 0.0 {
        return Err(format!("'{s}': the cache budget must be positive"));
    }
    Ok((n * mult as f64) as usize)
}

/// `parse_bytes`, with 0 allowed.
pub fn parse_size_or_zero(s: &str) -> Result<usize, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_bytes(s)
    }
}

/// Engine settings taken from the command line.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub parallel: usize,
    pub queue: usize,
    pub cache_memory: Option<usize>,
    pub prefix_cache: usize,
}

/// The name a model is served under: its file or directory name.
pub fn model_id(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// Loads the model at `path` in the weight format `weights` and starts its engine.
pub fn load_ready(
    path: &Path,
    weights: &crate::WeightArgs,
    opts: EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<Ready> {
    let loaded: LoadedModel = weights.load(path)?;
    start_ready(Arc::new(loaded), opts, metrics)
}

/// Starts an engine over a loaded model.
pub fn start_ready(
    loaded: Arc<LoadedModel>,
    opts: EngineOptions,
    metrics: Arc<Metrics>,
) -> Result<Ready> {
    if opts.parallel == 0 {
        bail!("--parallel 0: at least one sequence must be able to run");
    }
    loaded
        .tokenizer()
        .context("serve needs the model's tokenizer")?;
    let m = &loaded.model;
    let (kv, state) = m.cache_bytes_per_token_and_state();
    let limits = Limits {
        parallel: opts.parallel,
        queue: opts.queue,
        cache_budget: opts.cache_memory,
        context: m.cfg.max_position_embeddings,
        kv_bytes_per_token: kv,
        state_bytes: state,
        prefix_cache: opts.prefix_cache,
    };
    if let Some(b) = opts.cache_memory {
        if b < limits.reservation(1) {
            bail!(
                "--cache-memory {b} bytes cannot hold even one token of one sequence ({} bytes)",
                limits.reservation(1)
            );
        }
    }
    metrics.slots.set(opts.parallel);
    metrics
        .cache_budget_bytes
        .set(opts.cache_memory.unwrap_or(0));
    let engine = engine::start(loaded.clone(), limits, metrics);
    Ok(Ready { loaded, engine })
}

pub fn run(a: ServeArgs) -> Result<()> {
    a.model.apply_threads();
    let path = a.model.path();
    if !path.exists() {
        bail!("model path {} does not exist", path.display());
    }
    let opts = EngineOptions {
        parallel: a.parallel,
        queue: a.queue,
        cache_memory: a.cache_memory,
        prefix_cache: a.prefix_cache,
    };
    if opts.parallel == 0 {
        bail!("--parallel 0: at least one sequence must be able to run");
    }
    // Several sequences decode in one step: keep the tiled q8_0 copy the batched kernel reads.
    recurformer::model::kernels::q8_gemv::set_tiled_packing(opts.parallel > 1);
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        model_id: a.model_name.clone().unwrap_or_else(|| model_id(&path)),
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body_bytes,
        metrics: metrics.clone(),
        ready: OnceLock::new(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serve: listening on http://{addr} (model '{}' loading; GET /health answers 503 \
             until it is ready)",
            shared.model_id
        );
        // The socket is open while the model loads, so clients see 503 rather than a refusal.
        let loading = shared.clone();
        let weights = a.weights.clone();
        let kv = weights.kv.kv;
        std::thread::Builder::new()
            .name("recurformer-load".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                match load_ready(&path, &weights, opts, metrics) {
                    Ok(ready) => {
                        let l = ready.engine.limits;
                        eprintln!(
                            "serve: ready in {:.1} s: context {} tokens, {} slots, queue {}, KV \
                             {} bytes per token ({}) + state {} bytes per sequence, cache budget {}",
                            t0.elapsed().as_secs_f64(),
                            l.context,
                            l.parallel,
                            l.queue,
                            l.kv_bytes_per_token,
                            kv,
                            l.state_bytes,
                            l.cache_budget
                                .map_or("unlimited".into(), |b| format!("{b} bytes"))
                        );
                        let _ = loading.ready.set(ready);
                    }
                    Err(e) => {
                        eprintln!("error: loading {}: {e:#}", path.display());
                        std::process::exit(1);
                    }
                }
            })
            .context("starting the loader thread")?;
        axum::serve(listener, http::router(shared))
            .await
            .context("serving HTTP")
    })
}
