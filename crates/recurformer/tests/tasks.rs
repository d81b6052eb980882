//! Long-context task generators and scoring: the needle sits at the stated depth, a HashHop query
//! has its answer exactly k hops away, prompts have exactly the requested number of tokens of the
//! default model's tokenizer, cases are deterministic in the seed, and the grid runner and the
//! heatmap produce well-formed output.

mod common;
use anyhow::{Context, Result};
use common::*;
use recurformer::eval::tasks::*;
use recurformer::formats::tokenizer::Tokenizer;
use std::collections::{HashMap, HashSet};
use std::path::Path;

fn tokenizer() -> Result<Tokenizer> {
    let g = recurformer::formats::gguf::GgufFile::open(&default_model())?;
    Tokenizer::from_gguf(&g)?.context("the default model carries no tokenizer")
}

/// Byte indices just after every sentence end of `s`: `.`, `!` or `?` and any closing quotes or
/// brackets, followed by whitespace (the generator's rule, written again here).
fn sentence_ends(s: &str) -> Vec<usize> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if matches!(b[i], b'.' | b'!' | b'?') {
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'"' | b'\'' | b')' | b']') {
                j += 1;
            }
            // Curly closing quotes are three bytes each.
            while s[j..].starts_with(['\u{201d}', '\u{2019}']) {
                j += 3;
            }
            if s[j..].starts_with(char::is_whitespace) {
                out.push(j);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Token lengths of the sentence of `text` right before byte `at` (where the needle starts) and
/// of the one right after byte `end` (where it ends).
fn neighbour_sentence_tokens(
    tok: &Tokenizer,
    text: &str,
    at: usize,
    end: usize,
) -> Result<(usize, usize)> {
    let before = &text[..at];
    let ends = sentence_ends(before);
    let b_start = ends
        .iter()
        .rev()
        .find(|&&e| e < before.trim_end().len())
        .copied()
        .unwrap_or(0);
    let after = &text[end..];
    let a_end = sentence_ends(after).first().copied().unwrap_or(after.len());
    Ok((
        tok.encode(&before[b_start..], false)?.len(),
        tok.encode(&after[..a_end], false)?.len(),
    ))
}

#[test]
fn needle_is_exact_in_length_at_its_depth_and_deterministic() -> Result<()> {
    let tok = tokenizer()?;
    let hay = Haystack::paul_graham()?;
    let t0 = std::time::Instant::now();
    let mut n = 0;
    for chat in [true, false] {
        for &len in &[200usize, 777, 1024, 2048, 4096] {
            for (i, &depth) in [0.0, 0.25, 0.5, 0.75, 1.0].iter().enumerate() {
                let params = NeedleParams {
                    context_tokens: len,
                    depth,
                    seed: 11 + i as u64,
                    chat,
                };
                let c = needle_prompt(&tok, &hay, &params)?;
                n += 1;
                let what = format!("len {len} depth {depth} chat {chat}");
                // Exact length, and the ids are the tokenisation of the text.
                assert_eq!(c.prompt.len(), len, "{what}");
                assert_eq!(tok.encode(&c.text, !chat)?, c.prompt, "{what}");
                // The value appears once, inside the needle, which sits between sentences.
                assert_eq!(c.value.len(), 7);
                assert_eq!(c.text.matches(&c.value).count(), 1, "{what}");
                assert_eq!(c.text.matches(&c.needle).count(), 1, "{what}");
                let at = c.text.find(&c.needle).unwrap();
                let end = at + c.needle.len();
                let prev = c.text[..at].trim_end();
                assert!(
                    prev.ends_with(['.', '!', '?', '"', '\'', ')', ']', '\u{201d}', '\u{2019}'])
                        || c.text[..at].ends_with(NEEDLE_INTRO),
                    "{what}: needle follows {:?}",
                    &prev[prev.len().saturating_sub(30)..]
                );
                assert!(
                    c.text[end..].starts_with(char::is_whitespace),
                    "{what}: needle followed by {:?}",
                    &c.text[end..end + 20]
                );
                // The needle's tokens decode to the needle.
                let piece = tok.decode(
                    &c.prompt[c.needle_position..c.needle_position + c.needle_tokens],
                    false,
                )?;
                assert_eq!(piece.trim(), c.needle, "{what}");
                // Depth: the target position lies within one sentence of the needle.
                let target = c.haystack_start as f64 + depth * c.haystack_tokens as f64;
                let (lb, la) = neighbour_sentence_tokens(&tok, &c.text, at, end)?;
                let lo = c.needle_position as f64 - lb as f64 - 1.0;
                let hi = (c.needle_position + c.needle_tokens) as f64 + la as f64 + 1.0;
                assert!(
                    (lo..=hi).contains(&target),
                    "{what}: needle at token {} (+{}), target {target:.0}, sentences {lb}/{la}",
                    c.needle_position,
                    c.needle_tokens
                );
                if depth == 0.0 {
                    assert_eq!(c.needle_position, c.haystack_start, "{what}");
                }
                assert!(
                    (c.depth_actual - depth).abs() < 0.2 || len < 300,
                    "{what}: {}",
                    c.depth_actual
                );
                // The haystack is most of the prompt.
                assert!(c.haystack_tokens + c.needle_tokens + 120 >= len, "{what}");
            }
        }
    }
    println!("{n} needle prompts in {:.2} s", t0.elapsed().as_secs_f64());

    // Same seed, same case; another seed, another value and offset.
    let p = NeedleParams {
        context_tokens: 1500,
        depth: 0.5,
        seed: 3,
        chat: true,
    };
    let a = needle_prompt(&tok, &hay, &p)?;
    assert_eq!(a, needle_prompt(&tok, &hay, &p)?);
    let b = needle_prompt(
        &tok,
        &hay,
        &NeedleParams {
            seed: 4,
            ..p.clone()
        },
    )?;
    assert_ne!(a.value, b.value);
    assert_ne!(a.haystack_offset, b.haystack_offset);
    // Same seed at another depth: same value and haystack, needle elsewhere.
    let c = needle_prompt(
        &tok,
        &hay,
        &NeedleParams {
            depth: 0.9,
            ..p.clone()
        },
    )?;
    assert_eq!(
        (a.value.as_str(), a.haystack_offset),
        (c.value.as_str(), c.haystack_offset)
    );
    assert!(c.needle_position > a.needle_position + 300);

    // Too short to hold the framing.
    let e = needle_prompt(
        &tok,
        &hay,
        &NeedleParams {
            context_tokens: 40,
            ..p.clone()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("too short"), "{e:#}");
    let e = needle_prompt(&tok, &hay, &NeedleParams { depth: 1.5, ..p }).unwrap_err();
    assert!(format!("{e:#}").contains("1.5"), "{e:#}");
    Ok(())
}

/// Parses `lhs = rhs` lines of `hash_len` characters of [a-z0-9] from a prompt's text.
fn parse_assignments(text: &str, hash_len: usize) -> Vec<(String, String)> {
    let is_hash = |s: &str| {
        s.len() == hash_len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    text.lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(" = ")?;
            (is_hash(a) && is_hash(b)).then(|| (a.to_string(), b.to_string()))
        })
        .collect()
}

#[test]
fn hashhop_answer_is_k_hops_away_and_length_is_exact() -> Result<()> {
    let tok = tokenizer()?;
    let t0 = std::time::Instant::now();
    for chat in [true, false] {
        for &len in &[300usize, 1000, 2048, 4096] {
            for hops in 1..=3 {
                let params = HashHopParams {
                    context_tokens: len,
                    hops,
                    seed: 5 + hops as u64,
                    chat,
                    hash_len: 8,
                };
                let c = hashhop_case(&tok, &params)?;
                let what = format!("len {len} hops {hops} chat {chat}");
                assert_eq!(c.prompt.len(), len, "{what}");
                assert_eq!(tok.encode(&c.text, !chat)?, c.prompt, "{what}");

                // Read the assignments back from the text alone.
                let lines = parse_assignments(&c.text, 8);
                assert_eq!(lines, c.assignments, "{what}");
                let lhs: HashMap<&str, &str> = lines
                    .iter()
                    .map(|(a, b)| (a.as_str(), b.as_str()))
                    .collect();
                assert_eq!(lhs.len(), lines.len(), "{what}: a hash is assigned twice");
                let rhs: HashSet<&str> = lines.iter().map(|(_, b)| b.as_str()).collect();
                assert_eq!(
                    rhs.len(),
                    lines.len(),
                    "{what}: a hash is the value of two lines"
                );
                // Every drawn hash is distinct: a hash is on two lines only as one chain's link.
                let all: Vec<&str> = lines
                    .iter()
                    .flat_map(|(a, b)| [a.as_str(), b.as_str()])
                    .collect();
                let distinct: HashSet<&str> = all.iter().copied().collect();
                let links = lines
                    .iter()
                    .filter(|(_, b)| lhs.contains_key(b.as_str()))
                    .count();
                assert_eq!(distinct.len(), all.len() - links, "{what}");

                // The prompt ends with the query's line left open, after the instruction; the
                // query is written nowhere else than in its own assignment.
                let q_at = c
                    .text
                    .find(&hashhop_question(hops))
                    .context("instruction")?;
                assert!(c.text.ends_with(&format!("\n{} =", c.query)), "{what}");
                assert!(c.text.rfind(&c.query).unwrap() > q_at, "{what}");
                assert_eq!(c.text.matches(&c.query).count(), 2, "{what}");
                // Following the query k times gives the answer, and the chain stops there.
                assert!(
                    !rhs.contains(c.query.as_str()),
                    "{what}: the query is not a chain start"
                );
                let mut h = c.query.as_str();
                for k in 0..hops {
                    h = lhs
                        .get(h)
                        .with_context(|| format!("{what}: chain breaks at hop {k}"))?;
                    assert_eq!(h, c.chain[k + 1], "{what}");
                }
                assert_eq!(h, c.answer, "{what}");
                assert!(
                    !lhs.contains_key(h),
                    "{what}: the chain goes on past the answer"
                );
                assert_eq!(c.text.matches(&c.answer).count(), 1, "{what}");
                for (k, &i) in c.chain_lines.iter().enumerate() {
                    assert_eq!(lines[i], (c.chain[k].clone(), c.chain[k + 1].clone()));
                }
                if len >= 1000 {
                    assert!(c.full_chains > 10, "{what}: {} chains", c.full_chains);
                }
            }
        }
    }
    println!("24 HashHop prompts in {:.2} s", t0.elapsed().as_secs_f64());

    // Deterministic; the lines are shuffled (the query's chain is not simply first).
    let p = HashHopParams {
        context_tokens: 1200,
        hops: 2,
        seed: 9,
        chat: false,
        hash_len: 8,
    };
    let a = hashhop_case(&tok, &p)?;
    assert_eq!(a, hashhop_case(&tok, &p)?);
    let b = hashhop_case(
        &tok,
        &HashHopParams {
            seed: 10,
            ..p.clone()
        },
    )?;
    assert_ne!(a.answer, b.answer);
    let cases: Vec<_> = (0..6)
        .map(|s| {
            hashhop_case(
                &tok,
                &HashHopParams {
                    seed: s,
                    ..p.clone()
                },
            )
        })
        .collect::<Result<_>>()?;
    assert!(cases.iter().any(|c| c.chain_lines[0] > 10));
    let e = hashhop_case(
        &tok,
        &HashHopParams {
            context_tokens: 30,
            ..p.clone()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("too short"), "{e:#}");
    assert!(hashhop_case(&tok, &HashHopParams { hops: 0, ..p }).is_err());
    Ok(())
}

#[test]
fn scoring_on_hand_made_outputs() {
    // Exact, embedded, wrong, empty.
    assert!(answer_matches("4817263", "4817263"));
    assert!(answer_matches(" 4817263.", "4817263"));
    assert!(answer_matches(
        "The special magic number is 4817263, as stated.",
        "4817263"
    ));
    assert!(!answer_matches(
        "The special magic number is 4817264.",
        "4817263"
    ));
    assert!(!answer_matches("48172630", "4817263"));
    assert!(!answer_matches("", "4817263"));
    // HashHop: the answer anywhere, including at the end of a written-out chain.
    assert!(answer_matches(" k3v9q0aa", "k3v9q0aa"));
    assert!(answer_matches(" p1x2z3w4 = k3v9q0aa\n", "k3v9q0aa"));
    assert!(!answer_matches(" p1x2z3w4", "k3v9q0aa"));
    assert!(!answer_matches(" k3v9q0aab", "k3v9q0aa"));
    assert!(!answer_matches("", "k3v9q0aa"));
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn needle_heatmap_is_a_png_of_the_expected_size() -> Result<()> {
    let contexts = vec![1024, 2048, 4096, 8192];
    let depths = vec![0.0, 0.25, 0.5, 0.75, 1.0];
    let mut cells = Vec::new();
    for (i, &context) in contexts.iter().enumerate() {
        for (j, &depth) in depths.iter().enumerate() {
            let correct = (i + j) % 3;
            cells.push(NeedleCell {
                context,
                depth,
                samples: 2,
                correct: correct.min(2),
                accuracy: correct.min(2) as f64 / 2.0,
            });
        }
    }
    cells.pop(); // one cell without cases is drawn grey
    let r = NeedleResults {
        contexts,
        depths,
        samples: 2,
        seed: 0,
        chat: true,
        scoring: Scoring::TeacherForced,
        max_new_tokens: 16,
        accuracy: 0.5,
        summary: RetrievalSummary::from_cases((0..38).map(|i| (i % 2 == 0, 7, 5, Some(-1.0)))),
        cells,
        cases: vec![],
    };
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("needle.png");
    recurformer::report::needle_heatmap(&r, "smollm2-135m-instruct-q4_1.gguf", &p)?;
    assert_eq!(png_size(&p), recurformer::report::needle_heatmap_size(&r));
    // Another grid, another size; the figure changes with the numbers.
    let mut r2 = r.clone();
    r2.cells[0].accuracy = 1.0;
    r2.cells[0].correct = 2;
    let p2 = dir.path().join("needle2.png");
    recurformer::report::needle_heatmap(&r2, "x", &p2)?;
    assert_ne!(std::fs::read(&p)?, std::fs::read(&p2)?);
    let empty = NeedleResults {
        contexts: vec![],
        ..r.clone()
    };
    assert!(recurformer::report::needle_heatmap(&empty, "x", &dir.path().join("e.png")).is_err());
    if let Ok(keep) = std::env::var("RECURFORMER_KEEP_FIGURES") {
        std::fs::copy(&p, Path::new(&keep).join("needle.png"))?;
    }
    Ok(())
}

#[test]
fn run_needle_end_to_end_on_the_default_model() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let tok = loaded.tokenizer()?;
    let cfg = NeedleConfig {
        contexts: vec![256],
        depths: vec![0.0, 1.0],
        samples: 1,
        seed: 1,
        chat: true,
        scoring: Scoring::Generate,
        max_new_tokens: 12,
        ..Default::default()
    };
    let mut calls = 0;
    let t0 = std::time::Instant::now();
    let r = run_needle(&loaded.model, tok, &cfg, &mut |_| calls += 1)?;
    println!(
        "run_needle 256 x 2 depths in {:.1} s: {:?}",
        t0.elapsed().as_secs_f64(),
        r.cases
            .iter()
            .map(|c| (&c.value, &c.output, c.correct))
            .collect::<Vec<_>>()
    );
    assert_eq!(calls, cfg.cases());
    assert_eq!(r.cells.len(), 2);
    assert_eq!(r.cases.len(), 2);
    for c in &r.cases {
        assert_eq!(c.correct, answer_matches(&c.output, &c.value));
        assert!(c.prefill_secs > 0.0);
    }
    let acc = r.cases.iter().filter(|c| c.correct).count() as f64 / 2.0;
    assert_eq!(r.accuracy, acc);
    assert!(r.cell(256, 1.0).is_some() && r.cell(256, 0.5).is_none());
    // Serialisable for the report.
    let v = serde_json::to_value(&r)?;
    assert_eq!(v["cells"][0]["context"], 256);
    let back: NeedleResults = serde_json::from_value(v)?;
    assert_eq!(back, r);
    assert_eq!(r.summary.exact_match.trials, 2);
    assert_eq!(r.summary.digit_accuracy, None);

    // The same cases teacher-forced: the same verdicts here (the model answers in the expected
    // form), plus the graded figures; no decode time.
    let tf = run_needle(
        &loaded.model,
        tok,
        &NeedleConfig {
            scoring: Scoring::TeacherForced,
            ..cfg.clone()
        },
        &mut |_| {},
    )?;
    for (g, t) in r.cases.iter().zip(&tf.cases) {
        assert_eq!((g.value.as_str(), g.correct), (t.value.as_str(), t.correct));
        assert_eq!(t.digits, 7);
        assert!(t.answer_logprob.is_some_and(|x| x <= 0.0) && t.decode_secs == 0.0);
        if t.correct {
            assert_eq!(t.digits_correct, 7);
            assert!(
                t.output.starts_with(&format!(" {}", t.value)),
                "{}",
                t.output
            );
        }
    }
    assert_eq!(
        tf.summary.exact_match.successes,
        r.summary.exact_match.successes
    );
    assert!(tf.summary.digit_accuracy.is_some() && tf.summary.mean_answer_logprob.is_some());
    Ok(())
}

/// One real needle case at 1024 tokens on the default model (run with `--ignored`; prints time).
#[test]
#[ignore]
fn needle_and_hashhop_timing_at_1024() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let tok = loaded.tokenizer()?;
    let t0 = std::time::Instant::now();
    let r = run_needle(
        &loaded.model,
        tok,
        &NeedleConfig {
            contexts: vec![1024],
            depths: vec![0.5],
            ..Default::default()
        },
        &mut |_| {},
    )?;
    let c = &r.cases[0];
    println!(
        "needle 1024: {:.1} s total (prefill {:.1} s, decode {:.2} s), value {} output {:?} correct {}",
        t0.elapsed().as_secs_f64(),
        c.prefill_secs,
        c.decode_secs,
        c.value,
        c.output,
        c.correct
    );
    let t0 = std::time::Instant::now();
    let h = run_hashhop(
        &loaded.model,
        tok,
        &HashHopConfig {
            contexts: vec![1024],
            hops: vec![1, 2],
            samples: 3,
            ..Default::default()
        },
        &mut |_| {},
    )?;
    for c in &h.cases {
        println!(
            "hashhop 1024 hops {}: prefill {:.1} s decode {:.2} s, answer {} output {:?} correct {}",
            c.hops, c.prefill_secs, c.decode_secs, c.answer, c.output, c.correct
        );
    }
    println!("hashhop total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Lengths fit exactly for many seeds, short and long, with and without the chat template.
/// (A wider sweep, 40 seeds x 180..16384 tokens x 1-3 hops, passed once in 38 s.)
#[test]
fn many_seeds_fit_exactly() -> Result<()> {
    let tok = tokenizer()?;
    let hay = Haystack::paul_graham()?;
    for seed in 100..112u64 {
        for &len in &[333usize, 1500] {
            let chat = seed % 2 == 0;
            let depth = (seed % 5) as f64 / 4.0;
            let c = needle_prompt(
                &tok,
                &hay,
                &NeedleParams {
                    context_tokens: len,
                    depth,
                    seed,
                    chat,
                },
            )?;
            assert_eq!(c.prompt.len(), len, "needle seed {seed} len {len}");
            let hops = 1 + (seed % 3) as usize;
            let h = hashhop_case(
                &tok,
                &HashHopParams {
                    context_tokens: len,
                    hops,
                    seed,
                    chat,
                    hash_len: 8,
                },
            )?;
            assert_eq!(h.prompt.len(), len, "hashhop seed {seed} len {len}");
        }
    }
    Ok(())
}
