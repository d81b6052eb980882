//! Seeded mutation tests of every file reader: a valid small file, thousands of damaged copies
//! (`tests/common/mutate.rs`), and for each one the reader returns Ok or an error: never a panic,
//! never more than a bounded allocation (a counting allocator installed here), never longer than a
//! bounded time. Failures name the reader, the seed and the mutation; replay one case with
//! `RF_MUTATION_REPLAY=<reader>:<seed> cargo test --release --test mutation -- --nocapture`, run
//! more with `RF_MUTATIONS=20000`.

mod common;
use anyhow::Result;
use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::GgmlDType;
use common::gguf::tiny_llama_gguf_with;
use common::mutate::{self, apply_bytes, byte_edits, join, mutate_json_text, Limits, Rng};
use common::*;
use recurformer::checkpoint::loader;
use recurformer::convert::recency::{Calibration, RecencyReport};
use recurformer::formats::config::ModelConfig;
use recurformer::formats::text::load_documents;
use recurformer::formats::tokenizer::{ChatMessage, Tokenizer};
use recurformer::model::hybrid::Init;
use recurformer::model::plan::Plan;
use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: common::counting_alloc::CountingAlloc = common::counting_alloc::CountingAlloc;

/// A scratch directory, removed when the test ends (the driver's closures hold copies of its
/// path). In memory where Linux offers it: each case rewrites a file, and on a busy disk the writes,
/// not the readers, would set the run time.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

fn scratch(name: &str) -> Scratch {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let d = root.join(format!("rf-mutation-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// Sets every number under a key ending in `_s` (wall times, rates) to 1, so that a file written
/// by a training run is the same on every run and a seed replays the same bytes.
fn pin_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k.ends_with("_s") && x.is_number() {
                    *x = 1.0.into();
                } else {
                    pin_timings(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(pin_timings),
        _ => {}
    }
}

/// GPT-2's byte-to-character map (printable bytes as themselves, the rest shifted past 255), as
/// byte-level BPE vocabularies spell their tokens.
fn byte_char(b: u8) -> char {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable {
        b as char
    } else {
        let shifted = (0..=255u8)
            .filter(|x| !((33..=126).contains(x) || (161..=172).contains(x) || *x >= 174))
            .position(|x| x == b)
            .unwrap();
        char::from_u32(256 + shifted as u32).unwrap()
    }
}

/// Tokenizer metadata for the tiny Llama's 256-token vocabulary: three control tokens, merged
/// tokens with their merges, the remaining slots single bytes; plus a chat template.
fn tiny_tokenizer_meta() -> Vec<(&'static str, GValue)> {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let merges = ["Ġ t", "h e", "Ġ a", "i n", "e r", "o n", "Ġt he"];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let mut b = 0u8;
    while tokens.len() < 256 {
        let c = byte_char(b).to_string();
        if !tokens.contains(&c) {
            tokens.push(c);
        }
        b = b.wrapping_add(1);
    }
    let types: Vec<GValue> = (0..256)
        .map(|i| GValue::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let s = |x: &str| GValue::String(x.into());
    vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            GValue::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.token_type", GValue::Array(types)),
        ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
        ("tokenizer.ggml.add_bos_token", GValue::Bool(false)),
        (
            "tokenizer.chat_template",
            s(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
               {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            ),
        ),
    ]
}

/// Uses a tokenizer that loaded: encode, decode and the chat template must not panic either.
fn exercise(t: &Tokenizer) -> Result<()> {
    let ids = t.encode("<|im_start|>the 2025 rain in Spain<|im_end|>", true)?;
    t.decode(&ids, false)?;
    t.decode(&[0, 1, 255, 256, u32::MAX], true).ok();
    if t.chat_template.is_some() {
        let m = ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        };
        t.apply_chat_template(&[m], true)?;
    }
    Ok(())
}

/// Where the header ends in a GGUF file (the tensor data starts), to aim edits at it.
fn gguf_header_len(bytes: &[u8]) -> usize {
    let mut c = std::io::Cursor::new(bytes);
    candle_core::quantized::gguf_file::Content::read(&mut c)
        .map(|c| c.tensor_data_offset as usize)
        .unwrap_or(bytes.len())
}

/// A safetensors file mutated in its header: JSON-aware edits of the header (dtypes, shapes,
/// offsets) half the time, byte edits aimed at the header otherwise.
fn mutate_safetensors(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if rng.chance(50) {
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let (h, what) = mutate_json_text(rng, header);
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(&bytes[8 + n..]);
        (out, format!("header: {what}"))
    } else {
        let e = byte_edits(rng, bytes.len(), 0..8 + n);
        (apply_bytes(bytes, &e), join(&e))
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Puts a file's original bytes back when dropped, so a case that panics does not damage the
/// next one.
struct Restore<'a>(PathBuf, &'a [u8]);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        std::fs::write(&self.0, self.1).unwrap();
    }
}

/// Runs `load` on `dir` after writing `file` there with `bytes`, then restores the original.
fn with_file(
    dir: &Path,
    file: &str,
    bytes: &[u8],
    original: &[u8],
    load: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let _restore = Restore(dir.join(file), original);
    std::fs::write(dir.join(file), bytes)?;
    load()
}

#[test]
fn gguf() -> Result<()> {
    let dir = scratch("gguf");
    let good = dir.join("good.gguf");
    tiny_llama_gguf_with(&good, GgmlDType::Q8_0, tiny_tokenizer_meta())?;
    let m = loader::load(&good)?;
    exercise(m.tokenizer()?)?;
    let bytes = std::fs::read(&good)?;
    let header = gguf_header_len(&bytes);
    let path = dir.join("m.gguf");
    mutate::run(
        "gguf",
        1_000_000,
        Limits::default(),
        move |seed| {
            let mut rng = Rng::new(seed);
            let e = byte_edits(&mut rng, bytes.len(), 0..header);
            (apply_bytes(&bytes, &e), join(&e))
        },
        move |input| {
            std::fs::write(&path, input)?;
            let m = loader::load(&path)?;
            if let Some(t) = &m.tokenizer {
                exercise(t)?;
            }
            Ok(())
        },
    );
    Ok(())
}

#[test]
fn safetensors_single() -> Result<()> {
    let dir = scratch("st");
    copy_dir(&fixture("tiny-llama"), &dir);
    let bytes = std::fs::read(dir.join("model.safetensors"))?;
    let d = dir.to_path_buf();
    mutate::run(
        "safetensors",
        2_000_000,
        Limits::default(),
        move |seed| mutate_safetensors(&mut Rng::new(seed), &bytes),
        move |input| {
            std::fs::write(d.join("model.safetensors"), input)?;
            loader::load(&d).map(|_| ())
        },
    );
    Ok(())
}

#[test]
fn safetensors_sharded() -> Result<()> {
    let dir = scratch("shards");
    copy_dir(&fixture("tiny-qwen2"), &dir);
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json"))?;
    let shards: Vec<(String, Vec<u8>)> = (1..=4)
        .map(|i| {
            let f = format!("model-0000{i}-of-00004.safetensors");
            let b = std::fs::read(dir.join(&f)).unwrap();
            (f, b)
        })
        .collect();
    let d = dir.to_path_buf();
    let originals = shards.clone();
    let idx = index.clone();
    mutate::run(
        "sharded",
        3_000_000,
        Limits::default(),
        move |seed| {
            let mut rng = Rng::new(seed);
            if rng.chance(60) {
                let (b, what) = mutate_json_text(&mut rng, &index);
                (
                    ("model.safetensors.index.json".to_string(), b),
                    format!("index: {what}"),
                )
            } else {
                let (f, b) = rng.pick(&shards).clone();
                let (b, what) = mutate_safetensors(&mut rng, &b);
                ((f.clone(), b), format!("{f}: {what}"))
            }
        },
        move |(file, bytes)| {
            let orig = match originals.iter().find(|(f, _)| f == file) {
                Some((_, b)) => b.clone(),
                None => idx.as_bytes().to_vec(),
            };
            with_file(&d, file, bytes, &orig, || loader::load(&d).map(|_| ()))
        },
    );
    Ok(())
}

/// The tiny Llama converted at group 0 of layer 0 and group 1 of layer 1, saved with a tokenizer:
/// a RecurFormer checkpoint directory whose config.json carries the `recurformer` section.
fn hybrid_checkpoint(dir: &Path) -> Result<()> {
    let (_, h) = common::train::tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let g = dir.join("tok.gguf");
    tiny_llama_gguf_with(&g, GgmlDType::F32, tiny_tokenizer_meta())?;
    let tok = loader::load(&g)?.tokenizer;
    std::fs::remove_file(&g)?;
    recurformer::checkpoint::save::save_checkpoint(&h, tok.as_ref(), &dir.join("ckpt"))
}

#[test]
fn config_json() -> Result<()> {
    let dir = scratch("config");
    hybrid_checkpoint(&dir)?;
    let ck = dir.join("ckpt");
    loader::load(&ck)?;
    let text = std::fs::read_to_string(ck.join("config.json"))?;
    let original = text.clone();
    mutate::run(
        "config",
        4_000_000,
        Limits::default(),
        move |seed| mutate_json_text(&mut Rng::new(seed), &text),
        move |input| {
            with_file(&ck, "config.json", input, original.as_bytes(), || {
                loader::load_config(&ck)?;
                loader::load(&ck).map(|_| ())
            })
        },
    );
    Ok(())
}

#[test]
fn tokenizer_json() -> Result<()> {
    let dir = scratch("tokenizer");
    hybrid_checkpoint(&dir)?;
    let ck = dir.join("ckpt");
    exercise(&Tokenizer::from_hf_dir(&ck)?)?;
    let tok = std::fs::read_to_string(ck.join("tokenizer.json"))?;
    let cfg = std::fs::read_to_string(ck.join("tokenizer_config.json"))?;
    let originals = [
        ("tokenizer.json", tok.clone()),
        ("tokenizer_config.json", cfg.clone()),
    ];
    mutate::run(
        "tokenizer",
        5_000_000,
        Limits::default(),
        move |seed| {
            let mut rng = Rng::new(seed);
            let (file, text) = if rng.chance(80) {
                ("tokenizer.json", &tok)
            } else {
                ("tokenizer_config.json", &cfg)
            };
            let (b, what) = mutate_json_text(&mut rng, text);
            ((file, b), format!("{file}: {what}"))
        },
        move |(file, bytes)| {
            let orig = &originals.iter().find(|(f, _)| f == file).unwrap().1;
            with_file(&ck, file, bytes, orig.as_bytes(), || {
                exercise(&Tokenizer::from_hf_dir(&ck)?)
            })
        },
    );
    Ok(())
}

#[test]
fn plan_json() -> Result<()> {
    let dir = scratch("plan");
    let cfg = ModelConfig::from_hf_file(&fixture("tiny-llama").join("config.json"))?;
    let path = dir.join("plan.json");
    Plan::from_groups(&cfg, &[vec![0], vec![1]])?.save(&path)?;
    Plan::load(&path, &cfg)?;
    let text = std::fs::read_to_string(&path)?;
    mutate::run(
        "plan",
        6_000_000,
        Limits::default(),
        move |seed| mutate_json_text(&mut Rng::new(seed), &text),
        move |input| {
            std::fs::write(&path, input)?;
            let p = Plan::load(&path, &cfg)?;
            // What the CLI prints about a plan it read.
            p.layer_summary();
            p.cache_table();
            Ok(())
        },
    );
    Ok(())
}

#[test]
fn recency_json() -> Result<()> {
    let dir = scratch("recency");
    let base = loader::load(&fixture("tiny-llama"))?.model;
    let (ids, _) = tiny_expected("tiny-llama")?;
    let ids: Vec<u32> = ids.squeeze(0)?.to_vec1()?;
    let report = recurformer::convert::analyze::analyze(
        &base,
        &[ids],
        2,
        Calibration::default(),
        "tiny-llama",
        &mut |_| {},
    )?;
    let path = dir.join("recency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    RecencyReport::load(&path)?;
    let text = std::fs::read_to_string(&path)?;
    mutate::run(
        "recency",
        7_000_000,
        Limits::default(),
        move |seed| mutate_json_text(&mut Rng::new(seed), &text),
        move |input| {
            std::fs::write(&path, input)?;
            let r = RecencyReport::load(&path)?;
            // What `plan` does with a report it read: both rules, then the plan's own checks.
            let a = Plan::by_fraction(&r, 0.5, 1);
            let b = Plan::by_threshold(&r, 0.5, 0);
            a.and(b).map(|_| ())
        },
    );
    Ok(())
}

#[test]
fn jsonl_data() -> Result<()> {
    let dir = scratch("jsonl");
    let path = dir.join("data.jsonl");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({"text": format!("Record {i}: \"It is a truth universally acknowledged\" — ünïcödé {i}"), "id": i})
                .to_string()
        })
        .collect();
    let text = lines.join("\n") + "\n";
    assert_eq!(load_documents(std::slice::from_ref(&path)).is_err(), true);
    std::fs::write(&path, &text)?;
    assert_eq!(load_documents(std::slice::from_ref(&path))?.len(), 40);
    let p = path.clone();
    mutate::run(
        "jsonl",
        8_000_000,
        Limits::default(),
        move |seed| {
            let mut rng = Rng::new(seed);
            if rng.chance(50) {
                // One record damaged as JSON.
                let i = rng.below(lines.len());
                let (b, what) = mutate_json_text(&mut rng, &lines[i]);
                let mut out: Vec<u8> = Vec::new();
                for (j, l) in lines.iter().enumerate() {
                    if j == i {
                        out.extend(b.iter().filter(|&&c| c != b'\n'));
                    } else {
                        out.extend(l.as_bytes());
                    }
                    out.push(b'\n');
                }
                (out, format!("line {}: {what}", i + 1))
            } else {
                let e = byte_edits(&mut rng, text.len(), 0..text.len());
                (apply_bytes(text.as_bytes(), &e), join(&e))
            }
        },
        move |input| {
            std::fs::write(&p, input)?;
            load_documents(std::slice::from_ref(&p)).map(|_| ())
        },
    );
    Ok(())
}

#[test]
fn train_state() -> Result<()> {
    use common::train::*;
    use recurformer::train::{read_resume_point, RunOptions, Stage, Start};
    let dir = scratch("train");
    let (base, h) = tiny_hybrid("tiny-llama", &[vec![0], vec![1]], Init::Attention)?;
    let data = tiny_data()?;
    let out = dir.join("run");
    // Stopped after distillation step 3, checkpoint at step 2: optimizer state and a log present.
    run(
        &session(&h, &base, &data, &out),
        Start::Fresh(tiny_config(vec![Stage::Align, Stage::Distill], 8)),
        RunOptions {
            eval_every: 0,
            save_every: 2,
        },
        &|st, step| st == Stage::Distill && step == 3,
    )?;
    let sp = out.join("train_state.json");
    let mut st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sp)?)?;
    pin_timings(&mut st);
    std::fs::write(&sp, serde_json::to_string_pretty(&st)?)?;
    let lp = out.join("train_log.jsonl");
    let mut log = String::new();
    for l in std::fs::read_to_string(&lp)?.lines() {
        let mut v: serde_json::Value = serde_json::from_str(l)?;
        pin_timings(&mut v);
        log += &format!("{v}\n");
    }
    std::fs::write(&lp, log)?;
    read_resume_point(&out)?;
    let files: Vec<(&'static str, Vec<u8>)> = [
        "train_state.json",
        "optimizer.safetensors",
        "train_log.jsonl",
    ]
    .into_iter()
    .map(|f| (f, std::fs::read(out.join(f)).unwrap()))
    .collect();
    let originals = files.clone();
    mutate::run(
        "train_state",
        9_000_000,
        Limits::default(),
        move |seed| {
            let mut rng = Rng::new(seed);
            let k = rng.below(100);
            let (file, bytes) = if k < 70 {
                &files[0]
            } else if k < 85 {
                &files[1]
            } else {
                &files[2]
            };
            let (b, what) = if *file == "optimizer.safetensors" {
                mutate_safetensors(&mut rng, bytes)
            } else if *file == "train_state.json" {
                mutate_json_text(&mut rng, std::str::from_utf8(bytes).unwrap())
            } else {
                let e = byte_edits(&mut rng, bytes.len(), 0..bytes.len());
                (apply_bytes(bytes, &e), join(&e))
            };
            ((*file, b), format!("{file}: {what}"))
        },
        move |(file, bytes)| {
            let orig = &originals.iter().find(|(f, _)| f == file).unwrap().1;
            with_file(&out, file, bytes, orig, || {
                read_resume_point(&out).map(|_| ())
            })
        },
    );
    Ok(())
}
