//! HashHop: chains of hash assignments, prompts filled to an exact token length, and the grid
//! runner. See the module doc of `tasks`.

use super::*;
use crate::formats::tokenizer::Tokenizer;
use crate::model::llama::Model;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

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
    /// Teacher-forced (one forward per case; the whole chain `h1 = h2 = ...` must be the argmax)
    /// or by generation (the final hash anywhere in the output).
    #[serde(default)]
    pub scoring: Scoring,
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
            scoring: Scoring::default(),
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
    /// Teacher-forced: content tokens of the expected chain and how many were the argmax.
    #[serde(default)]
    pub digits: usize,
    #[serde(default)]
    pub digits_correct: usize,
    /// Teacher-forced: mean log-probability of the expected chain's tokens.
    #[serde(default)]
    pub answer_logprob: Option<f64>,
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
    #[serde(default)]
    pub scoring: Scoring,
    pub max_new_tokens: usize,
    pub hash_len: usize,
    pub accuracy: f64,
    /// Exact match with its interval, per-token accuracy and answer log-probability.
    pub summary: RetrievalSummary,
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
            // After "{q} =": " h1" for one hop, the chain " h1 = h2 = ..." as the instruction
            // asks for more.
            let continuation = format!(" {}", case.chain[1..].join(" = "));
            let s = score_case(
                model,
                tok,
                &CaseToScore {
                    prompt: &case.prompt,
                    text: &case.text,
                    add_special: !cfg.chat,
                    continuation: &continuation,
                    expected: &case.answer,
                },
                cfg.scoring,
                cfg.max_new_tokens,
                &eos,
            )
            .with_context(|| format!("HashHop case context {context} hops {hops}"))?;
            Ok(HashHopCaseResult {
                context,
                hops,
                sample,
                seed: params.seed,
                query: case.query,
                answer: case.answer,
                output: s.output,
                correct: s.correct,
                digits: s.content_tokens,
                digits_correct: s.content_correct,
                answer_logprob: s.answer_logprob,
                lines: case.assignments.len(),
                prefill_secs: s.prefill_secs,
                decode_secs: s.decode_secs,
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
    let summary = RetrievalSummary::from_cases(
        cases
            .iter()
            .map(|c| (c.correct, c.digits, c.digits_correct, c.answer_logprob)),
    );
    Ok(HashHopResults {
        contexts: cfg.contexts.clone(),
        hops: cfg.hops.clone(),
        samples: cfg.samples,
        seed: cfg.seed,
        chat: cfg.chat,
        scoring: cfg.scoring,
        max_new_tokens: cfg.max_new_tokens,
        hash_len: cfg.hash_len,
        accuracy,
        summary,
        cells,
        cases,
    })
}
