//! Recency analysis on the default model: agrees with statistics computed by PyTorch +
//! transformers from `output_attentions` (fixtures/smollm2/recency_golden.json, written by
//! reference/make_recency_fixture.py), is deterministic for a seed, and stays in range.

mod common;
use anyhow::{Context, Result};
use common::*;
use recurformer::convert::recency::Calibration;

#[test]
fn scores_match_transformers_output_attentions() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(
        "smollm2/recency_golden.json",
    ))?)?;
    let ids: Vec<u32> = golden["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let window = golden["window"].as_u64().context("window")? as usize;
    let report = recurformer::convert::analyze::analyze(
        &loaded.model,
        &[ids],
        window,
        Calibration::default(),
        "default",
        &mut |_| {},
    )?;
    let (mut worst_r, mut worst_s, mut worst_d) = (0f64, 0f64, 0f64);
    for gl in golden["layers"].as_array().context("layers")? {
        let l = gl["layer"].as_u64().unwrap() as usize;
        for gh in gl["heads"].as_array().unwrap() {
            let h = gh["head"].as_u64().unwrap() as usize;
            let ours = &report.layers[l].heads[h];
            worst_r = worst_r.max((ours.recency - gh["recency"].as_f64().unwrap()).abs());
            worst_s = worst_s.max((ours.sink - gh["sink"].as_f64().unwrap()).abs());
            let d = gh["distance"].as_f64().unwrap();
            worst_d = worst_d.max((ours.distance - d).abs() / d.max(1.0));
        }
    }
    println!("max |ours - transformers|: recency {worst_r:.2e}, sink {worst_s:.2e}, distance (relative) {worst_d:.2e}");
    assert!(worst_r <= 1e-4 && worst_s <= 1e-4 && worst_d <= 1e-4);
    // The scores discriminate: some heads are local, some are not.
    let scores: Vec<f64> = report
        .layers
        .iter()
        .flat_map(|l| l.heads.iter().map(|h| h.recency))
        .collect();
    let (lo, hi) = scores
        .iter()
        .fold((1f64, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(lo < 0.2 && hi > 0.8, "recency range {lo}..{hi}");
    Ok(())
}

#[test]
fn analysis_is_deterministic_and_in_range() -> Result<()> {
    use recurformer::formats::text::{load_documents, sample_windows, token_stream};
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let docs = load_documents(&[root().join("data/text/austen/northanger_abbey.txt")])?;
    let stream = token_stream(&docs, loaded.tokenizer()?, Some(2))?;
    let run = |seed| -> Result<recurformer::convert::recency::RecencyReport> {
        let seqs = sample_windows(&stream, 2, 96, seed)?;
        recurformer::convert::analyze::analyze(
            &loaded.model,
            &seqs,
            16,
            Calibration::default(),
            "default",
            &mut |_| {},
        )
    };
    let (a, b, c) = (run(5)?, run(5)?, run(6)?);
    assert_eq!(a, b);
    assert_ne!(a, c);
    for l in &a.layers {
        for h in &l.heads {
            assert!(
                (0.0..=1.0).contains(&h.recency) && (0.0..=1.0).contains(&h.sink),
                "{h:?}"
            );
            assert!(h.distance >= 0.0 && h.output_rms > 0.0, "{h:?}");
        }
        for g in &l.groups {
            assert!(g.min_recency <= g.mean_recency + 1e-12);
        }
    }
    Ok(())
}
