//! `analyze`: run the base model's eager attention over calibration windows and measure every
//! head's recency score, sink mass, mean attention distance and output RMS (see `recency.rs`).

use crate::convert::recency::{Calibration, HeadAccumulator, RecencyReport, SINK_TOKENS};
use crate::model::llama::Model;
use crate::model::options::{AttentionImpl, AttnObservation, ForwardOptions};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Measures recency statistics over `sequences`; `progress` is called after each sequence with
/// the number done. Memory is bounded by one layer's (heads x T x T) probabilities at a time.
pub fn analyze(
    model: &Model,
    sequences: &[Vec<u32>],
    window: usize,
    calibration: Calibration,
    model_name: &str,
    progress: &mut dyn FnMut(usize),
) -> Result<RecencyReport> {
    let cfg = &model.cfg;
    if window == 0 {
        bail!("window must be at least 1");
    }
    if let Some(s) = sequences.iter().find(|s| s.len() <= window) {
        bail!(
            "calibration sequences of {} tokens leave no query position t >= window {window}",
            s.len()
        );
    }
    let mut accs: Vec<HeadAccumulator> = (0..cfg.num_hidden_layers)
        .map(|_| HeadAccumulator::new(cfg.num_attention_heads))
        .collect();
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    for (i, seq) in sequences.iter().enumerate() {
        let ids = Tensor::new(seq.as_slice(), &model.device)?.unsqueeze(0)?; // (1, t)
        let mut cache = model.new_cache(1, seq.len());
        let mut observer = |o: &AttnObservation| -> Result<()> {
            accs[o.layer].add_probs(o.probs, window)?;
            accs[o.layer].add_outputs(o.heads_out)
        };
        model.forward_hidden(&ids, &mut cache, &opts, Some(&mut observer))?;
        progress(i + 1);
    }
    let layers = accs
        .iter()
        .enumerate()
        .map(|(l, a)| a.finish(l, cfg.group_size()))
        .collect();
    let report = RecencyReport {
        model: model_name.to_string(),
        num_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        window,
        sink_tokens: SINK_TOKENS,
        calibration,
        layers,
        probes: None,
    };
    report.validate()?;
    Ok(report)
}
