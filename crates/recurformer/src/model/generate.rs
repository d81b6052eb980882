//! Token generation: sampling and the prefill + decode loop over a cache.

use crate::model::cache::{CacheBytes, HybridCache};
use crate::model::llama::Model;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// How the next token is chosen. The order of operations follows transformers' logits processors:
/// repetition penalty, temperature, top-k, top-p.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 is off. Logits of tokens already in the sequence are divided by it (multiplied when
    /// negative), as in the CTRL paper and transformers' `RepetitionPenaltyLogitsProcessor`.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        if params.temperature < 0.0 || !params.temperature.is_finite() {
            bail!(
                "temperature {} must be a finite number >= 0",
                params.temperature
            );
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top-p {p} must be in (0, 1]");
            }
        }
        if params.top_k == Some(0) {
            bail!("top-k must be at least 1");
        }
        if !(params.repetition_penalty > 0.0) {
            bail!(
                "repetition penalty {} must be > 0",
                params.repetition_penalty
            );
        }
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Picks the next token from `logits` (vocabulary-sized) given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &tok in history {
                if seen.insert(tok) {
                    if let Some(x) = l.get_mut(tok as usize) {
                        *x = if *x < 0.0 { *x * rp } else { *x / rp };
                    }
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(&l);
        }
        let temp = self.params.temperature as f32;
        let mut idx: Vec<usize> = (0..l.len()).collect();
        // Sort descending by logit; ties broken by id so the order is deterministic.
        idx.sort_by(|&a, &b| {
            l[b].partial_cmp(&l[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if let Some(k) = self.params.top_k {
            idx.truncate(k.min(idx.len()));
        }
        let maxl = l[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i] - maxl) / temp) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.params.top_p {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let u: f64 = self.rng.random::<f64>();
        let mut acc = 0.0;
        for (p, &i) in probs.iter().zip(&idx) {
            acc += p;
            if u < acc {
                return i as u32;
            }
        }
        *idx.last().expect("at least one candidate") as u32
    }
}

/// The tokens that end an answer: the model's EOS ids and, in chat, the chat template's
/// end-of-turn token (chat models end a turn with it even when their EOS differs).
pub fn end_tokens(eos: &[u32], tok: &crate::formats::tokenizer::Tokenizer, chat: bool) -> Vec<u32> {
    let mut out = eos.to_vec();
    if chat {
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = tok.token_id(t) {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
    }
    out
}

pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub cache: CacheBytes,
    pub stopped_at_eos: bool,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed over the tokens produced after the first one (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub eos: &'a [u32],
}

/// Prefills the prompt, then decodes one token at a time until EOS or `max_tokens`.
/// `on_token` sees every new token as it is produced (for streaming).
pub fn generate(
    model: &Model,
    req: &GenerateRequest,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if req.prompt.is_empty() {
        bail!("the prompt is empty: nothing to condition on");
    }
    let mut cache: HybridCache = model.new_cache(1, req.prompt.len() + req.max_tokens);
    let mut history = req.prompt.to_vec();
    let mut out = Vec::new();
    let mut stats = GenerationStats {
        prompt_tokens: req.prompt.len(),
        ..Default::default()
    };
    if req.max_tokens == 0 {
        return Ok((out, stats));
    }
    let t0 = Instant::now();
    let ids = Tensor::new(req.prompt, &model.device)?.unsqueeze(0)?; // (1, t)
    let mut logits = model
        .forward_last(&ids, &mut cache)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let tok = sampler.sample(&logits, &history);
        out.push(tok);
        history.push(tok);
        on_token(tok)?;
        if req.eos.contains(&tok) {
            stats.stopped_at_eos = true;
            break;
        }
        if out.len() >= req.max_tokens {
            break;
        }
        let ids = Tensor::new(&[tok], &model.device)?.unsqueeze(0)?; // (1, 1)
        logits = model
            .forward_last(&ids, &mut cache)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    stats.cache = cache.bytes();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let logits = vec![0.0, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&logits, &[]), 1);
        // A strong repetition penalty on token 1 hands the argmax to token 2.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&logits, &[1]), 2);
        // top-k 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), 1);
        }
        // top-p small enough to keep only the best token.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: Some(0.1),
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), 1);
        }
        // top-k 2 only ever yields the two best tokens, and both appear.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits, &[])).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        assert!(draws.contains(&1) && draws.contains(&2));
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..30).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            top_k: Some(0),
            ..Default::default()
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}
