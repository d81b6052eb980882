//! The causal check of a plan before any training (issue 18, part 2): the base model with the
//! planned groups' attention restricted to the sink tokens plus a recent window — roughly the best
//! a mixer with windowed heads beside it can reproduce of them (`Model::with_kv_window`) — is scored
//! on held-out passkey prompts. Where this ceiling falls below the base, the plan swaps a replaced
//! group for the next candidate and keeps the swap when the ceiling rises.
//!
//! Which group to hand back first: the replaced groups ranked by the copy probe's soft mass (the
//! attention they put on the key while the answer is produced, `convert::probes`) measured on the
//! check's own prompts, most first, then by lowest recency; what replaces it: the unprotected attention group with the highest
//! recency that keeps the per-layer minimum. The trials are greedy and capped (`max_swaps`), and
//! every trial is recorded in plan.json, accepted or not.
//!
//! The prompts are the analysis probe's passkey format (`convert::passkey`) with their own seed,
//! length and key size, so the check is not scored on the prompts the probes chose heads with;
//! the evaluation's needle (Paul Graham essays) stays out of planning altogether.

use crate::convert::probes::{CopyCase, CopySet, Probe};
use crate::convert::recency::RecencyReport;
use crate::model::llama::Model;
use crate::model::options::ForwardOptions;
use crate::model::plan::{
    CeilingCheck, CeilingSettings, GroupHarm, GroupHarmEntry, GroupRef, Plan, Refinement, SwapTrial,
};
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use std::collections::BTreeSet;

/// Per prompt: whether `model` predicts every answer token as the argmax, teacher forced (one
/// forward per prompt, logits at the answer positions only).
pub fn passkey_exact(model: &Model, set: &CopySet) -> Result<Vec<bool>> {
    passkey_exact_of(model, set, &(0..set.cases.len()).collect::<Vec<_>>())
}

/// [`passkey_exact`] of the prompts `which` only, in that order.
pub fn passkey_exact_of(model: &Model, set: &CopySet, which: &[usize]) -> Result<Vec<bool>> {
    which
        .iter()
        .map(|&i| {
            let c = &set.cases[i];
            let k = c.ids.len() - c.answer_start;
            let h = final_hidden(model, c)?;
            let logits = model.logits(&h.narrow(1, c.answer_start - 1, k)?)?; // (1, k, v)
            let pred = logits.argmax(D::Minus1)?.squeeze(0)?.to_vec1::<u32>()?;
            Ok(pred == c.ids[c.answer_start..])
        })
        .collect()
}

/// The final-normed hidden state (1, n, d) of one prompt, whole, from a fresh cache.
fn final_hidden(model: &Model, c: &CopyCase) -> Result<Tensor> {
    let x = Tensor::new(c.ids.as_slice(), &model.device)?.unsqueeze(0)?; // (1, n)
    let mut cache = model.new_cache(1, c.ids.len());
    model.forward_hidden(&x, &mut cache, &ForwardOptions::default(), None)
}

/// Prose tokens before the answer whose log-loss [`passkey_logprob`] also reports.
pub const PROSE_TOKENS: usize = 256;

/// Per prompt: the log-probability of the whole answer (the sum over its tokens), teacher forced
/// — a graded version of [`passkey_exact`] that moves before an answer flips — and the mean
/// log-loss of the [`PROSE_TOKENS`] tokens before the answer (the end of the haystack and the
/// question), which says what the same change costs on ordinary text.
pub fn passkey_logprob(model: &Model, set: &CopySet) -> Result<Vec<(f64, f64)>> {
    set.cases
        .iter()
        .map(|c| scores_of(model, c, &final_hidden(model, c)?))
        .collect()
}

/// [`passkey_logprob`] of one prompt from its final hidden state `h` (1, n, d).
fn scores_of(model: &Model, c: &CopyCase, h: &Tensor) -> Result<(f64, f64)> {
    let n = c.ids.len();
    let k = n - c.answer_start;
    let lo = c.answer_start.saturating_sub(PROSE_TOKENS + 1).max(1);
    // Rows lo-1 .. n-1 predict tokens lo .. n.
    let logits = model.logits(&h.narrow(1, lo - 1, n - lo)?)?.squeeze(0)?; // (n-lo, v)
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F64)?, D::Minus1)?;
    let target = Tensor::new(&c.ids[lo..], &model.device)?.unsqueeze(1)?;
    let lp = logp.gather(&target, 1)?.squeeze(1)?.to_vec1::<f64>()?;
    let (prose, answer) = lp.split_at(lp.len() - k);
    let prose_nll = -prose.iter().sum::<f64>() / prose.len().max(1) as f64;
    Ok((answer.iter().sum::<f64>(), prose_nll))
}

/// For each KV group `(layer, group)` of `groups`: the [`GroupHarm`] of restricting that group
/// alone, in `base`, to `sinks` + `window` recent keys, on `set` — a causal, per-group measure of
/// what replacing the group costs, where the recency score only says how local its attention is
/// on prose. `progress(done, total)` is called after each group. ([`toggle_harm`] with nothing
/// restricted around the trials.)
pub fn group_harm(
    base: &Model,
    template: &Plan,
    set: &CopySet,
    sinks: usize,
    window: usize,
    groups: &[(usize, usize)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<GroupHarmEntry>> {
    let none = Plan::from_mamba_sets(
        template.shape,
        template.rule.clone(),
        &vec![Vec::new(); template.shape.num_layers],
    );
    toggle_harm(base, &none, set, sinks, window, groups, progress)
}

/// The harm of each group of `groups` in the context of `background`: `base` with the groups
/// `background` replaces restricted to `sinks` + `window` recent keys is the reference, and each
/// trial flips one group — restricts it too when `background` keeps it, gives it its full
/// attention back when `background` replaces it. The entry is the reference's answer
/// log-probability minus the trial's (and the trial's prose log-loss minus the reference's), so
/// a restricted group's entry is negative by what handing it back gains, and a kept group's is
/// what replacing it as well would cost *beside the others*: where single-group harm
/// ([`group_harm`]) misses that groups cover for each other, this sees it to first order.
///
/// Each trial changes one layer, so the reference's input to every layer is computed once per
/// prompt and a trial runs from its layer up (`Model::forward_from_layer`): half the layers on
/// average. `progress(done, total)` is called after each group.
pub fn toggle_harm(
    base: &Model,
    background: &Plan,
    set: &CopySet,
    sinks: usize,
    window: usize,
    groups: &[(usize, usize)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<GroupHarmEntry>> {
    let sets = replaced_sets(background);
    // A trial may restrict every group of a layer: it is a measurement, not a plan, so the
    // per-layer minimum of the background's rule does not apply to it.
    let mut rule = background.rule.clone();
    rule.min_attention_groups_per_layer = 0;
    let restricted = |sets: &[Vec<usize>]| -> Result<Model> {
        if sets.iter().all(Vec::is_empty) {
            return Ok(base.clone());
        }
        let p = Plan::from_mamba_sets(background.shape, rule.clone(), sets);
        base.with_kv_window(&p, sinks, window)
    };
    let reference = restricted(&sets)?;
    let mut inputs: Vec<Vec<Tensor>> = Vec::with_capacity(set.cases.len());
    let mut ref_lp = Vec::with_capacity(set.cases.len());
    for c in &set.cases {
        let ids = Tensor::new(c.ids.as_slice(), &base.device)?.unsqueeze(0)?;
        let mut v = Vec::new();
        let h = reference.forward_from_layer(0, &reference.embed(&ids)?, Some(&mut v))?;
        ref_lp.push(scores_of(&reference, c, &h)?);
        inputs.push(v);
    }
    let mut out = Vec::with_capacity(groups.len());
    for (i, &(l, g)) in groups.iter().enumerate() {
        let mut flipped = sets.clone();
        match flipped[l].iter().position(|&x| x == g) {
            Some(at) => {
                flipped[l].remove(at);
            }
            None => {
                flipped[l].push(g);
                flipped[l].sort_unstable();
            }
        }
        let m = restricted(&flipped)?;
        let lp = set
            .cases
            .iter()
            .zip(&inputs)
            .map(|(c, v)| scores_of(&m, c, &m.forward_from_layer(l, &v[l], None)?))
            .collect::<Result<Vec<_>>>()?;
        let n = lp.len() as f64;
        out.push(GroupHarmEntry {
            layer: l,
            group: g,
            harm: GroupHarm {
                answer: ref_lp.iter().zip(&lp).map(|(b, w)| b.0 - w.0).sum::<f64>() / n,
                prose: ref_lp.iter().zip(&lp).map(|(b, w)| w.1 - b.1).sum::<f64>() / n,
            },
        });
        progress(i + 1, groups.len());
    }
    Ok(out)
}

/// Refines `plan` by swaps measured in its own context (`plan --refine`): [`toggle_harm`] of
/// every group the plan replaces and of every group of `candidates` it keeps, on `set`; then, up
/// to `max_swaps` times, the replaced group whose return gains most is handed back and the kept
/// candidate whose restriction costs least (keeping its layer's `min_attention_groups_per_layer`)
/// is replaced instead, as long as the gain exceeds the cost. The gains and costs are first-order
/// (each measured with every other group as the plan has it), so a swap's true effect is for the
/// check (or a second refinement) to confirm. Returns the plan with `rule.refine` recorded; the
/// plan is unchanged when no pair pays. `progress(done, total)` is called after each group.
pub fn refine_in_context(
    base: &Model,
    plan: &Plan,
    set: &CopySet,
    settings: Refinement,
    candidates: &[(usize, usize)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Plan> {
    let sets = replaced_sets(plan);
    let replaced: Vec<(usize, usize)> = sets
        .iter()
        .enumerate()
        .flat_map(|(l, gs)| gs.iter().map(move |&g| (l, g)))
        .collect();
    let kept: Vec<(usize, usize)> = candidates
        .iter()
        .copied()
        .filter(|&(l, g)| !sets[l].contains(&g))
        .collect();
    let groups: Vec<(usize, usize)> = replaced.iter().chain(&kept).copied().collect();
    let entries = toggle_harm(
        base,
        plan,
        set,
        settings.sinks,
        settings.window,
        &groups,
        progress,
    )?;
    let harm = |g: (usize, usize)| {
        entries
            .iter()
            .find(|e| (e.layer, e.group) == g)
            .map(|e| e.harm.answer)
            .expect("every group was measured")
    };
    // Gains of handing back, largest first; costs of replacing as well, smallest first (ties: lower
    // layer, then lower group).
    let mut gains: Vec<((usize, usize), f64)> = replaced.iter().map(|&g| (g, -harm(g))).collect();
    gains.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut costs: Vec<((usize, usize), f64)> = kept.iter().map(|&g| (g, harm(g))).collect();
    costs.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let n_kv = plan.shape.num_key_value_heads;
    let min_keep = plan.rule.min_attention_groups_per_layer.max(1);
    let mut new_sets = sets.clone();
    let (mut restored, mut instead) = (Vec::new(), Vec::new());
    let mut used = BTreeSet::new();
    for &(out, gain) in &gains {
        if restored.len() >= settings.max_swaps {
            break;
        }
        let fits = |(l, _): (usize, usize), s: &[Vec<usize>]| {
            let after = s[l].len() + 1 - usize::from(out.0 == l);
            n_kv - after >= min_keep
        };
        let Some(&(into, cost)) = costs
            .iter()
            .find(|&&(g, _)| !used.contains(&g) && fits(g, &new_sets))
        else {
            break;
        };
        if gain <= cost {
            break;
        }
        used.insert(into);
        new_sets[out.0].retain(|&g| g != out.1);
        new_sets[into.0].push(into.1);
        new_sets[into.0].sort_unstable();
        restored.push(GroupRef {
            layer: out.0,
            group: out.1,
        });
        instead.push(GroupRef {
            layer: into.0,
            group: into.1,
        });
    }
    let mut rule = plan.rule.clone();
    rule.refine = Some(Refinement {
        groups: entries,
        restored,
        replaced: instead,
        ..settings
    });
    Ok(Plan::from_mamba_sets(plan.shape, rule, &new_sets))
}

fn count(v: &[bool]) -> usize {
    v.iter().filter(|&&x| x).count()
}

fn replaced_sets(plan: &Plan) -> Vec<Vec<usize>> {
    plan.layers.iter().map(|l| l.mamba_groups.clone()).collect()
}

/// Scores the plan's ceiling on `set` and swaps groups while it is below the base (see the module
/// doc). Returns the plan to write (with `ceiling` set) — the input plan itself when no swap
/// helped. `progress(done, what)` is called after each scoring pass.
pub fn check_plan(
    base: &Model,
    plan: &Plan,
    report: &RecencyReport,
    set: &CopySet,
    s: &CeilingSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<Plan> {
    let base_ok = passkey_exact(base, set)?;
    let base_correct = count(&base_ok);
    // Per prompt, whether the plan answers it. A plan that replaces nothing is the base model:
    // its answers are known.
    let answers_of = |p: &Plan| -> Result<Vec<bool>> {
        if p.replaced_groups() == 0 {
            return Ok(base_ok.clone());
        }
        let m = base.with_kv_window(p, s.sinks, s.window)?;
        passkey_exact(&m, set)
    };
    progress(&format!(
        "base model: {base_correct} of {}",
        set.cases.len()
    ));
    let mut cur = plan.clone();
    cur.ceiling = None;
    let mut cur_ok = answers_of(&cur)?;
    let planned_correct = count(&cur_ok);
    progress(&format!(
        "plan, groups restricted to {} sinks + {} recent keys: {planned_correct} of {}",
        s.sinks,
        s.window,
        set.cases.len()
    ));
    let marks = |v: &[bool]| {
        v.iter()
            .map(|&x| if x { '1' } else { '.' })
            .collect::<String>()
    };
    progress(&format!(
        "per prompt, in order (1 = exact): base {}, plan {}",
        marks(&base_ok),
        marks(&cur_ok)
    ));
    let mut cur_correct = planned_correct;

    // Candidates to hand back: replaced groups, most copy mass first, then lowest recency. The
    // copy mass is measured on the check's own prompts (the base model's attention on the key
    // while it answers), where the analysis report's probe ran on shorter, plainer prompts; the
    // report's score is the fallback when the check's prompts cannot be probed.
    let recency: std::collections::HashMap<(usize, usize), f64> = report
        .group_scores()
        .into_iter()
        .map(|(l, g, r)| ((l, g), r))
        .collect();
    let copy_mass: std::collections::HashMap<(usize, usize), f64> =
        if cur_correct < base_correct && s.max_swaps > 0 {
            progress("probing the base model's copy mass on the check's prompts");
            let probed = crate::convert::probes::probe_heads(base, None, Some(set), &mut |_| {})?;
            probed
                .group_scores(Probe::CopyMass)
                .into_iter()
                .map(|(l, g, x)| ((l, g), x))
                .collect()
        } else {
            report
                .probes
                .as_ref()
                .filter(|p| p.probes().contains(&Probe::CopyMass))
                .map(|p| {
                    p.group_scores(Probe::CopyMass)
                        .into_iter()
                        .map(|(l, g, x)| ((l, g), x))
                        .collect()
                })
                .unwrap_or_default()
        };
    let key = |lg: &(usize, usize)| -> (f64, f64) {
        (
            copy_mass.get(lg).copied().unwrap_or(0.0),
            recency.get(lg).copied().unwrap_or(0.0),
        )
    };
    let mut out_order: Vec<(usize, usize)> = cur
        .layers
        .iter()
        .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
        .collect();
    out_order.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(a.cmp(b))
    });
    let protected: BTreeSet<(usize, usize)> = cur
        .rule
        .protection
        .iter()
        .flat_map(|p| p.protected.iter().map(|g| (g.layer, g.group)))
        .collect();
    let mut handed_back: BTreeSet<(usize, usize)> = BTreeSet::new();
    let min_keep = cur.rule.min_attention_groups_per_layer;
    let n_kv = cur.shape.num_key_value_heads;
    let mut swaps = Vec::new();
    for out in out_order {
        if swaps.len() >= s.max_swaps || cur_correct >= base_correct {
            break;
        }
        let sets = replaced_sets(&cur);
        // The best attention group to replace instead: not protected, not handed back, and its
        // layer keeps `min_keep` attention groups after the swap.
        let mut into_order: Vec<(usize, usize)> = recency
            .keys()
            .copied()
            .filter(|&(l, g)| {
                !sets[l].contains(&g)
                    && !protected.contains(&(l, g))
                    && !handed_back.contains(&(l, g))
                    && (l, g) != out
            })
            .filter(|&(l, _)| {
                let replaced_after = sets[l].len() + 1 - usize::from(out.0 == l);
                n_kv - replaced_after >= min_keep.max(1)
            })
            .collect();
        into_order.sort_by(|a, b| recency[b].total_cmp(&recency[a]).then(a.cmp(b)));
        let Some(&into) = into_order.first() else {
            break;
        };
        let mut trial_sets = sets.clone();
        trial_sets[out.0].retain(|&g| g != out.1);
        trial_sets[into.0].push(into.1);
        let trial = Plan::from_mamba_sets(cur.shape, cur.rule.clone(), &trial_sets);
        // The count can only rise through a prompt the plan misses: score those first, and the
        // rest only when one of them is answered.
        let m = base.with_kv_window(&trial, s.sinks, s.window)?;
        let (missed, answered): (Vec<usize>, Vec<usize>) =
            (0..set.cases.len()).partition(|&i| !cur_ok[i]);
        let gained = passkey_exact_of(&m, set, &missed)?;
        let (correct, trial_ok) = if gained.iter().any(|&x| x) {
            let kept = passkey_exact_of(&m, set, &answered)?;
            let mut ok = vec![false; set.cases.len()];
            for (&i, &x) in missed.iter().zip(&gained).chain(answered.iter().zip(&kept)) {
                ok[i] = x;
            }
            (Some(count(&ok)), Some(ok))
        } else {
            (None, None)
        };
        let accepted = correct.is_some_and(|c| c > cur_correct);
        progress(&format!(
            "swap L{}G{} -> L{}G{}: {} ({})",
            out.0,
            out.1,
            into.0,
            into.1,
            match correct {
                Some(c) => format!("{c} of {}", set.cases.len()),
                None => format!("none of the {} missed prompts answered", missed.len()),
            },
            if accepted { "kept" } else { "undone" }
        ));
        swaps.push(SwapTrial {
            out,
            into,
            correct,
            accepted,
        });
        if accepted {
            handed_back.insert(out);
            cur = trial;
            cur_ok = trial_ok.expect("an accepted trial was scored in full");
            cur_correct = count(&cur_ok);
        }
    }
    cur.ceiling = Some(CeilingCheck {
        settings: s.clone(),
        base_correct,
        planned_correct,
        final_correct: cur_correct,
        swaps,
    });
    cur.refresh_predicted_cache();
    anyhow::ensure!(
        cur.replaced_groups() == plan.replaced_groups(),
        "internal: swaps changed the number of replaced groups"
    );
    Ok(cur)
}
