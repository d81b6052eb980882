//! Saving on a disk that fills up: a checkpoint save that fails mid-write ends with an error naming
//! the file and the cause, leaves the previous checkpoint intact and loadable and no partial files
//! behind, and `train --resume` continues from the intact checkpoint to the same result as an
//! uninterrupted run. The failure is injected (`formats::io::fault`, always runs) and, where the
//! test may mount one, real (a small tmpfs; skipped with the reason printed otherwise).

mod common;
use anyhow::Result;
use common::train::*;
use recurformer::checkpoint::loader;
use recurformer::checkpoint::save::save_checkpoint;
use recurformer::formats::io::fault;
use recurformer::model::hybrid::Init;
use recurformer::train::{read_resume_point, train, Event, RunOptions, Stage, Start};
use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::Path;

/// Names in `dir`, sorted (hidden ones too: staging and temporary directories start with '.').
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// Every file of a checkpoint directory with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    entries(dir)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(dir.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    snapshot(dir).iter().map(|(_, b)| b.len() as u64).sum()
}

#[test]
fn a_save_that_runs_out_of_space_keeps_the_previous_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_, a) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let (_, b) = tiny_hybrid("tiny-llama", &[vec![1], vec![0]], Init::Random)?;
    let ck = tmp.path().join("ck");
    save_checkpoint(&a, None, &ck)?;
    let before = snapshot(&ck);
    let probe = tmp.path().join("probe");
    save_checkpoint(&b, None, &probe)?;
    let full = dir_bytes(&probe);
    std::fs::remove_dir_all(&probe)?;
    // The disk fills at the first byte, inside config.json, inside model.safetensors and at its
    // last byte.
    for budget in [0, 100, 4096, full / 2, full - 1] {
        let e = {
            let _g = fault::fail_writes_after(budget);
            save_checkpoint(&b, None, &ck).expect_err("the save must fail")
        };
        let msg = format!("{e:#}");
        println!("out of space after {budget} of {full} bytes: {msg}");
        assert!(msg.contains("No space left on device"), "{msg}");
        assert!(
            msg.contains("config.json")
                || msg.contains("model.safetensors")
                || msg.contains("_recurformer.py"),
            "{msg}"
        );
        assert!(msg.contains("ck is unchanged"), "{msg}");
        assert_eq!(entries(tmp.path()), vec!["ck"], "partial files left behind");
        assert!(snapshot(&ck) == before, "the previous checkpoint changed");
        let m = loader::load(&ck)?.model;
        assert_eq!(m.recurformer, a.recurformer);
    }
    // With space, the same save replaces it.
    save_checkpoint(&b, None, &ck)?;
    assert!(snapshot(&ck) != before);
    assert_eq!(loader::load(&ck)?.model.recurformer, b.recurformer);
    assert_eq!(entries(tmp.path()), vec!["ck"]);
    Ok(())
}

/// A training run whose disk fills after its first checkpoint stops with the error, keeps that
/// checkpoint, and resumed from it ends bit for bit where an uninterrupted run ends.
#[test]
fn training_on_a_full_disk_stops_and_resumes_from_the_intact_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    // 12 steps: 3 of alignment, 9 of distillation; checkpoints every 2 steps.
    let cfg = tiny_config(vec![Stage::Align, Stage::Distill], 12);
    let opts = RunOptions {
        eval_every: 0,
        save_every: 2,
    };
    let whole = tmp.path().join("whole");
    run(
        &session(&h, &base, &data, &whole),
        Start::Fresh(cfg.clone()),
        opts,
        &|_, _| false,
    )?;

    let runs = tmp.path().join("runs");
    std::fs::create_dir_all(&runs)?;
    let out = runs.join("out");
    // After the checkpoint at step 2 the disk has 20 kB left: a few log lines fit, the next
    // checkpoint does not.
    let guard: RefCell<Option<fault::Guard>> = RefCell::new(None);
    let mut on_event = |e: Event| {
        if let Event::Checkpoint { step: 2, .. } = e {
            guard.replace(Some(fault::fail_writes_after(20_000)));
        }
        ControlFlow::Continue(())
    };
    let e = train(
        &session(&h, &base, &data, &out),
        Start::Fresh(cfg),
        opts,
        &mut on_event,
    )
    .err()
    .expect("the run must stop on the full disk");
    drop(guard.take());
    let msg = format!("{e:#}");
    println!("training stopped: {msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert_eq!(entries(&runs), vec!["out"], "partial files left behind");
    let (loaded, rp) = read_resume_point(&out)?;
    assert_eq!(
        (rp.state.progress.stage_index, rp.state.progress.step),
        (0, 2)
    );
    let resumed = run(
        &session(&loaded.model, &base, &data, &out),
        Start::Resume(Box::new(rp)),
        opts,
        &|_, _| false,
    )?;
    assert!(resumed.finished);
    let (ta, tb) = (
        tensors(&whole, "model.safetensors")?,
        tensors(&out, "model.safetensors")?,
    );
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        assert_eq!(bits(x)?, bits(&tb[name])?, "{name} differs");
    }
    assert_eq!(
        step_losses(&read_log(&whole)?),
        step_losses(&read_log(&out)?)
    );
    Ok(())
}

/// Unmounts when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The same on a real filesystem that fills up: a tmpfs with room for one checkpoint and a half.
#[test]
fn a_save_on_a_real_full_filesystem_keeps_the_previous_checkpoint() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_, a) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let (_, b) = tiny_hybrid("tiny-llama", &[vec![1], vec![0]], Init::Random)?;
    let probe = tmp.path().join("probe");
    save_checkpoint(&a, None, &probe)?;
    let one = dir_bytes(&probe);
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let size = format!("size={}k", one * 3 / 2 / 1024);
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
        .arg(&mnt)
        .output();
    match status {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIPPED: cannot mount a tmpfs here ({}); the injected-failure tests cover this",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return Ok(());
        }
        Err(e) => {
            println!("SKIPPED: cannot run mount ({e}); the injected-failure tests cover this");
            return Ok(());
        }
    }
    let _m = Mount(mnt.clone());
    let ck = mnt.join("ck");
    save_checkpoint(&a, None, &ck)?;
    let before = snapshot(&ck);
    let e = save_checkpoint(&b, None, &ck).expect_err("the filesystem is too small for two");
    let msg = format!("{e:#}");
    println!("tmpfs of {size}, checkpoint of {one} bytes: {msg}");
    assert!(msg.contains("No space left on device"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert_eq!(entries(&mnt), vec!["ck"], "partial files left behind");
    assert!(snapshot(&ck) == before, "the previous checkpoint changed");
    assert_eq!(loader::load(&ck)?.model.recurformer, a.recurformer);
    // Removing the previous checkpoint frees the space: the save then succeeds.
    std::fs::remove_dir_all(&ck)?;
    save_checkpoint(&b, None, &ck)?;
    assert_eq!(loader::load(&ck)?.model.recurformer, b.recurformer);
    Ok(())
}
