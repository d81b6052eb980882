//! Damaged Hugging Face checkpoints: each gives an error naming the file, tensor or field and the
//! numbers involved, never a panic.

mod common;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn copy_fixture(name: &str, to: &Path) -> Result<PathBuf> {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst)?;
    for e in std::fs::read_dir(fixture(name))? {
        let e = e?;
        std::fs::copy(e.path(), dst.join(e.file_name()))?;
    }
    Ok(dst)
}

fn load_err(p: &Path) -> String {
    match recurformer::checkpoint::loader::load(p) {
        Ok(_) => panic!("{} loaded but should have been refused", p.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<()> {
    let p = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu)?;
    edit(&mut t);
    candle_core::safetensors::save(&t, &p)?;
    Ok(())
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

#[test]
fn missing_extra_misshapen_and_mistyped_tensors() -> Result<()> {
    let tmp = tempfile::tempdir()?;

    let d = copy_fixture("tiny-llama", &tmp.path().join("missing"))?;
    rewrite(&d, |t| {
        t.remove(Q);
    })?;
    let e = load_err(&d);
    assert!(e.contains(Q) && e.contains("missing"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("extra"))?;
    rewrite(&d, |t| {
        t.insert(
            "model.layers.1.self_attn.q_norm.weight".into(),
            Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    let e = load_err(&d);
    assert!(e.contains("q_norm") && e.contains("unexpected"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("shape"))?;
    rewrite(&d, |t| {
        let w = t[Q].narrow(0, 0, 32).unwrap();
        t.insert(Q.into(), w);
    })?;
    let e = load_err(&d);
    assert!(
        e.contains(Q) && e.contains("[32, 64]") && e.contains("[64, 64]"),
        "{e}"
    );

    let d = copy_fixture("tiny-llama", &tmp.path().join("dtype"))?;
    rewrite(&d, |t| {
        let w = t[Q].to_dtype(DType::I64).unwrap();
        t.insert(Q.into(), w);
    })?;
    let e = load_err(&d);
    assert!(e.contains(Q) && e.contains("I64"), "{e}");

    // Half-precision weights are accepted (converted to f32).
    let d = copy_fixture("tiny-llama", &tmp.path().join("bf16"))?;
    rewrite(&d, |t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::BF16).unwrap();
        }
    })?;
    recurformer::checkpoint::loader::load(&d)?;
    Ok(())
}

#[test]
fn broken_files_and_configs() -> Result<()> {
    let tmp = tempfile::tempdir()?;

    let e = load_err(&tmp.path().join("nowhere"));
    assert!(e.contains("nowhere") && e.contains("does not exist"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("trunc"))?;
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p)?;
    std::fs::write(&p, &bytes[..bytes.len() / 2])?;
    let e = load_err(&d);
    assert!(e.contains("model.safetensors"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("noconfig"))?;
    std::fs::remove_file(d.join("config.json"))?;
    let e = load_err(&d);
    assert!(e.contains("config.json"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("arch"))?;
    let cfg = std::fs::read_to_string(d.join("config.json"))?;
    let mut v: serde_json::Value = serde_json::from_str(&cfg)?;
    v["model_type"] = "falcon".into();
    std::fs::write(d.join("config.json"), v.to_string())?;
    let e = load_err(&d);
    assert!(e.contains("falcon") && e.contains("config.json"), "{e}");

    let d = copy_fixture("tiny-llama", &tmp.path().join("yarn"))?;
    let mut v: serde_json::Value = serde_json::from_str(&cfg)?;
    v.as_object_mut().unwrap().remove("rope_parameters");
    v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(d.join("config.json"), v.to_string())?;
    let e = load_err(&d);
    assert!(e.contains("yarn"), "{e}");

    std::fs::write(d.join("config.json"), "{ not json")?;
    let e = load_err(&d);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");

    // A shard listed in the index but missing on disk.
    let d = copy_fixture("tiny-qwen2", &tmp.path().join("shards"))?;
    let idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        d.join("model.safetensors.index.json"),
    )?)?;
    let shard = idx["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(d.join(&shard))?;
    let e = load_err(&d);
    assert!(e.contains(&shard) && e.contains("does not exist"), "{e}");
    Ok(())
}

/// Found by `tests/mutation.rs` (tokenizer seed 5000228): tokenizers 0.23 panicked (`expect`) on
/// a decoder object that is not valid JSON. Now an error naming the file; a shard index cannot
/// point outside the checkpoint directory; an oversized JSON side file is refused unread.
#[test]
fn regression_damaged_tokenizer_json_and_hostile_index_are_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let d = tmp.path();
    std::fs::write(
        d.join("tokenizer.json"),
        r#"{"version":"1.0","decoder":{"type":"ByteLevel","add_prefix_space":false "trim_offsets":true},"model":{}}"#,
    )?;
    let e = match recurformer::formats::tokenizer::Tokenizer::from_hf_dir(d) {
        Ok(_) => panic!("a damaged tokenizer.json loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("tokenizer.json") && e.contains("not valid JSON"),
        "{e}"
    );

    let s = copy_fixture("tiny-qwen2", &d.join("escape"))?;
    let ip = s.join("model.safetensors.index.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ip)?)?;
    idx["weight_map"]["model.norm.weight"] = "../../../etc/passwd".into();
    std::fs::write(&ip, idx.to_string())?;
    let e = load_err(&s);
    assert!(
        e.contains("etc/passwd") && e.contains("not a file name"),
        "{e}"
    );

    let big = copy_fixture("tiny-llama", &d.join("big"))?;
    let f = std::fs::File::options()
        .append(true)
        .open(big.join("config.json"))?;
    f.set_len(65 << 20)?;
    let e = load_err(&big);
    assert!(
        e.contains("config.json") && e.contains("68157440 bytes"),
        "{e}"
    );
    Ok(())
}
