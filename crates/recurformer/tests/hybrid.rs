//! RecurFormer checkpoints: conversion, save/load, the hybrid cache, and damaged checkpoints.

mod common;
use anyhow::Result;
use candle_core::{Device, Tensor};
use common::*;
use recurformer::checkpoint::save::save_checkpoint;
use recurformer::convert::init::{convert, ConvertOptions};
use recurformer::convert::recency::{Calibration, RecencyReport};
use recurformer::model::hybrid::{Init, Provenance};
use recurformer::model::llama::Model;
use recurformer::model::plan::Plan;
use std::path::Path;

fn provenance() -> Provenance {
    Provenance {
        base_model: "test".into(),
        recency: None,
        plan_file: None,
        seed: 0,
        recurformer_version: "test".into(),
        training: vec![],
    }
}

fn report_for(m: &Model, ids: &[u32], window: usize) -> Result<RecencyReport> {
    recurformer::convert::analyze::analyze(
        m,
        &[ids.to_vec()],
        window,
        Calibration::default(),
        "test",
        &mut |_| {},
    )
}

fn hybrid(m: &Model, plan: &Plan, recency: Option<&RecencyReport>, init: Init) -> Result<Model> {
    convert(
        m,
        &ConvertOptions {
            plan,
            recency,
            init,
            seed: 3,
            provenance: provenance(),
            local: None,
        },
    )
}

fn logits(m: &Model, ids: &Tensor) -> Result<Tensor> {
    m.forward(ids, &mut m.new_cache(1, ids.dim(1)?))
}

/// Full forward vs prefill of `prefill` tokens then pieces of 3 and single tokens.
fn cached_vs_full(m: &Model, ids: &Tensor, prefill: usize) -> Result<f32> {
    let (full, cached) = full_and_cached(m, ids, prefill)?;
    max_abs_diff(&full, &cached)
}

fn save_and_load(m: &Model, dir: &Path) -> Result<Model> {
    save_checkpoint(m, None, dir)?;
    Ok(recurformer::checkpoint::loader::load(dir)?.model)
}

#[test]
fn empty_plan_reproduces_the_base_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in ["tiny-llama", "tiny-llama3", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let h = hybrid(&base, &Plan::empty(&base.cfg), None, Init::Attention)?;
        assert_eq!(
            max_abs_diff(&logits(&base, &ids)?, &logits(&h, &ids)?)?,
            0.0
        );
        let back = save_and_load(&h, &tmp.path().join(name))?;
        assert_eq!(
            max_abs_diff(&logits(&base, &ids)?, &logits(&back, &ids)?)?,
            0.0,
            "{name}"
        );
        assert!(back.recurformer.is_some());
    }
    Ok(())
}

#[test]
fn tiny_hybrids_round_trip_and_decode_like_the_full_forward() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let ids_v: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let report = report_for(&base, &ids_v, 2)?;
        // Layer 0 keeps group 1 only; layer 1 is all Mamba.
        let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![0, 1]])?;
        for init in [Init::Attention, Init::Random] {
            let h = hybrid(&base, &plan, Some(&report), init)?;
            assert!(h.layers[1].self_attn.is_none() && h.layers[1].mixer.is_some());
            let d = cached_vs_full(&h, &ids, 5)?;
            println!("{name} {init:?}: cached vs full {d:.2e}");
            assert!(d <= 1e-4, "{name} {init:?}: {d}");
            // The conversion changes the function (it is not the base model any more)...
            assert!(max_abs_diff(&logits(&base, &ids)?, &logits(&h, &ids)?)? > 1e-3);
            // ...and a saved checkpoint reloads to exactly the same function.
            let back = save_and_load(&h, &tmp.path().join(format!("{name}-{init:?}")))?;
            assert_eq!(
                max_abs_diff(&logits(&h, &ids)?, &logits(&back, &ids)?)?,
                0.0
            );
            // Cache bytes: KV for the kept group of layer 0 only, plus the two mixers' states.
            let t = ids.dim(1)?;
            let mut cache = back.new_cache(1, t);
            back.forward(&ids, &mut cache)?;
            let c = &back.cfg;
            assert_eq!(cache.bytes().kv, 2 * c.head_dim * 4 * t);
            let state: usize = back
                .layers
                .iter()
                .filter_map(|l| l.mixer.as_ref())
                .map(|m| m.cfg.state_bytes(1))
                .sum();
            assert_eq!(cache.bytes().recurrent, state);
            assert_eq!(cache.bytes().total(), plan.predicted_bytes(t).total_bytes);
        }
    }
    Ok(())
}

#[test]
fn quantised_tiny_hybrids_decode_like_their_full_forward() -> Result<()> {
    // Under q8_0 the mixers' five projections become one quantised matrix that prefill and decode
    // both read (and decode steps run the mixer kernel and the q8_0 decode kernel), so cached
    // decode still equals the full forward up to the order of f32 sums: the f32 bound above.
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let ids_v: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let report = report_for(&base, &ids_v, 2)?;
        let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![0, 1]])?;
        let mut h = hybrid(&base, &plan, Some(&report), Init::Random)?;
        let f32_logits = logits(&h, &ids)?;
        let s = h.quantize(recurformer::model::quant::WeightFormat::Q8_0)?;
        let mixers = h.layers.iter().filter(|l| l.mixer.is_some()).count();
        assert!(mixers == 2, "{name}: {mixers} mixers");
        assert!(
            h.layers
                .iter()
                .filter_map(|l| l.mixer.as_ref())
                .all(|m| m.step_proj.is_some()),
            "{name}: a mixer's projections were left in f32: {:?}",
            s.kept_f32
        );
        // A prefill of 2, a piece of 3, then single-token steps (the step kernel).
        assert!(ids.dim(1)? >= 8, "{name}: {} tokens", ids.dim(1)?);
        let d = cached_vs_full(&h, &ids, 2)?;
        println!("{name} q8_0: cached vs full {d:.2e}");
        assert!(d <= 1e-4, "{name}: {d}");
        // It is still the same function up to q8_0 rounding: a few 0.5 % errors of the
        // matmuls compounded over two layers, well under 5 % of the largest logit.
        let q = max_abs_diff(&f32_logits, &logits(&h, &ids)?)?;
        let scale = f32_logits.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("{name} q8_0 vs f32 logits: {q:.3e} (largest {scale:.2})");
        assert!(
            q > 0.0 && q < 0.05 * scale,
            "{name}: q8_0 vs f32 logits {q} of {scale}"
        );
    }
    Ok(())
}

#[test]
fn a_long_prompt_prefilled_in_pieces_gives_the_full_forward_logits() -> Result<()> {
    use recurformer::model::llama::PREFILL_PIECE;
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let ids_v: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![0, 1]])?;
        let h = hybrid(&base, &plan, None, Init::Random)?;
        // Two whole pieces and a part of one.
        let t = 2 * PREFILL_PIECE + 37;
        let long: Vec<u32> = (0..t).map(|i| ids_v[i % ids_v.len()]).collect();
        let long = Tensor::new(long.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        for (what, m) in [("base", &base), ("hybrid", &h)] {
            let full = logits(m, &long)?.narrow(1, t - 1, 1)?.squeeze(1)?; // (1, v)
            let mut cache = m.new_cache(1, 16);
            let last = m.forward_last(&long, &mut cache)?;
            assert_eq!(cache.seq_len, t);
            let d = max_abs_diff(&full, &last)?;
            println!("{name} {what}: pieces vs one prefill {d:.2e}");
            // The cached-vs-full bound of the tests above.
            assert!(d <= 1e-4, "{name} {what}: {d}");
        }
    }
    Ok(())
}

#[test]
fn attention_init_needs_the_recency_report() -> Result<()> {
    let base = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![]])?;
    let e = hybrid(&base, &plan, None, Init::Attention)
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("--recency"), "{e}");
    let h = hybrid(&base, &plan, None, Init::Random)?;
    let e = hybrid(&h, &plan, None, Init::Random)
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("already"), "{e}");
    Ok(())
}

#[test]
fn damaged_hybrid_checkpoints_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let base = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![1]])?;
    let h = hybrid(&base, &plan, None, Init::Random)?;
    let make = |name: &str| -> Result<std::path::PathBuf> {
        let d = tmp.path().join(name);
        save_checkpoint(&h, None, &d)?;
        Ok(d)
    };
    let err = |d: &Path| {
        format!(
            "{:#}",
            recurformer::checkpoint::loader::load(d)
                .err()
                .expect("damaged checkpoint loaded")
        )
    };
    let edit_tensors =
        |d: &Path, f: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| -> Result<()> {
            let p = d.join("model.safetensors");
            let mut t = candle_core::safetensors::load(&p, &Device::Cpu)?;
            f(&mut t);
            candle_core::safetensors::save(&t, &p)?;
            Ok(())
        };
    let edit_config = |d: &Path, f: &dyn Fn(&mut serde_json::Value)| -> Result<()> {
        let p = d.join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
        f(&mut v);
        std::fs::write(&p, v.to_string())?;
        Ok(())
    };

    let d = make("missing")?;
    edit_tensors(&d, &|t| {
        t.remove("model.layers.1.mixer.A_log");
    })?;
    let e = err(&d);
    assert!(
        e.contains("model.layers.1.mixer.A_log") && e.contains("missing"),
        "{e}"
    );

    let d = make("shape")?;
    edit_tensors(&d, &|t| {
        let w = Tensor::zeros((5, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.mixer.x_proj.weight".into(), w);
    })?;
    let e = err(&d);
    assert!(
        e.contains("model.layers.0.mixer.x_proj.weight") && e.contains("[5, 64]"),
        "{e}"
    );

    // The plan says layer 0 keeps both groups, but the tensors are those of one kept group.
    let d = make("inconsistent")?;
    edit_config(&d, &|v| {
        let l0 = &mut v["recurformer"]["plan"]["layers"][0];
        l0["attention_groups"] = serde_json::json!([0, 1]);
        l0["attention_heads"] = serde_json::json!([0, 1, 2, 3]);
        l0["mamba_groups"] = serde_json::json!([]);
        l0["mamba_heads"] = serde_json::json!([]);
    })?;
    let e = err(&d);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("[32, 64]"),
        "{e}"
    );

    // A plan that splits a group.
    let d = make("partial")?;
    edit_config(&d, &|v| {
        v["recurformer"]["plan"]["layers"][0]["mamba_heads"] = serde_json::json!([0]);
    })?;
    let e = err(&d);
    assert!(e.contains("layer 0"), "{e}");

    // Without the section, the mixer tensors are unexpected.
    let d = make("nosection")?;
    edit_config(&d, &|v| {
        v.as_object_mut().unwrap().remove("recurformer");
    })?;
    let e = err(&d);
    assert!(
        e.contains("mixer") && e.contains("no `recurformer` section"),
        "{e}"
    );
    Ok(())
}

#[test]
fn real_model_hybrid_decodes_like_its_full_forward() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let base = &loaded.model;
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(
        "smollm2/recency_golden.json",
    ))?)?;
    let ids: Vec<u32> = golden["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let report = report_for(base, &ids[..128], 32)?;
    let plan = Plan::by_fraction(&report, 0.5, 1)?;
    assert_eq!(plan.replaced_groups(), 45);
    let h = hybrid(base, &plan, Some(&report), Init::Attention)?;
    let x = Tensor::new(&ids[..48], &Device::Cpu)?.unsqueeze(0)?;
    let d = cached_vs_full(&h, &x, 16)?;
    println!("50% hybrid: cached vs full {d:.2e}");
    assert!(d <= 1e-3, "{d}");
    let mut cache = h.new_cache(1, 48);
    h.forward(&x, &mut cache)?;
    assert_eq!(cache.bytes().total(), plan.predicted_bytes(48).total_bytes);
    assert_eq!(cache.bytes().kv * 2, base.cfg.kv_bytes_per_token() * 48);
    // The empty plan on the real model is the base model, through a saved checkpoint too.
    let tmp = tempfile::tempdir()?;
    let e = hybrid(base, &Plan::empty(&base.cfg), None, Init::Attention)?;
    save_checkpoint(&e, loaded.tokenizer.as_ref(), &tmp.path().join("empty"))?;
    let back = recurformer::checkpoint::loader::load(&tmp.path().join("empty"))?;
    let short = x.narrow(1, 0, 24)?;
    assert_eq!(
        max_abs_diff(&logits(base, &short)?, &logits(&back.model, &short)?)?,
        0.0
    );
    // The saved tokenizer and chat template behave like the GGUF's.
    let (t0, t1) = (loaded.tokenizer()?, back.tokenizer()?);
    for s in [
        "Hello world 12345",
        "<|im_start|>user\nhi<|im_end|>",
        "  spaces\n\ttabs",
    ] {
        assert_eq!(t0.encode(s, true)?, t1.encode(s, true)?, "{s:?}");
    }
    let msgs = vec![recurformer::formats::tokenizer::ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    assert_eq!(
        t0.apply_chat_template(&msgs, true)?,
        t1.apply_chat_template(&msgs, true)?
    );
    Ok(())
}

/// `bench_point` (fresh prefills, median over repeats) and `bench_series` (one growing cache)
/// report the cache bytes the plan predicts, time to first token only for fresh prefills, and a
/// smaller cache for the hybrid at every length.
#[test]
fn bench_points_report_first_token_time_and_exact_cache_bytes() -> Result<()> {
    use recurformer::eval::bench::{bench_point, bench_series};
    let base = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![1]])?;
    let h = hybrid(&base, &plan, None, Init::Random)?;
    let tokens: Vec<u32> = (0..200u32).map(|i| (i * 7 + 3) % 250).collect();
    for m in [&base, &h] {
        let (kv, state) = m.cache_bytes_per_token_and_state();
        let p = bench_point(m, &tokens, 64, 5, 3)?;
        assert_eq!(p.repeats, 3);
        let ttft = p.ttft_s.expect("fresh prefill has a first-token time");
        assert!(ttft > 0.0 && (p.prefill_tok_s * ttft - 64.0).abs() < 1e-6);
        // The cache holds the context and the decoded tokens.
        assert_eq!(p.cache_bytes, kv * (64 + 5) + state);
        let s = bench_series(m, &tokens, &[32, 96], 4)?;
        assert!(s.iter().all(|p| p.ttft_s.is_none() && p.decode_tok_s > 0.0));
        assert_eq!(s[1].cache_bytes, kv * (96 + 4) + state);
    }
    let (b, hp) = (
        bench_point(&base, &tokens, 100, 2, 1)?,
        bench_point(&h, &tokens, 100, 2, 1)?,
    );
    assert!(hp.cache_bytes < b.cache_bytes);
    assert!(bench_point(&base, &tokens, 500, 2, 1).is_err());
    assert!(bench_point(&base, &tokens, 10, 2, 0).is_err());
    Ok(())
}

/// The causal ceiling's model (`Model::with_kv_window`): a window covering the whole sequence is
/// the base model; a short one changes exactly the restricted groups' outputs; decoding with the
/// cache equals the full forward; a RecurFormer or a zero window is refused.
#[test]
fn kv_window_restriction_is_exact_and_decodes_like_the_full_forward() -> Result<()> {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let t = ids.dim(1)?;
        let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![1]])?;
        let wide = base.with_kv_window(&plan, 0, t)?;
        assert!(max_abs_diff(&logits(&base, &ids)?, &logits(&wide, &ids)?)? < 1e-5);
        let narrow = base.with_kv_window(&plan, 1, 2)?;
        assert!(max_abs_diff(&logits(&base, &ids)?, &logits(&narrow, &ids)?)? > 1e-3);
        // Up to the first positions every key is a sink or recent: the first 3 logits agree.
        let first = |m: &Model| -> Result<Tensor> { Ok(logits(m, &ids)?.narrow(1, 0, 3)?) };
        assert!(max_abs_diff(&first(&base)?, &first(&narrow)?)? < 1e-5);
        let d = cached_vs_full(&narrow, &ids, 5)?;
        assert!(d <= 1e-4, "{name}: cached vs full {d}");
        assert!(base.with_kv_window(&plan, 4, 0).is_err());
        let h = hybrid(&base, &plan, None, Init::Random)?;
        assert!(h.with_kv_window(&plan, 4, 32).is_err());
    }
    Ok(())
}

/// Windowed heads beside the mixer (`convert` with `local`): at conversion the hybrid is exactly
/// the base model restricted to the window on the plan's groups (the mixer starts silent); with
/// the mixer active it decodes like the full forward, round-trips through a checkpoint, and its
/// cache holds at most sinks + window - 1 tokens per windowed group.
#[test]
fn windowed_heads_start_at_the_ceiling_and_decode_like_the_full_forward() -> Result<()> {
    use recurformer::model::hybrid::LocalWindow;
    let tmp = tempfile::tempdir()?;
    for name in ["tiny-llama", "tiny-qwen2"] {
        let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
        let (ids, _) = tiny_expected(name)?;
        let t = ids.dim(1)?;
        let ids_v: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let report = report_for(&base, &ids_v, 2)?;
        let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![0, 1]])?;
        let local = LocalWindow {
            sinks: 2,
            window: 3,
        };
        let h = convert(
            &base,
            &ConvertOptions {
                plan: &plan,
                recency: Some(&report),
                init: Init::Attention,
                seed: 3,
                provenance: provenance(),
                local: Some(local),
            },
        )?;
        let ceiling = base.with_kv_window(&plan, 2, 3)?;
        let d = max_abs_diff(&logits(&ceiling, &ids)?, &logits(&h, &ids)?)?;
        assert!(d < 1e-5, "{name}: converted vs ceiling {d}");
        // Wake the mixers up: the sum of both parts must still decode like the full forward.
        let h = recurformer::train::map_model(&h, &mut |n, x| {
            Ok(if n.ends_with(".mixer.norm.weight") {
                x.ones_like()?
            } else {
                x.clone()
            })
        })?;
        assert!(max_abs_diff(&logits(&ceiling, &ids)?, &logits(&h, &ids)?)? > 1e-4);
        let d = cached_vs_full(&h, &ids, 5)?;
        assert!(d <= 1e-4, "{name}: cached vs full {d}");
        let d = cached_vs_full(&h, &ids, 1)?;
        assert!(d <= 1e-4, "{name}: cached vs full from one token {d}");
        let back = save_and_load(&h, &tmp.path().join(name))?;
        assert_eq!(
            max_abs_diff(&logits(&h, &ids)?, &logits(&back, &ids)?)?,
            0.0
        );
        assert_eq!(
            back.recurformer.as_ref().map(|s| s.mixer.local),
            Some(Some(local))
        );
        let mut cache = back.new_cache(1, t);
        back.forward(&ids, &mut cache)?;
        let c = &back.cfg;
        // Layer 0 replaces group 0, layer 1 both groups: 3 windowed groups, sinks + window - 1
        // tokens each.
        assert_eq!(cache.bytes().window, 3 * 2 * c.head_dim * 4 * (2 + 3 - 1));
        let (_, state) = back.cache_bytes_per_token_and_state();
        assert_eq!(state, cache.bytes().recurrent + cache.bytes().window);
    }
    Ok(())
}
