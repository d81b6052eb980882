//! Median time of one batched decode step (`Model::forward_step_batch`) of n sequences of the
//! default model, each with a cache of `ctx` tokens: `cargo run --release --example
//! batch_step_timing -- [ctx] [steps] [weights] [model]` (weights f32 by default, or q8_0, ...).
//! Prints ms per step and tokens/s for n = 1, 2, 4, 8.
use candle_core::Tensor;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let ctx: usize = std::env::args().nth(1).unwrap_or("256".into()).parse()?;
    let steps: usize = std::env::args().nth(2).unwrap_or("16".into()).parse()?;
    let weights = recurformer::model::quant::WeightFormat::parse(
        &std::env::args().nth(3).unwrap_or("f32".into()),
    )?;
    let path = std::env::args()
        .nth(4)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(recurformer::default_model_path);
    let mut m = recurformer::checkpoint::loader::load(&path)?.model;
    m.quantize_for_inference(weights)?;
    println!("{} in {weights}, ctx {ctx}", path.display());
    let ids: Vec<u32> = (0..ctx as u32).map(|i| 100 + i % 1000).collect();
    let mut base = m.new_cache(1, ctx + 64);
    m.forward_last(
        &Tensor::new(ids.as_slice(), &m.device)?.unsqueeze(0)?,
        &mut base,
    )?;
    for n in [1usize, 2, 4, 8] {
        let mut caches: Vec<_> = (0..n).map(|_| base.clone()).collect();
        for c in caches.iter_mut() {
            // Own storage per sequence (a clone shares the preallocated K/V buffers).
            for l in c.layers.iter_mut() {
                if let Some(kv) = l.kv.as_mut() {
                    *kv = recurformer::model::cache::KvCache::new(
                        1,
                        kv.n_kv_heads,
                        kv.head_dim,
                        ctx + 64,
                    );
                }
            }
            c.seq_len = 0;
            m.forward_last(&Tensor::new(ids.as_slice(), &m.device)?.unsqueeze(0)?, c)?;
        }
        let toks: Vec<u32> = (0..n as u32).map(|i| 500 + i).collect();
        let mut times = vec![];
        for _ in 0..steps {
            let mut refs: Vec<_> = caches.iter_mut().collect();
            let t = Instant::now();
            m.forward_step_batch(&toks, &mut refs)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[steps / 2];
        println!(
            "n {n}: median step {med:.1} ms, {:.1} tok/s",
            n as f64 * 1e3 / med
        );
    }
    Ok(())
}
