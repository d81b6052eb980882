//! The decode-attention kernel alone, old (per-row) vs new (group) side by side (issue 20):
//! `cargo run --release --example decode_attention_timing -- [CONTEXTS] [LAYERS] [REPS] [BLOCKS]
//! [ISAS]`, e.g. `512,2048,8192 15 7 512 detect`.
//!
//! A "step" is one call of the kernel per layer over LAYERS layers (default 15: the 50 %
//! RecurFormer keeps about half of SmolLM2's 30 layers' KV heads), each layer with its own cache
//! of CTX keys (1 sequence, 9 query heads over 3 KV heads of 64, one new query; the cache a view
//! into a larger buffer, as in `KvCache`), so that at 8K the caches (94 MB in f16) stream from
//! memory as in a real step instead of sitting in the last-level cache. For each context and
//! cache type the variants (the per-row kernel at 512-key blocks, the group kernel at each of
//! BLOCKS) are timed in turn, REPS times alternated; medians, ratios against the per-row kernel,
//! the cache bytes read per second, and the largest difference between the outputs.
//! ISAS: `detect` (default), `all` (each set this CPU has), or a list such as `scalar,avx2`.
//! The machine may be shared: alternation and medians, and one thread (`RAYON_NUM_THREADS=1`)
//! for numbers that mean something.
use candle_core::{DType, Device, Tensor};
use recurformer::model::kernels::decode_attention::{decode_attention_with, DecodeKernel};
use recurformer::model::kernels::simd::Isa;
use std::time::Instant;

fn list(s: Option<&String>, default: &str) -> Vec<String> {
    s.map_or(default, |s| s.as_str())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let contexts: Vec<usize> = list(args.get(1), "512,2048,8192")
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let layers: usize = args.get(2).map_or(Ok(15), |s| s.parse())?;
    let reps: usize = args.get(3).map_or(Ok(7), |s| s.parse())?;
    let blocks: Vec<usize> = list(args.get(4), "512")
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let isas: Vec<Isa> = match args.get(5).map_or("detect", |s| s.as_str()) {
        "detect" => vec![Isa::detect()],
        "all" => Isa::available(),
        l => l
            .split(',')
            .map(|x| match x {
                "scalar" => Ok(Isa::Scalar),
                "avx2" => Ok(Isa::Avx2),
                "avx512" => Ok(Isa::Avx512),
                _ => anyhow::bail!("unknown instruction set {x}"),
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let (nh, nkv, hd) = (9, 3, 64);
    let scale = 1.0 / (hd as f64).sqrt();
    let dev = Device::Cpu;
    println!(
        "{layers} layers x (1, {nh}/{nkv} heads, hd {hd}), {reps} alternations, threads {}",
        rayon::current_num_threads()
    );
    for &isa in &isas {
        for &ctx in &contexts {
            for dt in [DType::F32, DType::F16] {
                let mut caches = Vec::new();
                for _ in 0..layers {
                    let buf = |sd: f32| -> anyhow::Result<Tensor> {
                        let b = Tensor::randn(0f32, sd, (1, nkv, ctx + 16, hd), &dev)?;
                        Ok(b.to_dtype(dt)?.narrow(2, 0, ctx)?)
                    };
                    let q = Tensor::randn(0f32, 1., (1, nh, 1, hd), &dev)?;
                    caches.push((q, buf(1.0)?, buf(1.0)?));
                }
                let mut variants = vec![(
                    "per-row".to_string(),
                    DecodeKernel {
                        isa,
                        block: 512,
                        rows: true,
                    },
                )];
                for &b in &blocks {
                    let k = DecodeKernel {
                        isa,
                        block: b,
                        rows: false,
                    };
                    variants.push((format!("group, block {b}"), k));
                }
                // Calls per timing, so that one timing lasts ~10 ms or more.
                let inner = (16384 / (ctx * layers)).max(1);
                let step = |k: DecodeKernel| -> anyhow::Result<Vec<Tensor>> {
                    caches
                        .iter()
                        .map(|(q, kc, vc)| Ok(decode_attention_with(k, q, kc, vc, scale)?))
                        .collect()
                };
                let outs: Vec<Vec<Tensor>> = variants
                    .iter()
                    .map(|(_, k)| step(*k))
                    .collect::<anyhow::Result<_>>()?;
                let mut times = vec![Vec::new(); variants.len()];
                for _ in 0..reps {
                    for (vi, (_, k)) in variants.iter().enumerate() {
                        let t = Instant::now();
                        for _ in 0..inner {
                            step(*k)?;
                        }
                        times[vi].push(t.elapsed().as_secs_f64() * 1e3 / inner as f64);
                    }
                }
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(|a, b| a.total_cmp(b));
                    v[v.len() / 2]
                };
                let meds: Vec<f64> = times.iter_mut().map(median).collect();
                let bytes = (layers * 2 * nkv * ctx * hd * dt.size_in_bytes()) as f64;
                for (vi, (name, _)) in variants.iter().enumerate() {
                    let mut diff = 0f32;
                    for (a, b) in outs[vi].iter().zip(&outs[0]) {
                        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                        diff = diff.max(d);
                    }
                    println!(
                        "{isa:?} ctx {ctx:>5} {dt:?} {name:<16} {:>8.3} ms/step  {:>5.2}x  \
                         {:>5.1} GB/s  max diff vs per-row {diff:.1e}",
                        meds[vi],
                        meds[0] / meds[vi],
                        bytes / meds[vi] / 1e6,
                    );
                }
            }
        }
    }
    Ok(())
}
