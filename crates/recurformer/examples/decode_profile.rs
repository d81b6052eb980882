//! Where one decode step goes, op by op (issue 20): `cargo run --release --example decode_profile
//! -- MODEL CTX [WEIGHTS] [KV] [REPS]` (WEIGHTS f32|q8_0|..., default q8_0; KV f32|f16, default
//! f16; REPS default 20). The caches are filled with random keys and values (the windowed heads'
//! cache with a random window) so that a step reads a cache of CTX tokens.
//!
//! A step is replayed by hand from the public pieces of `DecoderLayer::forward` (the same ops in
//! the same order, on the real caches, so weights come from memory as in a real step), with a
//! timer around each op (the mixer's step as one op: its projections and kernel). Each replay is followed by
//! one real `forward_last` step; medians over REPS of each op's sum over the layers, and of the
//! real step. The gap between the real step and the sum of its ops is the glue timed nowhere
//! (cat, reshapes, dispatch between ops). Medians, not means: the machine may be shared.
use candle_core::{Device, Tensor};
use recurformer::model::attention::{attention, AttentionInputs};
use recurformer::model::kernels::prefill_attention::{prefill_attention, KeyRule};
use recurformer::model::options::ForwardOptions;
use std::collections::BTreeMap;
use std::time::Instant;

struct Timer {
    acc: BTreeMap<&'static str, f64>,
}

impl Timer {
    fn time<T>(
        &mut self,
        k: &'static str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let s = Instant::now();
        let r = f()?;
        *self.acc.entry(k).or_default() += s.elapsed().as_secs_f64() * 1e6;
        Ok(r)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(recurformer::default_model_path);
    let ctx: usize = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let weights =
        recurformer::model::quant::WeightFormat::parse(args.get(3).map_or("q8_0", |s| s))?;
    let kv = recurformer::model::cache::KvDtype::parse(args.get(4).map_or("f16", |s| s))?;
    let reps: usize = args.get(5).map_or(Ok(20), |s| s.parse())?;
    let mut m = recurformer::checkpoint::loader::load(&path)?.model;
    m.set_kv_dtype(kv);
    m.quantize(weights)?;
    let dev = Device::Cpu;
    let hd = m.cfg.head_dim;
    let capacity = ctx + 2 * reps + 8;
    let fill = |cache: &mut recurformer::model::cache::HybridCache| -> anyhow::Result<()> {
        for (l, lc) in m.layers.iter().zip(cache.layers.iter_mut()) {
            if let Some(kvc) = lc.kv.as_mut() {
                let k = Tensor::randn(0f32, 1., (1, kvc.n_kv_heads, ctx, hd), &dev)?;
                kvc.append(&k, &k)?;
            }
            if let (Some(w), Some(a)) = (lc.window.as_mut(), l.local.as_ref()) {
                let k = Tensor::randn(0f32, 1., (1, a.n_kv_heads, ctx, hd), &dev)?;
                w.append(&k, &k)?;
            }
        }
        cache.seq_len = ctx;
        Ok(())
    };
    let mut cache = m.new_cache(1, capacity);
    fill(&mut cache)?;
    let mut states: Vec<_> = m
        .layers
        .iter()
        .map(|l| l.mixer.as_ref().map(|mx| mx.new_state(1, &dev)).transpose())
        .collect::<anyhow::Result<_>>()?;
    let opts = ForwardOptions::default();
    let ids = Tensor::new(&[500u32], &dev)?.unsqueeze(0)?;
    let mut per_rep: Vec<BTreeMap<&'static str, f64>> = Vec::new();
    let mut whole = Vec::new();
    for rep in 0..reps + 1 {
        let mut t = Timer {
            acc: BTreeMap::new(),
        };
        let pos = cache.seq_len;
        let (cos, sin) = t.time("embedding + rope tables", || {
            m.embed(&ids)?;
            Ok(m.rope.tables(pos, 1, &dev)?)
        })?;
        let mut x = m.embed(&ids)?; // (1, 1, d)
        for (i, (layer, lc)) in m.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = t.time("norms", || layer.input_layernorm.forward(&x, &opts))?;
            let mut parts = Vec::new();
            if let Some(a) = &layer.self_attn {
                let (q, k, v) = t.time("kept attn: q/k/v proj (q8_0)", || {
                    Ok((
                        a.q_proj.forward(&h)?,
                        a.k_proj.forward(&h)?,
                        a.v_proj.forward(&h)?,
                    ))
                })?;
                let (q, k) = t.time("kept attn: rope + reshapes", || {
                    let q = q.reshape((1, 1, a.n_heads, hd))?.transpose(1, 2)?;
                    let k = k.reshape((1, 1, a.n_kv_heads, hd))?.transpose(1, 2)?;
                    Ok((
                        m.rope.apply(&q, &cos, &sin, &opts)?,
                        m.rope.apply(&k, &cos, &sin, &opts)?,
                    ))
                })?;
                let v = v.reshape((1, 1, a.n_kv_heads, hd))?.transpose(1, 2)?;
                let (k_all, v_all) = t.time("kept attn: cache append", || {
                    Ok(lc.kv.as_mut().unwrap().append(&k, &v)?)
                })?;
                let o = t.time("kept attn: decode kernel", || {
                    Ok(attention(AttentionInputs {
                        q: &q,
                        k: &k_all,
                        v: &v_all,
                        opts: &opts,
                        want_probs: false,
                    })?
                    .0)
                })?;
                parts.push(o.transpose(1, 2)?.reshape((1, 1, a.n_heads * hd))?);
            }
            if let Some(mx) = &layer.mixer {
                let st = states[i].as_mut().unwrap();
                // The step as the model runs it: projections (one q8_0 matmul under --weights
                // q8_0) and the hand-written kernel (`mamba/step.rs`).
                let out = t.time("mixer: step (projections + kernel)", || mx.step(&h, st))?;
                let mut y = out;
                if let Some(w) = &layer.local {
                    let (q, k, v) = t.time("windowed: q/k/v proj (q8_0)", || {
                        Ok((
                            w.q_proj.forward(&h)?,
                            w.k_proj.forward(&h)?,
                            w.v_proj.forward(&h)?,
                        ))
                    })?;
                    let (q, k, v) = t.time("windowed: rope + reshapes", || {
                        let q = q.reshape((1, 1, w.n_heads, hd))?.transpose(1, 2)?;
                        let k = k.reshape((1, 1, w.n_kv_heads, hd))?.transpose(1, 2)?;
                        let v = v
                            .reshape((1, 1, w.n_kv_heads, hd))?
                            .transpose(1, 2)?
                            .contiguous()?;
                        Ok((
                            m.rope.apply(&q, &cos, &sin, &opts)?,
                            m.rope.apply(&k, &cos, &sin, &opts)?,
                            v,
                        ))
                    })?;
                    let (ka, va, layout) = t.time("windowed: cache append (cat)", || {
                        Ok(lc.window.as_mut().unwrap().append(&k, &v)?)
                    })?;
                    let o = t.time("windowed: kernel", || {
                        Ok(prefill_attention(
                            &q,
                            &ka,
                            &va,
                            KeyRule {
                                window: Some((w.settings.sinks, w.settings.window)),
                                sink_rows: layout.sink_rows,
                                first_pos: layout.first_pos,
                            },
                        )?)
                    })?;
                    y = t.time("windowed: add to mixer", || {
                        Ok((y + o.transpose(1, 2)?.reshape((1, 1, w.n_heads * hd))?)?)
                    })?;
                }
                parts.push(y);
            }
            let o_in = t.time("cat kept | replaced", || {
                Ok(if parts.len() == 1 {
                    parts.pop().unwrap()
                } else {
                    Tensor::cat(&parts, 2)?
                })
            })?;
            let o = t.time("o_proj (q8_0)", || layer.o_proj.forward(&o_in))?;
            x = t.time("residual adds", || Ok((&x + o)?))?;
            let h2 = t.time("norms", || {
                layer.post_attention_layernorm.forward(&x, &opts)
            })?;
            let mlp = &layer.mlp;
            let (gt, up) = t.time("mlp: gate + up proj (q8_0)", || {
                Ok((mlp.gate_proj.forward(&h2)?, mlp.up_proj.forward(&h2)?))
            })?;
            let gu = t.time("mlp: silu * up", || Ok((candle_nn::ops::silu(&gt)? * up)?))?;
            let dn = t.time("mlp: down proj (q8_0)", || mlp.down_proj.forward(&gu))?;
            x = t.time("residual adds", || Ok((&x + dn)?))?;
        }
        let hf = t.time("norms", || m.norm.forward(&x, &opts))?;
        t.time("lm head (q8_0)", || m.logits(&hf))?;
        cache.seq_len += 1;
        // The real step, right after.
        let s = Instant::now();
        m.forward_last(&ids, &mut cache)?;
        let real = s.elapsed().as_secs_f64() * 1e6;
        if rep > 0 {
            per_rep.push(t.acc);
            whole.push(real);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let keys: Vec<&'static str> = per_rep[0].keys().copied().collect();
    let mut rows: Vec<(&'static str, f64)> = keys
        .iter()
        .map(|k| (*k, med(per_rep.iter().map(|r| r[k]).collect())))
        .collect();
    let replay = med(per_rep.iter().map(|r| r.values().sum::<f64>()).collect());
    let whole = med(whole);
    rows.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    println!(
        "{} ctx {ctx}, {weights} weights, {kv} cache, {} threads: real step {:.2} ms ({:.1} tok/s); replayed op by op {:.2} ms",
        path.display(),
        candle_core::utils::get_num_threads(),
        whole / 1e3,
        1e6 / whole,
        replay / 1e3,
    );
    for (k, v) in rows {
        println!(
            "  {:<44} {:>7.3} ms  {:>5.1} %",
            k,
            v / 1e3,
            100.0 * v / replay
        );
    }
    Ok(())
}
