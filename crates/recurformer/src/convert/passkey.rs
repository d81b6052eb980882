//! Synthetic passkey prompts for the copy probe (`convert::probes`), teacher forced.
//!
//! The format follows the passkey task of Mohtashami & Jaggi 2023 ("Landmark Attention",
//! arXiv:2305.16300): a key of `key_digits` digits stated once in filler text, asked for at the
//! end. It deliberately differs from the evaluation's needle task (`eval::tasks`: Paul Graham
//! essays, "The special magic number is ..." with 7-digit values), so that choosing heads on these
//! prompts does not tune the plan to the evaluation's template: the haystack is prose from the
//! calibration files (by default Austen without Persuasion, which is held out), the wording is
//! below, the keys have 5 digits by default.
//!
//! Prompts are assembled from separately tokenised pieces, so the key's tokens in the needle and
//! in the answer are the same ids and the source of answer token j is exactly the needle's key
//! token j.

use crate::convert::probes::{CopyCase, CopySet, CopySettings};
use crate::formats::tokenizer::ChatMessage;
use crate::formats::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Opens the prompt (encoded with the tokenizer's special tokens, BOS where it asks for one).
pub const PASSKEY_INTRO: &str =
    "Read the passage below. Somewhere in it is a pass key; you will be asked for it.\n\n";
/// The needle, `{key}` standing for the key. Inserted after a sentence end of the haystack.
pub const PASSKEY_NEEDLE: &str = " The pass key is {key}. Remember it.";
/// Closes the prompt; the answer (the key's tokens) follows it directly.
pub const PASSKEY_QUESTION: &str = "\n\nWhat is the pass key? The pass key is ";
/// With chat framing: the question closes the user's turn ...
pub const PASSKEY_CHAT_QUESTION: &str = "\n\nWhat is the pass key?";
/// ... and the assistant's turn opens with this, the key's tokens directly after.
pub const PASSKEY_CHAT_ANSWER: &str = "The pass key is ";

/// Where the needle may go, as fractions of the filler: [`PasskeyOptions::depth`]'s default.
pub const PASSKEY_DEPTH: [f64; 2] = [0.1, 0.9];

/// Options of [`passkey_cases`].
#[derive(Debug, Clone)]
pub struct PasskeyOptions {
    pub prompts: usize,
    /// Prompt tokens before the answer (exact).
    pub prompt_len: usize,
    pub key_digits: usize,
    pub seed: u64,
    /// Names of the haystack files (recorded in the report).
    pub haystack_files: Vec<String>,
    /// Frame the prompt as one user turn of the model's chat template (system prompt included
    /// where the template writes one), the answer opening the assistant's turn.
    pub chat: bool,
    /// The needle's depth is drawn uniformly from this range of the filler ([`PASSKEY_DEPTH`]).
    pub depth: [f64; 2],
}

/// One way of hiding a key in a haystack and asking for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wording {
    /// Short name, recorded in reports.
    pub name: &'static str,
    /// Opens the prompt (encoded with the tokenizer's special tokens, BOS where it asks for one).
    pub intro: &'static str,
    /// The needle, `{key}` standing for the key. Inserted after a sentence end of the haystack.
    pub needle: &'static str,
    /// Closes the plain-text prompt; the key's tokens follow directly.
    pub question: &'static str,
    /// With chat framing: closes the user's turn ...
    pub chat_question: &'static str,
    /// ... and opens the assistant's, the key's tokens directly after.
    pub chat_answer: &'static str,
}

/// The pass-key wording (the only one of [`PromptFamily::Passkey`]).
pub const PASSKEY: Wording = Wording {
    name: "pass key",
    intro: PASSKEY_INTRO,
    needle: PASSKEY_NEEDLE,
    question: PASSKEY_QUESTION,
    chat_question: PASSKEY_CHAT_QUESTION,
    chat_answer: PASSKEY_CHAT_ANSWER,
};

/// The wordings of [`PromptFamily::Varied`]: the pass key and three others that differ from it
/// and from the evaluation's needle ("special magic number") in every sentence: a code stated as
/// a fact, a reference number in brackets, a phone extension tied to a name. In those three the
/// answer is asked for in other words than the needle's ("The safe opens with the code" for "The
/// code that opens the safe is"), so the token before the key never repeats the needle's: the
/// answer must be found by what it means, not by copying what followed the same words (an
/// induction match), as in the evaluation's needle, whose answer prefix ("... mentioned in the
/// text above is") does not repeat its sentence either. Key lengths vary with them
/// ([`PromptFamily::Varied`]).
pub const VARIED_WORDINGS: [Wording; 4] = [
    PASSKEY,
    Wording {
        name: "safe code",
        intro: "The text below is long. One sentence in it gives the code that opens a safe; \
                keep the code in mind.\n\n",
        needle: " The code that opens the safe is {key}.",
        question: "\n\nWhich code opens the safe? The safe opens with the code ",
        chat_question: "\n\nWhich code opens the safe?",
        chat_answer: "The safe opens with the code ",
    },
    Wording {
        name: "reference number",
        intro: "Please read this document carefully. It mentions a reference number that will \
                matter later.\n\n",
        needle: " (Reference number: {key}.)",
        question: "\n\nWhat was the reference number? The reference number given was ",
        chat_question: "\n\nWhat was the reference number?",
        chat_answer: "The reference number given was ",
    },
    Wording {
        name: "extension",
        intro: "Here is a passage with a telephone extension hidden inside it. You will need it \
                at the end.\n\n",
        needle: " Dr. Ellison can be reached at extension {key}.",
        question: "\n\nAt which extension can Dr. Ellison be reached? Dr. Ellison's extension \
                   number is ",
        chat_question: "\n\nAt which extension can Dr. Ellison be reached?",
        chat_answer: "Dr. Ellison's extension number is ",
    },
];

/// Which prompts `plan` measures groups on (its ranking, refinement and check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFamily {
    /// One wording ([`PASSKEY`]), one haystack, keys of exactly `key_digits` digits.
    #[default]
    Passkey,
    /// Prompt n uses wording `n % 4` of [`VARIED_WORDINGS`] and haystack `(n + n / 4) % H` of the
    /// H given (every wording meets every haystack within 4H prompts), keys of `key_digits` - 1,
    /// `key_digits` or `key_digits` + 1 digits: choices made on it cannot fit one wording or one
    /// kind of text.
    Varied,
}

impl PromptFamily {
    pub fn name(self) -> &'static str {
        match self {
            PromptFamily::Passkey => "passkey",
            PromptFamily::Varied => "varied",
        }
    }
}

/// Token pieces that frame the haystack: before it, and after it up to the key's answer.
fn framing(tok: &Tokenizer, w: &Wording, chat: bool) -> Result<(Vec<u32>, Vec<u32>)> {
    if !chat {
        return Ok((tok.encode(w.intro, true)?, tok.encode(w.question, false)?));
    }
    const MARK: &str = "\u{1}PASSKEY-BODY\u{1}";
    let content = format!("{}{MARK}{}", w.intro, w.chat_question);
    let rendered = tok.apply_chat_template(
        &[ChatMessage {
            role: "user".into(),
            content,
        }],
        true,
    )?;
    let (before, after) = rendered.split_once(MARK).with_context(|| {
        "passkey prompts: the chat template does not copy the user message verbatim; run the \
         check without chat framing"
    })?;
    // The template writes any BOS itself.
    Ok((
        tok.encode(before, false)?,
        tok.encode(&format!("{after}{}", w.chat_answer), false)?,
    ))
}

/// `prompts` passkey prompts of exactly `prompt_len` tokens plus the answer, cut from
/// `haystack` (a token stream of prose; windows holding `eos` are redrawn). The needle goes after
/// the first sentence end at or past a depth drawn uniformly from `o.depth` of the filler.
pub fn passkey_cases(
    tok: &Tokenizer,
    haystack: &[u32],
    eos: Option<u32>,
    o: &PasskeyOptions,
) -> Result<CopySet> {
    family_cases(tok, &[haystack], eos, o, PromptFamily::Passkey)
}

/// [`passkey_cases`] of a [`PromptFamily`]: for [`PromptFamily::Varied`] the wordings, key
/// lengths and `haystacks` (one token stream each; `o.haystack_files` names them in the same
/// order) alternate from prompt to prompt; [`PromptFamily::Passkey`] uses the first haystack only.
pub fn family_cases(
    tok: &Tokenizer,
    haystacks: &[&[u32]],
    eos: Option<u32>,
    o: &PasskeyOptions,
    family: PromptFamily,
) -> Result<CopySet> {
    if o.prompts == 0 || !(1..=12).contains(&o.key_digits) {
        bail!(
            "passkey prompts: need >= 1 prompt and 1..=12 key digits (got {} prompts, {} digits)",
            o.prompts,
            o.key_digits
        );
    }
    if family == PromptFamily::Varied && !(2..=11).contains(&o.key_digits) {
        bail!(
            "varied passkey prompts: keys of {} digits +- 1 need 2..=11 digits",
            o.key_digits
        );
    }
    if haystacks.is_empty() {
        bail!("passkey prompts: no haystack given");
    }
    let [d0, d1] = o.depth;
    if !(0.0..=1.0).contains(&d0) || !(0.0..=1.0).contains(&d1) || d0 > d1 {
        bail!("passkey prompts: the depth range {d0}..{d1} must lie within 0..1, low end first");
    }
    let wordings: &[Wording] = match family {
        PromptFamily::Passkey => &[PASSKEY],
        PromptFamily::Varied => &VARIED_WORDINGS,
    };
    let hay_count = match family {
        PromptFamily::Passkey => 1,
        PromptFamily::Varied => haystacks.len(),
    };
    let ends: Vec<u32> = [".", "!", "?"]
        .iter()
        .filter_map(|s| tok.encode(s, false).ok())
        .filter(|v| v.len() == 1)
        .map(|v| v[0])
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut cases = Vec::with_capacity(o.prompts);
    // Per wording, tokenised once: (intro, question) framing and the needle's text before and
    // after the key.
    let pieces = wordings
        .iter()
        .map(|w| {
            let (before, after) = w
                .needle
                .split_once("{key}")
                .expect("the needle names {key}");
            Ok((
                framing(tok, w, o.chat)?,
                (tok.encode(before, false)?, tok.encode(after, false)?),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    for n in 0..o.prompts {
        let w = &wordings[n % wordings.len()];
        let ((intro, question), (nb, na)) = &pieces[n % wordings.len()];
        let h = (n + n / wordings.len()) % hay_count;
        let haystack = haystacks[h];
        let digits = match family {
            PromptFamily::Passkey => o.key_digits,
            PromptFamily::Varied => o.key_digits - 1 + rng.random_range(0..3usize),
        };
        let key: String = (0..digits)
            .map(|i| {
                let d = if i == 0 {
                    rng.random_range(1..10)
                } else {
                    rng.random_range(0..10)
                };
                char::from(b'0' + d as u8)
            })
            .collect();
        let key_ids = tok.encode(&key, false)?;
        let fixed = intro.len() + nb.len() + key_ids.len() + na.len() + question.len();
        if o.prompt_len < fixed + 16 || haystack.len() < o.prompt_len {
            bail!(
                "passkey prompt {n} ({}): {} tokens leave fewer than 16 for the filler after the \
                 {fixed} of the wording and key (or the haystack {} has only {} tokens)",
                w.name,
                o.prompt_len,
                o.haystack_files.get(h).map_or("given", String::as_str),
                haystack.len()
            );
        }
        let body_len = o.prompt_len - fixed;
        let mut start = rng.random_range(0..=haystack.len() - body_len);
        for _ in 0..100 {
            if eos.is_none_or(|e| !haystack[start..start + body_len].contains(&e)) {
                break;
            }
            start = rng.random_range(0..=haystack.len() - body_len);
        }
        let body = &haystack[start..start + body_len];
        let depth: f64 = if d1 > d0 {
            rng.random_range(d0..d1)
        } else {
            d0
        };
        let at = (depth * body_len as f64).round() as usize;
        // After the next sentence end within 64 tokens, else at the depth itself.
        let cut = (at..body_len.min(at + 64))
            .find(|&i| ends.contains(&body[i]))
            .map_or(at, |i| i + 1);
        let mut ids = intro.clone();
        ids.extend_from_slice(&body[..cut]);
        ids.extend_from_slice(&nb);
        let key_at = ids.len();
        ids.extend_from_slice(&key_ids);
        ids.extend_from_slice(&na);
        ids.extend_from_slice(&body[cut..]);
        ids.extend_from_slice(&question);
        let answer_start = ids.len();
        debug_assert_eq!(answer_start, o.prompt_len);
        ids.extend_from_slice(&key_ids);
        cases.push(CopyCase {
            ids,
            answer_start,
            sources: (key_at..key_at + key_ids.len()).collect(),
        });
    }
    let needle = match family {
        PromptFamily::Passkey => PASSKEY_NEEDLE.trim().to_string(),
        PromptFamily::Varied => VARIED_WORDINGS
            .iter()
            .map(|w| w.needle.trim())
            .collect::<Vec<_>>()
            .join(" | "),
    };
    Ok(CopySet {
        settings: CopySettings {
            prompts: o.prompts,
            prompt_len: o.prompt_len,
            key_digits: o.key_digits,
            seed: o.seed,
            haystack: o.haystack_files.clone(),
            needle,
            answer_tokens: 0,
            model_token_accuracy: 0.0,
            model_exact: 0,
        },
        cases,
    })
}
