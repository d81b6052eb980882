//! Tiny random-weight Llama / Qwen2 checkpoints written by reference/make_fixtures.py with
//! PyTorch + transformers: our logits must match theirs, and the fast path, the eager path and
//! cached decoding must agree with each other.

mod common;
use anyhow::Result;
use candle_core::{Device, Tensor};
use common::*;
use recurformer::model::llama::Model;
use recurformer::model::options::{AttentionImpl, ForwardOptions};

const TINY: [&str; 3] = ["tiny-llama", "tiny-llama3", "tiny-qwen2"];

fn load(name: &str) -> Result<Model> {
    Ok(recurformer::checkpoint::loader::load(&fixture(name))?.model)
}

fn full_logits(m: &Model, ids: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
    let mut cache = m.new_cache(1, 4);
    let h = m.forward_hidden(ids, &mut cache, opts, None)?;
    m.logits(&h)
}

#[test]
fn tiny_logits_match_transformers() -> Result<()> {
    for name in TINY {
        let m = load(name)?;
        let (ids, expected) = tiny_expected(name)?;
        let got = m.forward(&ids, &mut m.new_cache(1, 16))?;
        let d = max_abs_diff(&got, &expected)?;
        let scale = expected.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("{name}: max |ours - transformers| = {d:.3e} (logit scale {scale:.2})");
        assert!(
            scale > 0.1,
            "{name}: fixture logits are too small to test anything"
        );
        assert!(d <= 1e-4, "{name}: logits differ by {d}");
    }
    Ok(())
}

#[test]
fn tiny_architectures_are_what_they_claim() -> Result<()> {
    let l = load("tiny-llama")?;
    assert!(!l.cfg.tie_word_embeddings && !l.cfg.attention_bias);
    assert!(matches!(
        l.cfg.rope_scaling,
        Some(recurformer::formats::config::RopeScaling::Linear { .. })
    ));
    let l3 = load("tiny-llama3")?;
    assert!(l3.cfg.tie_word_embeddings);
    assert!(matches!(
        l3.cfg.rope_scaling,
        Some(recurformer::formats::config::RopeScaling::Llama3 { .. })
    ));
    let q = load("tiny-qwen2")?;
    assert_eq!(
        q.cfg.architecture,
        recurformer::formats::config::Architecture::Qwen2
    );
    assert!(q.cfg.attention_bias);
    assert!(q.layers[0]
        .self_attn
        .as_ref()
        .unwrap()
        .q_proj
        .bias
        .is_some());
    // The Qwen2 fixture is sharded.
    assert!(fixture("tiny-qwen2")
        .join("model.safetensors.index.json")
        .exists());
    Ok(())
}

#[test]
fn fast_path_matches_eager_path() -> Result<()> {
    for name in TINY {
        let m = load(name)?;
        let (ids, _) = tiny_expected(name)?;
        let fast = full_logits(&m, &ids, &ForwardOptions::default())?;
        let eager = full_logits(
            &m,
            &ids,
            &ForwardOptions {
                attention: AttentionImpl::Eager,
                differentiable: false,
            },
        )?;
        let diff = full_logits(
            &m,
            &ids,
            &ForwardOptions {
                attention: AttentionImpl::Eager,
                differentiable: true,
            },
        )?;
        let d1 = max_abs_diff(&fast, &eager)?;
        let d2 = max_abs_diff(&eager, &diff)?;
        println!("{name}: fast vs eager {d1:.2e}, eager vs differentiable ops {d2:.2e}");
        assert!(d1 <= 1e-5 && d2 <= 1e-5);
    }
    Ok(())
}

#[test]
fn cached_decode_matches_full_forward() -> Result<()> {
    for name in TINY {
        let m = load(name)?;
        let (ids, _) = tiny_expected(name)?;
        let t = ids.dim(1)?;
        let full = m.forward(&ids, &mut m.new_cache(1, t))?; // (1, t, v)
                                                             // Prefill 5 tokens, then pieces of 1, 3 and single tokens; capacity 2 forces regrowth.
        let mut cache = m.new_cache(1, 2);
        let mut pieces = vec![];
        let cuts = [0, 5, 6, 9];
        for w in cuts.windows(2) {
            pieces.push(m.forward(&ids.narrow(1, w[0], w[1] - w[0])?, &mut cache)?);
        }
        for i in 9..t {
            pieces.push(m.forward(&ids.narrow(1, i, 1)?, &mut cache)?);
        }
        let stepped = Tensor::cat(&pieces, 1)?;
        let d = max_abs_diff(&full, &stepped)?;
        println!("{name}: cached vs full {d:.2e}");
        assert!(d <= 1e-4, "{name}: cached decode differs by {d}");
        assert_eq!(cache.seq_len, t);
        let c = &m.cfg;
        assert_eq!(
            cache.bytes().kv,
            2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * t
        );
        assert_eq!(cache.bytes().recurrent, 0);
    }
    Ok(())
}

#[test]
fn long_prefill_chunks_queries_without_changing_results() -> Result<()> {
    // A small score block makes the fast path split its 300 queries into chunks of 16.
    use recurformer::model::attention::{attention, attention_blocked, AttentionInputs};
    let dev = Device::Cpu;
    let (nh, nkv, t, hd) = (4, 2, 300, 8);
    let q = Tensor::randn(0f32, 1., (1, nh, t, hd), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, nkv, t + 7, hd), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, nkv, t + 7, hd), &dev)?;
    let fast = ForwardOptions::default();
    let eager = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    let (a, _) = attention_blocked(
        AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            opts: &fast,
            want_probs: false,
        },
        nh * (t + 7) * 16,
    )?;
    let (b, p) = attention(AttentionInputs {
        q: &q,
        k: &k,
        v: &v,
        opts: &eager,
        want_probs: true,
    })?;
    assert!(max_abs_diff(&a, &b)? <= 1e-5);
    // Probabilities: rows sum to one, and nothing above the causal diagonal (7 cached keys).
    let p = p.expect("eager returns probabilities"); // (1, nh, t, t+7)
    let sums = p.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    let row0 = p.narrow(2, 0, 1)?.flatten_all()?.to_vec1::<f32>()?; // head 0, query 0: sees keys 0..=7
    assert!(row0[8..t + 7].iter().all(|&x| x == 0.0));
    Ok(())
}

#[test]
fn decode_kernel_matches_eager_across_key_blocks() -> Result<()> {
    // 1300 cached keys span three of the kernel's 512-key blocks; 1 to 4 new queries use it.
    use recurformer::model::attention::{attention, AttentionInputs, DECODE_KERNEL_MAX_QUERIES};
    let dev = Device::Cpu;
    let (nh, nkv, hd, s) = (6, 2, 16, 1300);
    let cache_k = Tensor::randn(0f32, 2., (1, nkv, s + 50, hd), &dev)?; // a larger buffer, as in KvCache
    let cache_v = Tensor::randn(0f32, 1., (1, nkv, s + 50, hd), &dev)?;
    let (k, v) = (cache_k.narrow(2, 0, s)?, cache_v.narrow(2, 0, s)?);
    for t in 1..=DECODE_KERNEL_MAX_QUERIES {
        let q = Tensor::randn(0f32, 2., (1, nh, t, hd), &dev)?;
        let fast = ForwardOptions::default();
        let eager = ForwardOptions {
            attention: AttentionImpl::Eager,
            differentiable: false,
        };
        let (a, _) = attention(AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            opts: &fast,
            want_probs: false,
        })?;
        let (b, _) = attention(AttentionInputs {
            q: &q,
            k: &k,
            v: &v,
            opts: &eager,
            want_probs: false,
        })?;
        let d = max_abs_diff(&a, &b)?;
        println!("t={t}: decode kernel vs eager {d:.2e}");
        assert!(d <= 1e-5, "t={t}: {d}");
    }
    Ok(())
}

#[test]
fn forward_from_any_layer_continues_the_full_forward() -> Result<()> {
    for name in TINY {
        let m = load(name)?;
        let (ids, _) = tiny_expected(name)?;
        let want = m.forward_hidden(
            &ids,
            &mut m.new_cache(1, 16),
            &ForwardOptions::default(),
            None,
        )?;
        let mut inputs = Vec::new();
        let from0 = m.forward_from_layer(0, &m.embed(&ids)?, Some(&mut inputs))?;
        assert_eq!(inputs.len(), m.layers.len(), "{name}: one input per layer");
        assert_eq!(max_abs_diff(&from0, &want)?, 0.0, "{name}: from layer 0");
        for (l, x) in inputs.iter().enumerate() {
            let d = max_abs_diff(&m.forward_from_layer(l, x, None)?, &want)?;
            assert_eq!(d, 0.0, "{name}: from layer {l} differs by {d}");
        }
        // Starting from a wrong input must change the result (the test can fail).
        let last = m.layers.len() - 1;
        let d = max_abs_diff(&m.forward_from_layer(last, &inputs[0], None)?, &want)?;
        assert!(
            d > 1e-3,
            "{name}: layer 0's input fed to layer {last} gave the same output"
        );
        assert!(m
            .forward_from_layer(m.layers.len(), &inputs[0], None)
            .is_err());
    }
    Ok(())
}
