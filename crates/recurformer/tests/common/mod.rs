//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod counting_alloc;
pub mod gguf;
pub mod mutate;
pub mod train;

use anyhow::{Context, Result};
use candle_core::Tensor;
use std::path::PathBuf;

pub fn root() -> PathBuf {
    recurformer::repo_root()
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures").join(name)
}

/// The default model; tests that need it fail (not skip) when setup has not run.
pub fn default_model() -> PathBuf {
    let p = recurformer::default_model_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Logits of `ids` in one forward, and from a prefill of `prefill` tokens followed by a piece of 3
/// and single tokens, in a cache of capacity 2 (so it regrows).
pub fn full_and_cached(
    m: &recurformer::model::llama::Model,
    ids: &Tensor,
    prefill: usize,
) -> Result<(Tensor, Tensor)> {
    let t = ids.dim(1)?;
    let full = m.forward(ids, &mut m.new_cache(1, t))?;
    let mut cache = m.new_cache(1, 2);
    let mut parts = vec![m.forward(&ids.narrow(1, 0, prefill)?, &mut cache)?];
    let mut i = prefill;
    if i + 3 <= t {
        parts.push(m.forward(&ids.narrow(1, i, 3)?, &mut cache)?);
        i += 3;
    }
    while i < t {
        parts.push(m.forward(&ids.narrow(1, i, 1)?, &mut cache)?);
        i += 1;
    }
    assert_eq!(cache.seq_len, t);
    Ok((full, Tensor::cat(&parts, 1)?))
}

/// Reads `expected.safetensors` of a tiny fixture: (input_ids as u32 (1, t), logits (1, t, v)).
pub fn tiny_expected(dir: &str) -> Result<(Tensor, Tensor)> {
    let p = fixture(dir).join("expected.safetensors");
    let t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
        .with_context(|| format!("{}", p.display()))?;
    let ids = t
        .get("input_ids")
        .context("input_ids")?
        .to_dtype(candle_core::DType::U32)?;
    let logits = t.get("logits").context("logits")?.clone();
    Ok((ids, logits))
}
