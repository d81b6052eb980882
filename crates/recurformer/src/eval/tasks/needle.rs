//! Needle in a haystack (passkey retrieval): the haystack of whole sentences, prompts of an exact
//! token length with the needle at a depth, and the grid runner. See the module doc of `tasks`.

use super::*;
use crate::formats::tokenizer::Tokenizer;
use crate::model::llama::Model;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Haystack text cut into sentences. Every sentence keeps the whitespace in front of it, so
/// concatenating a run of sentences reproduces the text.
#[derive(Debug, Clone)]
pub struct Haystack {
    /// Where the text came from (for messages).
    pub source: String,
    sentences: Vec<String>,
}

impl Haystack {
    /// The `*.txt` files of `dir` in sorted order, each trimmed and preceded by a blank line.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading haystack directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        files.retain(|p| p.extension().and_then(|e| e.to_str()) == Some("txt"));
        files.sort();
        if files.is_empty() {
            bail!("haystack directory {} holds no .txt files", dir.display());
        }
        let mut text = String::new();
        for f in &files {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("reading {} (is it UTF-8 text?)", f.display()))?;
            text.push_str("\n\n");
            text.push_str(t.trim());
        }
        Self::from_text(&text, &dir.display().to_string())
    }

    /// The Paul Graham essays shipped in `data/text/paul_graham`.
    pub fn paul_graham() -> Result<Self> {
        Self::load(&crate::repo_root().join(PAUL_GRAHAM_DIR))
    }

    /// Splits `text` after every `.`, `!` or `?` (and any closing quotes or brackets) that is
    /// followed by whitespace; the whitespace starts the next sentence. Whitespace-only pieces are
    /// dropped.
    pub fn from_text(text: &str, source: &str) -> Result<Self> {
        let mut sentences = Vec::new();
        let mut start = 0;
        let mut chars = text.char_indices().peekable();
        while let Some((_, c)) = chars.next() {
            if !matches!(c, '.' | '!' | '?') {
                continue;
            }
            while let Some(&(_, n)) = chars.peek() {
                if matches!(n, '"' | '\'' | ')' | ']' | '”' | '’') {
                    chars.next();
                } else {
                    break;
                }
            }
            if let Some(&(j, n)) = chars.peek() {
                if n.is_whitespace() {
                    sentences.push(text[start..j].to_string());
                    start = j;
                }
            }
        }
        sentences.push(text[start..].to_string());
        sentences.retain(|s| !s.trim().is_empty());
        // A sentence must start with whitespace so that runs can be concatenated (a wrap-around
        // from the last sentence to the first included).
        for s in sentences.iter_mut() {
            if !s.starts_with(char::is_whitespace) {
                s.insert_str(0, "\n\n");
            }
        }
        if sentences.len() < 2 {
            bail!(
                "haystack {source} has {} sentence(s); it needs text of many sentences",
                sentences.len()
            );
        }
        Ok(Haystack {
            source: source.to_string(),
            sentences,
        })
    }

    pub fn num_sentences(&self) -> usize {
        self.sentences.len()
    }

    /// Sentence `i` (wrapping around), with its leading whitespace.
    pub fn sentence(&self, i: usize) -> &str {
        &self.sentences[i % self.sentences.len()]
    }
}

/// What one needle prompt is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleParams {
    /// Exact length of the prompt in tokens.
    pub context_tokens: usize,
    /// Where the needle goes in the haystack: 0 = first sentence, 1 = after the last one.
    pub depth: f64,
    /// Draws the value and the haystack offset.
    pub seed: u64,
    /// Frame the prompt with the model's chat template.
    pub chat: bool,
}

/// One generated needle prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleCase {
    pub params: NeedleParams,
    /// Prompt token ids; exactly `params.context_tokens` of them.
    pub prompt: Vec<u32>,
    /// The prompt's text (what `prompt` is the tokenisation of).
    pub text: String,
    /// The 7-digit value to retrieve (the expected answer).
    pub value: String,
    /// The needle sentence as inserted (without surrounding whitespace).
    pub needle: String,
    /// Index of the sentence of the haystack text where the haystack starts.
    pub haystack_offset: usize,
    /// Token index of the haystack's first token in `prompt`.
    pub haystack_start: usize,
    /// Tokens of the haystack, needle excluded.
    pub haystack_tokens: usize,
    /// Token index of the needle's first token in `prompt`.
    pub needle_position: usize,
    /// Tokens of the needle sentence.
    pub needle_tokens: usize,
    /// (needle_position - haystack_start) / haystack_tokens: the depth actually achieved.
    pub depth_actual: f64,
}

/// How many start offsets the fit tries before giving up.
const MAX_WINDOWS: usize = 4000;

/// Builds the needle prompt for `params` from `haystack`: deterministic in `params`.
///
/// The value (7 digits, first one non-zero) and a start sentence are drawn from the seed; the
/// window of whole sentences is slid forward from there until the framed prompt has exactly
/// `context_tokens` tokens and its haystack does not contain the value.
pub fn needle_prompt(
    tok: &Tokenizer,
    haystack: &Haystack,
    params: &NeedleParams,
) -> Result<NeedleCase> {
    if !(0.0..=1.0).contains(&params.depth) {
        bail!("needle depth {} is outside [0, 1]", params.depth);
    }
    let target = params.context_tokens;
    let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
    let value = rng.random_range(1_000_000u32..10_000_000).to_string();
    let n = haystack.num_sentences();
    let start0 = rng.random_range(0..n);
    let needle = NEEDLE_SENTENCE.replace("{value}", &value);

    // Token counts, measured on pieces; the framed prompt is always re-encoded whole to check.
    let count = |s: &str| -> Result<usize> { Ok(tok.encode(s, false)?.len()) };
    let empty = frame(
        tok,
        params.chat,
        NEEDLE_INTRO,
        "",
        NEEDLE_QUESTION,
        NEEDLE_ANSWER_PREFIX,
    )?;
    let fixed = empty.ids.len();
    if target < fixed + 8 {
        bail!(
            "context {target} tokens is too short for the needle task: the framing alone takes \
             {fixed} tokens"
        );
    }
    let needle_inner = count(&format!(" {needle}"))?; // after a sentence
    let needle_first = count(&needle)?; // at the very start
    let mut full_len: HashMap<usize, usize> = HashMap::new();
    let mut trim_len: HashMap<usize, usize> = HashMap::new();
    let mut len_of = |i: usize, trimmed: bool| -> Result<usize> {
        let i = i % n;
        let memo = if trimmed {
            &mut trim_len
        } else {
            &mut full_len
        };
        if let Some(&l) = memo.get(&i) {
            return Ok(l);
        }
        let s = haystack.sentence(i);
        let l = count(if trimmed { s.trim_start() } else { s })?;
        memo.insert(i, l);
        Ok(l)
    };

    // actual - estimate at the joints between pieces (tokenisers merge across some of them),
    // learned from the last window that was encoded whole.
    let mut correction: i64 = 0;
    let mut learned = false;
    for attempt in 0..MAX_WINDOWS.min(n) {
        let first = (start0 + attempt) % n;
        // Sentence lengths of the window: the first one without its leading whitespace.
        let mut lens = vec![len_of(first, true)?];
        let mut est = (fixed + needle_inner + lens[0]) as i64;
        while est + correction < target as i64 && lens.len() < n {
            let l = len_of(first + lens.len(), false)?;
            lens.push(l);
            est += l as i64;
        }
        // The boundary nearest to depth x haystack tokens (ties go to the earlier one).
        let total: usize = lens.iter().sum();
        let want = params.depth * total as f64;
        let mut b = 0;
        let mut acc = 0usize;
        let mut best = f64::INFINITY;
        for k in 0..=lens.len() {
            let dist = (acc as f64 - want).abs();
            if dist < best {
                best = dist;
                b = k;
            }
            if k < lens.len() {
                acc += lens[k];
            }
        }
        if b == 0 {
            // Needle first, then the first sentence with its whitespace.
            est += needle_first as i64 - needle_inner as i64 + len_of(first, false)? as i64
                - lens[0] as i64;
        }
        if learned && est + correction != target as i64 {
            continue;
        }
        // Assemble the body.
        let mut body = String::new();
        let mut needle_at = 0;
        for k in 0..=lens.len() {
            if k == b {
                if k > 0 {
                    body.push(' ');
                }
                needle_at = body.len();
                body.push_str(&needle);
            }
            if k < lens.len() {
                let s = haystack.sentence(first + k);
                body.push_str(if k == 0 && b != 0 { s.trim_start() } else { s });
            }
        }
        let f = frame(
            tok,
            params.chat,
            NEEDLE_INTRO,
            &body,
            NEEDLE_QUESTION,
            NEEDLE_ANSWER_PREFIX,
        )?;
        learned = true;
        if f.ids.len() != target {
            correction = f.ids.len() as i64 - est;
            continue;
        }
        if body.matches(value.as_str()).count() != 1 {
            continue; // the essays happen to contain the value here
        }
        let hay_start = f.token_at(tok, f.body.start)?;
        let hay_end = f.token_at(tok, f.body.end)?;
        let needle_pos = f.token_at(tok, f.body.start + needle_at)?;
        let needle_end = f.token_at(tok, f.body.start + needle_at + needle.len() - 1)? + 1;
        let needle_tokens = needle_end - needle_pos;
        let haystack_tokens = (hay_end - hay_start).saturating_sub(needle_tokens);
        return Ok(NeedleCase {
            params: params.clone(),
            prompt: f.ids,
            text: f.text,
            value,
            needle,
            haystack_offset: first,
            haystack_start: hay_start,
            haystack_tokens,
            needle_position: needle_pos,
            needle_tokens,
            depth_actual: (needle_pos - hay_start) as f64 / haystack_tokens.max(1) as f64,
        });
    }
    bail!(
        "could not fit a haystack of whole sentences from {} to exactly {target} tokens \
         (tried {} start offsets from sentence {start0}, last correction {correction})",
        haystack.source,
        MAX_WINDOWS.min(n)
    )
}

/// The needle grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleConfig {
    /// Prompt lengths in tokens.
    pub contexts: Vec<usize>,
    /// Needle depths in [0, 1].
    pub depths: Vec<f64>,
    /// Cases per (context, depth) cell; sample s uses seed `seed + s` in every cell.
    pub samples: usize,
    pub seed: u64,
    /// Frame prompts with the model's chat template.
    pub chat: bool,
    /// Teacher-forced (one forward per case) or by generation (see `scoring`).
    #[serde(default)]
    pub scoring: Scoring,
    /// Tokens generated per answer at most (generation scoring).
    pub max_new_tokens: usize,
    /// Directory of `.txt` files for the haystack.
    pub haystack: PathBuf,
}

impl Default for NeedleConfig {
    fn default() -> Self {
        NeedleConfig {
            contexts: vec![1024, 2048, 4096, 8192],
            depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            samples: 1,
            seed: 0,
            chat: true,
            scoring: Scoring::default(),
            max_new_tokens: 16,
            haystack: crate::repo_root().join(PAUL_GRAHAM_DIR),
        }
    }
}

impl NeedleConfig {
    /// Number of cases (generations) the grid runs.
    pub fn cases(&self) -> usize {
        self.contexts.len() * self.depths.len() * self.samples
    }

    fn validate(&self) -> Result<()> {
        if self.contexts.is_empty() || self.depths.is_empty() || self.samples == 0 {
            bail!(
                "the needle grid is empty: {} context(s) x {} depth(s) x {} sample(s)",
                self.contexts.len(),
                self.depths.len(),
                self.samples
            );
        }
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            bail!("needle depth {d} is outside [0, 1]");
        }
        if self.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        Ok(())
    }
}

/// One case of the needle grid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleCaseResult {
    pub context: usize,
    pub depth: f64,
    pub sample: usize,
    pub seed: u64,
    pub value: String,
    /// The model's answer (new tokens, decoded); teacher-forced, the argmax at the answer's
    /// positions and the one after.
    pub output: String,
    pub correct: bool,
    /// Teacher-forced: the value's digits (content tokens) and how many were the argmax.
    #[serde(default)]
    pub digits: usize,
    #[serde(default)]
    pub digits_correct: usize,
    /// Teacher-forced: mean log-probability of the answer tokens.
    #[serde(default)]
    pub answer_logprob: Option<f64>,
    pub needle_position: usize,
    pub depth_actual: f64,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Accuracy of one (context, depth) cell.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleCell {
    pub context: usize,
    pub depth: f64,
    pub samples: usize,
    pub correct: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleResults {
    pub contexts: Vec<usize>,
    pub depths: Vec<f64>,
    pub samples: usize,
    pub seed: u64,
    pub chat: bool,
    #[serde(default)]
    pub scoring: Scoring,
    pub max_new_tokens: usize,
    /// Mean over all cases.
    pub accuracy: f64,
    /// Exact match with its interval, digit accuracy and answer log-probability.
    pub summary: RetrievalSummary,
    /// Row-major: contexts outer, depths inner.
    pub cells: Vec<NeedleCell>,
    pub cases: Vec<NeedleCaseResult>,
}

impl NeedleResults {
    pub fn cell(&self, context: usize, depth: f64) -> Option<&NeedleCell> {
        self.cells
            .iter()
            .find(|c| c.context == context && c.depth == depth)
    }
}

/// Runs the needle grid on `model`; `progress` is called after every case with its context length
/// in tokens.
pub fn run_needle(
    model: &Model,
    tok: &Tokenizer,
    cfg: &NeedleConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<NeedleResults> {
    cfg.validate()?;
    let haystack = Haystack::load(&cfg.haystack)?;
    let eos = stop_tokens(model, tok);
    let (grid, cases) = run_grid(
        &cfg.contexts,
        &cfg.depths,
        cfg.samples,
        progress,
        |context, depth, sample| {
            let params = NeedleParams {
                context_tokens: context,
                depth,
                seed: sample_seed(cfg.seed, sample),
                chat: cfg.chat,
            };
            let case = needle_prompt(tok, &haystack, &params)
                .with_context(|| format!("needle case context {context} depth {depth}"))?;
            // The answer as the model writes it after "... is": a space, then the value.
            let continuation = format!(" {}", case.value);
            let s = score_case(
                model,
                tok,
                &CaseToScore {
                    prompt: &case.prompt,
                    text: &case.text,
                    add_special: !cfg.chat,
                    continuation: &continuation,
                    expected: &case.value,
                },
                cfg.scoring,
                cfg.max_new_tokens,
                &eos,
            )
            .with_context(|| format!("needle case context {context} depth {depth}"))?;
            Ok(NeedleCaseResult {
                context,
                depth,
                sample,
                seed: params.seed,
                value: case.value,
                output: s.output,
                correct: s.correct,
                digits: s.content_tokens,
                digits_correct: s.content_correct,
                answer_logprob: s.answer_logprob,
                needle_position: case.needle_position,
                depth_actual: case.depth_actual,
                prefill_secs: s.prefill_secs,
                decode_secs: s.decode_secs,
            })
        },
        |c| c.correct,
    )?;
    let cells = grid
        .into_iter()
        .map(|(context, depth, correct)| NeedleCell {
            context,
            depth,
            samples: cfg.samples,
            correct,
            accuracy: correct as f64 / cfg.samples as f64,
        })
        .collect();
    let accuracy = cases.iter().filter(|c| c.correct).count() as f64 / cases.len() as f64;
    let summary = RetrievalSummary::from_cases(
        cases
            .iter()
            .map(|c| (c.correct, c.digits, c.digits_correct, c.answer_logprob)),
    );
    Ok(NeedleResults {
        contexts: cfg.contexts.clone(),
        depths: cfg.depths.clone(),
        samples: cfg.samples,
        seed: cfg.seed,
        chat: cfg.chat,
        scoring: cfg.scoring,
        max_new_tokens: cfg.max_new_tokens,
        accuracy,
        summary,
        cells,
        cases,
    })
}
