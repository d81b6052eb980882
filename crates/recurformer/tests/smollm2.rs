//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against the independent reference:
//! PyTorch + transformers loading the same GGUF (it dequantises and un-permutes on its own) and
//! llama.cpp's tokenizer. Fixtures: fixtures/smollm2/, written by reference/make_fixtures.py.

mod common;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor, D};
use common::*;
use recurformer::checkpoint::loader::LoadedModel;
use recurformer::formats::tokenizer::ChatMessage;
use recurformer::model::generate::{generate, GenerateRequest, Sampler, SamplingParams};
use recurformer::model::options::{AttentionImpl, ForwardOptions};
use serde_json::Value;
use std::sync::OnceLock;

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        recurformer::checkpoint::loader::load(&default_model()).expect("loading the default model")
    })
}

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let p = fixture("smollm2/reference.json");
        serde_json::from_str(&std::fs::read_to_string(&p).expect("reading reference.json"))
            .expect("parsing reference.json")
    })
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn last_position_logits_match_transformers() -> Result<()> {
    let m = &model().model;
    let logits =
        candle_core::safetensors::load(fixture("smollm2/logits.safetensors"), &Device::Cpu)?;
    let prompts = reference()["prompts"].as_array().context("prompts")?;
    assert!(prompts.len() >= 3);
    for p in prompts {
        let ids = ids_of(&p["ids"]);
        let expected = logits
            .get(p["logits_key"].as_str().context("logits_key")?)
            .context("logits tensor")?;
        let got = m.forward_last(
            &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            &mut m.new_cache(1, ids.len()),
        )?;
        let d = max_abs_diff(&got.squeeze(0)?, expected)?;
        println!(
            "{:>3} tokens: max |ours - transformers| = {d:.2e}",
            ids.len()
        );
        assert!(d <= 1e-3, "prompt {:?}: logits differ by {d}", p["text"]);
    }
    Ok(())
}

#[test]
fn greedy_continuations_are_identical() -> Result<()> {
    let m = &model().model;
    for p in reference()["prompts"].as_array().context("prompts")? {
        let ids = ids_of(&p["ids"]);
        let expected = ids_of(&p["greedy_ids"]);
        let mut sampler = Sampler::new(SamplingParams::default())?;
        let req = GenerateRequest {
            prompt: &ids,
            max_tokens: expected.len(),
            eos: &[],
        };
        let (got, _) = generate(m, &req, &mut sampler, &mut |_| Ok(()))?;
        assert_eq!(got, expected, "greedy continuation of {:?}", p["text"]);
    }
    Ok(())
}

#[test]
fn perplexity_of_the_reference_passage() -> Result<()> {
    let m = &model().model;
    let r = &reference()["perplexity"];
    let ids = ids_of(&r["ids"]);
    assert_eq!(ids.len(), 512);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = m
        .forward(&input, &mut m.new_cache(1, ids.len()))?
        .squeeze(0)?; // (t, v)
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, ids.len() - 1)?, D::Minus1)?;
    let targets = Tensor::new(&ids[1..], &Device::Cpu)?.unsqueeze(1)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let nll = -picked.iter().map(|&x| x as f64).sum::<f64>() / picked.len() as f64;
    let ppl = nll.exp();
    let ref_ppl = r["ppl"].as_f64().context("ppl")?;
    println!("perplexity: ours {ppl:.4}, transformers {ref_ppl:.4}");
    assert!(
        (ppl / ref_ppl - 1.0).abs() <= 1e-3,
        "perplexity {ppl} vs {ref_ppl}"
    );
    Ok(())
}

#[test]
fn tokenizer_matches_llama_cpp() -> Result<()> {
    let tok = model().tokenizer()?;
    let cases = reference()["tokenizer"]
        .as_array()
        .context("tokenizer cases")?;
    assert!(cases.len() >= 10);
    for c in cases {
        let text = c["text"].as_str().context("text")?;
        let expected = ids_of(&c["ids_llama_cpp"]);
        let got = tok.encode(text, false)?;
        assert_eq!(got, expected, "token ids of {text:?}");
        // Byte-level BPE is lossless.
        assert_eq!(tok.decode(&got, false)?, text);
    }
    Ok(())
}

#[test]
fn chat_template_renders_like_transformers() -> Result<()> {
    let tok = model().tokenizer()?;
    for c in reference()["chat"].as_array().context("chat cases")? {
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone())?;
        let add = c["add_generation_prompt"].as_bool().unwrap_or(true);
        let text = tok.apply_chat_template(&messages, add)?;
        assert_eq!(text, c["text"].as_str().context("text")?);
        assert_eq!(tok.encode(&text, false)?, ids_of(&c["ids"]));
    }
    Ok(())
}

#[test]
fn cached_decode_matches_full_forward_on_the_real_model() -> Result<()> {
    let m = &model().model;
    let ids = ids_of(&reference()["perplexity"]["ids"]);
    let ids = &ids[..48];
    let all = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let full = m.forward(&all, &mut m.new_cache(1, 48))?; // (1, 48, v)
    let mut cache = m.new_cache(1, 8); // small capacity: the cache regrows twice on the way
    let mut parts = vec![m.forward(&all.narrow(1, 0, 16)?, &mut cache)?];
    for i in 16..48 {
        parts.push(m.forward(&all.narrow(1, i, 1)?, &mut cache)?);
    }
    let d = max_abs_diff(&full, &Tensor::cat(&parts, 1)?)?;
    println!("cached decode vs full forward: {d:.2e}");
    assert!(d <= 1e-3, "{d}");
    assert_eq!(cache.bytes().kv, m.cfg.kv_bytes_per_token() * 48);
    Ok(())
}

#[test]
fn fast_attention_matches_eager_on_the_real_model() -> Result<()> {
    let m = &model().model;
    let ids = ids_of(&reference()["perplexity"]["ids"]);
    let x = Tensor::new(&ids[..96], &Device::Cpu)?.unsqueeze(0)?;
    let run = |opts: ForwardOptions| -> Result<Tensor> {
        let h = m.forward_hidden(&x, &mut m.new_cache(1, 96), &opts, None)?;
        m.logits(&h)
    };
    let fast = run(ForwardOptions::default())?;
    let eager = run(ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    })?;
    let d = max_abs_diff(&fast, &eager)?;
    println!("fast vs eager: {d:.2e}");
    assert!(d <= 1e-4, "{d}");
    // The eager path hands every layer's probabilities to an observer.
    let mut seen = vec![];
    let mut obs = |o: &recurformer::model::options::AttnObservation| -> Result<()> {
        assert_eq!(o.probs.dims(), &[1, m.cfg.num_attention_heads, 96, 96]);
        assert_eq!(
            o.heads_out.dims(),
            &[1, m.cfg.num_attention_heads, 96, m.cfg.head_dim]
        );
        seen.push(o.layer);
        Ok(())
    };
    let opts = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    m.forward_hidden(&x, &mut m.new_cache(1, 96), &opts, Some(&mut obs))?;
    assert_eq!(seen, (0..m.cfg.num_hidden_layers).collect::<Vec<_>>());
    Ok(())
}
