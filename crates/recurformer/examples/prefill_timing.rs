//! Times attention of SmolLM2's head shape (9 query heads over 3 KV heads of 64) at one context
//! length: prefill through the tiled kernel on each instruction set this CPU has, with f32 and f16
//! keys, against the chunked GEMM path; then one decode query against an f32 and an f16 cache of
//! that length, alternated so that a shared machine's load hits both alike.
//! `cargo run --release --example prefill_timing -- 2048`.

use candle_core::{DType, Device, Tensor};
use recurformer::model::attention::{attention_blocked, AttentionInputs};
use recurformer::model::kernels::prefill_attention::{prefill_attention_on, KeyRule};
use recurformer::model::kernels::simd::Isa;
use recurformer::model::options::ForwardOptions;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let t: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2048);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 9, t, 64), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, 3, t, 64), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, 3, t, 64), &dev)?;
    let time = |f: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<f64> {
        f()?;
        let t0 = Instant::now();
        for _ in 0..3 {
            f()?;
        }
        Ok(t0.elapsed().as_secs_f64() / 3.0)
    };
    let opts = ForwardOptions::default();
    let chunked = time(&|| {
        Ok(attention_blocked(
            AttentionInputs {
                q: &q,
                k: &k,
                v: &v,
                opts: &opts,
                want_probs: false,
            },
            1 << 24,
        )?
        .0)
    })?;
    println!("t {t}: chunked GEMM path {:.1} ms per layer", chunked * 1e3);
    for dt in [DType::F32, DType::F16] {
        let (k, v) = (k.to_dtype(dt)?, v.to_dtype(dt)?);
        // The scalar fallback (for CPUs without AVX2) is timed at short lengths only.
        for isa in Isa::available()
            .into_iter()
            .filter(|&i| i != Isa::Scalar || t <= 2048)
        {
            let s = time(&|| Ok(prefill_attention_on(isa, &q, &k, &v, KeyRule::default())?))?;
            println!(
                "t {t}: tiled {dt:?} {isa:?} {:.1} ms per layer ({:.2}x the chunked path)",
                s * 1e3,
                chunked / s
            );
        }
    }
    // Decode: one query against the whole cache, f32 vs f16, alternating; medians over 200 steps.
    use recurformer::model::kernels::decode_attention::decode_attention;
    let q1 = Tensor::randn(0f32, 1., (1, 9, 1, 64), &dev)?;
    let (k16, v16) = (k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t0 = Instant::now();
        decode_attention(&q1, &k, &v, 0.125)?;
        a.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        decode_attention(&q1, &k16, &v16, 0.125)?;
        b.push(t0.elapsed().as_secs_f64());
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (a, b) = (a[100], b[100]);
    println!(
        "t {t}: decode attention per layer: f32 cache {:.1} us, f16 cache {:.1} us ({:.2}x)",
        a * 1e6,
        b * 1e6,
        a / b
    );
    Ok(())
}
