//! How a retrieval case is scored: by greedy generation, or teacher-forced in one forward pass.
//!
//! **Teacher-forced** (the default): the prompt followed by the expected answer, written as the
//! model should write it right after the answer prefix (` 8213133` after `... is`, tokenised in
//! context so the leading space falls where the tokenizer puts it), runs through one forward pass
//! from a fresh cache. The case is an exact match when the argmax at every answer position is the
//! answer token *and* the argmax after the last one does not continue the word (so `82131334` is
//! no match, as in [`answer_matches`]): exactly what greedy decoding would write first. Besides
//! the exact match it gives a graded signal: the share of the answer's content tokens (those that
//! hold a letter or digit: one per digit for SmolLM2's digit-splitting tokenizer) that are the
//! argmax, and the mean log-probability of the answer tokens. It costs one prefill of the prompt
//! plus a few tokens, and only the last positions' logits are computed.
//!
//! **Generation** decodes greedily up to `max_new_tokens` and looks for the answer anywhere in the
//! output as a whole word: it also accepts answers in another form (` **8213133**`, a chain of
//! hashes written differently), which teacher forcing counts wrong, and costs the decode steps on
//! top of the prefill.

use super::{answer_matches, greedy_answer};
use crate::eval::stats::Proportion;
use crate::formats::tokenizer::Tokenizer;
use crate::model::llama::Model;
use crate::model::options::ForwardOptions;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// How retrieval cases are scored (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    #[default]
    TeacherForced,
    Generate,
}

impl std::str::FromStr for Scoring {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "teacher-forced" => Ok(Scoring::TeacherForced),
            "generate" => Ok(Scoring::Generate),
            _ => bail!("unknown scoring {s:?} (expected teacher-forced or generate)"),
        }
    }
}

impl std::fmt::Display for Scoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scoring::TeacherForced => "teacher-forced",
            Scoring::Generate => "generate",
        })
    }
}

/// The ids of `continuation` as the tokenizer writes it right after `prompt_text` (whose ids are
/// `prompt_ids`): the tail of the tokenisation of the joined text. Fails when the tokenizer
/// merges across the joint, since then the prompt the model sees would not be `prompt_ids`.
pub fn continuation_ids(
    tok: &Tokenizer,
    prompt_text: &str,
    prompt_ids: &[u32],
    add_special: bool,
    continuation: &str,
) -> Result<Vec<u32>> {
    let full = tok.encode(&format!("{prompt_text}{continuation}"), add_special)?;
    if full.len() <= prompt_ids.len() || full[..prompt_ids.len()] != *prompt_ids {
        bail!(
            "the answer {continuation:?} does not tokenise separately from the prompt ({} prompt \
             ids, {} with the answer, the tokenizer merges across the joint)",
            prompt_ids.len(),
            full.len()
        );
    }
    Ok(full[prompt_ids.len()..].to_vec())
}

/// One teacher-forced case.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherForced {
    /// Every answer token is the argmax and the argmax after the answer ends the word.
    pub correct: bool,
    /// The argmax at each answer position, then the one after the answer (answer length + 1).
    pub predicted: Vec<u32>,
    /// Content tokens of the answer (holding a letter or digit) and how many are the argmax.
    pub content_tokens: usize,
    pub content_correct: usize,
    /// Mean over the answer tokens of log p(token | everything before it).
    pub mean_logprob: f64,
    pub secs: f64,
}

/// True when `piece` (a decoded token) starts with an ASCII letter or digit, so that it would
/// extend a word or number written before it.
fn continues_word(piece: &str) -> bool {
    piece.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// Scores `answer` after `prompt` in one forward pass of `model` from a fresh cache (the fast
/// attention path); logits are computed at the answer's positions only.
pub fn teacher_forced(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    answer: &[u32],
) -> Result<TeacherForced> {
    if prompt.is_empty() || answer.is_empty() {
        bail!(
            "teacher forcing needs a prompt and an answer (got {} and {} tokens)",
            prompt.len(),
            answer.len()
        );
    }
    let t0 = Instant::now();
    let (p, n) = (prompt.len(), answer.len());
    let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    let x = Tensor::new(ids.as_slice(), &model.device)?.unsqueeze(0)?; // (1, p+n)
    let mut cache = model.new_cache(1, p + n);
    let h = model.forward_hidden(&x, &mut cache, &ForwardOptions::default(), None)?; // (1, p+n, d)
                                                                                     // Position p-1+i predicts answer[i]; position p+n-1 what follows the answer.
    let logits = model.logits(&h.narrow(1, p - 1, n + 1)?)?.squeeze(0)?; // (n+1, v)
    let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, n)?, D::Minus1)?; // (n, v)
    let targets = Tensor::new(answer, &model.device)?.unsqueeze(1)?; // (n, 1)
    let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let mean_logprob = picked.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let (mut content_tokens, mut content_correct) = (0, 0);
    for (i, &a) in answer.iter().enumerate() {
        let piece = tok.decode(&[a], false)?;
        if piece.chars().any(|c| c.is_alphanumeric()) {
            content_tokens += 1;
            content_correct += (predicted[i] == a) as usize;
        }
    }
    let all_right = predicted[..n] == *answer;
    let ends = !continues_word(&tok.decode(&predicted[n..], false)?);
    Ok(TeacherForced {
        correct: all_right && ends,
        predicted,
        content_tokens,
        content_correct,
        mean_logprob,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// What a task needs to score one case either way.
pub struct CaseToScore<'a> {
    pub prompt: &'a [u32],
    /// The prompt's text and whether its ids were encoded with special tokens (BOS).
    pub text: &'a str,
    pub add_special: bool,
    /// The answer as the model should write it after the prompt (leading space included).
    pub continuation: &'a str,
    /// What generation must produce as a whole word (the value, the final hash).
    pub expected: &'a str,
}

/// The score of one case, shared by the needle and HashHop results.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseScore {
    /// Generation: the decoded answer. Teacher-forced: the argmax continuation decoded (what
    /// greedy decoding would write for the answer's length + 1).
    pub output: String,
    pub correct: bool,
    /// Teacher-forced only (0 and None under generation).
    pub content_tokens: usize,
    pub content_correct: usize,
    pub answer_logprob: Option<f64>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// Scores `case` with `scoring`; `max_new_tokens` and `eos` are for generation.
pub fn score_case(
    model: &Model,
    tok: &Tokenizer,
    case: &CaseToScore,
    scoring: Scoring,
    max_new_tokens: usize,
    eos: &[u32],
) -> Result<CaseScore> {
    match scoring {
        Scoring::Generate => {
            let (output, stats) = greedy_answer(model, tok, case.prompt, max_new_tokens, eos)?;
            Ok(CaseScore {
                correct: answer_matches(&output, case.expected),
                output,
                content_tokens: 0,
                content_correct: 0,
                answer_logprob: None,
                prefill_secs: stats.prefill_secs,
                decode_secs: stats.decode_secs,
            })
        }
        Scoring::TeacherForced => {
            let answer = continuation_ids(
                tok,
                case.text,
                case.prompt,
                case.add_special,
                case.continuation,
            )
            .context("teacher-forced scoring")?;
            let tf = teacher_forced(model, tok, case.prompt, &answer)?;
            Ok(CaseScore {
                output: tok.decode(&tf.predicted, true)?,
                correct: tf.correct,
                content_tokens: tf.content_tokens,
                content_correct: tf.content_correct,
                answer_logprob: Some(tf.mean_logprob),
                prefill_secs: tf.secs,
                decode_secs: 0.0,
            })
        }
    }
}

/// Summary of a task's cases: exact match with its interval, and under teacher forcing the
/// graded figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalSummary {
    pub exact_match: Proportion,
    /// Content tokens (digits) of all answers that were the argmax, pooled over the cases;
    /// teacher-forced only.
    pub digit_accuracy: Option<f64>,
    /// Mean over the cases of the mean answer-token log-probability; teacher-forced only.
    pub mean_answer_logprob: Option<f64>,
}

impl RetrievalSummary {
    /// From each case's (correct, content tokens, content tokens right, answer log-prob).
    pub fn from_cases(cases: impl IntoIterator<Item = (bool, usize, usize, Option<f64>)>) -> Self {
        let (mut n, mut ok, mut tok, mut tok_ok) = (0, 0, 0, 0);
        let mut lps = Vec::new();
        for (correct, content, content_ok, lp) in cases {
            n += 1;
            ok += correct as usize;
            tok += content;
            tok_ok += content_ok;
            lps.extend(lp);
        }
        RetrievalSummary {
            exact_match: Proportion::new(ok, n),
            digit_accuracy: (tok > 0).then(|| tok_ok as f64 / tok as f64),
            mean_answer_logprob: (!lps.is_empty() && lps.len() == n)
                .then(|| lps.iter().sum::<f64>() / n as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_names_round_trip() {
        for s in [Scoring::TeacherForced, Scoring::Generate] {
            assert_eq!(s.to_string().parse::<Scoring>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.to_string())
            );
        }
        assert!("greedy".parse::<Scoring>().is_err());
        assert_eq!(Scoring::default(), Scoring::TeacherForced);
    }

    #[test]
    fn word_continuation() {
        assert!(continues_word("4"));
        assert!(continues_word("ab"));
        assert!(!continues_word("."));
        assert!(!continues_word(" 4"));
        assert!(!continues_word("<|im_end|>"));
        assert!(!continues_word(""));
    }

    #[test]
    fn summary_of_hand_made_cases() {
        let s = RetrievalSummary::from_cases([
            (true, 7, 7, Some(-0.1)),
            (false, 7, 4, Some(-2.0)),
            (true, 7, 7, Some(-0.3)),
            (false, 7, 0, Some(-5.2)),
        ]);
        assert_eq!((s.exact_match.successes, s.exact_match.trials), (2, 4));
        assert_eq!(s.digit_accuracy, Some(18.0 / 28.0));
        assert!((s.mean_answer_logprob.unwrap() + 1.9).abs() < 1e-12);
        // Generation: no graded figures.
        let g = RetrievalSummary::from_cases([(true, 0, 0, None), (false, 0, 0, None)]);
        assert_eq!((g.digit_accuracy, g.mean_answer_logprob), (None, None));
        assert_eq!(g.exact_match.rate, 0.5);
    }
}
