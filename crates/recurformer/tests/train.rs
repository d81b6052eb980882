//! Continual training (`recurformer::train`): the training forward equals the model's forward,
//! student gradients agree with finite differences, a few steps lower the loss, a stopped and
//! resumed run equals an uninterrupted one bit for bit, failures stop with the step named, damaged
//! or mismatched checkpoints are refused, and distillation lowers the held-out loss of the default
//! model.

mod common;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::*;
use recurformer::hybrid::{convert, save_checkpoint, ConvertOptions, Init, Provenance};
use recurformer::llama::{AttentionImpl, ForwardOptions, Model};
use recurformer::plan::Plan;
use recurformer::recency::Calibration;
use recurformer::train::{
    distill_losses, forward_train, forward_train_states, hidden_state_loss, logits_train,
    make_trainable, map_model, model_to_dtype, read_resume_point, train, Budget, Event, RunOptions,
    Session, Stage, Start, TokenDocument, TrainConfig, TrainData, TrainOutcome, TrainScope,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn provenance(base: &str) -> Provenance {
    Provenance {
        base_model: base.into(),
        recency: None,
        plan_file: None,
        seed: 0,
        recurformer_version: "test".into(),
        training: vec![],
    }
}

/// A tiny hybrid: `groups[l]` are the KV groups of layer l replaced by a mixer.
fn tiny_hybrid(name: &str, groups: &[Vec<usize>], init: Init) -> Result<(Model, Model)> {
    let base = recurformer::loader::load(&fixture(name))?.model;
    let (ids, _) = tiny_expected(name)?;
    let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
    let report = recurformer::analyze::analyze(
        &base,
        &[ids],
        2,
        Calibration::default(),
        "test",
        &mut |_| {},
    )?;
    let plan = Plan::from_groups(&base.cfg, groups)?;
    let h = convert(
        &base,
        &ConvertOptions {
            plan: &plan,
            recency: Some(&report),
            init,
            seed: 3,
            provenance: provenance(&fixture(name).display().to_string()),
        },
    )?;
    Ok((base, h))
}

/// Byte-level documents (the tiny models have a 256-token vocabulary): `n` pieces of `len`
/// bytes of an Austen novel, starting at `skip`.
fn byte_docs(file: &str, skip: usize, n: usize, len: usize) -> Result<Vec<TokenDocument>> {
    let p = root().join("data/text/austen").join(file);
    let bytes =
        std::fs::read(&p).with_context(|| format!("{} (run scripts/setup.sh)", p.display()))?;
    Ok((0..n)
        .map(|i| TokenDocument {
            source: format!("{file}#{i}"),
            ids: bytes[skip + i * len..skip + (i + 1) * len]
                .iter()
                .map(|&b| b as u32)
                .collect(),
        })
        .collect())
}

fn tiny_data() -> Result<TrainData> {
    let train = byte_docs("emma.txt", 5000, 6, 700)?;
    let held = byte_docs("persuasion.txt", 5000, 2, 400)?;
    Ok(TrainData::new(&train, &held, Some(2)))
}

fn tiny_config(stages: Vec<Stage>, max_steps: u64) -> TrainConfig {
    TrainConfig {
        stages,
        seq_len: 24,
        batch: 2,
        accum: 2,
        lr: 3e-3,
        align_lr: 1e-2,
        warmup: 2,
        eval_windows: 4,
        align_share: 0.25,
        budget: Budget {
            max_steps: Some(max_steps),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn session<'a>(
    student: &'a Model,
    teacher: &'a Model,
    data: &'a TrainData,
    out: &Path,
) -> Session<'a> {
    Session {
        student,
        tokenizer: None,
        teacher,
        teacher_path: "tiny-llama".into(),
        data,
        out: out.to_path_buf(),
    }
}

/// Runs until finished, or until `stop(stage, step)` says to stop after that step (as if the
/// process were killed there: nothing more is written).
fn run(
    s: &Session,
    start: Start,
    opts: RunOptions,
    stop: &dyn Fn(Stage, u64) -> bool,
) -> Result<TrainOutcome> {
    let on_event: &mut dyn FnMut(Event) -> ControlFlow<()> = &mut |e| match e {
        Event::Step(r) if stop(r.stage, r.step) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    };
    train(s, start, opts, on_event)
}

fn tensors(dir: &Path, file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join(file),
        &Device::Cpu,
    )?)
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

fn step_losses(log: &[serde_json::Value]) -> Vec<(u64, u64, f64)> {
    log.iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            (
                r["stage_index"].as_u64().unwrap(),
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn read_log(dir: &Path) -> Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// The tiny Llama converted at group 0 of layer 0 and group 1 of layer 1, base and hybrid in f64,
/// and two windows of `len` bytes of Emma from byte `skip`: the setting of the gradient tests.
/// Layer 0's mixer reaches the loss through layer 1's kept attention and its mixer.
fn f64_hybrid_and_windows(skip: usize, len: usize) -> Result<(Model, Model, Tensor)> {
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let docs = byte_docs("emma.txt", skip, 2, len)?;
    let flat: Vec<u32> = docs.iter().flat_map(|d| d.ids.clone()).collect();
    Ok((
        model_to_dtype(&base, DType::F64)?,
        model_to_dtype(&h, DType::F64)?,
        Tensor::from_vec(flat, (2, len), &Device::Cpu)?,
    ))
}

/// Central finite differences (f64, step 1e-5) of `loss_of` at one element of each probed tensor
/// of `model` against the autograd gradient in `g` of the matching var; relative error <= 1e-5,
/// and the gradient must not be zero.
fn assert_gradients_match_finite_differences(
    model: &Model,
    vars: &[(String, candle_core::Var)],
    g: &candle_core::backprop::GradStore,
    probes: &[(&str, usize)],
    loss_of: &dyn Fn(&Model) -> Result<Tensor>,
) -> Result<()> {
    let eps = 1e-5;
    for &(target, idx) in probes {
        let loss_perturbed = |delta: f64| -> Result<f64> {
            let m = map_model(model, &mut |name, t| {
                if name != target {
                    return Ok(t.clone());
                }
                let mut v = t.flatten_all()?.to_vec1::<f64>()?;
                v[idx] += delta;
                Ok(Tensor::from_vec(v, t.dims(), t.device())?)
            })?;
            Ok(loss_of(&m)?.to_scalar::<f64>()?)
        };
        let fd = (loss_perturbed(eps)? - loss_perturbed(-eps)?) / (2.0 * eps);
        let var = &vars
            .iter()
            .find(|(n, _)| n == target)
            .with_context(|| format!("{target}: not a trained tensor"))?
            .1;
        let ad = g
            .get(var.as_tensor())
            .with_context(|| format!("{target}: no gradient"))?
            .flatten_all()?
            .to_vec1::<f64>()?[idx];
        let rel = (fd - ad).abs() / fd.abs().max(ad.abs()).max(1e-10);
        println!("{target}[{idx}]: finite difference {fd:.8e}, autograd {ad:.8e}, rel {rel:.1e}");
        assert!(ad != 0.0, "{target}[{idx}]: zero gradient");
        assert!(rel <= 1e-5, "{target}[{idx}]: fd {fd} vs autograd {ad}");
    }
    Ok(())
}

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
        let (ids, _) = tiny_expected(name)?;
        let fwd: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
        let t = fwd.len();
        let both: Vec<u32> = fwd.iter().chain(fwd.iter().rev()).copied().collect();
        let ids = Tensor::from_vec(both, (2, t), &Device::Cpu)?; // (2, t): forward and reversed
        for (what, m) in [("base", &base), ("hybrid", &h)] {
            let reference = m.forward_hidden(&ids, &mut m.new_cache(2, t), &eager, None)?;
            let ours = forward_train(m, &ids)?;
            let d = max_abs_diff(&reference, &ours)?;
            println!("{name} {groups:?} {what}: training forward vs forward_hidden {d:.2e}");
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
    let before: HashMap<String, Tensor> =
        recurformer::hybrid::named_tensors(&h).into_iter().collect();
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
    let before: HashMap<String, Tensor> =
        recurformer::hybrid::named_tensors(&h).into_iter().collect();
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

/// With only a time limit, the schedule's horizon is estimated after the first few steps and the
/// stage stops on time.
#[test]
fn a_time_budget_sets_the_horizon_and_stops() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    let mut cfg = tiny_config(vec![Stage::Align], 1);
    cfg.budget = Budget {
        max_minutes: Some(0.02),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let mut horizon = None;
    let o = train(
        &session(&h, &base, &data, &tmp.path().join("timed")),
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 0,
            save_every: 0,
        },
        &mut |e| {
            if let Event::Horizon { horizon: x, .. } = e {
                horizon = Some(x);
            }
            ControlFlow::Continue(())
        },
    )?;
    let d = &o.state.progress.done[0];
    println!(
        "1.2 s budget: horizon {horizon:?}, {} steps, stopped by {}, {:.2} s",
        d.steps,
        d.stopped_by,
        t0.elapsed().as_secs_f64()
    );
    assert!(horizon.is_some() && d.steps >= 1);
    assert_eq!(Some(d.horizon), horizon);
    assert!(d.elapsed_s < 5.0, "{}", d.elapsed_s);
    Ok(())
}

#[test]
fn a_few_steps_lower_the_loss_and_write_a_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    let out = tmp.path().join("trained");
    let s = session(&h, &base, &data, &out);
    let mut cfg = tiny_config(vec![Stage::Align, Stage::Distill], 40);
    cfg.align_share = 0.5;
    let o = run(
        &s,
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 10,
            save_every: 0,
        },
        &|_, _| false,
    )?;
    assert!(o.finished);
    for d in &o.state.progress.done {
        let (a, b) = (
            d.heldout_start.as_ref().unwrap().loss,
            d.heldout_end.as_ref().unwrap().loss,
        );
        println!(
            "{:?}: {} steps, held-out {a:.5} -> {b:.5}",
            d.stage, d.steps
        );
        assert_eq!(d.steps, 20);
        assert!(b < a, "{:?}: held-out loss {a} -> {b}", d.stage);
    }
    // A normal model directory with the training recorded.
    let back = recurformer::loader::load(&out)?;
    let training = &back.model.recurformer.as_ref().unwrap().provenance.training;
    assert_eq!(training.len(), 2);
    assert_eq!(training[0]["stage"], "align");
    assert_eq!(training[1]["finished"], true);
    let png = std::fs::read(out.join("loss.png"))?;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let log = read_log(&out)?;
    assert_eq!(step_losses(&log).len(), 40);
    // The saved mixers are the trained ones: they differ from the conversion's.
    let (ids, _) = tiny_expected("tiny-llama")?;
    let t = ids.dim(1)?;
    let before = h.forward(&ids, &mut h.new_cache(1, t))?;
    let after = back.model.forward(&ids, &mut back.model.new_cache(1, t))?;
    assert!(max_abs_diff(&before, &after)? > 0.0);
    if let Ok(keep) = std::env::var("RECURFORMER_KEEP_FIGURES") {
        std::fs::copy(
            out.join("loss.png"),
            Path::new(&keep).join("train_loss.png"),
        )?;
    }
    Ok(())
}

/// A run stopped twice between checkpoints (once in each stage) and resumed ends with the same
/// parameters, optimizer state and per-step losses, bit for bit, as an uninterrupted run.
#[test]
fn stopped_and_resumed_run_equals_an_uninterrupted_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    // 12 steps: 3 of alignment, 9 of distillation; checkpoints every 2 steps.
    let cfg = tiny_config(vec![Stage::Align, Stage::Distill], 12);
    let opts = RunOptions {
        eval_every: 3,
        save_every: 2,
    };
    let out_a = tmp.path().join("a");
    let a = run(
        &session(&h, &base, &data, &out_a),
        Start::Fresh(cfg.clone()),
        opts,
        &|_, _| false,
    )?;
    assert!(a.finished);

    let out_b = tmp.path().join("b");
    // Stopped after align step 3 (checkpoint at 2) ...
    let b1 = run(
        &session(&h, &base, &data, &out_b),
        Start::Fresh(cfg),
        opts,
        &|st, step| st == Stage::Align && step == 3,
    )?;
    assert!(!b1.finished);
    let (loaded, rp) = read_resume_point(&out_b)?;
    assert_eq!(
        (rp.state.progress.stage_index, rp.state.progress.step),
        (0, 2)
    );
    // ... resumed, stopped after distill step 5 (checkpoint at 4) ...
    let b2 = run(
        &session(&loaded.model, &base, &data, &out_b),
        Start::Resume(Box::new(rp)),
        opts,
        &|st, step| st == Stage::Distill && step == 5,
    )?;
    assert!(!b2.finished);
    let (loaded, rp) = read_resume_point(&out_b)?;
    assert_eq!(
        (rp.state.progress.stage_index, rp.state.progress.step),
        (1, 4)
    );
    // ... and resumed to the end.
    let b3 = run(
        &session(&loaded.model, &base, &data, &out_b),
        Start::Resume(Box::new(rp)),
        opts,
        &|_, _| false,
    )?;
    assert!(b3.finished);

    let (ta, tb) = (
        tensors(&out_a, "model.safetensors")?,
        tensors(&out_b, "model.safetensors")?,
    );
    assert_eq!(ta.len(), tb.len());
    let mut mixers = 0;
    for (name, x) in &ta {
        let y = tb
            .get(name)
            .with_context(|| format!("{name} missing in the resumed run"))?;
        assert_eq!(bits(x)?, bits(y)?, "{name} differs");
        mixers += name.contains(".mixer.") as usize;
    }
    assert_eq!(mixers, 24);
    // The training changed the mixers (so the comparison is not vacuous).
    let h_t: HashMap<String, Tensor> = recurformer::hybrid::named_tensors(&h).into_iter().collect();
    let x = "model.layers.1.mixer.C_proj.weight";
    assert_ne!(bits(&ta[x])?, bits(&h_t[x])?);
    // Same losses at every step, each step logged once.
    let (la, lb) = (
        step_losses(&read_log(&out_a)?),
        step_losses(&read_log(&out_b)?),
    );
    assert_eq!(la.len(), 12);
    assert_eq!(la, lb);
    Ok(())
}

#[test]
fn non_finite_loss_stops_with_the_step_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    let opts = RunOptions {
        eval_every: 0,
        save_every: 1,
    };

    // A NaN in a mixer: the first step fails, nothing is written.
    let poisoned = map_model(&h, &mut |name, t| {
        if name == "model.layers.0.mixer.x_proj.weight" {
            Ok((t * f64::NAN)?)
        } else {
            Ok(t.clone())
        }
    })?;
    let out = tmp.path().join("poisoned");
    let e = run(
        &session(&poisoned, &base, &data, &out),
        Start::Fresh(tiny_config(vec![Stage::Align], 5)),
        opts,
        &|_, _| false,
    )
    .err()
    .context("a NaN parameter must stop the run")?;
    let e = format!("{e:#}");
    println!("{e}");
    assert!(
        e.contains("align step 1") && e.contains("non-finite"),
        "{e}"
    );
    assert!(e.contains("no checkpoint"), "{e}");
    assert!(!out.exists());

    // An absurd learning rate: some later step fails; the checkpoint of the step before stays.
    let out = tmp.path().join("diverged");
    let mut cfg = tiny_config(vec![Stage::Align], 30);
    cfg.align_lr = 1e12;
    cfg.clip = 0.0;
    cfg.warmup = 0;
    let e = run(
        &session(&h, &base, &data, &out),
        Start::Fresh(cfg),
        opts,
        &|_, _| false,
    )
    .err()
    .context("lr 1e12 must diverge")?;
    let e = format!("{e:#}");
    println!("{e}");
    let step: u64 = e
        .split("align step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no step in {e:?}"))?;
    assert!(step >= 2, "{e}");
    assert!(e.contains("last good checkpoint"), "{e}");
    let (_, rp) = read_resume_point(&out)?;
    assert_eq!(rp.state.progress.step, step - 1);
    Ok(())
}

#[test]
fn damaged_or_mismatched_checkpoints_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Random)?;
    let data = tiny_data()?;
    let opts = RunOptions {
        eval_every: 0,
        save_every: 2,
    };
    let good = tmp.path().join("good");
    run(
        &session(&h, &base, &data, &good),
        Start::Fresh(tiny_config(vec![Stage::Distill], 10)),
        opts,
        &|_, step| step == 3,
    )?;
    let err = |d: &Path| -> String {
        match read_resume_point(d) {
            Ok(_) => panic!("{} was accepted", d.display()),
            Err(e) => format!("{e:#}"),
        }
    };

    // A converted model is not a training checkpoint.
    let plain = tmp.path().join("plain");
    save_checkpoint(&h, None, &plain)?;
    let e = err(&plain);
    assert!(e.contains("no train_state.json"), "{e}");

    let variant = |name: &str, f: &dyn Fn(&Path) -> Result<()>| -> Result<PathBuf> {
        let d = tmp.path().join(name);
        copy_dir(&good, &d)?;
        f(&d)?;
        Ok(d)
    };
    let e = err(&variant("json", &|d| {
        Ok(std::fs::write(
            d.join("train_state.json"),
            "{\"format_version\": 1,",
        )?)
    })?);
    assert!(
        e.contains("train_state.json") && e.contains("not valid JSON"),
        "{e}"
    );
    let e = err(&variant("noopt", &|d| {
        Ok(std::fs::remove_file(d.join("optimizer.safetensors"))?)
    })?);
    assert!(
        e.contains("no optimizer.safetensors") && e.contains("step 2"),
        "{e}"
    );
    let e = err(&variant("badopt", &|d| {
        Ok(std::fs::write(d.join("optimizer.safetensors"), b"garbage")?)
    })?);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let e = err(&variant("model", &|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p)?;
        Ok(std::fs::write(&p, &bytes[..bytes.len() / 2])?)
    })?);
    assert!(e.contains("model.safetensors"), "{e}");

    // Killed between the two renames of a checkpoint swap: the directory is missing, the
    // previous checkpoint sits beside it.
    let gone = tmp.path().join("gone");
    copy_dir(&good, &tmp.path().join(".gone.old12345"))?;
    let e = err(&gone);
    assert!(e.contains(".gone.old12345") && e.contains("rename"), "{e}");

    // Other data or another teacher.
    let (loaded, rp) = read_resume_point(&good)?;
    let mut other = tiny_data()?;
    other.train.pop();
    let e = match train(
        &session(&loaded.model, &base, &other, &good),
        Start::Resume(Box::new(rp)),
        opts,
        &mut |_| ControlFlow::Continue(()),
    ) {
        Ok(_) => panic!("other data accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("training data differ"), "{e}");
    let other_teacher = map_model(&base, &mut |name, t| {
        if name == "model.norm.weight" {
            Ok((t * 1.5)?)
        } else {
            Ok(t.clone())
        }
    })?;
    let (loaded, rp) = read_resume_point(&good)?;
    let e = match train(
        &session(&loaded.model, &other_teacher, &data, &good),
        Start::Resume(Box::new(rp)),
        opts,
        &mut |_| ControlFlow::Continue(()),
    ) {
        Ok(_) => panic!("another teacher accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("not the checkpoint's teacher"), "{e}");
    // A fresh run refuses to overwrite an existing directory.
    let e = match train(
        &session(&h, &base, &data, &good),
        Start::Fresh(tiny_config(vec![Stage::Distill], 10)),
        opts,
        &mut |_| ControlFlow::Continue(()),
    ) {
        Ok(_) => panic!("overwrote a checkpoint"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("already exists") && e.contains("--resume"),
        "{e}"
    );
    Ok(())
}

/// The default model, 50 % of KV groups converted: a few distillation steps lower the held-out
/// distillation loss (a real run on real weights and text).
#[test]
fn distillation_lowers_the_held_out_loss_of_the_default_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let loaded = recurformer::loader::load(&default_model())?;
    let (base, tok) = (&loaded.model, loaded.tokenizer()?);
    let text = |f: &str, from: usize, chars: usize| -> Result<String> {
        let s = std::fs::read_to_string(root().join("data/text/austen").join(f))?;
        Ok(s.chars().skip(from).take(chars).collect())
    };
    let doc = |f: &str, from: usize, chars: usize| -> Result<TokenDocument> {
        Ok(TokenDocument {
            source: f.into(),
            ids: tok.encode(&text(f, from, chars)?, false)?,
        })
    };
    let train_docs = vec![
        doc("emma.txt", 20_000, 12_000)?,
        doc("pride_and_prejudice.txt", 20_000, 12_000)?,
    ];
    let held = vec![doc("persuasion.txt", 20_000, 6_000)?];
    let calib: Vec<u32> = train_docs[0].ids[..256].to_vec();
    let report = recurformer::analyze::analyze(
        base,
        &[calib],
        32,
        Calibration::default(),
        "default",
        &mut |_| {},
    )?;
    let plan = Plan::by_fraction(&report, 0.5, 1)?;
    let h = convert(
        base,
        &ConvertOptions {
            plan: &plan,
            recency: Some(&report),
            init: Init::Attention,
            seed: 0,
            provenance: provenance(&default_model().display().to_string()),
        },
    )?;
    let data = TrainData::new(&train_docs, &held, base.cfg.eos_token_ids.first().copied());
    let cfg = TrainConfig {
        stages: vec![Stage::Distill],
        seq_len: 64,
        batch: 1,
        accum: 1,
        lr: 1e-3,
        warmup: 0,
        eval_windows: 4,
        budget: Budget {
            max_steps: Some(10),
            ..Default::default()
        },
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let o = train(
        &Session {
            student: &h,
            tokenizer: loaded.tokenizer.as_ref(),
            teacher: base,
            teacher_path: default_model().display().to_string(),
            data: &data,
            out: tmp.path().join("smol"),
        },
        Start::Fresh(cfg),
        RunOptions {
            eval_every: 0,
            save_every: 0,
        },
        &mut |e| {
            if let Event::Step(r) = e {
                println!(
                    "step {}: KL {:.4} ({:.0} tok/s)",
                    r.step, r.loss, r.tokens_per_s
                );
            }
            ControlFlow::Continue(())
        },
    )?;
    let d = &o.state.progress.done[0];
    let (a, b) = (
        d.heldout_start.as_ref().unwrap(),
        d.heldout_end.as_ref().unwrap(),
    );
    println!(
        "default model, 50% converted: held-out KL {:.4} -> {:.4}, CE {:.4} -> {:.4} ({:.1} s)",
        a.kl.unwrap(),
        b.kl.unwrap(),
        a.ce.unwrap(),
        b.ce.unwrap(),
        t0.elapsed().as_secs_f64()
    );
    assert!(b.kl.unwrap() < a.kl.unwrap());
    Ok(())
}

/// Training throughput of each stage on the default model (50 % converted) at 256 tokens:
/// `cargo test --release --test train -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let loaded = recurformer::loader::load(&default_model())?;
    let (base, tok) = (&loaded.model, loaded.tokenizer()?);
    let s = std::fs::read_to_string(root().join("data/text/austen/emma.txt"))?;
    let ids = tok.encode(&s.chars().take(60_000).collect::<String>(), false)?;
    let held = tok.encode(
        &std::fs::read_to_string(root().join("data/text/austen/persuasion.txt"))?
            .chars()
            .take(6_000)
            .collect::<String>(),
        false,
    )?;
    let report = recurformer::analyze::analyze(
        base,
        &[ids[..256].to_vec()],
        32,
        Calibration::default(),
        "default",
        &mut |_| {},
    )?;
    let plan = Plan::by_fraction(&report, 0.5, 1)?;
    let h = convert(
        base,
        &ConvertOptions {
            plan: &plan,
            recency: Some(&report),
            init: Init::Attention,
            seed: 0,
            provenance: provenance("default"),
        },
    )?;
    let data = TrainData::new(
        &[TokenDocument {
            source: "emma".into(),
            ids,
        }],
        &[TokenDocument {
            source: "persuasion".into(),
            ids: held,
        }],
        None,
    );
    // Where a distillation step's time goes (seq 256, batch 1).
    let ids = Tensor::from_vec(data.train[..256].to_vec(), (1, 256), &Device::Cpu)?;
    let (hm, vars) = make_trainable(&h, TrainScope::Mixers)?;
    for rep in 0..2 {
        let t = std::time::Instant::now();
        let th = base.forward_hidden(
            &ids,
            &mut base.new_cache(1, 256),
            &ForwardOptions::default(),
            None,
        )?;
        let tl = base.logits(&th)?;
        let t_teacher = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let sh = forward_train(&hm, &ids)?;
        let t_student = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let logits = logits_train(&hm, &sh)?;
        let (kl, _) = distill_losses(&logits, &tl, &ids)?;
        let _ = kl.to_scalar::<f32>()?;
        let t_loss = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let g = kl.backward()?;
        let _ = g.get(vars[0].1.as_tensor());
        let t_back = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let hv = candle_core::Var::from_tensor(&sh.detach())?;
        let (kl2, _) = distill_losses(&logits_train(&hm, hv.as_tensor())?, &tl, &ids)?;
        let g2 = kl2.backward()?;
        let _ = g2.get(hv.as_tensor());
        println!(
            "  lm_head + KL forward and backward alone: {:.2} s",
            t.elapsed().as_secs_f64()
        );
        println!(
            "distill step breakdown ({rep}): teacher {t_teacher:.2} s, student forward {t_student:.2} s, \
             logits+KL {t_loss:.2} s, backward {t_back:.2} s"
        );
    }
    for stage in [Stage::Align, Stage::Distill] {
        let cfg = TrainConfig {
            stages: vec![stage],
            seq_len: 256,
            eval_windows: 1,
            budget: Budget {
                max_steps: Some(6),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut rates = Vec::new();
        train(
            &Session {
                student: &h,
                tokenizer: None,
                teacher: base,
                teacher_path: "default".into(),
                data: &data,
                out: tmp.path().join(stage.name()),
            },
            Start::Fresh(cfg),
            RunOptions {
                eval_every: 0,
                save_every: 0,
            },
            &mut |e| {
                if let Event::Step(r) = e {
                    println!(
                        "{} step {}: {:.2} s, {:.0} tok/s",
                        stage.name(),
                        r.step,
                        r.step_s,
                        r.tokens_per_s
                    );
                    rates.push(r.tokens_per_s);
                }
                ControlFlow::Continue(())
            },
        )?;
        // The first step pays for allocation; report the median of the rest.
        let mut rest = rates[1..].to_vec();
        rest.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{}: {:.0} training tokens/s (median of steps 2..{}, seq 256, batch 1, {} threads)",
            stage.name(),
            rest[rest.len() / 2],
            rates.len(),
            candle_core::utils::get_num_threads()
        );
    }
    Ok(())
}
