//! Head probes and retrieval-protecting plans (`convert::probes`, `convert::protect`): on the tiny
//! model the protecting plan never replaces a group above its probe threshold and, with
//! protection off, is the recency-only plan byte for byte; on the default model the passkey
//! prompts are well formed and the probes find the copying heads; files written before the probes
//! still load.

mod common;
use anyhow::{Context, Result};
use common::*;
use rand::{Rng, SeedableRng};
use recurformer::convert::passkey::{
    family_cases, passkey_cases, PasskeyOptions, PromptFamily, VARIED_WORDINGS,
};
use recurformer::convert::probes::{
    probe_heads, CopyCase, CopySet, CopySettings, Probe, RepeatSet,
};
use recurformer::convert::protect::{default_rules, parse_rules, plan_protecting, Budget};
use recurformer::convert::recency::{Calibration, RecencyReport};
use recurformer::model::llama::Model;
use recurformer::model::plan::{Plan, ProtectRule};

/// Hand-made copy prompts for a byte-level model: random ids with a 4-token key at position 10,
/// three filler ids, then the key again as the answer.
fn byte_copy_cases(n: usize, seed: u64) -> CopySet {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cases = (0..n)
        .map(|_| {
            let mut ids: Vec<u32> = (0..40).map(|_| rng.random_range(3..256)).collect();
            let key: Vec<u32> = ids[10..14].to_vec();
            ids.extend([33, 63, 32]);
            let answer_start = ids.len();
            ids.extend(&key);
            CopyCase {
                ids,
                answer_start,
                sources: (10..14).collect(),
            }
        })
        .collect();
    CopySet {
        settings: CopySettings {
            prompts: n,
            prompt_len: 43,
            key_digits: 4,
            seed,
            haystack: vec!["random bytes".into()],
            needle: "{key}".into(),
            answer_tokens: 0,
            model_token_accuracy: 0.0,
            model_exact: 0,
        },
        cases,
    }
}

/// JSON values equal up to the last bits of floats (serde_json's parser may round the last
/// digit differently from the printer).
fn assert_same_json(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        (Array(x), Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                assert_same_json(x, y, &format!("{at}[{i}]"));
            }
        }
        (Object(x), Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}"
            );
            for (k, v) in x {
                assert_same_json(v, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

fn tiny_report(model: &Model) -> Result<RecencyReport> {
    let repeat = RepeatSet::generate(model.cfg.vocab_size, 3, 12, 3, 1)?;
    let mut report = recurformer::convert::analyze::analyze(
        model,
        &repeat.sequences,
        4,
        Calibration::default(),
        "tiny-llama",
        &mut |_| {},
    )?;
    report.probes = Some(probe_heads(
        model,
        Some(&repeat),
        Some(&byte_copy_cases(3, 2)),
        &mut |_| {},
    )?);
    report.validate()?;
    Ok(report)
}

/// Asserts that `plan` replaces no group that a threshold rule of `rules` picks.
fn assert_nothing_above_threshold_replaced(
    report: &RecencyReport,
    plan: &Plan,
    rules: &[ProtectRule],
) {
    let probes = report.probes.as_ref().unwrap();
    for rule in rules {
        let (Some(t), p) = (rule.min_score, Probe::parse(&rule.probe).unwrap()) else {
            continue;
        };
        for (l, g, s) in probes.group_scores(p) {
            if s >= t {
                assert!(
                    !plan.layers[l].mamba_groups.contains(&g),
                    "layer {l} group {g} has {} {s} >= {t} but is replaced",
                    rule.probe
                );
            }
        }
    }
}

#[test]
fn protecting_plans_on_the_tiny_model() -> Result<()> {
    let model = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let report = tiny_report(&model)?;
    // The probes are deterministic and survive a JSON round trip.
    assert_eq!(report, tiny_report(&model)?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("recency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    assert_same_json(
        &serde_json::to_value(RecencyReport::load(&path)?)?,
        &serde_json::to_value(&report)?,
        "recency.json",
    );

    let total = model.cfg.num_hidden_layers * model.cfg.num_key_value_heads;
    // The default rules, and rules at each probe's median group score, so that on this random
    // model some groups are protected whatever their scores.
    let probes = report.probes.as_ref().unwrap();
    let median_rules: Vec<ProtectRule> = Probe::ALL
        .iter()
        .map(|&p| {
            let mut s: Vec<f64> = probes.group_scores(p).iter().map(|x| x.2).collect();
            s.sort_by(f64::total_cmp);
            ProtectRule {
                probe: p.name().into(),
                min_score: Some(s[s.len() / 2]),
                top_k: None,
            }
        })
        .collect();
    for rules in [default_rules(), median_rules] {
        for budget in [Budget::Fraction(0.5), Budget::Threshold(0.0)] {
            let plan = plan_protecting(&report, budget, 0, &rules)?;
            plan.validate(&model.cfg)?;
            assert_nothing_above_threshold_replaced(&report, &plan, &rules);
            let prot = plan.rule.protection.as_ref().context("protection record")?;
            let unprotected = total - prot.protected.len();
            if budget == Budget::Fraction(0.5) {
                // The budget is filled from the unprotected groups as far as they go.
                assert_eq!(plan.replaced_groups(), (total / 2).min(unprotected));
            } else {
                // Threshold 0 asks for every group: exactly the unprotected ones are replaced.
                assert_eq!(plan.replaced_groups(), unprotected);
            }
        }
    }
    let plan = plan_protecting(
        &report,
        Budget::Threshold(0.0),
        0,
        &parse_rules("copy_mass:top1")?,
    )?;
    assert_eq!(plan.rule.protection.as_ref().unwrap().protected.len(), 1);

    // Protection off: the recency-only plan, the same plan.json byte for byte.
    for (budget, k) in [
        (Budget::Fraction(0.5), 0),
        (Budget::Fraction(0.75), 1),
        (Budget::Threshold(0.3), 0),
    ] {
        let off = plan_protecting(&report, budget, k, &parse_rules("none")?)?;
        let recency_only = match budget {
            Budget::Fraction(f) => Plan::by_fraction(&report, f, k)?,
            Budget::Threshold(t) => Plan::by_threshold(&report, t, k)?,
        };
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        off.save(&a)?;
        recency_only.save(&b)?;
        assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
        assert!(!std::fs::read_to_string(&a)?.contains("protection"));
    }
    Ok(())
}

#[test]
fn passkey_prompts_and_probes_on_the_default_model() -> Result<()> {
    use recurformer::formats::text::{load_documents, token_stream};
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let tok = loaded.tokenizer()?;
    let file = root().join("data/text/austen/northanger_abbey.txt");
    let stream = token_stream(&load_documents(&[file])?, tok, Some(2))?;
    let opts = PasskeyOptions {
        prompts: 3,
        prompt_len: 160,
        key_digits: 5,
        seed: 4,
        haystack_files: vec!["northanger_abbey.txt".into()],
        chat: false,
        depth: recurformer::convert::passkey::PASSKEY_DEPTH,
    };
    let set = passkey_cases(tok, &stream, Some(2), &opts)?;
    assert_eq!(set.cases.len(), 3);
    for c in &set.cases {
        assert_eq!(c.answer_start, 160);
        let answer = &c.ids[c.answer_start..];
        let key = tok.decode(answer, true)?;
        assert!(
            key.len() == 5 && key.chars().all(|d| d.is_ascii_digit()),
            "{key:?}"
        );
        let sources: Vec<u32> = c.sources.iter().map(|&s| c.ids[s]).collect();
        assert_eq!(sources, answer);
        let text = tok.decode(&c.ids[..c.answer_start], true)?;
        assert!(
            text.contains(&format!("The pass key is {key}. Remember it.")),
            "{text}"
        );
        assert!(
            text.ends_with("What is the pass key? The pass key is "),
            "{text}"
        );
        assert!(!text.contains("magic number"));
    }
    // Seeded.
    assert_eq!(
        set.cases,
        passkey_cases(tok, &stream, Some(2), &opts)?.cases
    );

    // Chat framing (the plan's check): one user turn of the template, the answer opening the
    // assistant's turn; the needle's depth range is honoured and the prompt length is exact.
    let chat = PasskeyOptions {
        chat: true,
        key_digits: 7,
        prompt_len: 600,
        depth: [0.0, 0.2],
        ..opts.clone()
    };
    let early = passkey_cases(tok, &stream, Some(2), &chat)?.cases;
    for c in &early {
        assert_eq!(c.answer_start, 600);
        let answer = &c.ids[c.answer_start..];
        let sources: Vec<u32> = c.sources.iter().map(|&s| c.ids[s]).collect();
        assert_eq!(sources, answer);
        assert_eq!(tok.decode(answer, true)?.len(), 7);
        let text = tok.decode(&c.ids[..c.answer_start], false)?;
        let (system, user) = text.split_once("<|im_start|>user\n").unwrap();
        assert!(system.contains("<|im_start|>system"), "{text}");
        assert!(
            user.ends_with(
                "What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is "
            ),
            "{text}"
        );
    }
    // The depth range is honoured: needles drawn from the first fifth of the filler lie before
    // those drawn from the last fifth (a needle waits for a sentence end at most 64 tokens).
    let late = passkey_cases(
        tok,
        &stream,
        Some(2),
        &PasskeyOptions {
            depth: [0.8, 1.0],
            ..chat.clone()
        },
    )?
    .cases;
    let last_early = early.iter().map(|c| c.sources[0]).max().unwrap();
    let first_late = late.iter().map(|c| c.sources[0]).min().unwrap();
    assert!(last_early < first_late, "{last_early} vs {first_late}");
    let bad = PasskeyOptions {
        depth: [0.5, 0.2],
        ..opts.clone()
    };
    let err = passkey_cases(tok, &stream, Some(2), &bad).unwrap_err();
    assert!(err.to_string().contains("depth range"), "{err}");

    // The varied family: every wording and both haystacks within 8 prompts, keys of 6-8 digits
    // answered exactly at the needle's tokens, the passkey family of `family_cases` is
    // `passkey_cases`, and no prompt borrows the evaluation's wording.
    let bible = root().join("data/text/kjv/bible.txt");
    let kjv = token_stream(&load_documents(&[bible])?, tok, Some(2))?;
    let varied = PasskeyOptions {
        prompts: 8,
        haystack_files: vec!["northanger_abbey.txt".into(), "bible.txt".into()],
        ..chat.clone()
    };
    let cases = family_cases(
        tok,
        &[&stream, &kjv],
        Some(2),
        &varied,
        PromptFamily::Varied,
    )?
    .cases;
    let mut seen = std::collections::BTreeSet::new();
    let mut lengths = std::collections::BTreeSet::new();
    for (n, c) in cases.iter().enumerate() {
        assert_eq!(c.answer_start, 600);
        let answer = &c.ids[c.answer_start..];
        let sources: Vec<u32> = c.sources.iter().map(|&s| c.ids[s]).collect();
        assert_eq!(sources, answer);
        let key = tok.decode(answer, true)?;
        assert!(key.chars().all(|d| d.is_ascii_digit()), "{key:?}");
        lengths.insert(key.len());
        let text = tok.decode(&c.ids[..c.answer_start], false)?;
        let w = VARIED_WORDINGS
            .iter()
            .position(|w| text.ends_with(w.chat_answer) && text.contains(w.intro.trim()))
            .unwrap_or_else(|| panic!("prompt {n} has no known wording: {text}"));
        assert_eq!(w, n % 4);
        let needle = VARIED_WORDINGS[w].needle.replace("{key}", &key);
        assert!(text.contains(needle.trim()), "{text}");
        assert!(!text.contains("magic number"));
        // Which haystack: 12 tokens of filler well after the early needle, found in the Bible.
        let probe = &c.ids[400..412];
        let from_bible = kjv.windows(12).any(|x| x == probe);
        assert_eq!(from_bible, !stream.windows(12).any(|x| x == probe));
        seen.insert((w, from_bible));
    }
    assert_eq!(seen.len(), 8, "every wording with both haystacks: {seen:?}");
    assert!(
        lengths.iter().all(|l| (6..=8).contains(l)) && lengths.len() >= 2,
        "{lengths:?}"
    );
    assert_eq!(
        family_cases(tok, &[&stream, &kjv], Some(2), &chat, PromptFamily::Passkey)?.cases,
        passkey_cases(tok, &stream, Some(2), &chat)?.cases
    );

    let repeat = RepeatSet::generate(loaded.model.cfg.vocab_size, 1, 20, 3, 0)?;
    let probes = probe_heads(&loaded.model, Some(&repeat), Some(&set), &mut |_| {})?;
    let copy = probes.copy.as_ref().unwrap();
    println!(
        "model token accuracy {:.3}, exact {} of 3",
        copy.model_token_accuracy, copy.model_exact
    );
    assert_eq!(copy.answer_tokens, 15);
    // SmolLM2-135M has a few strong induction and copy heads (layers 17-18 in the full analysis);
    // most groups score near 0.
    for p in [Probe::Induction, Probe::CopyTop1, Probe::PreviousToken] {
        let mut s: Vec<f64> = probes.group_scores(p).iter().map(|x| x.2).collect();
        s.sort_by(f64::total_cmp);
        let (median, max) = (s[s.len() / 2], s[s.len() - 1]);
        println!("{}: median {median:.3}, max {max:.3}", p.name());
        assert!(
            max >= 0.6 && median <= 0.1,
            "{}: median {median}, max {max}",
            p.name()
        );
    }
    Ok(())
}

#[test]
fn files_written_before_the_probes_still_load() -> Result<()> {
    // The demo's committed plan.json, written before plans recorded a protection: it loads, and
    // saving it again writes the same bytes.
    let cfg = recurformer::checkpoint::loader::load_config(&default_model())?;
    let old = root().join("docs/demo-report/plan.json");
    let plan = Plan::load(&old, &cfg)?;
    assert!(plan.rule.protection.is_none());
    let dir = tempfile::tempdir()?;
    let again = dir.path().join("plan.json");
    plan.save(&again)?;
    assert_eq!(
        std::fs::read_to_string(&again)?,
        std::fs::read_to_string(&old)?
    );

    // A recency report without a probe section (what `analyze` wrote before the probes) loads.
    let model = recurformer::checkpoint::loader::load(&fixture("tiny-llama"))?.model;
    let mut report = tiny_report(&model)?;
    let mut json: serde_json::Value = serde_json::to_value(&report)?;
    json.as_object_mut().unwrap().remove("probes");
    let path = dir.path().join("recency.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    report.probes = None;
    let loaded = RecencyReport::load(&path)?;
    assert!(loaded.probes.is_none());
    assert_same_json(
        &serde_json::to_value(&loaded)?,
        &serde_json::to_value(&report)?,
        "recency.json",
    );
    // A probe section that lacks a score its settings announce is refused, naming it.
    let mut json: serde_json::Value = serde_json::to_value(tiny_report(&model)?)?;
    json["probes"]["layers"][1]["groups"][0]
        .as_object_mut()
        .unwrap()
        .remove("echo");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    let e = format!("{:#}", RecencyReport::load(&path).unwrap_err());
    assert!(e.contains("layer 1 group 0: echo is missing"), "{e}");
    Ok(())
}
