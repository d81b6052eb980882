//! Evaluation tasks shared by `eval` and the tests.
//!
//! Perplexity: the token stream is cut into consecutive windows of `context` tokens starting at the
//! first token (a trailing partial window is dropped); each window is one forward pass from an empty
//! cache. Two figures per context length: over every next-token prediction of each window, and over
//! the predictions in its second half only (positions context/2 .. context-1), where long context is
//! actually in use.

use crate::model::llama::Model;
use crate::model::options::ForwardOptions;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PerplexityResult {
    pub context: usize,
    pub windows: usize,
    /// Predictions counted over all positions.
    pub predictions: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    pub second_half_predictions: usize,
    pub second_half_mean_nll: f64,
    pub second_half_ppl: f64,
}

/// Positions whose logits are materialised at once (v floats each).
const LOGIT_CHUNK: usize = 256;

/// Negative log-likelihood of each next token in `ids` (one window): ids.len()-1 values, where
/// value i is -log p(ids[i+1] | ids[..=i]).
pub fn window_nll(model: &Model, ids: &[u32]) -> Result<Vec<f64>> {
    let t = ids.len();
    if t < 2 {
        bail!("a perplexity window needs at least 2 tokens, got {t}");
    }
    let x = Tensor::new(ids, &model.device)?.unsqueeze(0)?; // (1, t)
    let mut cache = model.new_cache(1, t);
    let h = model.forward_hidden(&x, &mut cache, &ForwardOptions::default(), None)?; // (1, t, d)
    let mut out = Vec::with_capacity(t - 1);
    let mut start = 0;
    while start < t - 1 {
        let n = LOGIT_CHUNK.min(t - 1 - start);
        let logits = model.logits(&h.narrow(1, start, n)?)?.squeeze(0)?; // (n, v)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets = Tensor::new(&ids[start + 1..start + 1 + n], &model.device)?.unsqueeze(1)?; // (n, 1)
        let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        out.extend(picked.into_iter().map(|x| -(x as f64)));
        start += n;
    }
    Ok(out)
}

/// Perplexity of `tokens` at one context length, over at most `limit` windows; `progress` is called
/// after every window with the tokens it covered.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    context: usize,
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize),
) -> Result<PerplexityResult> {
    if context < 4 {
        bail!("context {context} is too short for perplexity");
    }
    let mut windows = tokens.len() / context;
    if let Some(l) = limit {
        windows = windows.min(l);
    }
    if windows == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {context}",
            tokens.len()
        );
    }
    let (mut all, mut n_all, mut half, mut n_half) = (0f64, 0usize, 0f64, 0usize);
    for w in 0..windows {
        let nll = window_nll(model, &tokens[w * context..(w + 1) * context])?;
        // nll[i] predicts position i+1; the second half is positions context/2 .. context-1.
        for (i, x) in nll.iter().enumerate() {
            all += x;
            n_all += 1;
            if i + 1 >= context / 2 {
                half += x;
                n_half += 1;
            }
        }
        progress(context);
    }
    let (m, mh) = (all / n_all as f64, half / n_half as f64);
    Ok(PerplexityResult {
        context,
        windows,
        predictions: n_all,
        mean_nll: m,
        ppl: m.exp(),
        second_half_predictions: n_half,
        second_half_mean_nll: mh,
        second_half_ppl: mh.exp(),
    })
}
