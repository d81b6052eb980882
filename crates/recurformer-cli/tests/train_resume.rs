//! `recurformer train` end to end on a tiny model: a run killed with SIGKILL between checkpoints
//! and resumed ends with the same parameters, bit for bit, as an uninterrupted run; settings that
//! would break exact resume are refused with the reason.

use anyhow::{Context, Result};
use recurformer::checkpoint::save::save_checkpoint;
use recurformer::convert::init::{convert, ConvertOptions};
use recurformer::model::hybrid::{Init, Provenance};
use recurformer::model::plan::Plan;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_recurformer"))
}

/// A tiny hybrid checkpoint and byte-level JSONL data (pre-tokenised: the tiny model has no
/// tokenizer): returns (hybrid dir, train file, held-out file).
fn setup(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let root = recurformer::repo_root();
    let base_path = root.join("fixtures/tiny-llama");
    let base = recurformer::checkpoint::loader::load(&base_path)?.model;
    let plan = Plan::from_groups(&base.cfg, &[vec![0], vec![1]])?;
    let h = convert(
        &base,
        &ConvertOptions {
            plan: &plan,
            recency: None,
            init: Init::Random,
            seed: 1,
            provenance: Provenance {
                base_model: base_path.display().to_string(),
                recency: None,
                plan_file: None,
                seed: 1,
                recurformer_version: "test".into(),
                training: vec![],
            },
            local: None,
        },
    )?;
    let hybrid = dir.join("hybrid");
    save_checkpoint(&h, None, &hybrid)?;
    let text = std::fs::read(root.join("data/text/austen/emma.txt"))
        .context("data/text/austen/emma.txt (run scripts/setup.sh)")?;
    let write = |name: &str, from: usize, docs: usize, len: usize| -> Result<PathBuf> {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p)?;
        for d in 0..docs {
            let ids: Vec<u32> = text[from + d * len..from + (d + 1) * len]
                .iter()
                .map(|&b| b as u32)
                .collect();
            writeln!(f, "{}", serde_json::json!({ "ids": ids }))?;
        }
        Ok(p)
    };
    let train = write("train.jsonl", 10_000, 8, 1000)?;
    let held = write("held.jsonl", 30_000, 2, 500)?;
    Ok((hybrid, train, held))
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn step_records(dir: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            (
                r["stage_index"].as_u64().unwrap_or(0),
                r["step"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn sigkilled_and_resumed_run_equals_an_uninterrupted_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hybrid, train, held) = setup(tmp.path())?;
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            &hybrid.display().to_string(),
            "--data",
            &train.display().to_string(),
            "--heldout",
            &held.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--max-steps",
            "400",
            "--save-every",
            "40",
            "--eval-every",
            "100",
            "--threads",
            "2",
            "--no-token-cache",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = tmp.path().join("a");
    check(&bin().args(args(&a)).output()?, "uninterrupted run");

    // The same run, killed with SIGKILL in distillation between two checkpoints.
    let b = tmp.path().join("b");
    let mut child = bin()
        .args(args(&b))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t0 = Instant::now();
    loop {
        if step_records(&b).iter().any(|&(si, s)| si == 1 && s >= 50) {
            break;
        }
        assert!(
            child.try_wait()?.is_none(),
            "the run finished before it could be killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(child.try_wait()?.is_none());
    child.kill()?; // SIGKILL on Unix
    child.wait()?;
    let killed_at = step_records(&b).last().copied().context("log")?;
    println!("killed after distill step {}", killed_at.1);
    assert!(killed_at.1 < 300, "{killed_at:?}");

    // Resume: data and settings come from the checkpoint.
    let out = bin()
        .args([
            "train",
            "--resume",
            &b.display().to_string(),
            "--threads",
            "2",
            "--no-token-cache",
        ])
        .output()?;
    check(&out, "resumed run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resuming") && err.contains("at distill step"),
        "{err}"
    );

    let (ta, tb) = (
        candle_core::safetensors::load(a.join("model.safetensors"), &candle_core::Device::Cpu)?,
        candle_core::safetensors::load(b.join("model.safetensors"), &candle_core::Device::Cpu)?,
    );
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let y = tb.get(name).with_context(|| format!("{name} missing"))?;
        let bits = |t: &candle_core::Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        assert_eq!(bits(x)?, bits(y)?, "{name} differs after kill + resume");
    }
    assert_eq!(step_records(&a), step_records(&b));
    assert!(b.join("loss.png").exists());
    // The result is a model directory the other subcommands read.
    check(
        &bin()
            .args(["info", "--model", &b.display().to_string()])
            .output()?,
        "info on the trained model",
    );

    // Settings that would change the computation are refused on resume.
    let out = bin()
        .args([
            "train",
            "--resume",
            &a.display().to_string(),
            "--seq-len",
            "64",
            "--no-token-cache",
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seq_len: 32 vs 64"), "{err}");
    // A converted model is not a checkpoint to resume.
    let out = bin()
        .args([
            "train",
            "--resume",
            &hybrid.display().to_string(),
            "--no-token-cache",
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no train_state.json"), "{err}");
    Ok(())
}
