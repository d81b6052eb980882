//! The batched decode step of several sequences (what `serve` runs every step) against each
//! sequence decoded alone: same logits, same cache contents, for base models and hybrids (mixer
//! alone, and mixer with windowed heads beside it), with sequences of different lengths.

mod common;
use anyhow::Result;
use candle_core::Tensor;
use common::*;
use recurformer::convert::init::{convert, ConvertOptions};
use recurformer::model::cache::HybridCache;
use recurformer::model::hybrid::{Init, LocalWindow, Provenance};
use recurformer::model::llama::Model;
use recurformer::model::plan::Plan;

fn hybrid(base: &Model, local: Option<LocalWindow>) -> Result<Model> {
    // Layer 0 keeps KV group 1 only; layer 1 is all Mamba.
    let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![0, 1]])?;
    convert(
        base,
        &ConvertOptions {
            plan: &plan,
            recency: None,
            init: Init::Random,
            seed: 5,
            provenance: Provenance {
                base_model: "test".into(),
                recency: None,
                plan_file: None,
                seed: 5,
                recurformer_version: "test".into(),
                training: vec![],
            },
            local,
        },
    )
}

/// Prefills three prompts of different lengths, then decodes four steps both ways: all three as
/// one batched step, and each alone with the ordinary forward. Returns the largest logit gap.
fn batched_vs_alone(m: &Model, ids: &[u32]) -> Result<f32> {
    let lens = [3usize, 9, 6];
    let mut alone: Vec<HybridCache> = Vec::new();
    for &l in &lens {
        let mut c = m.new_cache(1, 4);
        m.forward_last(&Tensor::new(&ids[..l], &m.device)?.unsqueeze(0)?, &mut c)?;
        alone.push(c);
    }
    let mut batched: Vec<HybridCache> = alone.clone();
    let mut worst = 0f32;
    for step in 0..4 {
        // Different next tokens per sequence, drawn from the fixture's ids.
        let toks: Vec<u32> = (0..lens.len())
            .map(|i| ids[(lens[i] + step + i) % ids.len()])
            .collect();
        let mut refs: Vec<&mut HybridCache> = batched.iter_mut().collect();
        let got = m.forward_step_batch(&toks, &mut refs)?; // (3, v)
        for (i, c) in alone.iter_mut().enumerate() {
            let want = m.forward_last(&Tensor::new(&[toks[i]], &m.device)?.unsqueeze(0)?, c)?; // (1, v)
            worst = worst.max(max_abs_diff(&got.narrow(0, i, 1)?, &want)?);
        }
    }
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.seq_len, b.seq_len);
        assert_eq!(a.bytes(), b.bytes(), "cache bytes by kind");
    }
    Ok(worst)
}

#[test]
fn batched_decode_step_matches_each_sequence_alone() -> Result<()> {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let models = [
            ("base", base.clone()),
            ("mixer", hybrid(&base, None)?),
            (
                "mixer + window",
                hybrid(
                    &base,
                    Some(LocalWindow {
                        sinks: 2,
                        window: 4,
                    }),
                )?,
            ),
        ];
        for (what, m) in &models {
            let d = batched_vs_alone(m, &ids)?;
            println!("{name} {what}: batched vs alone max |logit diff| {d:.2e}");
            assert!(d <= 1e-4, "{name} {what}: {d}");
            // Quantised (the tiny models are 32-aligned, so every matrix and the mixers'
            // stacked projections are q8_0): the batched step's matmuls take all rows in one
            // call (the tiled kernel where the CPU has AVX-512 VNNI), each row's sums its own.
            let mut q = m.clone();
            q.quantize(recurformer::model::quant::WeightFormat::Q8_0)?;
            let d = batched_vs_alone(&q, &ids)?;
            println!("{name} {what} q8_0: batched vs alone max |logit diff| {d:.2e}");
            assert!(d <= 1e-4, "{name} {what} q8_0: {d}");
        }
    }
    Ok(())
}

#[test]
fn batched_decode_step_refuses_mismatched_inputs() -> Result<()> {
    let m = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let mut a = m.new_cache(1, 4);
    let mut b = m.new_cache(1, 4);
    let err = m
        .forward_step_batch(&[1, 2, 3], &mut [&mut a, &mut b])
        .unwrap_err();
    assert!(err.to_string().contains("3 tokens and 2 caches"), "{err}");
    let err = m
        .forward_step_batch(&[1, m.cfg.vocab_size as u32], &mut [&mut a, &mut b])
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let mut wide = m.new_cache(2, 4);
    m.forward_last(&Tensor::new(&[[1u32], [2]], &m.device)?, &mut wide)?;
    let err = m.forward_step_batch(&[1], &mut [&mut wide]).unwrap_err();
    assert!(err.to_string().contains("more than one sequence"), "{err}");
    Ok(())
}

/// A forked cache (what `serve` keeps as a prefix snapshot) restored and fed the rest of a text
/// gives the logits of a fresh prefill of the whole text, even after the original cache went on
/// with other tokens: for the base model and hybrids with and without windowed heads.
#[test]
fn a_forked_cache_continues_like_a_fresh_prefill() -> Result<()> {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let local = Some(LocalWindow {
            sinks: 2,
            window: 4,
        });
        for (what, m) in [
            ("base", base.clone()),
            ("mixer", hybrid(&base, None)?),
            ("mixer + window", hybrid(&base, local)?),
        ] {
            let t = |x: &[u32]| -> Result<Tensor> { Ok(Tensor::new(x, &m.device)?.unsqueeze(0)?) };
            let cut = 5;
            let mut fresh = m.new_cache(1, ids.len());
            let want = m
                .forward(&t(&ids)?, &mut fresh)?
                .narrow(1, cut, ids.len() - cut)?;
            let mut original = m.new_cache(1, 8);
            m.forward(&t(&ids[..cut])?, &mut original)?;
            let mut snapshot = original.fork(cut)?;
            // The original goes on with other tokens, in place, past the snapshot's position.
            let other: Vec<u32> = ids[cut..].iter().rev().copied().collect();
            m.forward(&t(&other)?, &mut original)?;
            let got = m.forward(&t(&ids[cut..])?, &mut snapshot)?;
            let d = max_abs_diff(&got, &want)?;
            println!("{name} {what}: restored vs fresh prefill {d:.2e}");
            assert!(d <= 1e-4, "{name} {what}: {d}");
            assert_eq!(snapshot.bytes(), fresh.bytes());
        }
    }
    Ok(())
}
