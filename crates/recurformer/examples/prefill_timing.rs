//! Times prefill attention of SmolLM2's head shape (9 query heads over 3 KV heads of 64) at one
//! context length: the tiled kernel on each instruction set this CPU has, with f32 and f16 keys,
//! against the chunked GEMM path. `cargo run --release --example prefill_timing -- 2048`.

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
        for isa in Isa::available() {
            let s = time(&|| Ok(prefill_attention_on(isa, &q, &k, &v, KeyRule::default())?))?;
            println!(
                "t {t}: tiled {dt:?} {isa:?} {:.1} ms per layer ({:.2}x the chunked path)",
                s * 1e3,
                chunked / s
            );
        }
    }
    Ok(())
}
