//! Continual training (`recurformer::train`), the differentiable side: the training forward equals
//! the model's forward, and student gradients (mixers, all parameters, o_proj, the hidden-state
//! term) agree with finite differences. The loop itself is `tests/train_loop.rs`.

mod common;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use common::train::*;
use common::*;
use recurformer::model::hybrid::Init;
use recurformer::model::hybrid::LocalWindow;
use recurformer::model::llama::Model;
use recurformer::model::options::{AttentionImpl, ForwardOptions};
use recurformer::train::{
    distill_losses, forward_train, forward_train_states, hidden_state_loss, logits_train,
    make_trainable, RunOptions, Stage, Start, TrainScope,
};
use std::collections::HashMap;

#[test]
fn training_forward_equals_the_model_forward() -> Result<()> {
    let eager = ForwardOptions {
        attention: AttentionImpl::Eager,
        differentiable: false,
    };
    for (name, groups) in [
        ("tiny-llama", vec![vec![0], vec![1]]),
        ("tiny-llama", vec![vec![0], vec![0, 1]]),
        ("tiny-qwen2", vec![vec![1], vec![]]),
    ] {
        let (base, h) = tiny_hybrid(name, &groups, Init::Attention)?;
        // The same plan with windowed heads (1 sink + 3 recent keys) beside the mixers.
        let local = LocalWindow {
            sinks: 1,
            window: 3,
        };
        let (_, hl) = tiny_local_hybrid(name, &groups, local)?;
        let (ids, _) = tiny_expected(name)?;
        let fwd: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let t = fwd.len();
        let both: Vec<u32> = fwd.iter().chain(fwd.iter().rev()).copied().collect();
        let ids = Tensor::from_vec(both, (2, t), &Device::Cpu)?; // (2, t): forward and reversed
        for (what, m) in [("base", &base), ("hybrid", &h), ("hybrid+window", &hl)] {
            let reference = m.forward_hidden(&ids, &mut m.new_cache(2, t), &eager, None)?;
            let ours = forward_train(m, &ids)?;
            let d = max_abs_diff(&reference, &ours)?;
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            println!("{name} {groups:?} {what}: training forward vs forward_hidden {d:.2e} (max |h| {scale:.2})");
            assert!(d <= 1e-5, "{name} {what}: {d}");
        }
    }
    Ok(())
}

/// Mixer gradients through the whole student (the kept heads of the layer above included)
/// against central finite differences, in f64.
#[test]
fn student_gradients_match_finite_differences() -> Result<()> {
    // Layer 0 replaces group 0, layer 1 group 1: layer 0's mixer reaches the loss through layer
    // 1's kept attention (queries, keys and values) and its mixer.
    let (base64, h64, ids) = f64_hybrid_and_windows(9000, 14)?;
    let teacher_logits = base64.logits(&forward_train(&base64, &ids)?)?;
    let loss_of = |m: &Model| -> Result<Tensor> {
        let logits = logits_train(m, &forward_train(m, &ids)?)?;
        let (kl, ce) = distill_losses(&logits, &teacher_logits, &ids)?;
        Ok((kl + (ce * 0.5)?)?)
    };
    let (hm, vars) = make_trainable(&h64, TrainScope::Mixers)?;
    let g = loss_of(&hm)?.backward()?;
    assert_eq!(vars.len(), 24);
    for (name, v) in &vars {
        let gv = g
            .get(v.as_tensor())
            .with_context(|| format!("{name}: no gradient"))?;
        let m = gv.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(m > 0.0 && m.is_finite(), "{name}: |grad| max {m}");
    }
    let probes = [
        ("model.layers.0.mixer.x_proj.weight", 5usize),
        ("model.layers.0.mixer.B_proj.weight", 70),
        ("model.layers.0.mixer.C_proj.weight", 3),
        ("model.layers.0.mixer.conv.weight", 4 * 7 + 3),
        ("model.layers.0.mixer.dt_proj.weight", 9),
        ("model.layers.0.mixer.A_log", 1),
        ("model.layers.0.mixer.D", 0),
        ("model.layers.0.mixer.z_proj.weight", 40),
        ("model.layers.0.mixer.norm.weight", 17),
        ("model.layers.1.mixer.A_log", 0),
        ("model.layers.1.mixer.x_proj.weight", 100),
        ("model.layers.1.mixer.dt_bias", 1),
    ];
    assert_gradients_match_finite_differences(&h64, &vars, &g, &probes, &loss_of)?;
    Ok(())
}

/// The hidden-state term of distillation (`--hidden-weight`): zero for a student equal to its
/// teacher, positive for a conversion, and its mixer gradients agree with finite differences
/// (f64), layer 0's mixer reaching layer 1's input directly and the final state through layer 1.
#[test]
fn hidden_state_loss_gradients_match_finite_differences() -> Result<()> {
    let (base64, h64, ids) = f64_hybrid_and_windows(9100, 12)?;
    let (t_final, t_states) = forward_train_states(&base64, &ids, true)?;
    assert_eq!(t_states.len(), base64.layers.len());
    let same = hidden_state_loss(&base64, &t_states, &t_final, &t_states, &t_final)?;
    assert_eq!(same.to_scalar::<f64>()?, 0.0);
    let loss_of = |m: &Model| -> Result<Tensor> {
        let (f, st) = forward_train_states(m, &ids, true)?;
        hidden_state_loss(m, &st, &f, &t_states, &t_final)
    };
    let (hm, vars) = make_trainable(&h64, TrainScope::Mixers)?;
    let l0 = loss_of(&hm)?;
    let l0v = l0.to_scalar::<f64>()?;
    println!("hidden-state NMSE of the untrained conversion: {l0v:.4e}");
    assert!(l0v > 0.0 && l0v.is_finite());
    let g = l0.backward()?;
    assert_gradients_match_finite_differences(
        &h64,
        &vars,
        &g,
        &[
            ("model.layers.0.mixer.x_proj.weight", 7usize),
            ("model.layers.0.mixer.A_log", 0),
            ("model.layers.1.mixer.C_proj.weight", 11),
            ("model.layers.1.mixer.norm.weight", 5),
        ],
        &loss_of,
    )?;
    Ok(())
}

/// Distillation with the hidden-state term on the tiny model: the held-out evaluation reports
/// the term, it falls with training, and the step log carries it as a third part.
#[test]
fn distillation_with_the_hidden_state_term_lowers_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    let out = tmp.path().join("trained");
    let s = session(&h, &base, &data, &out);
    let mut cfg = tiny_config(vec![Stage::Distill], 20);
    cfg.hidden_weight = 1.0;
    let o = run(
        &s,
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 0,
            save_every: 0,
        },
        &|_, _| false,
    )?;
    let d = &o.state.progress.done[0];
    let (a, b) = (
        d.heldout_start.as_ref().context("start")?,
        d.heldout_end.as_ref().context("end")?,
    );
    let (ha, hb) = (a.hidden.context("hidden")?, b.hidden.context("hidden")?);
    println!(
        "held-out hidden NMSE {ha:.5} -> {hb:.5}, KL {:.5} -> {:.5}, loss {:.5} -> {:.5}",
        a.kl.unwrap(),
        b.kl.unwrap(),
        a.loss,
        b.loss
    );
    assert!(hb < ha, "hidden NMSE {ha} -> {hb}");
    assert!(b.loss < a.loss);
    assert!(
        (a.loss - (a.kl.unwrap() + ha)).abs() < 1e-9,
        "loss = KL + 1.0 x hidden"
    );
    let log = read_log(&out)?;
    let steps: Vec<&serde_json::Value> = log.iter().filter(|r| r["kind"] == "step").collect();
    assert_eq!(steps.len(), 20);
    let parts = steps[0]["parts"].as_array().context("parts")?;
    assert_eq!(parts.len(), 3);
    assert!(parts[2].as_f64().context("hidden part")? > 0.0);
    Ok(())
}

/// `--train all`: every tensor of the student gets the right gradient (the frozen-weight fast
/// path must step aside for trained weights; o_proj reaches its gradient through the column
/// reorder, the embedding through its lookup).
#[test]
fn all_parameters_train_with_correct_gradients() -> Result<()> {
    let (base64, h64, ids) = f64_hybrid_and_windows(12000, 12)?;
    let teacher_logits = base64.logits(&forward_train(&base64, &ids)?)?;
    let loss_of = |m: &Model| -> Result<Tensor> {
        let logits = logits_train(m, &forward_train(m, &ids)?)?;
        Ok(distill_losses(&logits, &teacher_logits, &ids)?.0)
    };
    let (hm, vars) = make_trainable(&h64, TrainScope::All)?;
    assert_eq!(vars.len(), recurformer::train::tensor_names(&h64).len());
    let g = loss_of(&hm)?.backward()?;
    for (name, v) in &vars {
        let gv = g
            .get(v.as_tensor())
            .with_context(|| format!("{name}: no gradient"))?;
        let m = gv.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(m > 0.0 && m.is_finite(), "{name}: |grad| max {m}");
    }
    assert_gradients_match_finite_differences(
        &h64,
        &vars,
        &g,
        &[
            ("model.embed_tokens.weight", 101 * 64 + 3),
            ("model.layers.0.self_attn.o_proj.weight", 7 * 64 + 40),
            ("model.layers.1.self_attn.k_proj.weight", 9),
            ("model.layers.0.mlp.down_proj.weight", 77),
            ("model.layers.1.input_layernorm.weight", 5),
            ("model.norm.weight", 2),
            ("lm_head.weight", 104 * 64 + 1),
        ],
        &loss_of,
    )?;
    // A short run with every tensor trained changes tensors outside the mixers too.
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let tmp = tempfile::tempdir()?;
    let data = tiny_data()?;
    let out = tmp.path().join("all");
    let mut cfg = tiny_config(vec![Stage::Distill], 3);
    cfg.scope = TrainScope::All;
    run(
        &session(&h, &base, &data, &out),
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 0,
            save_every: 0,
        },
        &|_, _| false,
    )?;
    let after = tensors(&out, "model.safetensors")?;
    let before: HashMap<String, Tensor> = recurformer::checkpoint::save::named_tensors(&h)
        .into_iter()
        .collect();
    for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"] {
        assert_ne!(
            bits(&after[name])?,
            bits(&before[name])?,
            "{name} did not train"
        );
    }
    Ok(())
}

/// `--train mixers-oproj`: the mixers and the o_proj of the layers that have a mixer train;
/// every other tensor, the o_proj of an unconverted layer included, stays as it was.
#[test]
fn mixers_oproj_trains_the_converted_layers_o_proj_only() -> Result<()> {
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![]], Init::Attention)?;
    let (_, vars) = make_trainable(&h, TrainScope::MixersOproj)?;
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"model.layers.0.self_attn.o_proj.weight"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.contains(".mixer.")), "{names:?}");
    for n in &names {
        assert!(
            n.starts_with("model.layers.0.")
                && (n.contains(".mixer.") || *n == "model.layers.0.self_attn.o_proj.weight"),
            "{n} should not train"
        );
    }
    let tmp = tempfile::tempdir()?;
    let data = tiny_data()?;
    let out = tmp.path().join("oproj");
    let mut cfg = tiny_config(vec![Stage::Distill], 3);
    cfg.scope = TrainScope::MixersOproj;
    cfg.base_lr_ratio = 0.5;
    run(
        &session(&h, &base, &data, &out),
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 0,
            save_every: 0,
        },
        &|_, _| false,
    )?;
    let after = tensors(&out, "model.safetensors")?;
    let before: HashMap<String, Tensor> = recurformer::checkpoint::save::named_tensors(&h)
        .into_iter()
        .collect();
    assert_ne!(
        bits(&after["model.layers.0.self_attn.o_proj.weight"])?,
        bits(&before["model.layers.0.self_attn.o_proj.weight"])?,
        "the converted layer's o_proj did not train"
    );
    for name in [
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ] {
        assert_eq!(bits(&after[name])?, bits(&before[name])?, "{name} changed");
    }
    Ok(())
}

/// Windowed heads beside the mixers: the default scope leaves them frozen (they are the base
/// model's own heads), `all` trains them, and every trained tensor receives a gradient.
#[test]
fn windowed_heads_are_frozen_by_default_and_get_gradients_when_trained() -> Result<()> {
    let local = LocalWindow {
        sinks: 1,
        window: 3,
    };
    let (base, h) = tiny_local_hybrid("tiny-llama", &[vec![0], vec![1]], local)?;
    let (ids, _) = tiny_expected("tiny-llama")?;
    let teacher_logits = base.logits(&forward_train(&base, &ids)?)?;
    for scope in [TrainScope::Mixers, TrainScope::All] {
        let (hm, vars) = make_trainable(&h, scope)?;
        let local_vars = vars
            .iter()
            .filter(|(n, _)| n.contains(".local_attn."))
            .count();
        assert_eq!(
            local_vars,
            if scope == TrainScope::All { 6 } else { 0 },
            "{scope:?}"
        );
        let logits = logits_train(&hm, &forward_train(&hm, &ids)?)?;
        let g = distill_losses(&logits, &teacher_logits, &ids)?
            .0
            .backward()?;
        for (name, v) in &vars {
            let gv = g
                .get(v.as_tensor())
                .with_context(|| format!("{name}: no gradient"))?;
            let m = gv.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(m > 0.0 && m.is_finite(), "{scope:?} {name}: |grad| max {m}");
        }
    }
    Ok(())
}
