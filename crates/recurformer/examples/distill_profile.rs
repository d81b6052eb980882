//! Where the time of one distillation step goes (teacher forward, student forward, logits + loss,
//! backward), with glibc's default allocator settings and after `memory::reuse_freed_memory()`,
//! side by side in one run:
//! `cargo run --release --example distill_profile -- STUDENT_DIR [SEQ_LEN] [REPEATS]`.
//!
//! Each setting is measured in a fresh child process (this program run again with `--child MODE`):
//! glibc adapts its mmap threshold to the blocks a process frees, so a second measurement in the
//! same process would not see the defaults any more.
use candle_core::Tensor;
use recurformer::model::llama::Model;
use recurformer::model::options::ForwardOptions;
use recurformer::train::{distill_losses, forward_train, logits_train, make_trainable, TrainScope};
use std::time::Instant;

/// Median seconds of [teacher, student forward, logits + loss, backward, total] over `reps` steps.
fn profile(
    teacher: &Model,
    student: &Model,
    ids: &Tensor,
    reps: usize,
) -> anyhow::Result<[f64; 5]> {
    let t = ids.dim(1)?;
    let mut rows: Vec<[f64; 5]> = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let mut cache = teacher.new_cache(1, t);
        let h = teacher.forward_hidden(ids, &mut cache, &ForwardOptions::default(), None)?;
        let tl = teacher.logits(&h)?.detach();
        let t1 = Instant::now();
        let hs = forward_train(student, ids)?;
        let t2 = Instant::now();
        let sl = logits_train(student, &hs)?;
        let (kl, _ce) = distill_losses(&sl, &tl, ids)?;
        let _ = kl.to_scalar::<f32>()?;
        let t3 = Instant::now();
        let _g = kl.backward()?;
        let t4 = Instant::now();
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        rows.push([s(t0, t1), s(t1, t2), s(t2, t3), s(t3, t4), s(t0, t4)]);
    }
    let mut med = [0.0; 5];
    for (i, m) in med.iter_mut().enumerate() {
        let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        *m = v[v.len() / 2];
    }
    Ok(med)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: distill_profile STUDENT_DIR [SEQ_LEN] [REPEATS]";
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2..], usage);
    }
    ensure_arg(&args, usage)?;
    let mut meds = Vec::new();
    for mode in ["defaults", "reuse"] {
        let out = std::process::Command::new(std::env::current_exe()?)
            .arg("--child")
            .arg(mode)
            .args(&args[1..])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "the {mode} measurement failed: {}",
            out.status
        );
        let line = String::from_utf8(out.stdout)?;
        let v: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse())
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(v.len() == 5, "the {mode} measurement printed {line:?}");
        meds.push(v);
    }
    let t = args.get(2).map(String::as_str).unwrap_or("512");
    let reps = args.get(3).map(String::as_str).unwrap_or("3");
    let (before, after) = (&meds[0], &meds[1]);
    println!("distillation step, {t} tokens, median of {reps} (seconds), one process per column");
    println!("| part | glibc defaults | reuse freed memory | ratio |\n|---|---|---|---|");
    let names = [
        "teacher forward",
        "student forward",
        "logits + loss",
        "backward",
        "step",
    ];
    for (i, n) in names.iter().enumerate() {
        println!(
            "| {n} | {:.2} | {:.2} | {:.2}x |",
            before[i],
            after[i],
            before[i] / after[i]
        );
    }
    Ok(())
}

fn ensure_arg(args: &[String], usage: &str) -> anyhow::Result<()> {
    anyhow::ensure!(args.len() >= 2, "{usage}");
    Ok(())
}

/// One measurement: `MODE STUDENT_DIR [SEQ_LEN] [REPEATS]`; prints the five medians on stdout.
fn child(args: &[String], usage: &str) -> anyhow::Result<()> {
    let mode = args.first().ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    if mode == "reuse" {
        anyhow::ensure!(
            recurformer::memory::reuse_freed_memory(),
            "mallopt is not available on this platform"
        );
    }
    let student_dir = args.get(1).ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    let t: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    eprintln!("measuring with {mode} allocator settings ...");
    let teacher = recurformer::checkpoint::loader::load(&recurformer::default_model_path())?.model;
    let student = recurformer::checkpoint::loader::load(std::path::Path::new(student_dir))?.model;
    let (student, _vars) = make_trainable(&student, TrainScope::Mixers)?;
    let ids: Vec<u32> = (0..t as u32)
        .map(|i| (i * 7919 + 13) % 40000 + 100)
        .collect();
    let ids = Tensor::new(ids.as_slice(), &teacher.device)?.unsqueeze(0)?;
    profile(&teacher, &student, &ids, 1)?; // warm-up
    let med = profile(&teacher, &student, &ids, reps)?;
    println!("{}", med.map(|x| x.to_string()).join(" "));
    Ok(())
}
