use candle_core::Tensor;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let ctx: usize = std::env::args().nth(1).unwrap_or("4096".into()).parse()?;
    let steps: usize = std::env::args().nth(2).unwrap_or("8".into()).parse()?;
    // Optional third argument: the KV-cache type (f32, f16); fourth: weights (f32, q8_0, ...).
    let kv = recurformer::model::cache::KvDtype::parse(
        &std::env::args().nth(3).unwrap_or("f32".into()),
    )?;
    let weights = recurformer::model::quant::WeightFormat::parse(
        &std::env::args().nth(4).unwrap_or("f32".into()),
    )?;
    let mut m = recurformer::checkpoint::loader::load(&recurformer::default_model_path())?.model;
    m.set_kv_dtype(kv);
    m.quantize(weights)?;
    let mut cache = m.new_cache(1, ctx + steps + 1);
    // Fill the cache with random keys/values instead of a slow real prefill.
    let k = Tensor::randn(
        0f32,
        1.,
        (1, m.cfg.num_key_value_heads, ctx, m.cfg.head_dim),
        &m.device,
    )?;
    for l in cache.layers.iter_mut() {
        l.kv.as_mut().unwrap().append(&k, &k)?;
    }
    cache.seq_len = ctx;
    let mut times = vec![];
    for _ in 0..steps {
        let t = Instant::now();
        m.forward_last(
            &Tensor::new(&[500u32], &m.device)?.unsqueeze(0)?,
            &mut cache,
        )?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "ctx {ctx} ({kv} KV, {weights} weights): median step {:.1} ms",
        times[steps / 2]
    );
    Ok(())
}
