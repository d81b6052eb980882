//! Unit tests of the pieces of a run: configuration checks, window order, resume bookkeeping.

use super::*;
use crate::model::layers::Linear;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

fn rand(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut r = SplitMix64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| (r.next() >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    Ok(a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// The fused loss equals the losses composed from candle ops, values and gradients.
#[test]
fn fused_distill_loss_matches_the_composed_one() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        let (b, t, v) = (3, 5, 11);
        let s = Var::from_tensor(&rand(&[b, t, v], 1, dtype)?)?;
        let teacher = rand(&[b, t, v], 2, dtype)?;
        let ids_v: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
        let ids = Tensor::from_vec(ids_v, (b, t), &Device::Cpu)?;
        let (kl, ce) = distill_losses(s.as_tensor(), &teacher, &ids)?;
        let fused = (&kl + (&ce * 0.7)?)?;
        let g_fused = fused
            .backward()?
            .get(s.as_tensor())
            .context("grad")?
            .clone();
        // Composed reference.
        let ls = candle_nn::ops::log_softmax(s.as_tensor(), D::Minus1)?;
        let lt = candle_nn::ops::log_softmax(&teacher, D::Minus1)?;
        let kl_ref = ((lt.exp()? * (&lt - &ls)?)?.sum_all()? / (b * t) as f64)?;
        let tg = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?;
        let picked = ls.narrow(1, 0, t - 1)?.contiguous()?.gather(&tg, 2)?;
        let ce_ref = (picked.sum_all()? * (-1.0 / (b * (t - 1)) as f64))?;
        let reference = (&kl_ref + (&ce_ref * 0.7)?)?;
        let g_ref = reference
            .backward()?
            .get(s.as_tensor())
            .context("grad")?
            .clone();
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (what, x, y) in [("kl", &kl, &kl_ref), ("ce", &ce, &ce_ref)] {
            let e = max_rel(x, y)?;
            assert!(e <= tol, "{dtype:?} {what}: {e}");
        }
        let e = max_rel(&g_fused, &g_ref)?;
        println!("{dtype:?}: fused vs composed gradient, max relative difference {e:.1e}");
        assert!(e <= tol, "{dtype:?} gradient: {e}");
    }
    Ok(())
}

/// Per-position weights: all ones give the unweighted loss bit for bit; other weights give the
/// weighted means of the composed per-position losses, values and gradients.
#[test]
fn weighted_distill_loss_is_the_weighted_mean() -> Result<()> {
    let (b, t, v) = (2, 6, 13);
    let dtype = DType::F64;
    let s = Var::from_tensor(&rand(&[b, t, v], 3, dtype)?)?;
    let teacher = rand(&[b, t, v], 4, dtype)?;
    let ids_v: Vec<u32> = (0..b * t).map(|i| (i * 5 % v) as u32).collect();
    let ids = Tensor::from_vec(ids_v, (b, t), &Device::Cpu)?;
    let total = |kl: &Tensor, ce: &Tensor| -> Result<Tensor> { Ok((kl + (ce * 0.5)?)?) };
    let grad = |x: &Tensor| -> Result<Tensor> {
        Ok(x.backward()?.get(s.as_tensor()).context("grad")?.clone())
    };
    let (kl, ce) = distill_losses(s.as_tensor(), &teacher, &ids)?;
    let ones = vec![1.0; b * t];
    let (kl1, ce1) = distill_losses_weighted(s.as_tensor(), &teacher, &ids, Some(&ones))?;
    assert_eq!(kl.to_scalar::<f64>()?, kl1.to_scalar::<f64>()?);
    assert_eq!(ce.to_scalar::<f64>()?, ce1.to_scalar::<f64>()?);
    let (g, g1) = (grad(&total(&kl, &ce)?)?, grad(&total(&kl1, &ce1)?)?);
    assert_eq!(
        g.flatten_all()?.to_vec1::<f64>()?,
        g1.flatten_all()?.to_vec1::<f64>()?
    );

    // Weights 1 and 5 (and one 0); the reference composes per-position losses with candle ops.
    let w: Vec<f64> = (0..b * t)
        .map(|i| match i % 4 {
            0 => 5.0,
            3 if i == 3 => 0.0,
            _ => 1.0,
        })
        .collect();
    let (klw, cew) = distill_losses_weighted(s.as_tensor(), &teacher, &ids, Some(&w))?;
    let wt = Tensor::from_vec(w.clone(), (b, t), &Device::Cpu)?;
    let ls = candle_nn::ops::log_softmax(s.as_tensor(), D::Minus1)?;
    let lt = candle_nn::ops::log_softmax(&teacher, D::Minus1)?;
    let kl_pos = (lt.exp()? * (&lt - &ls)?)?.sum(D::Minus1)?; // (b, t)
    let kl_ref = ((kl_pos * &wt)?.sum_all()? / w.iter().sum::<f64>())?;
    let tg = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?;
    let picked = ls
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .gather(&tg, 2)?
        .squeeze(2)?; // (b, t-1)
    let w_ce = wt.narrow(1, 0, t - 1)?;
    let ce_den: f64 = w_ce.sum_all()?.to_scalar::<f64>()?;
    let ce_ref = ((picked * &w_ce)?.sum_all()? * (-1.0 / ce_den))?;
    for (what, x, y) in [("kl", &klw, &kl_ref), ("ce", &cew, &ce_ref)] {
        let e = max_rel(x, y)?;
        assert!(e <= 1e-12, "weighted {what}: {e}");
    }
    let e = max_rel(
        &grad(&total(&klw, &cew)?)?,
        &grad(&total(&kl_ref, &ce_ref)?)?,
    )?;
    assert!(e <= 1e-12, "weighted gradient: {e}");
    // The weights move the loss: the weighted value is not the plain one.
    assert!((klw.to_scalar::<f64>()? - kl.to_scalar::<f64>()?).abs() > 1e-6);

    // Bad weights are refused with the count named.
    let err = distill_losses_weighted(s.as_tensor(), &teacher, &ids, Some(&w[1..]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("11 values for 12 positions"), "{err}");
    Ok(())
}

/// Retrieval windows are mixed in at the configured share, deterministically.
#[test]
fn retrieval_share_is_met_and_deterministic() {
    for share in [0.0, 0.15, 0.5, 1.0] {
        let n = (0..20_000u64)
            .filter(|&g| is_retrieval_window(7, g, share))
            .count();
        let got = n as f64 / 20_000.0;
        assert!((got - share).abs() < 0.015, "share {share}: {got}");
    }
    let a: Vec<bool> = (0..100).map(|g| is_retrieval_window(7, g, 0.3)).collect();
    let b: Vec<bool> = (0..100).map(|g| is_retrieval_window(7, g, 0.3)).collect();
    let c: Vec<bool> = (0..100).map(|g| is_retrieval_window(8, g, 0.3)).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// The frozen-weight linear gives the plain matmul's output and input gradient.
#[test]
fn frozen_linear_matches_the_plain_one() -> Result<()> {
    let x = Var::from_tensor(&rand(&[2, 7, 5], 3, DType::F32)?)?;
    let l = Linear::new(
        rand(&[4, 5], 4, DType::F32)?,
        Some(rand(&[4], 5, DType::F32)?),
    );
    let r = rand(&[2, 7, 4], 6, DType::F32)?;
    let y1 = linear_train(&l, x.as_tensor())?;
    let y2 = l.forward(x.as_tensor())?;
    assert!(max_rel(&y1, &y2)? <= 1e-6);
    let g1 = (y1 * &r)?.sum_all()?.backward()?;
    let g2 = (y2 * &r)?.sum_all()?.backward()?;
    let (a, b) = (
        g1.get(x.as_tensor()).context("g1")?,
        g2.get(x.as_tensor()).context("g2")?,
    );
    assert!(max_rel(a, b)? <= 1e-6);
    Ok(())
}

#[test]
fn window_order_is_a_function_of_the_counter() -> Result<()> {
    let mut a = WindowOrder::new(1000, 64, 7)?;
    let seq: Vec<usize> = (0..40).map(|g| a.window(g).0).collect();
    // Random access, backwards too, gives the same windows.
    let mut b = WindowOrder::new(1000, 64, 7)?;
    for g in (0..40).rev() {
        assert_eq!(b.window(g).0, seq[g as usize]);
    }
    // Each epoch visits distinct, in-range windows.
    let mut c = WindowOrder::new(1000, 64, 7)?;
    let (_, e0, _) = c.window(0);
    let first: Vec<usize> = (0..c.perm.len() as u64).map(|g| c.window(g).0).collect();
    let mut s = first.clone();
    s.sort();
    s.dedup();
    assert_eq!(s.len(), first.len());
    assert!(first.iter().all(|&x| x + 64 <= 1000));
    assert_eq!(e0, 0);
    // Another seed, another order.
    let mut d = WindowOrder::new(1000, 64, 8)?;
    let other: Vec<usize> = (0..40).map(|g| d.window(g).0).collect();
    assert_ne!(seq, other);
    Ok(())
}

#[test]
fn config_differences_ignore_the_time_limit() {
    let a = TrainConfig {
        budget: Budget {
            max_steps: Some(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut b = a.clone();
    b.budget.max_minutes = Some(5.0);
    assert!(a.differences(&b).is_empty());
    b.seq_len = 128;
    b.adamw.beta2 = 0.99;
    let d = a.differences(&b);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(
        d.iter().any(|x| x.starts_with("seq_len: 512 vs 128")),
        "{d:?}"
    );
    assert!(d.iter().any(|x| x.starts_with("adamw.beta2")), "{d:?}");
}

#[test]
fn budgets_split_between_stages() {
    let cfg = TrainConfig {
        seq_len: 100,
        batch: 2,
        accum: 2,
        align_share: 0.25,
        budget: Budget {
            max_steps: Some(100),
            max_tokens: Some(40_000),
            max_minutes: Some(10.0),
        },
        ..Default::default()
    };
    let a = stage_budget(&cfg, 0, &[]);
    // 25 steps by count, 40000 * 0.25 / 400 = 25 by tokens.
    assert_eq!(a.steps, Some(25));
    assert_eq!(a.seconds, Some(150.0));
    let done = [StageSummary {
        stage: Stage::Align,
        steps: 25,
        horizon: 25,
        tokens: 10_000,
        elapsed_s: 100.0,
        stopped_by: "steps".into(),
        last_train_loss: None,
        heldout_start: None,
        heldout_end: None,
    }];
    let d = stage_budget(&cfg, 1, &done);
    assert_eq!(d.steps, Some(75));
    assert_eq!(d.seconds, Some(500.0));
}

#[test]
fn a_mix_takes_each_part_in_its_share_of_the_tokens() {
    let docs = |tag: &str, sizes: &[usize]| -> Vec<TokenDocument> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| TokenDocument {
                source: format!("{tag}{i}"),
                ids: vec![i as u32; n],
            })
            .collect()
    };
    let parts = || {
        vec![
            ("a".to_string(), 0.5, docs("a", &[300, 100, 200])), // 600 tokens: fixes the total
            ("b".to_string(), 0.25, docs("b", &[1000, 1000, 1000])),
            ("c".to_string(), 0.25, docs("c", &[50; 40])),
        ]
    };
    let out = mix_documents(parts(), 7).unwrap();
    let count = |tag: &str| -> usize {
        out.iter()
            .filter(|d| d.source.starts_with(tag))
            .map(|d| d.ids.len())
            .sum()
    };
    // a is used whole; b and c get half of a's tokens each (0.25 / 0.5).
    assert_eq!((count("a"), count("b"), count("c")), (600, 300, 300));
    // Whole documents until the quota, the last one cut: c takes six documents.
    assert_eq!(out.iter().filter(|d| d.source.starts_with('c')).count(), 6);
    // Seeded: the same seed gives the same documents, another seed another selection of b.
    let again = mix_documents(parts(), 7).unwrap();
    assert_eq!(
        out.iter().map(|d| &d.source).collect::<Vec<_>>(),
        again.iter().map(|d| &d.source).collect::<Vec<_>>()
    );
    let picks = |seed: u64| -> Vec<String> {
        mix_documents(parts(), seed)
            .unwrap()
            .into_iter()
            .filter(|d| d.source.starts_with('c'))
            .map(|d| d.source)
            .collect()
    };
    assert!((0..8).any(|s| picks(s) != picks(7)));
    // Bad shares and empty parts are refused by name.
    let mut bad = parts();
    bad[1].1 = 0.0;
    let e = format!("{:#}", mix_documents(bad, 0).unwrap_err());
    assert!(e.contains("share of b"), "{e}");
    let mut empty = parts();
    empty[2].2.clear();
    let e = format!("{:#}", mix_documents(empty, 0).unwrap_err());
    assert!(e.contains("c part"), "{e}");
}
