//! Peak memory of loading for inference (issue 20): with tensors read on demand and each layer
//! quantised as it is read (`loader::load_quantized`), the f32 weights of the whole model never
//! coexist. Measured with a global allocator that counts live heap bytes over all threads, on the
//! default model (SmolLM2-135M, 513 MiB of weights in f32).

mod common;
use anyhow::Result;
use recurformer::model::quant::WeightFormat;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let v = LIVE.fetch_add(l.size() as i64, Ordering::Relaxed) + l.size() as i64;
            PEAK.fetch_max(v, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// Peak and final live heap bytes (above what was live before) of `f`.
fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let out = f()?;
    let peak = (PEAK.load(Ordering::Relaxed) - start) as f64 / MIB;
    let live = (LIVE.load(Ordering::Relaxed) - start) as f64 / MIB;
    Ok((out, peak, live))
}

#[test]
fn loading_in_q8_0_never_holds_the_f32_model() -> Result<()> {
    let path = common::default_model();
    // f32 weights of the model, from its configuration.
    let cfg = recurformer::checkpoint::loader::load_config(&path)?;
    let f32_mib = {
        let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let layer = d * q + 2 * d * kv + q * d + 3 * d * i;
        4.0 * (cfg.num_hidden_layers * layer + v * d) as f64 / MIB
    };
    let ((loaded, s), peak, live) =
        measure(|| recurformer::checkpoint::loader::load_quantized(&path, WeightFormat::Q8_0))?;
    println!(
        "f32 weights {f32_mib:.1} MiB; load in q8_0: peak {peak:.1} MiB, live after {live:.1} MiB, \
         {} matrices quantised, {:.1} MiB of f32 freed",
        s.quantized,
        s.freed as f64 / MIB
    );
    // What stays is the q8_0 model (8.5 bits a weight: 0.27 of f32) plus norms and tables; the
    // peak is that plus the f32 embedding (read before the LM head is quantised from it) and one
    // layer in f32. Quantising after an f32 load peaked above the whole f32 model.
    assert!(live < 0.35 * f32_mib, "live {live:.1} MiB of {f32_mib:.1}");
    assert!(peak < 0.6 * f32_mib, "peak {peak:.1} MiB of {f32_mib:.1}");
    assert!(loaded.model.inference_only && loaded.model.embed_q.is_some());
    // The old order for contrast: everything in f32 first.
    let (_, peak_old, _) = measure(|| {
        let mut m = recurformer::checkpoint::loader::load(&path)?.model;
        m.quantize_for_inference(WeightFormat::Q8_0)?;
        Ok(m)
    })?;
    println!("load in f32, then quantise: peak {peak_old:.1} MiB");
    assert!(peak_old > 0.95 * f32_mib, "{peak_old:.1}");
    Ok(())
}
