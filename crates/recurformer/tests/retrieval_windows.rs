//! Synthetic retrieval windows (issue 18, part 3) built with the default model's tokenizer on real
//! training text: every window keeps its length, asks for something it contains, marks exactly the
//! answer, differs in wording and key format from the evaluation's needle, and is a pure function
//! of (seed, window index, base window).

mod common;
use anyhow::Result;
use common::*;
use recurformer::train::{retrieval_start, RetrievalWindows, TokenDocument, TrainData};
use std::collections::BTreeMap;

#[test]
fn retrieval_windows_ask_for_what_they_contain() -> Result<()> {
    let tok = recurformer::formats::tokenizer::Tokenizer::from_gguf(
        &recurformer::formats::gguf::GgufFile::open(&default_model())?,
    )?
    .expect("the default GGUF has a tokenizer");
    let text = std::fs::read_to_string(root().join("data/text/austen/emma.txt"))?;
    let text: String = text.chars().skip(30_000).take(60_000).collect();
    let stream = tok.encode(&text, false)?;
    let rw = RetrievalWindows::new(&tok)?;
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (len, n) in [(256usize, 240u64), (64, 60), (512, 30)] {
        for g in 0..n {
            let start = (g as usize * 997) % (stream.len() - len);
            let base = &stream[start..start + len];
            let w = rw.build(base, 11, g)?;
            assert_eq!(w.ids.len(), len, "window {g} ({})", w.kind);
            assert_eq!(w.answer.len(), len);
            assert_eq!(w, rw.build(base, 11, g)?, "window {g} is not deterministic");
            *kinds.entry(w.kind).or_default() += 1;
            // The answer is one run of tokens at the end of the window.
            let first = w.answer.iter().position(|&a| a).expect("an answer");
            assert!(w.answer[first..].iter().all(|&a| a), "window {g}: gaps");
            let answer = &w.ids[first..];
            let before = &w.ids[..first];
            let text_before = tok.decode(before, false)?;
            let lower = text_before.to_lowercase();
            assert!(
                !lower.contains("magic number") && !lower.contains("pass key"),
                "window {g} uses the evaluation's or the probe's wording"
            );
            match w.kind {
                "repeat" => {
                    // The answer tokens, with their 4-token cue, occur earlier as a whole.
                    let span = &w.ids[first - 4..];
                    assert!(
                        before[..first - 4].windows(span.len()).any(|x| x == span),
                        "window {g}: the repeated span is not in the text before it"
                    );
                }
                _ => {
                    let value = tok.decode(answer, false)?;
                    let value = value.trim();
                    assert!(!value.is_empty());
                    let seven_digits =
                        value.len() == 7 && value.bytes().all(|b| b.is_ascii_digit());
                    assert!(!seven_digits, "window {g}: the evaluation's key format");
                    assert!(
                        text_before.contains(value),
                        "window {g} ({}) asks for {value:?}, which it does not contain:\n{text_before}",
                        w.kind
                    );
                    // The question is about this value, and a fact / list entry holds it: the
                    // value occurs exactly once before the question.
                    assert_eq!(text_before.matches(value).count(), 1, "window {g}");
                }
            }
            // Row weights fall on the rows that predict answer tokens.
            let wts = w.row_weights(5.0);
            for (r, &x) in wts.iter().enumerate() {
                let expect = if r + 1 < len && w.answer[r + 1] {
                    5.0
                } else {
                    1.0
                };
                assert_eq!(x, expect, "window {g} row {r}");
            }
        }
    }
    println!("kinds: {kinds:?}");
    for k in ["facts", "list", "repeat"] {
        assert!(kinds.get(k).copied().unwrap_or(0) >= 20, "{k}: {kinds:?}");
    }
    Ok(())
}

/// Retrieval text never comes from the evaluation's needle haystack, and is drawn uniformly from
/// the documents it may use, whole windows inside one document.
#[test]
fn retrieval_text_avoids_the_evaluation_haystack() -> Result<()> {
    let essays = root().join("data/text/paul_graham");
    let essay = std::fs::read_dir(&essays)?
        .next()
        .expect("the essays are fetched by scripts/setup.sh")?
        .path();
    let doc = |source: String, n: usize, id: u32| TokenDocument {
        source,
        ids: vec![id; n],
    };
    let novel = root().join("data/text/austen/emma.txt");
    let data = TrainData::new(
        &[
            doc(novel.display().to_string(), 300, 5),
            doc(essay.display().to_string(), 900, 6),
            doc("notes.jsonl:3".into(), 100, 7),
        ],
        &[doc("held".into(), 100, 8)],
        Some(2),
    );
    assert_eq!(data.retrieval_ok, vec![true, false, true]);
    let starts = data.retrieval_starts(64);
    // Emma: tokens 0..301 (EOS included) -> starts 0..238; the essay is skipped; the note
    // (1202..1303) -> 1202..1240.
    assert_eq!(starts, vec![0..238, 1202..1240]);
    let total: usize = starts.iter().map(|r| r.len()).sum();
    let mut hits = [0usize; 2];
    for g in 0..4000 {
        let s0 = retrieval_start(&starts, total, 3, g);
        assert_eq!(s0, retrieval_start(&starts, total, 3, g));
        let i = starts
            .iter()
            .position(|r| r.contains(&s0))
            .unwrap_or_else(|| panic!("start {s0} outside the allowed ranges"));
        assert!(
            !data.train[s0..s0 + 64].contains(&6),
            "essay tokens in window {g}"
        );
        hits[i] += 1;
    }
    // Uniform over the 276 allowed starts: 238 / 276 of the draws in Emma.
    let share = hits[0] as f64 / 4000.0;
    assert!((share - 238.0 / 276.0).abs() < 0.03, "{hits:?}");
    Ok(())
}
