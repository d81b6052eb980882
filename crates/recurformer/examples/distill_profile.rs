//! Where the time of one distillation step goes (teacher forward, student forward, logits + loss,
//! backward), first with glibc's default allocator settings, then after
//! `memory::reuse_freed_memory()`, side by side in one process:
//! `cargo run --release --example distill_profile -- STUDENT_DIR [SEQ_LEN] [REPEATS]`.
use candle_core::Tensor;
use recurformer::llama::{ForwardOptions, Model};
use recurformer::train::{distill_losses, forward_train, logits_train, make_trainable, TrainScope};
use std::time::Instant;

/// Median seconds of [teacher, student forward, logits + loss, backward, total] over `reps` steps.
fn profile(teacher: &Model, student: &Model, ids: &Tensor, reps: usize) -> anyhow::Result<[f64; 5]> {
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
    let student_dir = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?;
    let t: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let teacher = recurformer::loader::load(&recurformer::default_model_path())?.model;
    let student = recurformer::loader::load(std::path::Path::new(student_dir))?.model;
    let (student, _vars) = make_trainable(&student, TrainScope::Mixers)?;
    let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919 + 13) % 40000 + 100).collect();
    let ids = Tensor::new(ids.as_slice(), &teacher.device)?.unsqueeze(0)?;
    profile(&teacher, &student, &ids, 1)?; // warm-up
    let before = profile(&teacher, &student, &ids, reps)?;
    let applied = recurformer::memory::reuse_freed_memory();
    profile(&teacher, &student, &ids, 1)?;
    let after = profile(&teacher, &student, &ids, reps)?;
    println!("distillation step, {t} tokens, median of {reps} (seconds); reuse_freed_memory applied: {applied}");
    println!("| part | glibc defaults | reuse freed memory | ratio |\n|---|---|---|---|");
    let names = ["teacher forward", "student forward", "logits + loss", "backward", "step"];
    for (i, n) in names.iter().enumerate() {
        println!("| {n} | {:.2} | {:.2} | {:.2}x |", before[i], after[i], before[i] / after[i]);
    }
    Ok(())
}
