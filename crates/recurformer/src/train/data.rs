//! Token data of a run: documents tokenised once, split by document into training and held-out
//! streams, and the deterministic window order (SplitMix64 from the seed and the window counter)
//! that makes the data position of a checkpoint one integer.

use super::*;
use crate::formats::tokenizer::Tokenizer;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One document as token ids.
#[derive(Debug, Clone)]
pub struct TokenDocument {
    pub source: String,
    pub ids: Vec<u32>,
}

/// FNV-1a, 64 bit: a stable hash for fingerprints and cache keys (not for security).
pub fn fnv64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(super) fn fnv64_u32(ids: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Reads documents from text / JSONL files or directories (as `data::collect_files`). A JSONL
/// record with an `"ids"` array is taken as pre-tokenised (how test models without a tokenizer are
/// fed); one with `"text"`, and any other file, is tokenised with `tok` (no special tokens).
/// With `cache_dir`, token ids are cached per (tokenizer, text) so a corpus is tokenised once.
pub fn load_token_documents(
    paths: &[PathBuf],
    tok: Option<&Tokenizer>,
    cache_dir: Option<&Path>,
) -> Result<Vec<TokenDocument>> {
    let tok_key = match tok {
        Some(t) => {
            let j = t
                .inner
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            Some(fnv64(j.as_bytes(), 0))
        }
        None => None,
    };
    let encode = |text: &str, source: &str| -> Result<Vec<u32>> {
        let (t, key) = match (tok, tok_key) {
            (Some(t), Some(k)) => (t, k),
            _ => bail!(
                "{source} is text but the model has no tokenizer: give pre-tokenised JSONL \
                 records ({{\"ids\": [...]}})"
            ),
        };
        let h = fnv64(text.as_bytes(), key);
        let cached = cache_dir.map(|d| d.join(format!("{h:016x}.u32")));
        if let Some(p) = &cached {
            if let Ok(bytes) = std::fs::read(p) {
                if bytes.len() % 4 == 0 {
                    return Ok(bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect());
                }
            }
        }
        let ids = t
            .encode(text, false)
            .with_context(|| format!("tokenizing {source}"))?;
        if let Some(p) = &cached {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            crate::formats::io::write_atomic(p, &bytes)
                .with_context(|| format!("writing the token cache {}", p.display()))?;
        }
        Ok(ids)
    };
    let mut docs = Vec::new();
    for f in crate::formats::text::collect_files(paths)? {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("reading {} (is it UTF-8 text?)", f.display()))?;
        if f.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let source = format!("{}:{}", f.display(), i + 1);
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{source}: not valid JSON"))?;
                let ids = if let Some(arr) = v.get("ids").and_then(|x| x.as_array()) {
                    arr.iter()
                        .map(|x| {
                            x.as_u64()
                                .filter(|&n| n <= u32::MAX as u64)
                                .map(|n| n as u32)
                                .with_context(|| {
                                    format!("{source}: \"ids\" holds {x}, not a token id")
                                })
                        })
                        .collect::<Result<Vec<u32>>>()?
                } else if let Some(t) = v.get("text").and_then(|x| x.as_str()) {
                    encode(t, &source)?
                } else {
                    bail!("{source}: record has neither \"ids\" (token ids) nor \"text\"");
                };
                docs.push(TokenDocument { source, ids });
            }
        } else {
            let source = f.display().to_string();
            let ids = encode(&text, &source)?;
            docs.push(TokenDocument { source, ids });
        }
    }
    Ok(docs)
}

/// The training documents of a mix: each part's documents in a seeded order, taken until the
/// part holds its share of the tokens (the last one cut short), so that the stream is exactly in
/// the mix's proportions. The part whose text is smallest for its share is used whole and fixes
/// the total; the others contribute a seeded selection of their documents. `parts` holds (name,
/// share, documents); shares need not sum to 1. A cut document keeps its source unchanged (so
/// rules keyed on it, such as `TrainData::retrieval_ok`, still apply).
pub fn mix_documents(
    parts: Vec<(String, f64, Vec<TokenDocument>)>,
    seed: u64,
) -> Result<Vec<TokenDocument>> {
    ensure!(!parts.is_empty(), "a training mix needs at least one part");
    let total_share: f64 = parts.iter().map(|p| p.1).sum();
    let mut budget = f64::INFINITY;
    for (name, share, docs) in &parts {
        ensure!(
            share.is_finite() && *share > 0.0,
            "the share of {name} in the training mix is {share}, not positive"
        );
        let n: usize = docs.iter().map(|d| d.ids.len()).sum();
        ensure!(n > 0, "the {name} part of the training mix holds no tokens");
        budget = budget.min(n as f64 * total_share / share);
    }
    let mut out = Vec::new();
    for (k, (name, share, mut docs)) in parts.into_iter().enumerate() {
        let quota = (budget * share / total_share).round() as usize;
        let mut rng = SplitMix64(mix(seed, fnv64(name.as_bytes(), k as u64)));
        for i in (1..docs.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            docs.swap(i, j);
        }
        let mut have = 0usize;
        for mut d in docs {
            if have >= quota {
                break;
            }
            if have + d.ids.len() > quota {
                d.ids.truncate(quota - have);
            }
            have += d.ids.len();
            out.push(d);
        }
    }
    Ok(out)
}

/// Splits `docs` into (train, held-out) by document: round(`fraction` x documents), at least one
/// and at most all but one, chosen by a seeded shuffle. For when no held-out files are named.
pub fn split_documents(
    docs: Vec<TokenDocument>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<TokenDocument>, Vec<TokenDocument>)> {
    let n = docs.len();
    ensure!(
        n >= 2,
        "holding out documents needs at least 2 documents, got {n}; name held-out files instead"
    );
    ensure!(
        (0.0..1.0).contains(&fraction),
        "held-out fraction {fraction} is outside [0, 1)"
    );
    let k = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(mix(seed, 0x4845_4c44)); // "HELD"
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let held: std::collections::BTreeSet<usize> = order[..k].iter().copied().collect();
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for (i, d) in docs.into_iter().enumerate() {
        if held.contains(&i) {
            heldout.push(d);
        } else {
            train.push(d);
        }
    }
    Ok((train, heldout))
}

/// The token streams a run trains and evaluates on.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// Training documents, each followed by EOS when the model has one.
    pub train: Vec<u32>,
    /// Held-out documents, likewise.
    pub heldout: Vec<u32>,
    pub train_sources: Vec<String>,
    pub heldout_sources: Vec<String>,
    /// Token range of each training document in `train` (EOS included), parallel to
    /// `train_sources`.
    pub train_ranges: Vec<std::ops::Range<usize>>,
    /// Per training document: whether retrieval windows may be built on it. False for the
    /// evaluation's needle haystack (the Paul Graham essays), which trains as text but never as a
    /// retrieval exercise, so the needle task keeps a haystack the exercises have not used.
    pub retrieval_ok: Vec<bool>,
    /// How the caller chose the documents (files, fraction...), recorded in `train_state.json`
    /// so a resume can find them again; free-form.
    pub inputs: Value,
}

/// Identifies the token streams (paths may differ between machines; the tokens may not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub train_tokens: u64,
    pub train_hash: String,
    pub heldout_tokens: u64,
    pub heldout_hash: String,
}

impl TrainData {
    pub fn new(train: &[TokenDocument], heldout: &[TokenDocument], eos: Option<u32>) -> Self {
        let pack = |docs: &[TokenDocument]| -> Vec<u32> {
            let mut s = Vec::new();
            for d in docs {
                s.extend_from_slice(&d.ids);
                if let Some(e) = eos {
                    s.push(e);
                }
            }
            s
        };
        let mut train_ranges = Vec::with_capacity(train.len());
        let mut at = 0;
        for d in train {
            let n = d.ids.len() + usize::from(eos.is_some());
            train_ranges.push(at..at + n);
            at += n;
        }
        let haystack = crate::repo_root()
            .join(crate::eval::tasks::PAUL_GRAHAM_DIR)
            .canonicalize()
            .ok();
        let retrieval_ok = train
            .iter()
            .map(|d| {
                let parent = Path::new(&d.source)
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                haystack.is_none() || parent != haystack
            })
            .collect();
        TrainData {
            train: pack(train),
            heldout: pack(heldout),
            train_sources: train.iter().map(|d| d.source.clone()).collect(),
            heldout_sources: heldout.iter().map(|d| d.source.clone()).collect(),
            train_ranges,
            retrieval_ok,
            inputs: Value::Null,
        }
    }

    /// Start offsets in `train` where a `len`-token retrieval window may be cut: inside one
    /// document that `retrieval_ok` allows, as [a, b) ranges.
    pub fn retrieval_starts(&self, len: usize) -> Vec<std::ops::Range<usize>> {
        self.train_ranges
            .iter()
            .zip(&self.retrieval_ok)
            .filter(|(r, &ok)| ok && r.len() >= len)
            .map(|(r, _)| r.start..r.end - len + 1)
            .collect()
    }

    pub fn fingerprint(&self) -> DataFingerprint {
        DataFingerprint {
            train_tokens: self.train.len() as u64,
            train_hash: format!("{:016x}", fnv64_u32(&self.train)),
            heldout_tokens: self.heldout.len() as u64,
            heldout_hash: format!("{:016x}", fnv64_u32(&self.heldout)),
        }
    }

    pub(super) fn check(&self, seq_len: usize, vocab: usize) -> Result<()> {
        ensure!(
            self.train.len() >= seq_len,
            "the training data has {} tokens, fewer than one window of {seq_len}",
            self.train.len()
        );
        ensure!(
            self.heldout.len() >= seq_len,
            "the held-out data has {} tokens, fewer than one window of {seq_len}",
            self.heldout.len()
        );
        for (what, s) in [("training", &self.train), ("held-out", &self.heldout)] {
            if let Some(&bad) = s.iter().find(|&&i| i as usize >= vocab) {
                bail!("the {what} data holds token id {bad}, outside the vocabulary of {vocab}");
            }
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, portable, and fully determined by its seed.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (modulo bias below 2^-40 for the sizes used here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub(super) fn mix(a: u64, b: u64) -> u64 {
    SplitMix64(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next()
}

/// The seed of a stage's data order.
pub(super) fn stage_seed(seed: u64, stage: Stage) -> u64 {
    mix(
        seed,
        match stage {
            Stage::Align => 1,
            Stage::Distill => 2,
        },
    )
}

/// The deterministic order in which a stage reads training windows: window g (g = 0, 1, ...) is
/// a pure function of (stream length, seq_len, seed, g).
pub struct WindowOrder {
    pub(super) stream_len: usize,
    pub(super) len: usize,
    pub(super) seed: u64,
    pub(super) epoch: u64,
    /// Global index of the first window of `epoch`.
    pub(super) epoch_first: u64,
    pub(super) offset: usize,
    pub(super) perm: Vec<u32>,
}

impl WindowOrder {
    pub fn new(stream_len: usize, len: usize, seed: u64) -> Result<Self> {
        ensure!(
            len >= 1 && stream_len >= len,
            "a stream of {stream_len} tokens holds no window of {len}"
        );
        let mut w = WindowOrder {
            stream_len,
            len,
            seed,
            epoch: 0,
            epoch_first: 0,
            offset: 0,
            perm: Vec::new(),
        };
        w.setup_epoch(0);
        Ok(w)
    }

    fn setup_epoch(&mut self, e: u64) {
        let mut rng = SplitMix64(mix(self.seed, e));
        // A random start below seq_len so epochs cut the stream at different places.
        let room = (self.stream_len - self.len + 1).min(self.len) as u64;
        self.offset = rng.below(room) as usize;
        let n = (self.stream_len - self.offset) / self.len;
        let mut perm: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        self.epoch = e;
        self.perm = perm;
    }

    /// Start offset in the stream of window `g`, and its (epoch, index within the epoch).
    pub fn window(&mut self, g: u64) -> (usize, u64, u64) {
        if g < self.epoch_first {
            self.epoch_first = 0;
            self.setup_epoch(0);
        }
        while g >= self.epoch_first + self.perm.len() as u64 {
            self.epoch_first += self.perm.len() as u64;
            let e = self.epoch + 1;
            self.setup_epoch(e);
        }
        let i = g - self.epoch_first;
        (
            self.offset + self.perm[i as usize] as usize * self.len,
            self.epoch,
            i,
        )
    }
}

/// Up to `k` windows of `len` tokens, evenly spaced over `stream` (always the same ones).
pub fn heldout_windows(stream: &[u32], len: usize, k: usize) -> Result<Vec<&[u32]>> {
    let n = stream.len() / len.max(1);
    ensure!(
        n >= 1,
        "the held-out data has {} tokens, fewer than one window of {len}",
        stream.len()
    );
    let k = k.clamp(1, n);
    Ok((0..k)
        .map(|i| {
            let w = i * n / k;
            &stream[w * len..(w + 1) * len]
        })
        .collect())
}

pub(super) fn ids_tensor(windows: &[&[u32]], dev: &Device) -> Result<Tensor> {
    let t = windows[0].len();
    let flat: Vec<u32> = windows.iter().flat_map(|w| w.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (windows.len(), t), dev)?) // (b, t)
}
