//! A named set of f32 tensors with the checks a loader needs: every tensor the model asks for exists
//! with the expected shape, and nothing in the file is left unused.
//!
//! Sources: safetensors files (single or sharded with `model.safetensors.index.json`) and GGUF
//! files (see `gguf.rs`, which maps GGUF names onto Hugging Face names before they land here).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Where each tensor came from, for error messages.
    origin: HashMap<String, PathBuf>,
    used: RefCell<BTreeSet<String>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, origin: HashMap<String, PathBuf>) -> Self {
        Weights {
            tensors,
            origin,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    fn where_(&self, name: &str) -> String {
        self.origin
            .get(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the checkpoint".into())
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).with_context(|| {
            let files: BTreeSet<String> = self
                .origin
                .values()
                .map(|p| p.display().to_string())
                .collect();
            format!(
                "tensor {name} is missing (looked in {})",
                files.into_iter().collect::<Vec<_>>().join(", ")
            )
        })?;
        if t.dims() != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {:?}",
                self.where_(name),
                t.dims(),
                shape
            );
        }
        if t.dtype() != DType::F32 {
            bail!(
                "tensor {name} in {} has dtype {:?}, expected a floating-point type",
                self.where_(name),
                t.dtype()
            );
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(t.clone())
    }

    /// Marks a tensor as deliberately unused (for example a saved copy of a tied `lm_head`).
    pub fn skip(&self, name: &str) {
        self.used.borrow_mut().insert(name.to_string());
    }

    /// Fails if the file held tensors the model did not ask for.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        let extra: Vec<&String> = {
            let mut v: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
            v.sort();
            v
        };
        if !extra.is_empty() {
            let shown: Vec<String> = extra
                .iter()
                .take(8)
                .map(|n| format!("{n} ({})", self.where_(n)))
                .collect();
            bail!(
                "{} unexpected tensor(s) in the checkpoint: {}{}",
                extra.len(),
                shown.join(", "),
                if extra.len() > 8 { ", ..." } else { "" }
            );
        }
        Ok(())
    }
}

/// Loads every tensor of one safetensors file as f32.
pub fn read_safetensors(
    path: &Path,
    out: &mut HashMap<String, Tensor>,
    origin: &mut HashMap<String, PathBuf>,
) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is opened read-only and the map is dropped before we return; a concurrent
    // writer could change the bytes under us, which is the usual caveat of memory-mapped loading.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::U8 => DType::U8,
            other => bail!(
                "tensor {name} in {} has dtype {other:?}, which is not supported",
                path.display()
            ),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .with_context(|| format!("tensor {name} in {}", path.display()))?;
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        // The tensor owns a copy now: let the kernel drop the mapped file pages it was read from,
        // so that loading does not hold the file and its copy resident at once (without this the
        // peak RSS of loading an f32 checkpoint is twice its size).
        #[cfg(unix)]
        {
            let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            // SAFETY: MADV_DONTNEED on a read-only private file mapping only discards resident
            // pages; a later read faults them in again from the unchanged file. No reference into
            // this range outlives this loop iteration.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    offset,
                    view.data().len(),
                )
            };
        }
        if out.insert(name.clone(), t).is_some() {
            bail!(
                "tensor {name} appears twice (second time in {})",
                path.display()
            );
        }
        origin.insert(name, path.to_path_buf());
    }
    Ok(())
}

/// Loads the weights of a Hugging Face checkpoint directory: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`.
pub fn load_hf_dir(dir: &Path) -> Result<Weights> {
    let mut tensors = HashMap::new();
    let mut origin = HashMap::new();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        read_safetensors(&single, &mut tensors, &mut origin)?;
    } else if index.exists() {
        let text = crate::formats::io::read_text(&index, crate::formats::io::JSON_FILE_LIMIT)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().with_context(|| {
                format!("{}: weight_map[{tensor}] is not a string", index.display())
            })?;
            // A shard is a file beside the index: no directories, no `..`, no absolute path, so
            // an index cannot make us map any other file on the machine.
            let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file);
            if !plain || file == ".." || file == "." {
                bail!(
                    "{}: weight_map[{tensor}] names {file:?}, which is not a file name in the \
                     checkpoint directory",
                    index.display()
                );
            }
            expected
                .entry(file.to_string())
                .or_default()
                .insert(tensor.clone());
        }
        for (file, names) in &expected {
            let path = dir.join(file);
            if !path.exists() {
                bail!(
                    "shard {} listed in {} does not exist",
                    path.display(),
                    index.display()
                );
            }
            let before: BTreeSet<String> = tensors.keys().cloned().collect();
            read_safetensors(&path, &mut tensors, &mut origin)?;
            let got: BTreeSet<String> = tensors
                .keys()
                .filter(|k| !before.contains(*k))
                .cloned()
                .collect();
            if let Some(missing) = names.difference(&got).next() {
                bail!(
                    "tensor {missing} is listed in {} for shard {file} but is not in it",
                    index.display()
                );
            }
        }
    } else {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    }
    Ok(Weights::new(tensors, origin))
}
