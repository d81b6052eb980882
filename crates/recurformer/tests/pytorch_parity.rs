//! RecurFormer checkpoints that PyTorch loads (issue 23): the transformers implementation in
//! `python/recurformer_hf/`, which `convert` and `train` copy into every RecurFormer checkpoint,
//! against this engine. The Rust side builds and saves each checkpoint and writes its own logits
//! and greedy continuation beside it; `python/tests/parity.py` loads the checkpoint with
//! `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and reports the
//! differences, which are asserted here:
//! - logits within 1e-4 (f32), identical greedy continuations;
//! - PyTorch's cached forward (prefill, a chunk, single tokens) equal to its full forward, and its
//!   chunked scan equal to its sequential scan;
//! - the accelerate training script, two CPU processes (gloo), lowers its loss and writes a
//!   checkpoint this engine loads with the logits PyTorch gives.
//!
//! These tests need the Python reference venv (reference/.venv): they run
//! `bash reference/setup_venv.sh` first, which installs it once (several minutes) and afterwards
//! returns at once. `RF_REFERENCE_PYTHON=/path/to/python` uses another interpreter with the
//! packages of reference/requirements.txt instead (and `accelerate` beside it).

mod common;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use common::train::{tiny_hybrid, tiny_local_hybrid};
use common::*;
use recurformer::checkpoint::loader;
use recurformer::checkpoint::save::save_checkpoint;
use recurformer::formats::tokenizer::Tokenizer;
use recurformer::model::generate::argmax;
use recurformer::model::hybrid::{Init, LocalWindow};
use recurformer::model::llama::Model;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Logits of PyTorch and this engine agree to this (f32 on the tiny models, f64 everywhere), and so
/// do cached and full forwards.
const TOL: f64 = 1e-4;

/// f32 logits of the 135M model (30 layers, logits up to ~30): f32 rounding alone moves them by
/// about 1e-4 (PyTorch's own cached and full forwards differ by 1.1e-4), so in f32 the real model
/// is held to the tolerance of its base-model fixture (fixtures/README.md), and to `TOL` in f64.
const REAL_F32_TOL: f64 = 1e-3;

/// The venv's python, after `reference/setup_venv.sh` (once per test binary).
fn venv_python() -> Result<PathBuf> {
    static DONE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.as_ref() {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("RF_REFERENCE_PYTHON") {
        *done = Some(PathBuf::from(p));
        return Ok(done.clone().expect("just set"));
    }
    let t0 = std::time::Instant::now();
    let status = Command::new("bash")
        .arg(root().join("reference/setup_venv.sh"))
        .current_dir(root())
        .status()
        .context("running bash reference/setup_venv.sh")?;
    ensure!(status.success(), "reference/setup_venv.sh failed: {status}");
    println!(
        "reference venv ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let py = root().join("reference/.venv/bin/python");
    ensure!(py.exists(), "{} is missing after setup", py.display());
    *done = Some(py.clone());
    Ok(py)
}

/// Environment of every Python process: offline, one thread per process (like the fixtures),
/// transformers' caches (the copied remote code) inside the test's temporary directory.
fn python_cmd(py: &Path, tmp: &Path) -> Command {
    let mut c = Command::new(py);
    c.current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.join("hf_home"))
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Saves `m` as a checkpoint in `dir` and writes `rust.safetensors` beside it: the prompt, the
/// logits this engine computes over it from the saved checkpoint (full forward, f32) and its
/// greedy continuation of `new` tokens (prefill, then one token at a time through the cache).
fn write_case(
    m: &Model,
    tok: Option<&Tokenizer>,
    dir: &Path,
    ids: &[u32],
    new: usize,
) -> Result<()> {
    save_checkpoint(m, tok, dir)?;
    let m = &loader::load(dir)?.model;
    let dev = Device::Cpu;
    let t = ids.len();
    let x = Tensor::new(ids, &dev)?.unsqueeze(0)?; // (1, t)
    let logits = m.forward(&x, &mut m.new_cache(1, t))?; // (1, t, v)
    let mut cache = m.new_cache(1, t + new);
    let mut all = ids.to_vec();
    let mut last = m.forward_last(&x, &mut cache)?; // (1, v)
    for _ in 0..new {
        let next = argmax(&last.squeeze(0)?.to_vec1::<f32>()?);
        all.push(next);
        last = m.forward_last(&Tensor::new(&[next], &dev)?.unsqueeze(0)?, &mut cache)?;
    }
    let all = Tensor::new(all.as_slice(), &dev)?.unsqueeze(0)?;
    // The same model in f64 through the training forward (the one path that runs in any dtype).
    let m64 = recurformer::train::model_to_dtype(m, DType::F64)?;
    let logits64 = m64.logits(&recurformer::train::forward_train(&m64, &x)?)?;
    recurformer::formats::io::write_safetensors(
        &[
            ("input_ids".into(), x.to_dtype(DType::I64)?),
            ("logits".into(), logits),
            ("logits_f64".into(), logits64),
            ("greedy".into(), all.to_dtype(DType::I64)?),
        ],
        &dir.join("rust.safetensors"),
    )
}

/// Runs `python/tests/parity.py` over the case directories; its per-case results.
fn pytorch_results(py: &Path, tmp: &Path, cases: &[PathBuf]) -> Result<Vec<serde_json::Value>> {
    let out = tmp.join("results.json");
    let t0 = std::time::Instant::now();
    let o = python_cmd(py, tmp)
        .arg(root().join("python/tests/parity.py"))
        .arg("--out")
        .arg(&out)
        .args(cases)
        .output()
        .context("running python/tests/parity.py")?;
    println!("{}", String::from_utf8_lossy(&o.stdout));
    if !o.status.success() {
        bail!(
            "python/tests/parity.py failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    println!("PyTorch checks: {:.1} s", t0.elapsed().as_secs_f64());
    let v: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    ensure!(
        v.len() == cases.len(),
        "{} results for {} cases",
        v.len(),
        cases.len()
    );
    Ok(v)
}

fn num(r: &serde_json::Value, key: &str) -> f64 {
    r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("result has no number {key}: {r}"))
}

/// The assertions every case makes; `mixers` and `windowed` are the layers that have them, `f32_tol`
/// the tolerance of the f32 comparisons.
fn assert_parity(r: &serde_json::Value, mixers: usize, windowed: usize, f32_tol: f64) {
    let case = r["case"].as_str().unwrap_or("?");
    let d = num(r, "max_abs_logit_diff");
    println!(
        "{case}: max |logit diff| {d:.2e} (logits up to {:.2}; f64: {:.2e}), cached vs full {:.2e} \
         (f64: {:.2e}), chunked vs sequential {:.2e}, greedy equal {}",
        num(r, "max_abs_logit"),
        num(r, "max_abs_logit_diff_f64"),
        num(r, "cached_vs_full"),
        num(r, "cached_vs_full_f64"),
        num(r, "chunked_vs_sequential"),
        r["greedy_equal"]
    );
    assert_eq!(r["class"], "RecurformerForCausalLM", "{case}");
    assert_eq!(
        r["mixers"].as_u64(),
        Some(mixers as u64),
        "{case}: mixer layers"
    );
    assert_eq!(
        r["windowed"].as_u64(),
        Some(windowed as u64),
        "{case}: windowed layers"
    );
    assert!(
        d <= f32_tol,
        "{case}: PyTorch and Rust logits differ by {d}"
    );
    let d64 = num(r, "max_abs_logit_diff_f64");
    assert!(
        d64 <= TOL,
        "{case}: in f64 PyTorch and Rust logits differ by {d64}"
    );
    assert!(
        num(r, "cached_vs_full") <= f32_tol,
        "{case}: PyTorch cached vs full: {r}"
    );
    assert!(
        num(r, "cached_vs_full_f64") <= TOL,
        "{case}: PyTorch cached vs full, f64: {r}"
    );
    assert!(
        num(r, "chunked_vs_sequential") <= f32_tol,
        "{case}: chunked vs sequential scan: {r}"
    );
    // Activation checkpointing recomputes the same function (checked on the tiny models).
    if let Some(g) = r["checkpointing_grad_diff"].as_f64() {
        assert!(
            g <= 1e-6,
            "{case}: gradients with and without checkpointing differ by {g}"
        );
    }
    assert_eq!(
        r["greedy_equal"], true,
        "{case}: greedy continuations differ: PyTorch {} Rust {}",
        r["greedy_pytorch"], r["greedy_rust"]
    );
}

/// A loopback port nobody listens on (for the processes' rendezvous).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A deterministic prompt of `n` ids below `vocab` (a linear congruential sequence).
fn prompt(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

fn mixer_layers(m: &Model) -> (usize, usize) {
    (
        m.layers.iter().filter(|l| l.mixer.is_some()).count(),
        m.layers.iter().filter(|l| l.local.is_some()).count(),
    )
}

#[test]
fn tiny_hybrids_match_pytorch() -> Result<()> {
    let py = venv_python()?;
    let tmp = tempfile::tempdir()?;
    // Plans: nothing replaced; some groups; all of a layer; windowed heads beside the mixers.
    // 70 tokens: more than one 64-token chunk of the scan, more than sinks + window.
    let local = LocalWindow {
        sinks: 2,
        window: 5,
    };
    let cases: Vec<(&str, Model)> = vec![
        (
            "llama-empty",
            tiny_hybrid("tiny-llama", &[vec![], vec![]], Init::Attention)?.1,
        ),
        (
            "llama-some",
            tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?.1,
        ),
        (
            "llama-all-of-layer0",
            tiny_hybrid("tiny-llama", &[vec![0, 1], vec![]], Init::Random)?.1,
        ),
        (
            "llama3-all",
            tiny_hybrid("tiny-llama3", &[vec![0, 1], vec![1]], Init::Attention)?.1,
        ),
        (
            "qwen2-some",
            tiny_hybrid("tiny-qwen2", &[vec![1], vec![0, 1]], Init::Attention)?.1,
        ),
        (
            "qwen2-random",
            tiny_hybrid("tiny-qwen2", &[vec![0], vec![]], Init::Random)?.1,
        ),
        (
            "llama-windowed",
            tiny_local_hybrid("tiny-llama", &[vec![0], vec![0, 1]], local)?.1,
        ),
        (
            "qwen2-windowed",
            tiny_local_hybrid("tiny-qwen2", &[vec![1], vec![0]], local)?.1,
        ),
    ];
    let mut dirs = Vec::new();
    let mut expect = Vec::new();
    for (i, (name, m)) in cases.iter().enumerate() {
        let d = tmp.path().join(name);
        let ids = prompt(70, m.cfg.vocab_size as u32, i as u64 + 1);
        write_case(m, None, &d, &ids, 8)?;
        // Every RecurFormer checkpoint carries the transformers code and its auto_map.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json"))?)?;
        assert_eq!(
            cfg["auto_map"]["AutoModelForCausalLM"],
            "modeling_recurformer.RecurformerForCausalLM"
        );
        for f in ["configuration_recurformer.py", "modeling_recurformer.py"] {
            let text = std::fs::read_to_string(d.join(f))?;
            let src = std::fs::read_to_string(root().join("python/recurformer_hf").join(f))?;
            assert_eq!(text, src, "{f} in the checkpoint is not the package's");
        }
        dirs.push(d);
        expect.push(mixer_layers(m));
    }
    let results = pytorch_results(&py, tmp.path(), &dirs)?;
    for (r, (mixers, windowed)) in results.iter().zip(&expect) {
        assert_parity(r, *mixers, *windowed, TOL);
        assert!(r["checkpointing_grad_diff"].is_number(), "{r}");
    }
    // The plans did what they say: no mixer, some, windowed ones.
    assert_eq!(expect[0], (0, 0));
    assert_eq!(expect[2], (1, 0));
    assert!(expect[6].1 == 2 && expect[7].1 == 2);
    Ok(())
}

#[test]
fn half_converted_smollm2_matches_pytorch() -> Result<()> {
    use recurformer::convert::init::{convert, ConvertOptions};
    use recurformer::convert::recency::Calibration;
    use recurformer::model::plan::Plan;
    let py = venv_python()?;
    let tmp = tempfile::tempdir()?;
    let t0 = std::time::Instant::now();
    let loaded = loader::load(&default_model())?;
    let base = &loaded.model;
    let tok = loaded.tokenizer()?;
    // analyze -> plan (50 % of the KV groups by recency) -> convert, as the CLI does, on a short
    // calibration text (the CLI's default calibration is longer; any report makes a valid plan).
    let text = std::fs::read_to_string(root().join("data/text/austen/persuasion.txt"))
        .context("data/text (run scripts/setup.sh)")?;
    let calib = tok.encode(&text[20_000..24_000], false)?;
    let calib = calib[..calib.len().min(256)].to_vec();
    let report = recurformer::convert::analyze::analyze(
        base,
        &[calib],
        32,
        Calibration::default(),
        "test",
        &mut |_| {},
    )?;
    let plan = Plan::by_fraction(&report, 0.5, 1)?;
    assert_eq!(plan.replaced_groups() * 2, 90, "half of the 90 KV groups");
    let h = convert(
        base,
        &ConvertOptions {
            plan: &plan,
            recency: Some(&report),
            init: Init::Attention,
            seed: 0,
            provenance: common::train::provenance("smollm2"),
            local: None,
        },
    )?;
    println!("converted in {:.1} s", t0.elapsed().as_secs_f64());
    let text =
        "The weather in the village had been fine for a week, and Anne walked every morning to";
    let ids = tok.encode(text, false)?;
    let d = tmp.path().join("smollm2-rf50");
    write_case(&h, Some(tok), &d, &ids, 12)?;
    // The prompt as text, for AutoTokenizer to encode.
    std::fs::write(
        d.join("prompt.json"),
        serde_json::json!({ "text": text, "ids": ids }).to_string(),
    )?;
    let results = pytorch_results(&py, tmp.path(), &[d])?;
    let (mixers, windowed) = mixer_layers(&h);
    assert!(mixers >= 15, "{mixers} layers with mixers");
    assert_parity(&results[0], mixers, windowed, REAL_F32_TOL);
    // AutoTokenizer loads the tokenizer the checkpoint carries and encodes as this engine does.
    assert_eq!(results[0]["tokenizer_ids_equal"], true, "{}", results[0]);
    Ok(())
}

#[test]
fn accelerate_training_on_two_cpu_processes_writes_a_checkpoint_rust_loads() -> Result<()> {
    let py = venv_python()?;
    let tmp = tempfile::tempdir()?;
    let (_, student) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let sdir = tmp.path().join("student");
    save_checkpoint(&student, None, &sdir)?;
    let out = tmp.path().join("trained");
    let log = tmp.path().join("log.jsonl");
    let accelerate = py.with_file_name("accelerate");
    let t0 = std::time::Instant::now();
    let o = python_cmd(&accelerate, tmp.path())
        // torchrun under `--multi_gpu` starts the processes; without a GPU the script joins them in
        // a gloo group on the CPU (`accelerate launch --cpu` would start only one).
        .args(["launch", "--multi_gpu", "--num_processes", "2"])
        .args(["--num_machines", "1", "--mixed_precision", "no"])
        .args([
            "--dynamo_backend",
            "no",
            "--main_process_port",
            &free_port()?.to_string(),
        ])
        .arg(root().join("python/recurformer_hf/train_accelerate.py"))
        .arg("--student")
        .arg(&sdir)
        .arg("--teacher")
        .arg(fixture("tiny-llama"))
        .arg("--byte-text")
        .arg(root().join("data/text/austen/emma.txt"))
        .args([
            "--steps",
            "10",
            "--seq-len",
            "64",
            "--batch",
            "2",
            "--lr",
            "3e-3",
        ])
        .args([
            "--warmup",
            "2",
            "--ce-weight",
            "0.5",
            "--hidden-weight",
            "1",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--log")
        .arg(&log)
        .output()
        .context("running accelerate launch")?;
    println!("{}", String::from_utf8_lossy(&o.stdout));
    ensure!(
        o.status.success(),
        "accelerate launch failed ({}):\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    println!("accelerate: {:.1} s", t0.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("on 2 process(es)"), "{stdout}");
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(steps.len(), 10);
    let series = |key: &str| -> Vec<f64> { steps.iter().map(|s| num(s, key)).collect() };
    let (loss, kl) = (series("loss"), series("kl"));
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    println!("loss per step: {loss:?}\nKL per step: {kl:?}");
    assert!(
        mean(&loss[7..]) < mean(&loss[..3]),
        "the loss did not fall: {loss:?}"
    );
    assert!(
        mean(&kl[7..]) < 0.9 * mean(&kl[..3]),
        "the KL did not fall: {kl:?}"
    );
    assert!(steps
        .iter()
        .all(|s| num(s, "hidden") > 0.0 && num(s, "ce") > 0.0));

    // The engine loads what PyTorch wrote: mixers changed, everything else as it was.
    let trained = loader::load(&out)?.model;
    let sec = trained
        .recurformer
        .as_ref()
        .context("a RecurFormer checkpoint")?;
    assert_eq!(sec.provenance.training.len(), 1);
    assert_eq!(sec.plan, student.recurformer.as_ref().unwrap().plan);
    let before = recurformer::checkpoint::save::named_tensors(&student);
    let after = recurformer::checkpoint::save::named_tensors(&trained);
    assert_eq!(before.len(), after.len());
    for ((n, a), (m, b)) in before.iter().zip(&after) {
        assert_eq!(n, m);
        let d = max_abs_diff(a, b)?;
        if n.contains(".mixer.") && n.ends_with("_proj.weight") {
            assert!(d > 0.0, "{n} did not train");
        } else if !n.contains(".mixer.") {
            assert_eq!(d, 0.0, "{n} is frozen but changed");
        }
    }
    // ... and PyTorch gives the same logits from it.
    let d = tmp.path().join("trained-case");
    write_case(&trained, None, &d, &prompt(70, 256, 9), 8)?;
    let r = pytorch_results(&py, tmp.path(), &[d])?;
    assert_parity(&r[0], 2, 0, TOL);
    Ok(())
}
