//! Continual training (`recurformer::train`), the loop: a few steps lower the loss, a time budget
//! sets the horizon, a stopped and resumed run equals an uninterrupted one bit for bit, failures
//! stop with the step named, damaged or mismatched checkpoints are refused, and distillation lowers
//! the held-out loss of the default model. The gradients are `tests/train.rs`.

mod common;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use common::train::*;
use common::*;
use recurformer::checkpoint::save::save_checkpoint;
use recurformer::convert::init::{convert, ConvertOptions};
use recurformer::convert::recency::Calibration;
use recurformer::model::hybrid::Init;
use recurformer::model::options::ForwardOptions;
use recurformer::model::plan::Plan;
use recurformer::train::{
    distill_losses, forward_train, logits_train, make_trainable, map_model, read_resume_point,
    train, Budget, Event, RunOptions, Session, Stage, Start, TokenDocument, TrainConfig, TrainData,
    TrainScope,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

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
    let back = recurformer::checkpoint::loader::load(&out)?;
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
    let h_t: HashMap<String, Tensor> = recurformer::checkpoint::save::named_tensors(&h)
        .into_iter()
        .collect();
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
/// distillation loss (a real run on real weights and text), with half of the training windows
/// rewritten into retrieval exercises whose answers weigh 4 (the held-out windows stay text).
#[test]
fn distillation_lowers_the_held_out_loss_of_the_default_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
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
    let report = recurformer::convert::analyze::analyze(
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
            local: None,
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
        retrieval_share: 0.5,
        answer_weight: 4.0,
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
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
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
    let report = recurformer::convert::analyze::analyze(
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
            local: None,
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
