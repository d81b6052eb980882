//! The plan's causal check (`convert::ceiling`) on the default model: a plan that replaces most
//! groups of the layers that hold the copy heads (17-24) falls below the base on passkeys when
//! those groups only see 4 sinks + 4 recent keys; the check measures that, trades groups back,
//! keeps only trades that raise the ceiling, never changes how many groups are replaced, never
//! empties a layer, and records every trial.

mod common;
use anyhow::Result;
use common::*;
use recurformer::convert::ceiling::{check_plan, passkey_exact};
use recurformer::convert::passkey::{passkey_cases, PasskeyOptions};
use recurformer::convert::recency::Calibration;
use recurformer::model::plan::{CeilingSettings, Plan};

#[test]
fn the_check_measures_the_ceiling_and_keeps_only_helpful_swaps() -> Result<()> {
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let (base, tok) = (&loaded.model, loaded.tokenizer()?);
    let text = std::fs::read_to_string(root().join("data/text/austen/emma.txt"))?;
    let text: String = text.chars().skip(50_000).take(40_000).collect();
    let stream = tok.encode(&text, false)?;
    let set = passkey_cases(
        tok,
        &stream,
        None,
        &PasskeyOptions {
            prompts: 8,
            prompt_len: 400,
            key_digits: 6,
            seed: 5,
            haystack_files: vec!["emma.txt".into()],
            chat: false,
            depth: recurformer::convert::passkey::PASSKEY_DEPTH,
        },
    )?;
    // Recency scores from two short windows (no probes: hand-back order is lowest recency first).
    let calib = vec![stream[..160].to_vec(), stream[2000..2160].to_vec()];
    let report = recurformer::convert::analyze::analyze(
        base,
        &calib,
        32,
        Calibration::default(),
        "default",
        &mut |_| {},
    )?;
    // Layers 17-24: every group but group 0 replaced.
    let sets: Vec<Vec<usize>> = (0..base.cfg.num_hidden_layers)
        .map(|l| {
            if (17..=24).contains(&l) {
                vec![1, 2]
            } else {
                vec![]
            }
        })
        .collect();
    let mut plan = Plan::from_groups(&base.cfg, &sets)?;
    plan.rule.min_attention_groups_per_layer = 1;
    let s = CeilingSettings {
        prompts: 8,
        prompt_len: 400,
        window: 4,
        max_swaps: 3,
        ..CeilingSettings::default()
    };
    let mut log = Vec::new();
    let out = check_plan(base, &plan, &report, &set, &s, &mut |m| {
        log.push(m.to_string())
    })?;
    println!("{}", log.join("\n"));
    let c = out.ceiling.as_ref().expect("the check is recorded");
    let base_ok = passkey_exact(base, &set)?.iter().filter(|&&x| x).count();
    assert_eq!(c.base_correct, base_ok);
    assert!(
        c.base_correct >= 7,
        "the base finds {} of 8",
        c.base_correct
    );
    assert!(
        c.planned_correct < c.base_correct,
        "restricting the copy layers to 4 recent keys should cost passkeys: {} vs {}",
        c.planned_correct,
        c.base_correct
    );
    assert!(!c.swaps.is_empty() && c.swaps.len() <= 3);
    // Each kept trade raised the ceiling over the last kept state; undone ones did not.
    let mut best = c.planned_correct;
    for t in &c.swaps {
        // A trial not scored in full answered none of the prompts the plan missed.
        let correct = t.correct.unwrap_or(best);
        assert_eq!(t.accepted, correct > best, "{t:?}");
        if t.accepted {
            best = correct;
        }
    }
    assert_eq!(c.final_correct, best);
    // The written plan is what the kept trades make of the input, and measures what it says.
    assert_eq!(out.replaced_groups(), plan.replaced_groups());
    for l in &out.layers {
        assert!(!l.attention_groups.is_empty(), "layer {} emptied", l.layer);
    }
    for t in c.swaps.iter().filter(|t| t.accepted) {
        assert!(!out.layers[t.out.0].mamba_groups.contains(&t.out.1));
        assert!(out.layers[t.into.0].mamba_groups.contains(&t.into.1));
    }
    let m = base.with_kv_window(&out, s.sinks, s.window)?;
    let again = passkey_exact(&m, &set)?.iter().filter(|&&x| x).count();
    assert_eq!(again, c.final_correct);
    // plan.json keeps the check; a plan without one serialises as before (no `ceiling` key).
    let json = serde_json::to_string(&out)?;
    assert!(json.contains("\"ceiling\""));
    assert!(!serde_json::to_string(&plan)?.contains("ceiling"));
    Ok(())
}

#[test]
fn group_harm_is_the_answer_cost_of_restricting_one_group() -> Result<()> {
    use recurformer::convert::ceiling::{
        group_harm, passkey_logprob, refine_in_context, toggle_harm,
    };
    use recurformer::model::plan::Refinement;
    let loaded = recurformer::checkpoint::loader::load(&default_model())?;
    let (base, tok) = (&loaded.model, loaded.tokenizer()?);
    let text = std::fs::read_to_string(root().join("data/text/austen/emma.txt"))?;
    let text: String = text.chars().skip(50_000).take(40_000).collect();
    let stream = tok.encode(&text, false)?;
    let set = passkey_cases(
        tok,
        &stream,
        None,
        &PasskeyOptions {
            prompts: 4,
            prompt_len: 400,
            key_digits: 6,
            seed: 5,
            haystack_files: vec!["emma.txt".into()],
            chat: false,
            depth: recurformer::convert::passkey::PASSKEY_DEPTH,
        },
    )?;
    let template = Plan::from_groups(&base.cfg, &vec![vec![]; base.cfg.num_hidden_layers])?;
    // L18G2 holds the strongest induction / copy heads; L1G0 is a previous-token group, exactly
    // local, so 4 sinks + 4 recent keys lose nothing of it.
    let groups = [(1, 0), (18, 2)];
    let harm = group_harm(base, &template, &set, 4, 4, &groups, &mut |_, _| {})?;
    for e in &harm {
        println!(
            "L{}G{}: answer {:.3} nats, prose {:.4} nats/token",
            e.layer, e.group, e.harm.answer, e.harm.prose
        );
    }
    assert_eq!(harm.len(), 2);
    assert_eq!(
        (harm[0].layer, harm[0].group, harm[1].layer, harm[1].group),
        (1, 0, 18, 2)
    );
    assert!(
        harm[1].harm.answer > harm[0].harm.answer + 0.5,
        "restricting the copy group should cost the answer more than the previous-token group"
    );
    // In the context of a plan that restricts L18G2, handing it back gains what restricting it
    // alone cost; restricting L1G0 as well costs about what it costs alone (it is exactly local).
    let bg = Plan::from_groups(&base.cfg, &{
        let mut s = vec![vec![]; base.cfg.num_hidden_layers];
        s[18] = vec![2];
        s
    })?;
    let ctx = toggle_harm(base, &bg, &set, 4, 4, &[(1, 0), (18, 2)], &mut |_, _| {})?;
    assert!(
        (ctx[1].harm.answer + harm[1].harm.answer).abs() < 1e-3
            && (ctx[1].harm.prose + harm[1].harm.prose).abs() < 1e-5,
        "handing back L18G2: {:?}, restricting it alone: {:?}",
        ctx[1].harm,
        harm[1].harm
    );
    assert!(
        ctx[0].harm.answer < 0.5,
        "L1G0 beside L18G2: {:?}",
        ctx[0].harm
    );
    // The refinement swaps the copy group back for the previous-token group and records both.
    let refined = refine_in_context(
        base,
        &bg,
        &set,
        Refinement {
            prompts: 4,
            prompt_len: 400,
            depth: recurformer::convert::passkey::PASSKEY_DEPTH,
            family: Default::default(),
            seed: 5,
            sinks: 4,
            window: 4,
            max_swaps: 3,
            groups: vec![],
            restored: vec![],
            replaced: vec![],
        },
        &[(1, 0), (18, 2)],
        &mut |_, _| {},
    )?;
    assert_eq!(refined.layers[18].mamba_groups, Vec::<usize>::new());
    assert_eq!(refined.layers[1].mamba_groups, vec![0]);
    let r = refined.rule.refine.as_ref().expect("recorded");
    assert_eq!(
        (r.restored.len(), r.restored[0].layer, r.replaced[0].layer),
        (1, 18, 1)
    );
    assert_eq!(r.groups.len(), 2);
    // A kept group in a layer at the plan's per-layer minimum is still measured (the trial
    // restricts the whole layer: a measurement, not a plan), and the refinement keeps the minimum.
    let mut sets2 = vec![vec![]; base.cfg.num_hidden_layers];
    sets2[1] = vec![1, 2];
    sets2[18] = vec![2];
    let mut bg2 = Plan::from_groups(&base.cfg, &sets2)?;
    bg2.rule.min_attention_groups_per_layer = 1;
    let refined2 = refine_in_context(
        base,
        &bg2,
        &set,
        Refinement {
            groups: vec![],
            ..r.clone()
        },
        &[(1, 0), (1, 1), (1, 2), (18, 2)],
        &mut |_, _| {},
    )?;
    let r2 = refined2.rule.refine.as_ref().expect("recorded");
    assert_eq!(r2.groups.len(), 4, "{:?}", r2.groups);
    assert!(r2.groups.iter().all(|e| e.harm.answer.is_finite()));
    refined2.validate(&base.cfg)?;
    assert_eq!(refined2.replaced_groups(), 3);
    // The layer-skipping path equals a whole forward of the restricted model.
    let base_lp = passkey_logprob(base, &set)?;
    let mut sets = vec![vec![]; base.cfg.num_hidden_layers];
    sets[18] = vec![2];
    let one = Plan::from_groups(&base.cfg, &sets)?;
    let lp = passkey_logprob(&base.with_kv_window(&one, 4, 4)?, &set)?;
    let n = lp.len() as f64;
    let answer = base_lp.iter().zip(&lp).map(|(b, w)| b.0 - w.0).sum::<f64>() / n;
    let prose = base_lp.iter().zip(&lp).map(|(b, w)| w.1 - b.1).sum::<f64>() / n;
    assert!(
        (answer - harm[1].harm.answer).abs() < 1e-3 && (prose - harm[1].harm.prose).abs() < 1e-5,
        "whole forward: answer {answer}, prose {prose}; from layer 18: {:?}",
        harm[1].harm
    );
    Ok(())
}
