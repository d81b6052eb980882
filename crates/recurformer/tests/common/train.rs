//! Fixtures of the training tests (`tests/train.rs`, `tests/train_loop.rs`): tiny hybrids, byte-level
//! data, configurations and sessions, checkpoint readers, and the finite-difference check.

use super::*;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use recurformer::convert::init::{convert, ConvertOptions};
use recurformer::convert::recency::Calibration;
use recurformer::model::hybrid::LocalWindow;
use recurformer::model::hybrid::{Init, Provenance};
use recurformer::model::llama::Model;
use recurformer::model::plan::Plan;
use recurformer::train::{
    map_model, model_to_dtype, train, Budget, Event, RunOptions, Session, Stage, Start,
    TokenDocument, TrainConfig, TrainData, TrainOutcome,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

pub fn provenance(base: &str) -> Provenance {
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
pub fn tiny_hybrid(name: &str, groups: &[Vec<usize>], init: Init) -> Result<(Model, Model)> {
    tiny_hybrid_with(name, groups, init, None)
}

/// [`tiny_hybrid`] with windowed heads beside the mixers (`local`), their mixers' output scale set
/// to 1 so that both parts contribute.
pub fn tiny_local_hybrid(
    name: &str,
    groups: &[Vec<usize>],
    local: LocalWindow,
) -> Result<(Model, Model)> {
    let (base, h) = tiny_hybrid_with(name, groups, Init::Attention, Some(local))?;
    let h = recurformer::train::map_model(&h, &mut |n, t| {
        Ok(if n.ends_with(".mixer.norm.weight") {
            t.ones_like()?
        } else {
            t.clone()
        })
    })?;
    Ok((base, h))
}

pub fn tiny_hybrid_with(
    name: &str,
    groups: &[Vec<usize>],
    init: Init,
    local: Option<LocalWindow>,
) -> Result<(Model, Model)> {
    let base = recurformer::checkpoint::loader::load(&fixture(name))?.model;
    let (ids, _) = tiny_expected(name)?;
    let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
    let report = recurformer::convert::analyze::analyze(
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
            local,
        },
    )?;
    Ok((base, h))
}

/// Byte-level documents (the tiny models have a 256-token vocabulary): `n` pieces of `len`
/// bytes of an Austen novel, starting at `skip`.
pub fn byte_docs(file: &str, skip: usize, n: usize, len: usize) -> Result<Vec<TokenDocument>> {
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

pub fn tiny_data() -> Result<TrainData> {
    let train = byte_docs("emma.txt", 5000, 6, 700)?;
    let held = byte_docs("persuasion.txt", 5000, 2, 400)?;
    Ok(TrainData::new(&train, &held, Some(2)))
}

pub fn tiny_config(stages: Vec<Stage>, max_steps: u64) -> TrainConfig {
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

pub fn session<'a>(
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
pub fn run(
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

pub fn tensors(dir: &Path, file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join(file),
        &Device::Cpu,
    )?)
}

pub fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

pub fn step_losses(log: &[serde_json::Value]) -> Vec<(u64, u64, f64)> {
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

pub fn read_log(dir: &Path) -> Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
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
pub fn f64_hybrid_and_windows(skip: usize, len: usize) -> Result<(Model, Model, Tensor)> {
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
pub fn assert_gradients_match_finite_differences(
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
