//! Where the time of a distillation step goes, by part of the student (issue 19):
//! `cargo run --release --example train_profile -- STUDENT_DIR [SEQ_LEN] [REPEATS]`.
//!
//! Each part of every layer runs on its own over the student's real activations of one window,
//! forward and backward (see `train::profile_parts`); the times are summed over the layers that
//! have the part and printed beside the whole step's teacher forwards (inference path, and the
//! eager path that keeps the layer inputs for the hidden-state term).
use candle_core::Tensor;
use recurformer::model::options::ForwardOptions;
use recurformer::train::{forward_train_states, make_trainable, profile_parts, TrainScope};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: train_profile STUDENT_DIR [SEQ_LEN] [REPEATS]";
    let student_dir = args.get(1).ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    let t: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let reps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    recurformer::memory::reuse_freed_memory();
    let teacher = recurformer::checkpoint::loader::load(&recurformer::default_model_path())?.model;
    let student = recurformer::checkpoint::loader::load(std::path::Path::new(student_dir))?.model;
    let (student, _vars) = make_trainable(&student, TrainScope::Mixers)?;
    let ids: Vec<u32> = (0..t as u32)
        .map(|i| (i * 7919 + 13) % 40000 + 100)
        .collect();
    let ids = Tensor::new(ids.as_slice(), &teacher.device)?.unsqueeze(0)?;
    let _ = profile_parts(&teacher, &student, &ids, 1)?; // warm-up
    let parts = profile_parts(&teacher, &student, &ids, reps)?;
    let mut teach = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        let t0 = Instant::now();
        let mut cache = teacher.new_cache(1, t);
        let h = teacher.forward_hidden(&ids, &mut cache, &ForwardOptions::default(), None)?;
        let _ = teacher.logits(&h)?;
        let t1 = Instant::now();
        let (h, _) = forward_train_states(&teacher, &ids, true)?;
        let _ = teacher.logits(&h)?;
        teach[0].push((t1 - t0).as_secs_f64());
        teach[1].push(t1.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("distillation step by part, {t} tokens, median of {reps} (seconds, 2 threads unless RAYON/--threads say otherwise)");
    println!("| part | layers | forward | backward | total |\n|---|---|---|---|---|");
    let (mut f, mut b) = (0.0, 0.0);
    for p in &parts {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} |",
            p.name,
            p.count,
            p.forward,
            p.backward,
            p.forward + p.backward
        );
        f += p.forward;
        b += p.backward;
    }
    println!("| student, all parts | | {f:.3} | {b:.3} | {:.3} |", f + b);
    println!(
        "| teacher, inference path + logits | | {:.3} | | |",
        med(&mut teach[0])
    );
    println!(
        "| teacher, eager path keeping layer inputs + logits | | {:.3} | | |",
        med(&mut teach[1])
    );
    Ok(())
}
