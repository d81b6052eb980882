//! The GGUF header (metadata and tensor directory), read with every length and offset checked
//! against the file before anything is allocated.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. candle's
//! `gguf_file::Content::read` parses the same layout and bounds most lengths, but trusts the rest:
//! a `general.alignment` of 0 divides by zero, and tensor dimensions whose product overflows
//! `usize` wrap to a small element count that passes its size check and panics later when the
//! tensor is reshaped (found by `tests/mutation.rs`, regression tests in `tests/gguf.rs`). So we
//! read the header ourselves into candle's `Content` (its fields are public) and hand only
//! validated tensor entries to candle's tensor reader. The checks follow llama.cpp's
//! `gguf_init_from_file_impl` (`ggml/src/gguf.cpp`): at most 4 dimensions, element counts that
//! fit in i64, the first dimension a multiple of the type's block size, alignment a power of two,
//! offsets aligned; and ours on top: no two tensors overlap and every tensor lies inside the file,
//! so the tensor bytes sum to at most the file's size.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// Keys and tensor names: GGUF allows up to 65535 bytes for a key; llama.cpp names are < 64.
pub const MAX_NAME_BYTES: u64 = 1 << 16;
/// One string value (a chat template, a token): far above any real one.
pub const MAX_STRING_BYTES: u64 = 64 << 20;
/// Arrays inside arrays: real files nest at most once.
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Array items over all metadata (a 256K-token vocabulary with its scores, types and merges is
/// about 1M): each costs a 32-byte `Value` in memory however few bytes it takes in the file.
pub const MAX_METADATA_ITEMS: u64 = 1 << 24;
/// `general.alignment`: a power of two up to this.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml type ids (`ggml.h`, `enum ggml_type`) of the types candle reads.
fn ggml_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Reader<'a> {
    r: BufReader<std::fs::File>,
    pos: u64,
    size: u64,
    path: &'a Path,
    /// Version 1 writes lengths and dimensions as u32, later versions as u64.
    v1: bool,
    /// Array items still allowed ([`MAX_METADATA_ITEMS`]).
    items_left: u64,
}

impl Reader<'_> {
    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes exist, naming `what` and the numbers.
    fn need(&self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.remaining() {
            bail!(
                "{}: {} needs {n} bytes at offset {}, but the file has {} bytes",
                self.path.display(),
                what(),
                self.pos,
                self.size
            );
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .with_context(|| format!("{}: reading {}", self.path.display(), what()))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length or count: u32 in version 1, u64 after.
    fn len(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        if self.v1 {
            Ok(self.u32(what)? as u64)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, max: u64, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.len(what)?;
        if n > max {
            bail!(
                "{}: {} is {n} bytes long, more than the limit of {max}",
                self.path.display(),
                what()
            );
        }
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .with_context(|| format!("{}: reading {}", self.path.display(), what()))?;
        self.pos += n;
        // Strings are not NUL-terminated, but some writers add one; candle's reader drops them
        // and reads invalid UTF-8 lossily, and so do we, so files it accepted still load.
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Smallest encoding of one value of type `t`: what an array of them needs at least per item.
    fn min_size(&self, t: u32) -> u64 {
        let len = if self.v1 { 4 } else { 8 };
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4 | 5 | 6 => 4,
            10..=12 => 8,
            8 => len,
            _ => 4 + len,
        }
    }

    fn value(&mut self, t: u32, depth: usize, key: &str) -> Result<Value> {
        let what = || format!("metadata {key}");
        Ok(match t {
            0 => Value::U8(self.bytes::<1>(&what)?[0]),
            1 => Value::I8(self.bytes::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(&what)?)),
            4 => Value::U32(self.u32(&what)?),
            5 => Value::I32(self.u32(&what)? as i32),
            6 => Value::F32(f32::from_le_bytes(self.bytes(&what)?)),
            7 => match self.bytes::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!(
                    "{}: metadata {key} is a bool stored as {b}",
                    self.path.display()
                ),
            },
            8 => Value::String(self.string(MAX_STRING_BYTES, &what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!(
                        "{}: metadata {key} nests arrays deeper than {MAX_ARRAY_DEPTH}",
                        self.path.display()
                    );
                }
                let et = self.u32(&what)?;
                if et > 12 {
                    bail!(
                        "{}: metadata {key} is an array of unknown type {et}",
                        self.path.display()
                    );
                }
                let n = self.len(&what)?;
                // Checked before reserving anything: n items take at least n * min_size bytes.
                let need = n.saturating_mul(self.min_size(et));
                self.need(need, &|| format!("metadata {key} (an array of {n} items)"))?;
                if n > self.items_left {
                    bail!(
                        "{}: metadata {key} is an array of {n} items, more than the {} left of \
                         the limit of {MAX_METADATA_ITEMS} array items per file",
                        self.path.display(),
                        self.items_left
                    );
                }
                self.items_left -= n;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, depth + 1, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(self.u64(&what)? as i64),
            12 => Value::F64(f64::from_le_bytes(self.bytes(&what)?)),
            other => bail!(
                "{}: metadata {key} has unknown value type {other}",
                self.path.display()
            ),
        })
    }
}

/// A tensor entry as read, before the data offset is known.
struct Entry {
    name: String,
    dtype: GgmlDType,
    /// Row-major (PyTorch) order: GGUF lists the fastest-varying dimension first.
    dims: Vec<usize>,
    offset: u64,
    bytes: u64,
}

/// Reads and checks the header of the GGUF file at `path`.
pub fn read_content(path: &Path) -> Result<Content> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let mut r = Reader {
        r: BufReader::new(f),
        pos: 0,
        size,
        path,
        v1: false,
        items_left: MAX_METADATA_ITEMS,
    };
    let magic = r.bytes::<4>(&|| "the GGUF magic".into())?;
    if &magic != b"GGUF" {
        bail!("{} is not a GGUF file (magic {magic:02x?})", path.display());
    }
    let version = r.u32(&|| "the version".into())?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => bail!(
            "{}: GGUF version {v} is not supported (1 to 3)",
            path.display()
        ),
    };
    r.v1 = version == 1;
    let n_tensors = r.len(&|| "the tensor count".into())?;
    let n_kv = r.len(&|| "the metadata count".into())?;
    // Each metadata entry takes at least a key length, a type and one byte; each tensor entry a
    // name length, a dimension count, one dimension, a type and an offset.
    let len_bytes = if r.v1 { 4 } else { 8 };
    let floor = n_kv
        .saturating_mul(len_bytes + 4 + 1)
        .saturating_add(n_tensors.saturating_mul(2 * len_bytes + 4 + 4 + 8));
    r.need(floor, &|| {
        format!("a header of {n_tensors} tensors and {n_kv} metadata entries")
    })?;

    let mut metadata = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(MAX_NAME_BYTES, &|| format!("metadata key {i}"))?;
        let t = r.u32(&|| format!("the type of metadata {key}"))?;
        let v = r.value(t, 0, &key)?;
        if metadata.insert(key.clone(), v).is_some() {
            bail!("{}: metadata {key} appears twice", path.display());
        }
    }

    let mut entries: Vec<Entry> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(MAX_NAME_BYTES, &|| format!("the name of tensor {i}"))?;
        let what = || format!("tensor {name}");
        let n_dims = r.u32(&what)?;
        if !(1..=4).contains(&n_dims) {
            bail!(
                "{}: tensor {name} has {n_dims} dimensions (1 to 4 allowed)",
                path.display()
            );
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.len(&what)?);
        }
        let type_id = r.u32(&what)?;
        let offset = r.u64(&what)?;
        let dtype = ggml_type(type_id).with_context(|| {
            format!(
                "{}: tensor {name} has unknown ggml type {type_id}",
                path.display()
            )
        })?;
        // Element count in i64, as llama.cpp requires; an overflow here is a damaged header.
        let elems = ne
            .iter()
            .try_fold(1u64, |a, &d| {
                a.checked_mul(d).filter(|&x| x <= i64::MAX as u64)
            })
            .with_context(|| {
                format!(
                    "{}: tensor {name} has dimensions {ne:?} whose product overflows",
                    path.display()
                )
            })?;
        let block = dtype.block_size() as u64;
        if ne[0] % block != 0 {
            bail!(
                "{}: tensor {name} ({dtype:?}) has a first dimension of {}, not a multiple of the \
                 block size {block}",
                path.display(),
                ne[0]
            );
        }
        let bytes = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .with_context(|| {
                format!(
                    "{}: tensor {name} has a byte size that overflows",
                    path.display()
                )
            })?;
        if bytes > size {
            bail!(
                "{}: tensor {name} ({dtype:?}, dimensions {ne:?}) needs {bytes} bytes, but the file \
                 has {size} bytes",
                path.display()
            );
        }
        if !seen.insert(name.clone()) {
            bail!("{}: tensor {name} appears twice", path.display());
        }
        let dims: Vec<usize> = ne.iter().rev().map(|&d| d as usize).collect();
        entries.push(Entry {
            name,
            dtype,
            dims,
            offset,
            bytes,
        });
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = match v {
                Value::U8(x) => *x as u64,
                Value::U16(x) => *x as u64,
                Value::U32(x) => *x as u64,
                Value::U64(x) => *x,
                Value::I8(x) => *x as u64,
                Value::I16(x) => *x as u64,
                Value::I32(x) => *x as u64,
                Value::I64(x) => *x as u64,
                other => bail!(
                    "{}: general.alignment is {:?}, expected an integer",
                    path.display(),
                    other.value_type()
                ),
            };
            if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                bail!(
                    "{}: general.alignment is {a}, expected a power of two up to {MAX_ALIGNMENT}",
                    path.display()
                );
            }
            a
        }
    };
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let data_len = size.saturating_sub(data_start);
    // Every tensor inside the data section, aligned, and no two overlapping: together they hold
    // at most the file's bytes, whatever the header claims.
    let mut by_offset: Vec<&Entry> = entries.iter().collect();
    by_offset.sort_by_key(|e| e.offset);
    let mut end_prev = 0u64;
    let mut prev_name = "";
    for e in by_offset {
        if e.offset % alignment != 0 {
            bail!(
                "{}: tensor {} starts at data offset {}, not a multiple of the alignment {alignment}",
                path.display(),
                e.name,
                e.offset
            );
        }
        let end = e.offset.checked_add(e.bytes).filter(|&x| x <= data_len);
        let Some(end) = end else {
            bail!(
                "{}: tensor {} ({:?}, shape {:?}) needs {} bytes at data offset {}, but the data \
                 section holds {data_len} bytes (file {size} bytes, data from byte {data_start})",
                path.display(),
                e.name,
                e.dtype,
                e.dims,
                e.bytes,
                e.offset
            );
        };
        if e.offset < end_prev {
            bail!(
                "{}: tensor {} (data offset {}) overlaps tensor {prev_name}, which ends at {end_prev}",
                path.display(),
                e.name,
                e.offset
            );
        }
        end_prev = end;
        prev_name = &e.name;
    }
    let tensor_infos = entries
        .into_iter()
        .map(|e| {
            let info = TensorInfo {
                ggml_dtype: e.dtype,
                shape: candle_core::Shape::from(e.dims),
                offset: e.offset,
            };
            (e.name, info)
        })
        .collect();
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_start,
    })
}
