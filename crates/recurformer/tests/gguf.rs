//! GGUF loading: every supported quantisation dequantises within its precision, a GGUF written
//! the way llama.cpp writes one (rows of W_q / W_k permuted for interleaved RoPE) reproduces the
//! Hugging Face checkpoint it came from, and damaged files are refused with the culprit named.

mod common;
use anyhow::Result;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::gguf::*;
use common::*;
use recurformer::formats::gguf::{permute_rows, GgufFile};

#[test]
fn every_supported_type_dequantises_within_its_precision() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = Tensor::randn(0f32, 1., (4, 512), &Device::Cpu)?;
    // Tolerances relative to max |x|: what each format's step size allows (4-bit: 1/16 of a block's
    // range at worst, 6-bit 1/64, 8-bit 1/256, half floats ~1e-3 / 1e-2 relative).
    let cases = [
        (GgmlDType::F32, 0.0),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 1e-2),
        (GgmlDType::Q8_0, 0.02),
        (GgmlDType::Q4_0, 0.2),
        (GgmlDType::Q4_1, 0.15),
        (GgmlDType::Q4K, 0.15),
        (GgmlDType::Q6K, 0.05),
    ];
    let tensors: Vec<(String, QTensor)> = cases
        .iter()
        .map(|(d, _)| Ok((format!("t_{d:?}"), QTensor::quantize(&src, *d)?)))
        .collect::<Result<_>>()?;
    let path = dir.path().join("types.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("llama".into()))],
        &tensors,
    )?;
    let g = GgufFile::open(&path)?;
    let scale = src.abs()?.max_all()?.to_scalar::<f32>()?;
    for (d, tol) in cases {
        let got = g.tensor_f32(&format!("t_{d:?}"))?;
        let err = max_abs_diff(&got, &src)? / scale;
        println!("{d:?}: max error {err:.2e} of max |x|");
        assert!(err <= tol, "{d:?}: error {err} > {tol}");
    }
    // A type we do not claim to support is refused, naming the tensor and the type.
    let q2 = vec![(
        "blk.0.attn_v.weight".to_string(),
        QTensor::quantize(&src, GgmlDType::Q2K)?,
    )];
    let p2 = dir.path().join("q2k.gguf");
    write_gguf(
        &p2,
        &[("general.architecture", Value::String("llama".into()))],
        &q2,
    )?;
    let e = GgufFile::open(&p2)?
        .tensor_f32("blk.0.attn_v.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.attn_v.weight") && e.contains("Q2K"),
        "{e}"
    );
    Ok(())
}

#[test]
fn llama_cpp_style_gguf_reproduces_the_hf_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ids, expected) = tiny_expected("tiny-llama")?;
    for (dtype, tol) in [(GgmlDType::F32, 1e-4), (GgmlDType::F16, 2e-2)] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        tiny_llama_as_gguf(&path, dtype)?;
        let loaded = recurformer::checkpoint::loader::load(&path)?;
        assert_eq!(
            loaded.format,
            recurformer::checkpoint::loader::SourceFormat::Gguf
        );
        assert!(!loaded.model.cfg.tie_word_embeddings);
        let m = &loaded.model;
        let got = m.forward(&ids, &mut m.new_cache(1, 16))?;
        let d = max_abs_diff(&got, &expected)?;
        println!("{dtype:?} GGUF vs transformers: {d:.2e}");
        assert!(d <= tol, "{dtype:?}: {d}");
    }
    // Without un-permuting, the same file would give different logits: the permutation matters.
    let w = candle_core::safetensors::load(
        fixture("tiny-llama").join("model.safetensors"),
        &Device::Cpu,
    )?;
    let q = &w["model.layers.0.self_attn.q_proj.weight"];
    assert!(max_abs_diff(&permute_rows(q, 4)?, q)? > 0.0);
    Ok(())
}

#[test]
fn damaged_gguf_files_are_refused_with_the_culprit_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.gguf");
    tiny_llama_as_gguf(&good, GgmlDType::F32)?;
    let bytes = std::fs::read(&good)?;
    // Truncated in the tensor data: the header reads, a tensor does not.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000])?;
    let e = format!(
        "{:#}",
        recurformer::checkpoint::loader::load(&cut)
            .err()
            .expect("truncated file must fail")
    );
    assert!(e.contains("cut.gguf") && e.contains("tensor"), "{e}");
    // Truncated in the header.
    std::fs::write(&cut, &bytes[..100])?;
    let e = format!(
        "{:#}",
        recurformer::checkpoint::loader::load(&cut)
            .err()
            .expect("truncated header must fail")
    );
    assert!(e.contains("cut.gguf"), "{e}");
    // Not a GGUF at all.
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"hello world, not a model")?;
    let e = format!(
        "{:#}",
        recurformer::checkpoint::loader::load(&junk)
            .err()
            .expect("junk must fail")
    );
    assert!(e.contains("junk.bin"), "{e}");
    // Unsupported architecture.
    let other = dir.path().join("mamba.gguf");
    write_gguf(
        &other,
        &[("general.architecture", Value::String("mamba".into()))],
        &[],
    )?;
    let e = format!(
        "{:#}",
        recurformer::checkpoint::loader::load(&other)
            .err()
            .expect("mamba arch must fail")
    );
    assert!(e.contains("mamba") && e.contains("not supported"), "{e}");
    Ok(())
}

/// Patches the first tensor entry of a GGUF written by `write_gguf` (one metadata string, one F32
/// tensor named `w`): returns the byte offset of its dimension list.
fn first_dims_at(bytes: &[u8]) -> usize {
    let pos = bytes
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0w")
        .expect("tensor name `w` with its length");
    pos + 9 + 4 // past the name and the dimension count
}

/// Found by `tests/mutation.rs` (gguf seed 1000589): dimensions whose product overflows wrapped to
/// a small element count in candle's reader, passed its size check, and panicked when the tensor
/// was reshaped. Now refused with the tensor named.
#[test]
fn regression_tensor_dimensions_that_overflow_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("dims.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?,
        GgmlDType::F32,
    )?;
    write_gguf(
        &p,
        &[("general.architecture", Value::String("llama".into()))],
        &[("w".to_string(), t)],
    )?;
    let mut bytes = std::fs::read(&p)?;
    let at = first_dims_at(&bytes);
    // ne = [8, 2^62 + 4]: the product wraps to 32 elements in 64 bits.
    bytes[at + 8..at + 16].copy_from_slice(&((1u64 << 62) + 4).to_le_bytes());
    std::fs::write(&p, &bytes)?;
    let e = format!("{:#}", GgufFile::open(&p).err().expect("must be refused"));
    assert!(
        e.contains("dims.gguf") && e.contains("tensor w") && e.contains("overflows"),
        "{e}"
    );
    Ok(())
}

/// candle's reader divides by `general.alignment` and panics on 0; a tensor whose bytes reach past
/// the end of the file, or overlap another, is refused before anything is read.
#[test]
fn regression_alignment_zero_and_tensors_outside_the_file_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = || {
        QTensor::quantize(
            &Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
    };
    let arch = ("general.architecture", Value::String("llama".into()));
    let p = dir.path().join("align.gguf");
    write_gguf(
        &p,
        &[arch.clone(), ("general.alignment", Value::U32(0))],
        &[("w".into(), t()?)],
    )?;
    let e = format!("{:#}", GgufFile::open(&p).err().expect("alignment 0"));
    assert!(e.contains("general.alignment is 0"), "{e}");

    let p = dir.path().join("far.gguf");
    write_gguf(&p, &[arch.clone()], &[("w".into(), t()?)])?;
    let mut bytes = std::fs::read(&p)?;
    let at = first_dims_at(&bytes);
    // ne = [8, 4000]: 128000 bytes of f32 in a file of a few hundred.
    bytes[at + 8..at + 16].copy_from_slice(&4000u64.to_le_bytes());
    std::fs::write(&p, &bytes)?;
    let e = format!("{:#}", GgufFile::open(&p).err().expect("past the end"));
    assert!(e.contains("tensor w") && e.contains("128000 bytes"), "{e}");

    let p = dir.path().join("overlap.gguf");
    write_gguf(&p, &[arch], &[("w".into(), t()?), ("x".into(), t()?)])?;
    let mut bytes = std::fs::read(&p)?;
    // x's offset (the last 8 bytes of its entry) set to w's, 0.
    let x = bytes
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0x")
        .unwrap();
    let off = x + 9 + 4 + 16 + 4;
    bytes[off..off + 8].copy_from_slice(&0u64.to_le_bytes());
    std::fs::write(&p, &bytes)?;
    let e = format!("{:#}", GgufFile::open(&p).err().expect("overlap"));
    assert!(e.contains("overlaps"), "{e}");
    Ok(())
}
