//! `recurformer bench`: time to first token, decode speed, cache bytes and peak memory of one or
//! more models at several context lengths, each model in its own child process (`bench-worker`)
//! so that its peak memory is its own; ratios against the first model, tables, JSON and plots.

use crate::{human_bytes, ModelArgs};
use anyhow::{Context, Result};
use clap::Args;
use recurformer::eval::bench::BenchPoint;
use recurformer::formats::io::shown_path;
use recurformer::model::cache::KvDtype;
use recurformer::model::quant::WeightFormat;
use recurformer::report::{line_chart, LineChart, Series};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Models to measure (the first is the reference for ratios); repeat the flag. Defaults to
    /// the default model. Each runs in its own child process, so peak memory is its own.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    #[command(flatten)]
    pub threads: crate::ThreadArgs,
    /// Context lengths (tokens of prompt before decoding), run in this order.
    #[arg(long, num_args = 1.., default_values_t = [1024usize, 4096, 8192])]
    pub contexts: Vec<usize>,
    /// Decode steps timed after each prefill; the median is reported.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Fresh prefills per context; time to first token is the median over them. A warm-up run
    /// (16 tokens) precedes all measurements and is never counted.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Text the contexts are cut from (repeated when too short). Default: Emma.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Reference engine run in the same command on the first model (a GGUF file): `pytorch`
    /// (reference/.venv, see reference/setup_venv.sh), `llama-cpp`, or `none`.
    #[arg(long, default_value = "pytorch")]
    pub reference: String,
    /// Directory for bench.json, bench.md and the plots decode_speed.png, cache_bytes.png and
    /// ttft.png (decode speed, cache bytes and time to first token against context length).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Weight formats to measure each model in (`f32`, `q8_0`, `q4_0`, `q4_k`, ...; see
    /// `generate --weights`): every model runs once per format, in its own child process.
    #[arg(long, num_args = 1.., default_values_t = [WeightFormat::F32], value_parser = crate::parse_weights)]
    pub weights: Vec<WeightFormat>,
    /// KV-cache element types to measure each model in (`generate --kv`): every model and
    /// weight format runs once per type, in its own child process.
    #[arg(long, num_args = 1.., default_values = [crate::DEFAULT_KV], value_parser = crate::parse_kv)]
    pub kv: Vec<KvDtype>,
    /// Prefill attention paths to measure: `tiled` (the online-softmax kernel, the default
    /// everywhere) and `chunked` (score blocks through candle's GEMM, the path before it, as
    /// `RECURFORMER_CHUNKED_PREFILL=1` selects): every run above once per path.
    #[arg(long, num_args = 1.., default_values = ["tiled"], value_parser = ["tiled", "chunked"])]
    pub prefill_attention: Vec<String>,
    /// Grow one cache through the contexts instead of prefilling each from scratch (much faster
    /// at long contexts; prefill tok/s is then per segment and no time to first token is
    /// reported). Decode figures are unaffected.
    #[arg(long)]
    pub incremental: bool,
}

/// One model's measurements, run by `bench` in a child process (prints JSON).
#[derive(Args)]
pub(crate) struct BenchWorkerArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    weights: crate::WeightArgs,
    #[arg(long, num_args = 1..)]
    contexts: Vec<usize>,
    #[arg(long)]
    decode_steps: usize,
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    #[arg(long)]
    text: PathBuf,
    #[arg(long)]
    incremental: bool,
}

/// What a worker reports: the measured points and the model's cache layout, which gives the
/// cache size at any length (KV bytes grow per token; the recurrent state is constant).
#[derive(serde::Serialize, serde::Deserialize)]
struct WorkerReport {
    points: Vec<BenchPoint>,
    kv_bytes_per_token: usize,
    state_bytes: usize,
    /// Bytes of weights a decode step reads, in the types they run in
    /// (`Model::decode_weight_bytes`).
    #[serde(default)]
    weight_bytes_per_token: usize,
}

pub(crate) fn bench_worker(a: BenchWorkerArgs) -> Result<()> {
    use recurformer::eval::bench::{bench_point, tokens_at_least};
    a.model.apply_threads();
    let loaded = a.weights.load(&a.model.path())?;
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let max_ctx = a.contexts.iter().copied().max().unwrap_or(0);
    let ids = tokens_at_least(&loaded.tokenizer()?.encode(&text, false)?, max_ctx)?;
    // Warm-up: first-touch allocations and thread-pool start are not part of any figure.
    bench_point(&loaded.model, &ids, 16.min(max_ctx), 2, 1)?;
    let points = if a.incremental {
        recurformer::eval::bench::bench_series(&loaded.model, &ids, &a.contexts, a.decode_steps)?
    } else {
        a.contexts
            .iter()
            .map(|&c| bench_point(&loaded.model, &ids, c, a.decode_steps, a.repeats))
            .collect::<Result<Vec<_>>>()?
    };
    for p in &points {
        eprintln!(
            "  {} ctx {}: {}prefill {:.1} tok/s, decode {:.2} tok/s, cache {} ({} KV), peak RSS {}",
            a.model.path().display(),
            p.context,
            p.ttft_s
                .map(|t| format!("first token {t:.2} s, "))
                .unwrap_or_default(),
            p.prefill_tok_s,
            p.decode_tok_s,
            human_bytes(p.cache_bytes as f64),
            a.weights.kv.kv,
            human_bytes(p.peak_rss_bytes as f64)
        );
    }
    let (kv_bytes_per_token, state_bytes) = loaded.model.cache_bytes_per_token_and_state();
    let report = WorkerReport {
        points,
        kv_bytes_per_token,
        state_bytes,
        weight_bytes_per_token: loaded.model.decode_weight_bytes(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One measured configuration.
struct Run {
    path: PathBuf,
    weights: WeightFormat,
    kv: KvDtype,
    /// Prefill attention on the chunked GEMM path instead of the tiled kernel.
    chunked: bool,
}

/// A short name for tables and legends: the file or directory name.
pub(crate) fn short_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| p.display().to_string())
}

pub(crate) fn bench_cmd(a: BenchArgs) -> Result<()> {
    let threads = a.threads.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let paths = if a.models.is_empty() {
        vec![recurformer::default_model_path()]
    } else {
        a.models.clone()
    };
    if a.weights.is_empty() {
        anyhow::bail!("--weights: give at least one weight format");
    }
    if a.kv.is_empty() {
        anyhow::bail!("--kv: give at least one KV-cache type");
    }
    // Every model in every weight format, KV type and prefill path, model-major; a name shows a
    // setting only when several are measured.
    let mut runs: Vec<Run> = Vec::new();
    for p in &paths {
        for &weights in &a.weights {
            for &kv in &a.kv {
                for pa in &a.prefill_attention {
                    runs.push(Run {
                        path: p.clone(),
                        weights,
                        kv,
                        chunked: pa == "chunked",
                    });
                }
            }
        }
    }
    let models: Vec<PathBuf> = runs.iter().map(|r| r.path.clone()).collect();
    let label = |i: usize| -> String {
        let r = &runs[i];
        let mut n = short_name(&r.path);
        if a.weights.len() > 1 {
            n.push_str(&format!(" [{}]", r.weights));
        }
        if a.kv.len() > 1 {
            n.push_str(&format!(" [{} KV]", r.kv));
        }
        if a.prefill_attention.len() > 1 {
            n.push_str(if r.chunked {
                " [chunked prefill]"
            } else {
                " [tiled prefill]"
            });
        }
        n
    };
    if a.contexts.is_empty() {
        anyhow::bail!("--contexts: give at least one context length");
    }
    let text_path = a
        .text
        .clone()
        .unwrap_or_else(|| recurformer::repo_root().join("data/text/austen/emma.txt"));
    let exe = std::env::current_exe().context("locating the recurformer binary")?;
    // Measured here, before any worker starts, so that no model's peak memory includes the
    // buffer.
    let bandwidth = memory_bandwidth(threads, 256 << 20, 5);
    eprintln!(
        "memory bandwidth: {:.1} GB/s (streaming read of 256 MiB, {threads} thread(s), best of 5)",
        bandwidth / 1e9
    );
    let mut reports: Vec<WorkerReport> = Vec::new();
    for r in &runs {
        let (m, w) = (&r.path, r.weights);
        eprintln!(
            "measuring {} ({w} weights, {} KV cache, {} prefill) ...",
            m.display(),
            r.kv,
            if r.chunked { "chunked" } else { "tiled" }
        );
        let mut cmd = std::process::Command::new(&exe);
        if r.chunked {
            cmd.env("RECURFORMER_CHUNKED_PREFILL", "1");
        } else {
            cmd.env_remove("RECURFORMER_CHUNKED_PREFILL");
        }
        let out = cmd
            .arg("bench-worker")
            .arg("--model")
            .arg(m)
            .arg("--weights")
            .arg(w.name())
            .arg("--kv")
            .arg(r.kv.name())
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--decode-steps")
            .arg(a.decode_steps.to_string())
            .arg("--repeats")
            .arg(a.repeats.to_string())
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
        reports.push(serde_json::from_slice(&out.stdout).context("parsing the worker's output")?);
    }
    let ours: Vec<&Vec<BenchPoint>> = reports.iter().map(|r| &r.points).collect();
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
    let mut md = format!(
        "{threads} threads, {} decode steps (median), {} fresh prefill(s) per context{}; ratios against the first model.\n\n\
         Physical limit of decode: bytes read per decoded token (weights in the types they run in + the cache at that context) \
         ÷ this machine's memory bandwidth, measured in this run: {:.1} GB/s (streaming read, {threads} thread(s)).\n\n\
         | context | model | first token (s) | prefill tok/s | prefill vs first | decode tok/s | decode vs first | bytes / token | limit tok/s (decode %) | cache (KV type) | cache vs first | peak RSS |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        a.decode_steps,
        a.repeats,
        if a.incremental { " (incremental: prefill per segment)" } else { "" },
        bandwidth / 1e9
    );
    for (ci, &c) in a.contexts.iter().enumerate() {
        let base = &ours[0][ci];
        for (i, pts) in ours.iter().enumerate() {
            let p = &pts[ci];
            let rep = &reports[i];
            let bytes = rep.weight_bytes_per_token + rep.kv_bytes_per_token * c + rep.state_bytes;
            let limit = bandwidth / bytes as f64;
            md.push_str(&format!(
                "| {c} | {} | {} | {:.1} | {:.2}x | {:.2} | {:.2}x | {} | {:.1} ({:.0} %) | {} ({}) | {:.3} | {} |\n",
                label(i),
                p.ttft_s
                    .map(|t| format!("{t:.2}"))
                    .unwrap_or_else(|| "-".into()),
                p.prefill_tok_s,
                p.prefill_tok_s / base.prefill_tok_s,
                p.decode_tok_s,
                p.decode_tok_s / base.decode_tok_s,
                human_bytes(bytes as f64),
                limit,
                100.0 * p.decode_tok_s / limit,
                human_bytes(p.cache_bytes as f64),
                runs[i].kv,
                p.cache_bytes as f64 / base.cache_bytes as f64,
                human_bytes(p.peak_rss_bytes as f64)
            ));
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
            // PyTorch dequantises the GGUF to f32; llama.cpp runs its own tensor types with an
            // f16 cache.
            let how = if eng == "llama_cpp" {
                "the GGUF's own types, f16 cache"
            } else {
                "f32"
            };
            md.push_str(&format!(
                "| {c} | {eng} (first model, {how}) | {:.2} | {pf:.1} | {:.2}x | {dc:.2} | {:.2}x | - | - | - | - | {} |\n",
                c as f64 / pf,
                pf / base.prefill_tok_s,
                dc / base.decode_tok_s,
                r["peak_rss_bytes"]
                    .as_f64()
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into())
            ));
        }
    }
    print!("{md}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let v = serde_json::json!({
            "models": models.iter().map(|m| shown_path(m)).collect::<Vec<_>>(),
            "weights": runs.iter().map(|r| r.weights.name()).collect::<Vec<_>>(),
            "kv": runs.iter().map(|r| r.kv.name()).collect::<Vec<_>>(),
            "prefill_attention": runs.iter().map(|r| if r.chunked { "chunked" } else { "tiled" }).collect::<Vec<_>>(),
            "threads": threads, "decode_steps": a.decode_steps, "repeats": a.repeats,
            "incremental": a.incremental, "contexts": a.contexts, "text": shown_path(&text_path),
            "recurformer": ours,
            "cache_layout": reports.iter().map(|r| serde_json::json!({
                "kv_bytes_per_token": r.kv_bytes_per_token, "state_bytes": r.state_bytes})).collect::<Vec<_>>(),
            "decode_weight_bytes": reports.iter().map(|r| r.weight_bytes_per_token).collect::<Vec<_>>(),
            "memory_bandwidth_bytes_per_s": bandwidth,
            "reference": reference});
        recurformer::formats::io::write_atomic(
            &dir.join("bench.json"),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )?;
        recurformer::formats::io::write_atomic(&dir.join("bench.md"), md.as_bytes())?;
        let names: Vec<String> = (0..runs.len()).map(label).collect();
        let layouts: Vec<(usize, usize)> = reports
            .iter()
            .map(|r| (r.kv_bytes_per_token, r.state_bytes))
            .collect();
        plot_bench(dir, &names, &ours, &layouts)?;
        eprintln!(
            "wrote {}/bench.json, bench.md, decode_speed.png, cache_bytes.png{}",
            dir.display(),
            if a.incremental { "" } else { ", ttft.png" }
        );
    }
    Ok(())
}

/// This machine's memory bandwidth in bytes per second: `threads` threads each sum their share
/// of a `bytes` buffer (far larger than the caches) as 64-bit words, `passes` times; the best
/// pass. Decode streams its weights and cache the same way, so this is the rate its bytes can
/// arrive at.
pub(crate) fn memory_bandwidth(threads: usize, bytes: usize, passes: usize) -> f64 {
    let words = bytes / 8;
    let threads = threads.max(1);
    // Written once so that every page is really mapped (a zeroed allocation may share one page).
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    let mut sink = 0u64;
    for _ in 0..passes {
        let t0 = std::time::Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        // Eight independent sums, so the adds keep pace with the loads.
                        let mut acc = [0u64; 8];
                        for c in part.chunks_exact(8) {
                            for (a, &v) in acc.iter_mut().zip(c) {
                                *a = a.wrapping_add(v);
                            }
                        }
                        acc.iter().fold(0u64, |x, &y| x.wrapping_add(y))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        let secs = t0.elapsed().as_secs_f64();
        sink = sums.iter().fold(sink, |x, &y| x.wrapping_add(y));
        best = best.max((words * 8) as f64 / secs);
    }
    std::hint::black_box(sink);
    best
}

/// Context lengths as tick labels: 1K, 8K, 128K; other values as numbers.
fn context_label(v: f64) -> String {
    if v >= 1024.0 && (v / 1024.0).fract().abs() < 1e-9 {
        format!("{}K", (v / 1024.0) as u64)
    } else {
        format!("{v:.0}")
    }
}

/// decode_speed.png and ttft.png (measured points) and cache_bytes.png (the exact cache size of
/// each model from 512 to 128K tokens: KV bytes per token x context + the recurrent state).
pub(crate) fn plot_bench(
    dir: &Path,
    names: &[String],
    points: &[&Vec<BenchPoint>],
    layouts: &[(usize, usize)],
) -> Result<()> {
    let x_fmt = |v: f64| context_label(v);
    let series = |f: &dyn Fn(&BenchPoint) -> Option<f64>| -> Vec<Series> {
        names
            .iter()
            .zip(points)
            .map(|(n, pts)| Series {
                name: n.clone(),
                points: pts
                    .iter()
                    .filter_map(|p| Some((p.context as f64, f(p)?)))
                    .collect(),
                markers: true,
            })
            .collect()
    };
    line_chart(
        &LineChart {
            title: "Decode speed against context length",
            x_desc: "context (tokens)",
            y_desc: "decode tokens/s (median)",
            log_x: true,
            log_y: false,
            x_fmt: &x_fmt,
            y_fmt: &|v| format!("{v:.0}"),
        },
        &series(&|p| Some(p.decode_tok_s)),
        &dir.join("decode_speed.png"),
    )?;
    let ttft = series(&|p| p.ttft_s);
    if ttft.iter().all(|s| !s.points.is_empty()) {
        line_chart(
            &LineChart {
                title: "Time to first token against context length",
                x_desc: "context (tokens)",
                y_desc: "seconds (prefill + first token)",
                log_x: true,
                log_y: true,
                x_fmt: &x_fmt,
                y_fmt: &|v| format!("{v:.2}"),
            },
            &ttft,
            &dir.join("ttft.png"),
        )?;
    }
    let contexts: Vec<f64> = (9..=17).map(|e| (1u64 << e) as f64).collect();
    let cache: Vec<Series> = names
        .iter()
        .zip(layouts)
        .map(|(n, &(kv, state))| Series {
            name: n.clone(),
            points: contexts
                .iter()
                .map(|&c| (c, (kv as f64 * c + state as f64) / (1u64 << 20) as f64))
                .collect(),
            markers: true,
        })
        .collect();
    line_chart(
        &LineChart {
            title: "Cache size (KV + recurrent state, f32, batch 1) against context length",
            x_desc: "context (tokens)",
            y_desc: "MiB",
            log_x: true,
            log_y: true,
            x_fmt: &x_fmt,
            y_fmt: &|v| {
                if v >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            },
        },
        &cache,
        &dir.join("cache_bytes.png"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_bandwidth_is_a_plausible_rate() {
        // 32 MiB on two threads, three passes: some hundreds of MB/s at the very least on any
        // machine that runs this, and below 10 TB/s (a wrong byte count would be off by 8x or
        // more in one direction or the other).
        let bw = super::memory_bandwidth(2, 32 << 20, 3);
        assert!(bw.is_finite() && bw > 2e8 && bw < 1e13, "{bw}");
    }
}
