//! Induction (copy) probe: a span of random tokens repeated 4 times. From the second repeat on,
//! every next token of the span can be predicted only by finding the earlier occurrence of the
//! current token and copying what followed it: the induction circuit of Olsson et al. 2022 ("In-
//! context learning and induction heads", <https://arxiv.org/abs/2209.11895>), measured on the
//! repeated random tokens that RazorAttention (Tang et al. 2024, <https://arxiv.org/abs/2407.15891>)
//! scores heads on. Fast (one forward of a few hundred tokens per sequence) and sensitive to a
//! broken copy circuit, which the needle detects only through a whole answer.
//!
//! Accuracy: in repeats 2..=R, at every position but the span's last, whether the argmax is the
//! span's next token (L - 1 predictions per repeat: after the span's last token comes the next
//! repeat's first, which is no token of the span's own order, and the last repeat has none).
//! Reported per repeat and overall.

use crate::eval::stats::Proportion;
use crate::formats::tokenizer::Tokenizer;
use crate::model::llama::Model;
use crate::model::options::ForwardOptions;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InductionConfig {
    /// Sequences (one forward each); sequence s draws its span from seed `seed + s`.
    pub sequences: usize,
    /// Tokens per span.
    pub span: usize,
    /// Times the span is written (the first is the one copied from).
    pub repeats: usize,
    pub seed: u64,
}

impl Default for InductionConfig {
    fn default() -> Self {
        InductionConfig {
            sequences: 16,
            span: 64,
            repeats: 4,
            seed: 0,
        }
    }
}

/// Token ids the spans are drawn from: the ordinary (not added, not special) tokens between the
/// 10 % and 50 % quantiles of their ids. In a byte-level BPE vocabulary the id order is the merge
/// order, which follows frequency in the tokenizer's training text, so this skips the bytes and
/// the most frequent words (which a model may predict from its priors instead of copying) and the
/// rarest half (possibly under-trained in the model). Sorted ascending.
pub fn induction_token_pool(tok: &Tokenizer, model_vocab: usize) -> Result<Vec<u32>> {
    let added: HashSet<u32> = tok
        .inner
        .get_added_tokens_decoder()
        .keys()
        .copied()
        .collect();
    let vocab = tok.vocab_size().min(model_vocab) as u32;
    let ordinary: Vec<u32> = (0..vocab)
        .filter(|id| !added.contains(id) && tok.inner.id_to_token(*id).is_some())
        .collect();
    let pool = ordinary[ordinary.len() / 10..ordinary.len() / 2].to_vec();
    if pool.len() < 256 {
        bail!(
            "the vocabulary has {} ordinary tokens: too few to draw random spans from",
            ordinary.len()
        );
    }
    Ok(pool)
}

/// The ids of sequence `s`: BOS where the tokenizer asks for one, then the span `repeats` times.
/// The span's tokens are distinct, so every token has one earlier occurrence to copy from.
pub fn induction_sequence(pool: &[u32], bos: &[u32], cfg: &InductionConfig, s: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(s as u64));
    let span: Vec<u32> = pool.choose_multiple(&mut rng, cfg.span).copied().collect();
    let mut ids = bos.to_vec();
    for _ in 0..cfg.repeats {
        ids.extend(&span);
    }
    ids
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InductionResults {
    pub sequences: usize,
    pub span: usize,
    pub repeats: usize,
    pub seed: u64,
    /// The id range spans were drawn from (inclusive) and its size.
    pub pool_first: u32,
    pub pool_last: u32,
    pub pool_size: usize,
    /// Repeats 2..=R in order: positions whose argmax was the span's next token.
    pub per_repeat: Vec<Proportion>,
    /// All of repeats 2..=R. Positions of a sequence are not independent trials, so its interval
    /// is narrower than the evidence; compare models on `per_sequence` as well.
    pub overall: Proportion,
    /// Each sequence's accuracy over repeats 2..=R.
    pub per_sequence: Vec<f64>,
    pub secs: f64,
}

/// Runs the probe on `model`; `progress` is called after every sequence with its length.
pub fn run_induction(
    model: &Model,
    tok: &Tokenizer,
    cfg: &InductionConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<InductionResults> {
    if cfg.sequences == 0 || cfg.span < 2 || cfg.repeats < 2 {
        bail!(
            "the induction probe needs sequences >= 1, span >= 2 and repeats >= 2 (got {}, {}, {})",
            cfg.sequences,
            cfg.span,
            cfg.repeats
        );
    }
    let pool = induction_token_pool(tok, model.cfg.vocab_size)?;
    if cfg.span > pool.len() {
        bail!(
            "a span of {} distinct tokens does not fit a pool of {}",
            cfg.span,
            pool.len()
        );
    }
    let bos = tok.encode("", true)?;
    let t0 = std::time::Instant::now();
    let (l, r) = (cfg.span, cfg.repeats);
    let mut hits = vec![0usize; r - 1];
    let mut per_sequence = Vec::with_capacity(cfg.sequences);
    for s in 0..cfg.sequences {
        let ids = induction_sequence(&pool, &bos, cfg, s);
        let x = Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?; // (1, t)
        let mut cache = model.new_cache(1, ids.len());
        let h = model.forward_hidden(&x, &mut cache, &ForwardOptions::default(), None)?; // (1, t, d)
        let start = bos.len() + l; // first position of the second repeat
        let logits = model
            .logits(&h.narrow(1, start, (r - 1) * l)?)?
            .squeeze(0)?; // ((r-1)l, v)
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut seq_hits = 0;
        for (k, hit) in hits.iter_mut().enumerate() {
            for j in 0..l - 1 {
                // Position start + k*l + j holds span[j]; its prediction should be span[j+1].
                let i = k * l + j;
                if pred[i] == ids[start + i + 1] {
                    *hit += 1;
                    seq_hits += 1;
                }
            }
        }
        per_sequence.push(seq_hits as f64 / ((r - 1) * (l - 1)) as f64);
        progress(l * r); // the tokens `eval` counts for the probe (BOS aside)
    }
    let per = cfg.sequences * (l - 1);
    Ok(InductionResults {
        sequences: cfg.sequences,
        span: l,
        repeats: r,
        seed: cfg.seed,
        pool_first: pool[0],
        pool_last: pool[pool.len() - 1],
        pool_size: pool.len(),
        per_repeat: hits.iter().map(|&h| Proportion::new(h, per)).collect(),
        overall: Proportion::new(hits.iter().sum(), per * (r - 1)),
        per_sequence,
        secs: t0.elapsed().as_secs_f64(),
    })
}
