//! Text input for calibration, training and evaluation: plain-text and JSONL files or directories
//! of them, tokenised, and cut into fixed-length windows deterministically from a seed.

use crate::formats::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// One document: a whole text file, or one JSONL record's `"text"`.
#[derive(Debug, Clone)]
pub struct Document {
    /// `path` or `path:line` for JSONL records.
    pub source: String,
    pub text: String,
}

/// Files under `paths` (directories are walked recursively, in sorted order), keeping `.txt`,
/// `.md`, `.jsonl` and `.json` files from directories; files named explicitly are always read.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("txt" | "md" | "jsonl" | "json")
            ) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("data path {} does not exist", p.display());
        }
    }
    if out.is_empty() {
        bail!("no text files found in {:?}", paths);
    }
    Ok(out)
}

/// Reads the documents of `paths`: a `.jsonl` file gives one document per line (its `"text"`
/// field), any other file one document.
pub fn load_documents(paths: &[PathBuf]) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for f in collect_files(paths)? {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("reading {} (is it UTF-8 text?)", f.display()))?;
        if f.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not valid JSON", f.display(), i + 1))?;
                let t = v.get("text").and_then(|t| t.as_str()).with_context(|| {
                    format!(
                        "{}:{}: record has no string field \"text\"",
                        f.display(),
                        i + 1
                    )
                })?;
                docs.push(Document {
                    source: format!("{}:{}", f.display(), i + 1),
                    text: t.to_string(),
                });
            }
        } else {
            docs.push(Document {
                source: f.display().to_string(),
                text,
            });
        }
    }
    Ok(docs)
}

/// All documents tokenised into one stream, each followed by the end-of-sequence token when the
/// model has one, so windows crossing a boundary see a proper separator.
pub fn token_stream(docs: &[Document], tok: &Tokenizer, eos: Option<u32>) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for d in docs {
        out.extend(
            tok.encode(&d.text, false)
                .with_context(|| format!("tokenizing {}", d.source))?,
        );
        if let Some(e) = eos {
            out.push(e);
        }
    }
    Ok(out)
}

/// `n` windows of `len` tokens at start offsets drawn uniformly from a seeded RNG (the same seed
/// gives the same windows); sorted by offset so reading order is stable.
pub fn sample_windows(stream: &[u32], n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if len == 0 || n == 0 {
        bail!("need at least one window of at least one token (got {n} windows of {len})");
    }
    if stream.len() < len {
        bail!(
            "the text has {} tokens, fewer than one window of {len}",
            stream.len()
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut starts: Vec<usize> = (0..n)
        .map(|_| rng.random_range(0..=stream.len() - len))
        .collect();
    starts.sort_unstable();
    Ok(starts
        .into_iter()
        .map(|s| stream[s..s + len].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_deterministic_and_in_range() {
        let stream: Vec<u32> = (0..1000).collect();
        let a = sample_windows(&stream, 5, 100, 7).unwrap();
        let b = sample_windows(&stream, 5, 100, 7).unwrap();
        let c = sample_windows(&stream, 5, 100, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for w in &a {
            assert_eq!(w.len(), 100);
            // Contiguous slices of the stream.
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1));
        }
        assert!(sample_windows(&stream, 1, 1001, 0)
            .unwrap_err()
            .to_string()
            .contains("1000 tokens"));
    }

    #[test]
    fn reads_text_and_jsonl_with_clear_errors() {
        let dir = std::env::temp_dir().join(format!("rf-data-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.txt"), "plain text").unwrap();
        std::fs::write(
            dir.join("sub/b.jsonl"),
            "{\"text\": \"one\"}\n\n{\"text\": \"two\"}\n",
        )
        .unwrap();
        std::fs::write(dir.join("ignored.bin"), [0u8, 1, 2]).unwrap();
        let docs = load_documents(&[dir.clone()]).unwrap();
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, vec!["plain text", "one", "two"]);
        std::fs::write(
            dir.join("sub/b.jsonl"),
            "{\"text\": \"one\"}\n{\"body\": 1}\n",
        )
        .unwrap();
        let e = format!("{:#}", load_documents(&[dir.clone()]).unwrap_err());
        assert!(e.contains("b.jsonl:2") && e.contains("text"), "{e}");
        let e = format!(
            "{:#}",
            load_documents(&[dir.join("missing.txt")]).unwrap_err()
        );
        assert!(e.contains("missing.txt"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
