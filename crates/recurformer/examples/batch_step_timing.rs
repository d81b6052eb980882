//! Median time of one batched decode step (`Model::forward_step_batch`) of n sequences of the
//! default model, each with a cache of `ctx` tokens: `cargo run --release --example
//! batch_step_timing -- [ctx] [steps] [weights] [model]` (weights f32 by default, or q8_0, ...).
//! Prints ms per step and tokens/s for n = 1, 2, 4, 8 (median and fastest step), and each n's
//! speed-up over n = 1.
//!
//! The steps of the four batch sizes are interleaved (one step of each n in turn, `steps` times),
//! so that on a shared machine a change of load falls on all of them alike and the ratios hold
//! even where the absolute times drift.
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
    // The tiled q8_0 copy for batched steps, as `serve --parallel N` makes it.
    recurformer::model::kernels::q8_gemv::set_tiled_packing(true);
    let mut m = recurformer::checkpoint::loader::load(&path)?.model;
    m.quantize_for_inference(weights)?;
    println!("{} in {weights}, ctx {ctx}", path.display());
    let ids: Vec<u32> = (0..ctx as u32).map(|i| 100 + i % 1000).collect();
    let ns = [1usize, 2, 4, 8];
    let mut sets = Vec::new();
    for &n in &ns {
        let mut caches = Vec::with_capacity(n);
        for _ in 0..n {
            // Own storage per sequence, room for every step.
            let mut c = m.new_cache(1, ctx + steps + 8);
            m.forward_last(
                &Tensor::new(ids.as_slice(), &m.device)?.unsqueeze(0)?,
                &mut c,
            )?;
            caches.push(c);
        }
        sets.push(caches);
    }
    let mut times = vec![Vec::with_capacity(steps); ns.len()];
    for _ in 0..steps {
        for (j, &n) in ns.iter().enumerate() {
            let toks: Vec<u32> = (0..n as u32).map(|i| 500 + i).collect();
            let mut refs: Vec<_> = sets[j].iter_mut().collect();
            let t = Instant::now();
            m.forward_step_batch(&toks, &mut refs)?;
            times[j].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let meds: Vec<f64> = times.iter_mut().map(med).collect();
    // The fastest step of each n too: on a machine loaded past its cores a step is either run
    // through or preempted, and the fastest is the closest to its unloaded time.
    let mins: Vec<f64> = times.iter().map(|v| v[0]).collect();
    let (tps1, best1) = (1e3 / meds[0], 1e3 / mins[0]);
    for ((&n, &ms), &lo) in ns.iter().zip(&meds).zip(&mins) {
        let (tps, best) = (n as f64 * 1e3 / ms, n as f64 * 1e3 / lo);
        println!(
            "n {n}: median step {ms:.1} ms, {tps:.1} tok/s, {:.2}x n = 1; fastest {lo:.1} ms, \
             {best:.1} tok/s, {:.2}x n = 1",
            tps / tps1,
            best / best1
        );
    }
    Ok(())
}
