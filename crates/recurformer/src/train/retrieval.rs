//! Synthetic retrieval windows mixed into training (issue 18, part 3).
//!
//! A share of a stage's training windows is rewritten into a retrieval exercise built on the
//! window's own prose, so that distillation sees, besides ordinary text, positions where the
//! teacher copies a token from far back and the student has to keep the circuit that does it:
//!
//! - **facts**: one to four short facts ("Ines's locker combination is 40917.") spliced into the
//!   prose at sentence ends, then a question about one of them and its answer at the window's end;
//! - **list**: a key: value list (`shelf-kqd-18: 6254`) in the prose, then one key looked up again;
//! - **repeat**: a span of the window's own text repeated at the end (an induction / copy exercise).
//!
//! The answer tokens are marked so the loss can weight them (`answer_weight`, on the KL and the
//! cross-entropy of the rows that predict them). In the spirit of DuoAttention's synthetic passkey
//! data (Xiao et al. 2024) and of retrieval-aware distillation of hybrids, which train the
//! retrieval-carrying parts on copy tasks; the mix share and weight here are this project's.
//!
//! Wordings, names and key formats differ on purpose from the evaluation's needle (Paul Graham
//! essays, "The special magic number is" + 7 digits) and from the analysis probe's passkeys ("The
//! pass key is"): values are 5, 6, 8 or 9 digits or letter-digit codes, never 7 plain digits, and the
//! haystack is training text other than the evaluation's essays (`TrainData::retrieval_ok`). A window is a pure function of (stage seed, window index,
//! the base window's tokens), so exact resume is kept.

use super::data::{mix, SplitMix64};
use crate::formats::tokenizer::Tokenizer;
use anyhow::{ensure, Result};

/// A training window with its answer tokens marked.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticWindow {
    pub ids: Vec<u32>,
    /// `answer[i]`: token i is part of an answer the window asks for.
    pub answer: Vec<bool>,
    /// Which exercise it is ("facts", "list", "repeat").
    pub kind: &'static str,
}

impl SyntheticWindow {
    /// Per-row loss weights of a (t)-token window: row r predicts token r + 1, so it weighs
    /// `answer_weight` when that token is an answer token, 1 otherwise. The last row has no target.
    pub fn row_weights(&self, answer_weight: f64) -> Vec<f64> {
        (0..self.ids.len())
            .map(|r| match self.answer.get(r + 1) {
                Some(true) => answer_weight,
                _ => 1.0,
            })
            .collect()
    }
}

const NAMES: &[&str] = &[
    "Ines",
    "Tobias",
    "Marguerite",
    "Oskar",
    "Priya",
    "Dmitri",
    "Lucia",
    "Anselm",
    "Hana",
    "Bertrand",
    "Yusuf",
    "Greta",
    "Matteo",
    "Solveig",
    "Kofi",
    "Rosalind",
    "Emeric",
    "Nadia",
    "Florian",
    "Zofia",
    "Cyrus",
    "Ilse",
    "Ramon",
    "Ottilie",
];

/// (fact with {name} and {value}, question about {name}, answer prefix): the answer follows
/// the prefix after a space.
const FACTS: &[(&str, &str, &str)] = &[
    (
        "{name}'s locker combination is {value}.",
        "What is {name}'s locker combination?",
        "Answer:",
    ),
    (
        "The ticket number given to {name} was {value}.",
        "Which ticket number was given to {name}?",
        "It was",
    ),
    (
        "For the record, {name} keeps the cellar key under code {value}.",
        "Under which code does {name} keep the cellar key?",
        "The code is",
    ),
    (
        "{name} wrote the reference {value} on the parcel.",
        "What reference did {name} write on the parcel?",
        "The reference was",
    ),
];

const SHELVES: &[&str] = &["shelf", "crate", "drawer", "bin", "rack", "cabinet"];

/// A value that is never 7 plain digits (the evaluation's format).
fn value(rng: &mut SplitMix64) -> String {
    let digits = |rng: &mut SplitMix64, n: usize| -> String {
        (0..n)
            .map(|i| {
                let lo = if i == 0 { 1 } else { 0 };
                char::from(b'0' + (lo + rng.next() % (10 - lo)) as u8)
            })
            .collect()
    };
    let letter = |rng: &mut SplitMix64| char::from(b'A' + (rng.next() % 26) as u8);
    match rng.next() % 4 {
        0 | 1 => {
            let n = [5, 6, 8, 9][(rng.next() % 4) as usize];
            digits(rng, n)
        }
        2 => format!("{}{}-{}", letter(rng), letter(rng), digits(rng, 4)),
        _ => format!("{}{}{}", digits(rng, 2), letter(rng), digits(rng, 3)),
    }
}

/// `n` values of which none contains another (so each is asked for unambiguously).
fn distinct_values(rng: &mut SplitMix64, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    while out.len() < n {
        let v = value(rng);
        if !out.iter().any(|o| o.contains(&v) || v.contains(o.as_str())) {
            out.push(v);
        }
    }
    out
}

/// Builds synthetic windows from training windows with one tokenizer.
pub struct RetrievalWindows<'a> {
    tok: &'a Tokenizer,
    /// Token ids whose text ends a sentence ('.', '!' or '?', possibly followed by quotes or
    /// white space): facts are spliced in after them.
    sentence_end: std::collections::HashSet<u32>,
}

impl<'a> RetrievalWindows<'a> {
    pub fn new(tok: &'a Tokenizer) -> Result<Self> {
        let mut sentence_end = std::collections::HashSet::new();
        for id in 0..tok.vocab_size() as u32 {
            let s = tok.decode(&[id], false)?;
            let s = s.trim_end_matches(|c: char| c.is_whitespace() || c == '"' || c == '\'');
            if !s.is_empty() && s.ends_with(['.', '!', '?']) && s.chars().count() <= 3 {
                sentence_end.insert(id);
            }
        }
        ensure!(
            !sentence_end.is_empty(),
            "the tokenizer has no token that ends a sentence ('.', '!', '?'): cannot build \
             retrieval windows"
        );
        Ok(RetrievalWindows { tok, sentence_end })
    }

    fn enc(&self, s: &str) -> Result<Vec<u32>> {
        self.tok.encode(s, false)
    }

    /// Window `g` of a stage, rewritten from the training window `base` (its length is kept).
    /// Deterministic in (seed, g, base).
    pub fn build(&self, base: &[u32], seed: u64, g: u64) -> Result<SyntheticWindow> {
        let t = base.len();
        ensure!(
            t >= 64,
            "retrieval windows need at least 64 tokens per window, got {t}"
        );
        let mut rng = SplitMix64(mix(seed ^ 0x5245_5452, g)); // "RETR"
        let kind = rng.next() % 8;
        let w = if kind < 4 {
            self.facts(base, &mut rng)?
        } else if kind < 6 {
            self.list(base, &mut rng)?
        } else {
            None
        };
        // A window too short for the drawn exercise gets the copy exercise instead.
        let w = w.unwrap_or_else(|| repeat(base, &mut rng));
        ensure!(
            w.ids.len() == t && w.answer.len() == t && w.answer.iter().any(|&a| a),
            "internal: a {} retrieval window has {} tokens for a {t}-token base window",
            w.kind,
            w.ids.len()
        );
        Ok(w)
    }

    /// Prose with facts spliced in at sentence ends; a question about one of them at the end.
    /// None when the window is too short for them.
    fn facts(&self, base: &[u32], rng: &mut SplitMix64) -> Result<Option<SyntheticWindow>> {
        let t = base.len();
        let (fact, question, prefix) = FACTS[(rng.next() % FACTS.len() as u64) as usize];
        let k = 1 + (rng.next() % (t as u64 / 64).clamp(1, 4)) as usize;
        let mut names: Vec<&str> = Vec::with_capacity(k);
        while names.len() < k {
            let n = NAMES[(rng.next() % NAMES.len() as u64) as usize];
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let values = distinct_values(rng, k);
        let asked = (rng.next() % k as u64) as usize;
        let fact_ids: Vec<Vec<u32>> = names
            .iter()
            .zip(&values)
            .map(|(n, v)| {
                self.enc(&format!(
                    " {}",
                    fact.replace("{name}", n).replace("{value}", v)
                ))
            })
            .collect::<Result<_>>()?;
        let q = self.enc(&format!(
            "\n\n{} {}",
            question.replace("{name}", names[asked]),
            prefix
        ))?;
        let ans = self.enc(&format!(" {}", values[asked]))?;
        let fixed: usize = fact_ids.iter().map(Vec::len).sum::<usize>() + q.len() + ans.len();
        if fixed + 16 > t {
            return Ok(None);
        }
        let filler = &base[..t - fixed];
        // Insertion points: after sentence ends, spread over the filler (sorted).
        let mut at: Vec<usize> = (0..k)
            .map(|_| self.snap(filler, (rng.next() % filler.len() as u64) as usize))
            .collect();
        at.sort_unstable();
        let mut ids = Vec::with_capacity(t);
        let mut prev = 0;
        for (p, f) in at.iter().zip(&fact_ids) {
            ids.extend_from_slice(&filler[prev..*p]);
            ids.extend_from_slice(f);
            prev = *p;
        }
        ids.extend_from_slice(&filler[prev..]);
        Ok(Some(ask(ids, &q, &ans, "facts")))
    }

    /// The first position at or after `p` (within 40 tokens) that follows a sentence end, else p.
    fn snap(&self, filler: &[u32], p: usize) -> usize {
        (p..filler.len().min(p + 40))
            .find(|&i| i > 0 && self.sentence_end.contains(&filler[i - 1]))
            .unwrap_or(p)
    }

    /// Prose, a key: value list, more prose, then one key looked up again. None when the window
    /// is too short for it.
    fn list(&self, base: &[u32], rng: &mut SplitMix64) -> Result<Option<SyntheticWindow>> {
        let t = base.len();
        let shelf = SHELVES[(rng.next() % SHELVES.len() as u64) as usize];
        let n = 2 + (rng.next() % ((t / 32).clamp(1, 12) as u64)) as usize;
        let mut keys = Vec::with_capacity(n);
        while keys.len() < n {
            let letters: String = (0..3)
                .map(|_| char::from(b'a' + (rng.next() % 26) as u8))
                .collect();
            let key = format!("{shelf}-{letters}-{}", 10 + rng.next() % 90);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        let values = distinct_values(rng, n);
        let mut list = String::from("\n\nInventory:\n");
        for (k, v) in keys.iter().zip(&values) {
            list.push_str(&format!("{k}: {v}\n"));
        }
        let list = self.enc(&list)?;
        let asked = (rng.next() % n as u64) as usize;
        let q = self.enc(&format!("\n\nLooking up {} again: {}:", shelf, keys[asked]))?;
        let ans = self.enc(&format!(" {}", values[asked]))?;
        let fixed = list.len() + q.len() + ans.len();
        if fixed + 16 > t {
            return Ok(None);
        }
        let filler = &base[..t - fixed];
        let p = self.snap(
            filler,
            (rng.next() % (filler.len() as u64 / 2 + 1)) as usize,
        );
        let mut ids = Vec::with_capacity(t);
        ids.extend_from_slice(&filler[..p]);
        ids.extend_from_slice(&list);
        ids.extend_from_slice(&filler[p..]);
        Ok(Some(ask(ids, &q, &ans, "list")))
    }
}

/// `ids` followed by the question `q` and its answer `ans`, the answer's tokens marked.
fn ask(mut ids: Vec<u32>, q: &[u32], ans: &[u32], kind: &'static str) -> SyntheticWindow {
    ids.extend_from_slice(q);
    let mut answer = vec![false; ids.len()];
    ids.extend_from_slice(ans);
    answer.resize(ids.len(), true);
    SyntheticWindow { ids, answer, kind }
}

/// The window's text with an earlier span of it repeated at the end: the first 4 tokens of the
/// repeat are the cue, the rest are answers.
fn repeat(base: &[u32], rng: &mut SplitMix64) -> SyntheticWindow {
    let t = base.len();
    let len = 16 + (rng.next() % 33) as usize; // 16..=48
    let len = len.min(t / 4);
    let head = t - len;
    // The span lies in the first half of what stays, so the copy reaches back at least t/4.
    let src = (rng.next() % (head / 2 - len.min(head / 2) + 1) as u64) as usize;
    let mut ids = base[..head].to_vec();
    ids.extend_from_slice(&base[src..src + len]);
    let mut answer = vec![false; t];
    for a in answer.iter_mut().skip(head + 4) {
        *a = true;
    }
    SyntheticWindow {
        ids,
        answer,
        kind: "repeat",
    }
}

/// Whether window `g` of a stage is a retrieval window at `share` (deterministic).
pub fn is_retrieval_window(seed: u64, g: u64, share: f64) -> bool {
    if share <= 0.0 {
        return false;
    }
    let u = SplitMix64(mix(seed ^ 0x4d49_5845, g)).next(); // "MIXE"
    ((u >> 11) as f64 / (1u64 << 53) as f64) < share
}

/// The start of window `g`'s retrieval text: uniform over the allowed start offsets `starts`
/// (`TrainData::retrieval_starts`, `total` of them), deterministic in (seed, g).
pub fn retrieval_start(
    starts: &[std::ops::Range<usize>],
    total: usize,
    seed: u64,
    g: u64,
) -> usize {
    let mut k = (SplitMix64(mix(seed ^ 0x5445_5854, g)).next() % total.max(1) as u64) as usize; // "TEXT"
    for r in starts {
        if k < r.len() {
            return r.start + k;
        }
        k -= r.len();
    }
    starts.last().map_or(0, |r| r.end - 1)
}
