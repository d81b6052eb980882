//! File input and output: text files read with a size limit, and output that never leaves a
//! half-written file behind (write a temporary sibling, sync, rename; on failure remove it), with a
//! test hook that makes writes fail as on a full disk ([`fault`]).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// How a path is named in reports, tables and recorded commands: relative to the current
/// directory (climbing with `..` where the two share more than the filesystem root), otherwise as
/// given. A report run from the repository then names `data/models/x.gguf`, not the absolute path
/// of the machine that made it.
pub fn shown_path(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_absolute() => relative_to(path, &cwd),
        _ => path.display().to_string(),
    }
}

/// `path` relative to the directory `base` (both absolute), or `path` itself when they share
/// nothing below the root.
fn relative_to(path: &Path, base: &Path) -> String {
    use std::path::Component;
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let only_root = p
        .iter()
        .take(common)
        .all(|c| matches!(c, Component::RootDir | Component::Prefix(_)));
    if only_root {
        return path.display().to_string();
    }
    let mut rel = std::path::PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &p[common..] {
        rel.push(c.as_os_str());
    }
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    rel.display().to_string()
}

/// Largest JSON side file we read whole (config.json, plan.json, recency.json, train_state.json, a
/// shard index, tokenizer_config.json): real ones are kilobytes to a few megabytes.
pub const JSON_FILE_LIMIT: u64 = 64 << 20;
/// Largest tokenizer.json (the largest published ones are tens of megabytes).
pub const TOKENIZER_FILE_LIMIT: u64 = 1 << 30;

/// Reads a UTF-8 text file whole, refusing one larger than `limit` bytes before reading it.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let size = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > limit {
        bail!(
            "{} is {size} bytes, more than the {limit} bytes this file kind may have",
            path.display()
        );
    }
    let mut text = String::with_capacity(size as usize);
    // `take` bounds the read even if the file grows after the size was read.
    f.take(limit)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (is it UTF-8 text?)", path.display()))?;
    Ok(text)
}

/// Test hook: make this thread's file writes fail once a number of bytes has been written, as a
/// filesystem that fills up does. Every file the library writes (checkpoints, plans, reports,
/// logs) goes through [`FileWriter`], so a test can make any save fail at any byte.
pub mod fault {
    use std::cell::Cell;

    thread_local! {
        static BUDGET: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Until the guard is dropped, writes on this thread succeed for `bytes` more bytes in total
    /// and then fail with ENOSPC ("No space left on device"), the last one partly written.
    pub fn fail_writes_after(bytes: u64) -> Guard {
        BUDGET.with(|b| b.set(Some(bytes)));
        Guard(())
    }

    pub struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            BUDGET.with(|b| b.set(None));
        }
    }

    /// How many of `n` bytes may be written now (consuming them from the budget).
    pub(super) fn allow(n: usize) -> usize {
        BUDGET.with(|b| match b.get() {
            None => n,
            Some(left) => {
                let k = (n as u64).min(left);
                b.set(Some(left - k));
                k as usize
            }
        })
    }
}

/// A file being written: buffered, counted against the [`fault`] budget, synced by `finish`.
pub struct FileWriter {
    inner: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl FileWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(FileWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
        })
    }

    /// Opens `path` for appending (creating it if needed).
    pub fn append(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("appending to {}", path.display()))?;
        Ok(FileWriter {
            inner: std::io::BufWriter::new(f),
            path: path.to_path_buf(),
        })
    }

    /// Writes all of `bytes`; the error names the file and the OS error (ENOSPC on a full disk).
    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        self.write_all(bytes)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Flushes and syncs the file to disk: a full disk shows here at the latest.
    pub fn finish(self) -> Result<()> {
        let path = self.path;
        let f = self
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", path.display()))
    }
}

impl std::io::Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = fault::allow(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write(&buf[..n])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `bytes` to a new file at `path` (replacing one there) and syncs it; on failure the
/// partial file is removed.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let r = FileWriter::create(path).and_then(|mut w| {
        w.put(bytes)?;
        w.finish()
    });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Syncs a directory, so renames and new entries in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
/// On failure (a full disk, say) the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    write_file(&tmp, bytes)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file through [`FileWriter`] (so a full disk is an error
/// naming the file, and the fault hook reaches it), streaming one tensor at a time. Layout per
/// <https://github.com/huggingface/safetensors> (README, "Format"): an 8-byte little-endian header
/// length, the JSON header padded with spaces to a multiple of 8, then the tensors' bytes in
/// header order, sorted by dtype alignment then name as the `safetensors` crate writes them.
pub fn write_safetensors(tensors: &[(String, candle_core::Tensor)], path: &Path) -> Result<()> {
    use safetensors::View;
    let mut order: Vec<&(String, candle_core::Tensor)> = tensors.iter().collect();
    order.sort_by(|(an, a), (bn, b)| View::dtype(b).cmp(&View::dtype(a)).then(an.cmp(bn)));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in &order {
        let n = View::data_len(t);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": View::dtype(t),
                "shape": t.dims(),
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let r = FileWriter::create(path).and_then(|mut w| {
        w.put(&(h.len() as u64).to_le_bytes())?;
        w.put(&h)?;
        for (_, t) in &order {
            w.put(&View::data(t))?;
        }
        w.finish()
    });
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_shown_relative_to_the_working_directory() {
        let base = Path::new("/work/repo/crates/cli");
        assert_eq!(
            relative_to(Path::new("/work/repo/crates/cli/x.json"), base),
            "x.json"
        );
        assert_eq!(
            relative_to(Path::new("/work/repo/data/m.gguf"), base),
            "../../data/m.gguf"
        );
        assert_eq!(relative_to(Path::new("/work/repo/crates/cli"), base), ".");
        // Nothing in common below the root: the path as given.
        assert_eq!(
            relative_to(Path::new("/tmp/out/r.md"), base),
            "/tmp/out/r.md"
        );
        assert_eq!(shown_path(Path::new("runs/demo")), "runs/demo");
    }
}
