//! A named set of f32 tensors with the checks a loader needs: every tensor the model asks for exists
//! with the expected shape, and nothing in the file is left unused.
//!
//! Sources: safetensors files (single or sharded with `model.safetensors.index.json`) and GGUF
//! files (see `gguf.rs`, which maps GGUF names onto Hugging Face names before they land here).
//!
//! Tensors from files are read when the model asks for them (`Weights::get`), not when the file
//! is opened: the safetensors files stay memory-mapped and each tensor is converted to f32 on its
//! own, a GGUF tensor is read and dequantised on its own. A loader that quantises each layer as it
//! builds it (`Model::load_hybrid_quantized`) then never holds the f32 copies of the whole model
//! at once: peak memory at load is the quantised model plus one layer in f32 (issue 20).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Reads one tensor from its file, as f32 for floating-point tensors.
pub type ReadTensor = Box<dyn Fn() -> Result<Tensor>>;

/// A tensor in memory, or one read from its file when asked for.
enum Entry {
    Ready(Tensor),
    Deferred {
        shape: Vec<usize>,
        /// The element type the file stores (a float type is converted to f32 by `read`).
        dtype: DType,
        read: ReadTensor,
    },
}

impl Entry {
    fn dims(&self) -> &[usize] {
        match self {
            Entry::Ready(t) => t.dims(),
            Entry::Deferred { shape, .. } => shape,
        }
    }
}

pub struct Weights {
    tensors: HashMap<String, Entry>,
    /// Where each tensor came from, for error messages.
    origin: HashMap<String, PathBuf>,
    used: RefCell<BTreeSet<String>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, origin: HashMap<String, PathBuf>) -> Self {
        Weights {
            tensors: tensors
                .into_iter()
                .map(|(k, t)| (k, Entry::Ready(t)))
                .collect(),
            origin,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// An empty set, filled by [`Weights::insert_deferred`].
    pub fn empty() -> Self {
        Weights {
            tensors: HashMap::new(),
            origin: HashMap::new(),
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Adds a tensor of `shape` stored as `dtype` in `origin`, read by `read` when the model asks
    /// for it. Fails if the name is taken.
    pub fn insert_deferred(
        &mut self,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        origin: &Path,
        read: ReadTensor,
    ) -> Result<()> {
        if self.tensors.contains_key(&name) {
            bail!(
                "tensor {name} appears twice (second time in {})",
                origin.display()
            );
        }
        self.origin.insert(name.clone(), origin.to_path_buf());
        self.tensors
            .insert(name, Entry::Deferred { shape, dtype, read });
        Ok(())
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

    /// The tensor `name` as f32, which must have exactly `shape`. A tensor from a file is read
    /// now, and each call reads it again (the model asks once per tensor).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.tensors.get(name).with_context(|| {
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
        if e.dims() != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, expected {:?}",
                self.where_(name),
                e.dims(),
                shape
            );
        }
        let t = match e {
            Entry::Ready(t) => t.clone(),
            Entry::Deferred { dtype, read, .. } => {
                if !dtype.is_float() {
                    bail!(
                        "tensor {name} in {} has dtype {dtype:?}, expected a floating-point type",
                        self.where_(name)
                    );
                }
                read().with_context(|| format!("reading tensor {name} in {}", self.where_(name)))?
            }
        };
        if t.dtype() != DType::F32 {
            bail!(
                "tensor {name} in {} has dtype {:?}, expected a floating-point type",
                self.where_(name),
                t.dtype()
            );
        }
        if t.dims() != shape {
            bail!(
                "tensor {name} in {} was read with shape {:?}, expected {:?}",
                self.where_(name),
                t.dims(),
                shape
            );
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(t)
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

/// Registers every tensor of one safetensors file in `out`, to be read (and converted to f32)
/// when the model asks for it. The file stays memory-mapped until `out` is dropped.
pub fn read_safetensors(path: &Path, out: &mut Weights) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under us,
    // which is the usual caveat of memory-mapped loading.
    let mmap = Arc::new(
        unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?,
    );
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
        let shape = view.shape().to_vec();
        let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        let len = view.data().len();
        let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if len != expected {
            bail!(
                "tensor {name} in {} holds {len} bytes, its shape {shape:?} and dtype {dtype:?} \
                 need {expected}",
                path.display()
            );
        }
        let map = mmap.clone();
        let read_shape = shape.clone();
        let read: ReadTensor = Box::new(move || {
            let bytes = &map[start..start + len];
            let t = Tensor::from_raw_buffer(bytes, dtype, &read_shape, &Device::Cpu)?;
            let t = if dtype.is_float() && dtype != DType::F32 {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            // The tensor owns a copy now: let the kernel drop the mapped file pages it was read
            // from, so that loading does not hold the file and its copy resident at once.
            #[cfg(unix)]
            {
                // SAFETY: MADV_DONTNEED on a read-only private file mapping only discards
                // resident pages; a later read faults them in again from the unchanged file. No
                // reference into this range outlives this call.
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
            Ok(t)
        });
        out.insert_deferred(name, shape, dtype, path, read)?;
    }
    Ok(())
}

/// Loads the weights of a Hugging Face checkpoint directory: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`.
pub fn load_hf_dir(dir: &Path) -> Result<Weights> {
    let mut w = Weights::empty();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        read_safetensors(&single, &mut w)?;
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
            let before: BTreeSet<String> = w.names().cloned().collect();
            read_safetensors(&path, &mut w)?;
            let got: BTreeSet<String> = w
                .names()
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
    Ok(w)
}
