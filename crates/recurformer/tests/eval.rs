//! Evaluation figures: perplexity agrees with the reference fixture, and a checkpoint converted
//! with an empty plan evaluates exactly like its base model.

mod common;
use anyhow::{Context, Result};
use common::*;

#[test]
fn perplexity_matches_the_reference_and_empty_plan_matches_base() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/reference.json"))?)?;
    let ids: Vec<u32> = r["perplexity"]["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let res =
        recurformer::eval::perplexity::perplexity(&loaded.model, &ids, 512, None, &mut |_| {})?;
    let ref_ppl = r["perplexity"]["ppl"].as_f64().context("ppl")?;
    println!(
        "eval perplexity {:.4} vs transformers {ref_ppl:.4}",
        res.ppl
    );
    assert_eq!(
        (res.windows, res.predictions, res.second_half_predictions),
        (1, 511, 256)
    );
    assert!((res.ppl / ref_ppl - 1.0).abs() <= 1e-3);
    // Two windows of 256: each restarts from an empty cache, so it differs from one window of 512.
    let two =
        recurformer::eval::perplexity::perplexity(&loaded.model, &ids, 256, None, &mut |_| {})?;
    assert_eq!((two.windows, two.predictions), (2, 510));
    assert!(two.ppl > res.ppl);

    let plan = recurformer::model::plan::Plan::empty(&loaded.model.cfg);
    let prov = recurformer::model::hybrid::Provenance {
        base_model: "default".into(),
        recency: None,
        plan_file: None,
        seed: 0,
        recurformer_version: "test".into(),
        training: vec![],
    };
    let opts = recurformer::convert::init::ConvertOptions {
        plan: &plan,
        recency: None,
        init: recurformer::model::hybrid::Init::Attention,
        seed: 0,
        provenance: prov,
        local: None,
    };
    let h = recurformer::convert::init::convert(&loaded.model, &opts)?;
    let he = recurformer::eval::perplexity::perplexity(&h, &ids, 512, None, &mut |_| {})?;
    assert_eq!(he, res);
    Ok(())
}
