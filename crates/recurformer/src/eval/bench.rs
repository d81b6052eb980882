//! Speed and memory measurement of the engine `generate` uses: prefill of a context of N tokens,
//! then single-token decode steps with the cache, medians over the steps.

use crate::model::llama::Model;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BenchPoint {
    pub context: usize,
    pub prefill_tok_s: f64,
    /// Time to first token: prefill of the whole context plus choosing the first new token (the
    /// median over repeats). `None` for [`bench_series`], whose prefills are segments of one
    /// growing cache rather than a fresh prompt.
    #[serde(default)]
    pub ttft_s: Option<f64>,
    /// Median over the decode steps (of every repeat).
    pub decode_tok_s: f64,
    /// Process peak resident memory after this point (monotone over a run: contexts run in
    /// increasing order, so it is the peak of the largest context so far).
    pub peak_rss_bytes: u64,
    pub cache_bytes: usize,
    /// Fresh prefills measured at this context (1 for [`bench_series`]).
    #[serde(default = "one")]
    pub repeats: usize,
}

fn one() -> usize {
    1
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmHWM:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            return kb * 1024;
        }
    }
    0
}

pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Prefills `tokens[..context]` into a fresh cache, then runs `decode_steps` greedy decode steps;
/// `repeats` times. Time to first token and prefill speed are medians over the repeats; decode
/// speed is the median over all decode steps of all repeats.
pub fn bench_point(
    model: &Model,
    tokens: &[u32],
    context: usize,
    decode_steps: usize,
    repeats: usize,
) -> Result<BenchPoint> {
    if tokens.len() < context {
        bail!(
            "benchmark text has {} tokens, context {context} needs more",
            tokens.len()
        );
    }
    if repeats == 0 {
        bail!("repeats must be at least 1");
    }
    let (mut ttft, mut step_secs, mut cache_bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..repeats {
        let mut cache = model.new_cache(1, context + decode_steps + 1);
        let ids = Tensor::new(&tokens[..context], &model.device)?.unsqueeze(0)?; // (1, context)
        let t0 = Instant::now();
        let logits = model.forward_last(&ids, &mut cache)?;
        let first = crate::model::generate::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        ttft.push(t0.elapsed().as_secs_f64());
        step_secs.extend(time_decode(model, &mut cache, first, decode_steps)?);
        cache_bytes = cache.bytes().total();
    }
    let ttft = median(&mut ttft);
    Ok(BenchPoint {
        context,
        prefill_tok_s: context as f64 / ttft,
        ttft_s: Some(ttft),
        decode_tok_s: 1.0 / median(&mut step_secs),
        peak_rss_bytes: peak_rss_bytes(),
        cache_bytes,
        repeats,
    })
}

/// Greedy-decodes `steps` tokens starting from token `next` (chosen from the prefill's logits),
/// returning each step's seconds.
fn time_decode(
    model: &Model,
    cache: &mut crate::model::cache::HybridCache,
    mut next: u32,
    steps: usize,
) -> Result<Vec<f64>> {
    let mut step_secs = Vec::with_capacity(steps);
    for _ in 0..steps {
        let ids = Tensor::new(&[next], &model.device)?.unsqueeze(0)?; // (1, 1)
        let t = Instant::now();
        let l = model
            .forward_last(&ids, cache)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        step_secs.push(t.elapsed().as_secs_f64());
        next = crate::model::generate::argmax(&l);
    }
    Ok(step_secs)
}

/// Token ids of `text`, repeated until there are at least `n`.
pub fn tokens_at_least(ids: &[u32], n: usize) -> Result<Vec<u32>> {
    if ids.is_empty() {
        bail!("benchmark text tokenizes to nothing");
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.extend_from_slice(ids);
    }
    out.truncate(n);
    Ok(out)
}

/// Like `bench_point` at every context of `contexts` (ascending), but with one growing cache:
/// the prompt is prefilled up to the first context, decode is timed, then prefill continues to the
/// next context, and so on. Far cheaper at long contexts than prefilling each from scratch;
/// `prefill_tok_s` is then the throughput of each prefill segment (context_prev..context), which
/// at long contexts is lower than a from-scratch prefill's average.
pub fn bench_series(
    model: &Model,
    tokens: &[u32],
    contexts: &[usize],
    decode_steps: usize,
) -> Result<Vec<BenchPoint>> {
    let max = contexts.iter().copied().max().unwrap_or(0);
    if tokens.len() < max {
        bail!(
            "benchmark text has {} tokens, context {max} needs more",
            tokens.len()
        );
    }
    if contexts.windows(2).any(|w| w[1] < w[0] + decode_steps) {
        bail!("contexts {contexts:?} must ascend by more than the {decode_steps} decode steps");
    }
    let mut cache = model.new_cache(1, max + decode_steps + 1);
    let mut out = Vec::new();
    for &c in contexts {
        let cur = cache.seq_len;
        let ids = Tensor::new(&tokens[cur..c], &model.device)?.unsqueeze(0)?; // (1, c - cur)
        let t0 = Instant::now();
        let logits = model.forward_last(&ids, &mut cache)?;
        let prefill = t0.elapsed().as_secs_f64();
        let first = crate::model::generate::argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        let mut steps = time_decode(model, &mut cache, first, decode_steps)?;
        out.push(BenchPoint {
            context: c,
            prefill_tok_s: (c - cur) as f64 / prefill,
            ttft_s: None,
            decode_tok_s: 1.0 / median(&mut steps),
            peak_rss_bytes: peak_rss_bytes(),
            cache_bytes: cache.bytes().total(),
            repeats: 1,
        });
    }
    Ok(out)
}
