//! `recurformer plan`: choose the KV groups to convert from a recency report and write plan.json,
//! keeping the groups with strong probe evidence of a retrieval role as attention by default.
//!
//! No model is loaded unless `--rank harm` or `--check-model` asks for one: the model shape comes
//! from the report, and the plan is validated against it before it is written.

use anyhow::{Context, Result};
use clap::Args;
use recurformer::convert::passkey::PromptFamily;
use recurformer::convert::recency::RecencyReport;
use recurformer::formats::io::shown_path;
use recurformer::model::plan::PlanShape;
use std::path::PathBuf;

/// How `plan` fills the budget (`--rank`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    Recency,
    Harm,
}

/// Seed of the harm ranking's prompts: apart from the check's (`CeilingSettings::seed`).
const RANK_SEED: u64 = 2001;

/// The varied prompt family's second haystack by default, beside the calibration novels: the
/// training books of the King James Bible (neither the evaluation's essays, nor held-out
/// Persuasion, nor scripture's held-out books). The plans of 2026-12-05 in BENCHMARKS.md were
/// measured with the whole `kjv/bible.txt` before this folder existed.
const VARIED_SECOND_HAYSTACK: &str = "data/text/kjv_books/train";

/// `--prompt-family` (`convert::passkey::PromptFamily`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyArg {
    Passkey,
    Varied,
}

impl From<FamilyArg> for PromptFamily {
    fn from(f: FamilyArg) -> Self {
        match f {
            FamilyArg::Passkey => PromptFamily::Passkey,
            FamilyArg::Varied => PromptFamily::Varied,
        }
    }
}

/// Options of `recurformer plan`.
#[derive(Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("rule")
        .required(true)
        .args(["threshold", "replace_fraction", "start_from"])
))]
pub struct PlanArgs {
    /// recency.json written by `recurformer analyze`.
    #[arg(long, value_name = "FILE")]
    pub recency: PathBuf,
    /// KV-cache element type the printed cache prediction is for (`generate --kv`); plan.json's
    /// `predicted_cache` stays in f32.
    #[command(flatten)]
    pub kv: crate::KvArgs,
    /// Replace every KV group whose mean recency score is >= T (scores lie in [0, 1]).
    /// Exclusive with --replace-fraction.
    #[arg(long, value_name = "T")]
    pub threshold: Option<f64>,
    /// Replace round(F * total KV groups) groups, those with the highest mean recency across all
    /// layers (ties: lower layer, then lower group first). F in [0, 1]. Exclusive with --threshold.
    #[arg(long, value_name = "F")]
    pub replace_fraction: Option<f64>,
    /// Keep at least K attention groups in every layer: a layer over the limit hands back its
    /// lowest-scoring replaced groups (they are not replaced elsewhere instead). 0 allows layers
    /// with no attention at all.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub min_attention_groups_per_layer: usize,
    /// Take the groups of this plan.json as they are instead of choosing them (exclusive with
    /// --threshold and --replace-fraction): --refine and the check (--check-model) then run on it,
    /// e.g. to measure a hand-made or earlier plan on other prompts.
    #[arg(long, value_name = "PLAN_JSON", conflicts_with_all = ["rank_from", "rank_extend"])]
    pub start_from: Option<PathBuf>,
    /// Where to write plan.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Also write the recency heatmap with the replaced groups framed, as PNG.
    #[arg(long, value_name = "PNG")]
    pub heatmap: Option<PathBuf>,
    /// Keep KV groups with strong probe evidence of a retrieval role as attention; the budget is
    /// filled from the remaining groups by recency. Comma-separated rules PROBE:T (protect a
    /// group whose score, the max over its query heads, is >= T) or PROBE:topK (the K best groups
    /// by that probe); probes: induction, echo, previous_token, copy_top1, copy_mass (measured by
    /// `analyze`). `default` is `induction:0.3,echo:0.5,previous_token:0.5,copy_top1:0.3` (why:
    /// the README, "plan", and `convert::protect::DEFAULT_PROTECT`); `none`
    /// turns protection off and reproduces the recency-only plan exactly. When the budget cannot
    /// be met without a protected group, fewer groups are replaced and a warning says so.
    #[arg(long, value_name = "RULES", default_value = "default")]
    pub protect: String,
    /// How the budget of --replace-fraction is filled. `recency`: the groups with the highest
    /// mean recency first. `harm`: each of the --rank-candidates most recency-aware groups is
    /// restricted alone to --check-sinks sinks + --check-window recent keys in the base model
    /// (--check-model) on --rank-prompts passkey prompts of --rank-context tokens (chat-framed,
    /// 7-digit keys, their own seed: not the check's prompts), and the groups that cost the
    /// answer's log-probability least are replaced first (BENCHMARKS.md, "Groups ranked by
    /// causal harm"). Protection rules apply either way.
    #[arg(long, value_enum, default_value_t = Rank::Recency)]
    pub rank: Rank,
    /// Passkey prompts of the harm ranking.
    #[arg(long, default_value_t = 8)]
    pub rank_prompts: usize,
    /// Tokens per harm-ranking prompt before the answer.
    #[arg(long, default_value_t = 1024)]
    pub rank_context: usize,
    /// Range of the needle's depth in the harm ranking's prompts (two fractions of the filler, low
    /// first): early needles are the farthest back, the ones a restricted group loses first.
    #[arg(long, num_args = 2, value_names = ["LO", "HI"], default_values_t = [0.0, 1.0])]
    pub rank_depth: Vec<f64>,
    /// The harm ranking's pool: the N most recency-aware groups, of which it measures those the
    /// protection rules leave replaceable (the rest stay attention).
    #[arg(long, default_value_t = 60)]
    pub rank_candidates: usize,
    /// Measure only the candidates that the harm ranking of this earlier plan.json (taken on the
    /// same prompts: --rank-prompts, --rank-context, --rank-depth, --check-sinks, --check-window)
    /// has not measured, and reuse its entries for the others: a larger candidate pool, or one
    /// without the protected groups, for the cost of the new groups alone.
    #[arg(long, value_name = "PLAN_JSON", conflicts_with = "rank_from")]
    pub rank_extend: Option<PathBuf>,
    /// Refine the plan in its own context with up to N swaps (needs --check-model): with the
    /// planned groups restricted to --check-sinks + --check-window keys, each replaced group is
    /// handed back alone and each kept candidate (the harm ranking's, and the unprotected ones of
    /// the --rank-candidates most recency-aware groups) restricted as well alone, on the harm ranking's kind
    /// of prompts (--rank-prompts, --rank-context, --rank-depth); then the groups whose return
    /// gains most are swapped for the candidates whose loss costs least while the gain exceeds the
    /// cost. Sees what single-group harm misses: groups that cover for each other. Costs about as
    /// much as a harm ranking. 0: off.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub refine: usize,
    /// Reuse the harm ranking of an earlier plan.json (`rule.harm`) instead of measuring it again:
    /// another fraction or protection rule from the same measurement, in seconds. Given several
    /// times (rankings of the same candidates on other prompts, e.g. --rank-context 1024 and
    /// 4096), each group costs the most it cost in any of them.
    #[arg(long, value_name = "PLAN_JSON")]
    pub rank_from: Vec<PathBuf>,
    /// Run the causal check with this base model (the one the report was made from): the base
    /// with the planned groups restricted to --check-sinks sink tokens + --check-window recent
    /// keys is scored on held-out passkey prompts cut from the calibration text; while it finds
    /// fewer than the base, up to --max-swaps replaced groups (most copy mass first) are traded
    /// for the next groups by recency, and a trade is kept when the ceiling rises. The result and
    /// every trial go into plan.json (`ceiling`). Off when not given.
    #[arg(long, value_name = "MODEL")]
    pub check_model: Option<PathBuf>,
    /// Passkey prompts of the check.
    #[arg(long, default_value_t = 24)]
    pub check_prompts: usize,
    /// Tokens per check prompt before the answer.
    #[arg(long, default_value_t = 1024)]
    pub check_context: usize,
    /// Recent keys the restricted groups keep in the check (the windowed heads' `--local-window`).
    #[arg(long, default_value_t = 32)]
    pub check_window: usize,
    /// Sink tokens the restricted groups keep in the check.
    #[arg(long, default_value_t = 4)]
    pub check_sinks: usize,
    /// Swap trials at most (0: measure the ceiling only).
    #[arg(long, default_value_t = 4)]
    pub max_swaps: usize,
    /// Digits of the check's pass keys.
    #[arg(long, default_value_t = 7)]
    pub check_key_digits: usize,
    /// Range of the needle's depth in the check's filler (two fractions, low first).
    #[arg(long, num_args = 2, value_names = ["LO", "HI"], default_values_t = [0.0, 1.0])]
    pub check_depth: Vec<f64>,
    /// Frame the check's prompts as plain text instead of one user turn of the model's chat
    /// template.
    #[arg(long)]
    pub check_plain: bool,
    /// Haystack text of the check prompts (files or directories; default: the calibration text,
    /// Austen without Persuasion). With `--prompt-family varied` each PATH is a haystack of its
    /// own (default: the calibration novels and the King James Bible).
    #[arg(long, value_name = "PATH")]
    pub check_data: Vec<PathBuf>,
    /// The prompts of the harm ranking, the refinement and the check. `passkey`: one wording
    /// ("The pass key is ..."), one haystack, keys of a fixed length. `varied`: four wordings
    /// (pass key, safe code, reference number, telephone extension), keys of one digit fewer or
    /// more, and the haystacks alternating, so that a plan chosen on them cannot fit one wording
    /// or one kind of text (none is the evaluation's needle or essays). Recorded in plan.json.
    #[arg(long, value_enum, default_value_t = FamilyArg::Passkey)]
    pub prompt_family: FamilyArg,
    #[command(flatten)]
    pub threads: crate::ThreadArgs,
}

pub fn run(args: PlanArgs) -> Result<()> {
    use recurformer::convert::protect::{parse_rules, plan_protecting, Budget};
    let report = RecencyReport::load(&args.recency)?;
    let k = args.min_attention_groups_per_layer;
    let budget = match (args.threshold, args.replace_fraction, &args.start_from) {
        (Some(tau), None, None) => Some(Budget::Threshold(tau)),
        (None, Some(f), None) => Some(Budget::Fraction(f)),
        (None, None, Some(_)) => None,
        // clap's "rule" group makes exactly one of them present.
        _ => anyhow::bail!("give exactly one of --threshold, --replace-fraction and --start-from"),
    };
    let mut rules = parse_rules(&args.protect)?;
    if args.protect.trim() == "default" && report.probes.is_none() && !rules.is_empty() {
        eprintln!(
            "warning: {} has no probe scores (written before the probes, or with them off), so \
             the plan protects no retrieval heads; rerun `recurformer analyze` to measure them",
            args.recency.display()
        );
        rules.clear();
    }
    if args.rank_extend.is_some() && args.rank != Rank::Harm {
        anyhow::bail!("--rank-extend extends a harm ranking: use it with --rank harm");
    }
    if !args.rank_from.is_empty() && args.rank != Rank::Harm {
        anyhow::bail!("--rank-from gives a harm ranking: use it with --rank harm");
    }
    if args.start_from.is_some() && args.rank != Rank::Recency {
        anyhow::bail!(
            "--start-from takes its plan's groups as they are: --rank does not apply (--refine \
             does)"
        );
    }
    let base = match (&args.check_model, args.rank, args.rank_from.is_empty()) {
        (Some(m), _, _) => Some(load_base(&args, m, &report)?),
        (None, Rank::Harm, true) => anyhow::bail!(
            "--rank harm measures each group in the base model: give it with --check-model \
             (or reuse a measured ranking with --rank-from)"
        ),
        (None, _, _) => None,
    };
    let mut plan = match (args.rank, budget) {
        (_, None) => {
            let path = args
                .start_from
                .as_ref()
                .expect("no budget only with --start-from");
            // Checked against the report's shape below.
            recurformer::model::plan::Plan::read(path)?
        }
        (Rank::Harm, Some(Budget::Fraction(f))) => {
            let ranking = match (args.rank_from.is_empty(), &base) {
                (false, _) => {
                    let parts = args
                        .rank_from
                        .iter()
                        .map(|p| load_ranking(p, &report))
                        .collect::<Result<Vec<_>>>()?;
                    let names: Vec<String> = args.rank_from.iter().map(|p| shown_path(p)).collect();
                    recurformer::model::plan::HarmRanking::merge_max(parts, &names)?
                }
                (true, Some(b)) => rank_by_harm(&args, b, &report, &rules)?,
                (true, None) => unreachable!("checked above"),
            };
            recurformer::convert::protect::plan_by_harm(&report, f, k, &rules, ranking)?
        }
        (Rank::Harm, Some(Budget::Threshold(_))) => anyhow::bail!(
            "--rank harm fills a --replace-fraction budget; --threshold is a recency rule"
        ),
        (Rank::Recency, Some(budget)) => plan_protecting(&report, budget, k, &rules)?,
    };
    plan.rule.recency_file = Some(shown_path(&args.recency));
    let shape = PlanShape::from_report(&report);
    plan.validate_shape(
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
    )
    .with_context(|| match &args.start_from {
        Some(p) => format!(
            "{} does not fit the model of {}",
            p.display(),
            args.recency.display()
        ),
        None => "the plan does not fit the report's model".to_string(),
    })?;
    if args.refine > 0 {
        let b = base.as_ref().context(
            "--refine measures the plan's groups in the base model: give it with --check-model",
        )?;
        plan = refine(&args, b, &report, &rules, plan)?;
    }
    if let Some(b) = &base {
        plan = check(&args, b, &report, plan)?;
    }
    plan.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let total = shape.num_layers * shape.num_key_value_heads;
    println!(
        "{}: {} layers, {} query heads, {} KV groups of {} (head_dim {}), window {}",
        report.model,
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads,
        shape.group_size(),
        shape.head_dim,
        report.window
    );
    let protected: std::collections::BTreeSet<(usize, usize)> = plan
        .rule
        .protection
        .iter()
        .flat_map(|p| p.protected.iter().map(|g| (g.layer, g.group)))
        .collect();
    println!(
        "group scores (mean recency); M = replaced by Mamba, A = stays attention, P = kept as \
         attention by probe protection"
    );
    for (lp, ls) in plan.layers.iter().zip(&report.layers) {
        let cells: Vec<String> = ls
            .groups
            .iter()
            .map(|g| {
                let tag = if lp.mamba_groups.contains(&g.group) {
                    'M'
                } else if protected.contains(&(lp.layer, g.group)) {
                    'P'
                } else {
                    'A'
                };
                format!("g{} {:.3} {tag}", g.group, g.mean_recency)
            })
            .collect();
        println!("  layer {:>3}: {}", lp.layer, cells.join("  "));
    }
    println!(
        "replaced {} of {total} KV groups ({:.1}%), {} query heads",
        plan.replaced_groups(),
        100.0 * plan.replaced_groups() as f64 / total.max(1) as f64,
        plan.layers
            .iter()
            .map(|l| l.mamba_heads.len())
            .sum::<usize>()
    );
    if let Some(p) = &plan.rule.protection {
        let rules: Vec<String> = p
            .rules
            .iter()
            .map(|r| match (r.min_score, r.top_k) {
                (Some(t), _) => format!("{} >= {t}", r.probe),
                (_, Some(k)) => format!("{} top {k}", r.probe),
                _ => r.probe.clone(),
            })
            .collect();
        let show = |gs: &mut dyn Iterator<Item = String>| gs.collect::<Vec<_>>().join(" ");
        println!(
            "protected {} groups ({}): {}",
            p.protected.len(),
            rules.join(", "),
            show(&mut p.protected.iter().map(|g| format!(
                "L{}G{}[{}]",
                g.layer,
                g.group,
                g.probes.join("+")
            )))
        );
        println!(
            "of which the recency-only rule would have replaced {}: {}",
            p.kept_from_recency.len(),
            show(&mut p.kept_from_recency.iter().map(|(l, g)| format!("L{l}G{g}")))
        );
    }
    if let recurformer::model::plan::Selection::ReplaceFraction {
        replace_fraction,
        requested_groups,
    } = plan.rule.selection
    {
        if plan.replaced_groups() < requested_groups {
            // What the per-layer minimum and the protection leave replaceable.
            let cap = shape.num_key_value_heads.saturating_sub(k);
            let available: usize = (0..shape.num_layers)
                .map(|l| {
                    let free = (0..shape.num_key_value_heads)
                        .filter(|&g| !protected.contains(&(l, g)))
                        .count();
                    free.min(cap)
                })
                .sum();
            eprintln!(
                "warning: --replace-fraction {replace_fraction} asks for {requested_groups} groups, but \
                 --min-attention-groups-per-layer {k} (at most {cap} per layer) and {} protected \
                 groups leave {available} replaceable; replaced {} instead (--protect none or \
                 stricter rules replace more)",
                protected.len(),
                plan.replaced_groups()
            );
        }
    }
    let kv = args.kv.kv;
    println!(
        "\npredicted cache ({kv} KV of kept groups + f32 Mamba conv/SSM state, vs the base model's \
         {kv} KV):"
    );
    print!("{}", plan.cache_table_in(kv));

    if let Some(png) = &args.heatmap {
        recurformer::report::recency_heatmap_with_plan(&report, &plan, png)?;
        println!("wrote {}", png.display());
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The base model of the check and the harm ranking, with the token streams of their haystacks
/// (one for the passkey family, all its files in one stream; one per haystack for the varied one).
struct Base {
    loaded: recurformer::checkpoint::loader::LoadedModel,
    streams: Vec<Vec<u32>>,
    /// Names of the haystacks, in the order of `streams`.
    names: Vec<String>,
    family: PromptFamily,
}

impl Base {
    fn eos(&self) -> Option<u32> {
        self.loaded.model.cfg.eos_token_ids.first().copied()
    }

    /// Chat-framed passkey prompts cut from the haystack.
    fn prompts(
        &self,
        prompts: usize,
        prompt_len: usize,
        key_digits: usize,
        seed: u64,
        chat: bool,
        depth: [f64; 2],
    ) -> Result<recurformer::convert::probes::CopySet> {
        let hay: Vec<&[u32]> = self.streams.iter().map(Vec::as_slice).collect();
        recurformer::convert::passkey::family_cases(
            self.loaded.tokenizer()?,
            &hay,
            self.eos(),
            &recurformer::convert::passkey::PasskeyOptions {
                prompts,
                prompt_len,
                key_digits,
                seed,
                haystack_files: self.names.clone(),
                chat,
                depth,
            },
            self.family,
        )
    }
}

/// Loads the base model at `model_path` and checks it has the report's shape.
fn load_base(
    args: &PlanArgs,
    model_path: &std::path::Path,
    report: &RecencyReport,
) -> Result<Base> {
    use recurformer::formats::text::{load_documents, token_stream};
    args.threads.apply();
    let loaded = recurformer::checkpoint::loader::load(model_path)?;
    let shape = PlanShape::from_report(report);
    let c = &loaded.model.cfg;
    anyhow::ensure!(
        (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ) == (
            shape.num_layers,
            shape.num_attention_heads,
            shape.num_key_value_heads
        ),
        "{} does not have the shape of the model {} was made from ({} layers, {} heads, {} KV \
         heads against {}, {}, {})",
        model_path.display(),
        args.recency.display(),
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        shape.num_layers,
        shape.num_attention_heads,
        shape.num_key_value_heads
    );
    let family = args.prompt_family.into();
    // Haystacks: each a list of files or directories that form one token stream.
    let haystacks: Vec<Vec<PathBuf>> = match (family, args.check_data.is_empty()) {
        (PromptFamily::Passkey, true) => vec![crate::default_calibration_files()],
        (PromptFamily::Passkey, false) => vec![args.check_data.clone()],
        (PromptFamily::Varied, true) => vec![
            crate::default_calibration_files(),
            vec![recurformer::repo_root().join(VARIED_SECOND_HAYSTACK)],
        ],
        (PromptFamily::Varied, false) => args.check_data.iter().map(|p| vec![p.clone()]).collect(),
    };
    // Held-out text named as a haystack is refused.
    let named: Vec<PathBuf> = haystacks.iter().flatten().cloned().collect();
    recurformer::formats::domains::check_not_heldout(&named, "plan's prompt haystacks")?;
    let eos = c.eos_token_ids.first().copied();
    let mut streams = Vec::with_capacity(haystacks.len());
    for files in &haystacks {
        streams.push(token_stream(
            &load_documents(files)?,
            loaded.tokenizer()?,
            eos,
        )?);
    }
    let names = haystacks
        .iter()
        .map(|files| {
            files
                .iter()
                .map(|f| shown_path(f))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Ok(Base {
        loaded,
        streams,
        names,
        family,
    })
}

/// The harm ranking recorded in the plan.json at `path` (`rule.harm`), checked against the
/// report's shape.
fn load_ranking(
    path: &std::path::Path,
    report: &RecencyReport,
) -> Result<recurformer::model::plan::HarmRanking> {
    let text =
        recurformer::formats::io::read_text(path, recurformer::formats::io::JSON_FILE_LIMIT)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let h = v.get("rule").and_then(|r| r.get("harm")).with_context(|| {
        format!(
            "{} has no harm ranking (rule.harm): was it made with --rank harm?",
            path.display()
        )
    })?;
    let r: recurformer::model::plan::HarmRanking = serde_json::from_value(h.clone())
        .with_context(|| format!("{}: rule.harm is not a harm ranking", path.display()))?;
    let shape = PlanShape::from_report(report);
    if let Some(e) = r
        .groups
        .iter()
        .find(|e| e.layer >= shape.num_layers || e.group >= shape.num_key_value_heads)
    {
        anyhow::bail!(
            "{}: rule.harm names layer {} group {}, the report's model has {} layers of {} KV groups",
            path.display(),
            e.layer,
            e.group,
            shape.num_layers,
            shape.num_key_value_heads
        );
    }
    Ok(r)
}

/// The harm ranking of `plan --rank harm` (`convert::ceiling::group_harm`).
fn rank_by_harm(
    args: &PlanArgs,
    b: &Base,
    report: &RecencyReport,
    rules: &[recurformer::model::plan::ProtectRule],
) -> Result<recurformer::model::plan::HarmRanking> {
    anyhow::ensure!(
        args.rank_prompts >= 1 && args.rank_candidates >= 1 && args.check_window >= 1,
        "--rank-prompts {}, --rank-candidates {} and --check-window {} must be at least 1",
        args.rank_prompts,
        args.rank_candidates,
        args.check_window
    );
    let set = rank_prompt_set(args, b)?;
    // Protected groups are never replaced: measuring them would be wasted.
    let mut groups = unprotected_candidates(report, rules, args.rank_candidates)?;
    let mut ranking = recurformer::model::plan::HarmRanking {
        prompts: args.rank_prompts,
        prompt_len: args.rank_context,
        depth: [args.rank_depth[0], args.rank_depth[1]],
        family: b.family,
        seed: RANK_SEED,
        sinks: args.check_sinks,
        window: args.check_window,
        candidates: groups.len(),
        unprotected_only: true,
        groups: Vec::new(),
        merged_from: Vec::new(),
    };
    // Entries of an earlier ranking on the same prompts are reused as they are.
    let mut reused = Vec::new();
    if let Some(path) = &args.rank_extend {
        let old = load_ranking(path, report)?;
        anyhow::ensure!(
            old.merged_from.is_empty(),
            "{}: its harm ranking merges several measurements (--rank-from A --rank-from B); \
             --rank-extend needs one measurement",
            path.display()
        );
        if let Some((field, ours, theirs)) = ranking.prompt_mismatch(&old) {
            anyhow::bail!(
                "{}: its harm ranking was measured with {field} {theirs}, this one asks for \
                 {ours}: --rank-extend reuses measurements on the same prompts only",
                path.display()
            );
        }
        reused = old
            .groups
            .into_iter()
            .filter(|e| groups.binary_search(&(e.layer, e.group)).is_ok())
            .collect();
        groups.retain(|g| !reused.iter().any(|e| (e.layer, e.group) == *g));
        eprintln!(
            "rank: {} of the {} candidates reused from {}",
            reused.len(),
            ranking.candidates,
            shown_path(path)
        );
    }
    let template = recurformer::model::plan::Plan::by_fraction(report, 0.0, 0)?;
    eprintln!(
        "rank: {} groups, each restricted alone to {} sinks + {} recent keys, on {} {} prompts of {} tokens (depth {}..{}, seed {RANK_SEED})",
        groups.len(),
        args.check_sinks,
        args.check_window,
        args.rank_prompts,
        b.family.name(),
        args.rank_context,
        args.rank_depth[0],
        args.rank_depth[1]
    );
    let t0 = std::time::Instant::now();
    let pb = crate::progress_bar(groups.len() as u64, "rank");
    let entries = recurformer::convert::ceiling::group_harm(
        &b.loaded.model,
        &template,
        &set,
        args.check_sinks,
        args.check_window,
        &groups,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    eprintln!("rank: measured in {:.0} s", t0.elapsed().as_secs_f64());
    ranking.groups = reused.into_iter().chain(entries).collect();
    ranking.groups.sort_by_key(|e| (e.layer, e.group));
    Ok(ranking)
}

/// Of the `n` most recency-aware groups, those the protection `rules` leave replaceable, sorted by
/// (layer, group). (The pool is the top `n` either way, so protection does not pull less local
/// groups into it: groups harmless alone can be harmful together, BENCHMARKS.md, "A larger pool
/// ranked alone makes it worse".)
fn unprotected_candidates(
    report: &RecencyReport,
    rules: &[recurformer::model::plan::ProtectRule],
    n: usize,
) -> Result<Vec<(usize, usize)>> {
    let protected = recurformer::convert::protect::protected_groups(report, rules)?;
    let mut ranked = report.group_scores();
    ranked.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut groups: Vec<(usize, usize)> = ranked
        .iter()
        .take(n)
        .filter(|&&(l, g, _)| protected[l][g].is_empty())
        .map(|&(l, g, _)| (l, g))
        .collect();
    groups.sort_unstable();
    Ok(groups)
}

/// The harm ranking's (and the refinement's) prompts: chat-framed 7-digit pass keys of the
/// --rank-* settings, seed RANK_SEED.
fn rank_prompt_set(args: &PlanArgs, b: &Base) -> Result<recurformer::convert::probes::CopySet> {
    b.prompts(
        args.rank_prompts,
        args.rank_context,
        7,
        RANK_SEED,
        true,
        [args.rank_depth[0], args.rank_depth[1]],
    )
}

/// `--refine`: swaps measured in the plan's own context (`convert::ceiling::refine_in_context`).
fn refine(
    args: &PlanArgs,
    b: &Base,
    report: &RecencyReport,
    rules: &[recurformer::model::plan::ProtectRule],
    plan: recurformer::model::plan::Plan,
) -> Result<recurformer::model::plan::Plan> {
    // The harm ranking's candidates and the unprotected ones of the --rank-candidates most
    // recency-aware groups (a ranking from before `unprotected_only` measured protected ones too).
    let protected = recurformer::convert::protect::protected_groups(report, rules)?;
    let mut candidates = unprotected_candidates(report, rules, args.rank_candidates)?;
    if let Some(h) = &plan.rule.harm {
        candidates.extend(
            h.groups
                .iter()
                .map(|e| (e.layer, e.group))
                .filter(|&(l, g)| protected[l][g].is_empty()),
        );
    }
    candidates.sort_unstable();
    candidates.dedup();
    let set = rank_prompt_set(args, b)?;
    let settings = recurformer::model::plan::Refinement {
        prompts: args.rank_prompts,
        prompt_len: args.rank_context,
        depth: [args.rank_depth[0], args.rank_depth[1]],
        family: b.family,
        seed: RANK_SEED,
        sinks: args.check_sinks,
        window: args.check_window,
        max_swaps: args.refine,
        groups: Vec::new(),
        restored: Vec::new(),
        replaced: Vec::new(),
    };
    let kept = candidates
        .iter()
        .filter(|&&(l, g)| !plan.layers[l].mamba_groups.contains(&g))
        .count();
    let total = plan.replaced_groups() + kept;
    eprintln!(
        "refine: {} replaced groups handed back and {kept} kept candidates restricted, each alone beside the plan's, on {} {} prompts of {} tokens (depth {}..{}, seed {RANK_SEED})",
        plan.replaced_groups(),
        args.rank_prompts,
        b.family.name(),
        args.rank_context,
        args.rank_depth[0],
        args.rank_depth[1]
    );
    let t0 = std::time::Instant::now();
    let pb = crate::progress_bar(total as u64, "refine");
    let out = recurformer::convert::ceiling::refine_in_context(
        &b.loaded.model,
        &plan,
        &set,
        settings,
        &candidates,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    let r = out
        .rule
        .refine
        .as_ref()
        .expect("refine_in_context records it");
    let harm = |g: &recurformer::model::plan::GroupRef| {
        r.groups
            .iter()
            .find(|e| (e.layer, e.group) == (g.layer, g.group))
            .map_or(f64::NAN, |e| e.harm.answer)
    };
    eprintln!(
        "refine: measured in {:.0} s; {} swaps",
        t0.elapsed().as_secs_f64(),
        r.restored.len()
    );
    for (o, i) in r.restored.iter().zip(&r.replaced) {
        eprintln!(
            "refine: L{}G{} back to attention (gains {:.3} nats), L{}G{} replaced instead (costs {:.3})",
            o.layer,
            o.group,
            -harm(o),
            i.layer,
            i.group,
            harm(i)
        );
    }
    Ok(out)
}

/// The causal check (`convert::ceiling`) of `plan` with the base model `b`.
fn check(
    args: &PlanArgs,
    b: &Base,
    report: &RecencyReport,
    plan: recurformer::model::plan::Plan,
) -> Result<recurformer::model::plan::Plan> {
    use recurformer::convert::ceiling::check_plan;
    use recurformer::model::plan::CeilingSettings;
    let base = &b.loaded.model;
    let s = CeilingSettings {
        prompts: args.check_prompts,
        prompt_len: args.check_context,
        sinks: args.check_sinks,
        window: args.check_window,
        max_swaps: args.max_swaps,
        key_digits: args.check_key_digits,
        chat: !args.check_plain,
        depth: [args.check_depth[0], args.check_depth[1]],
        family: b.family,
        ..CeilingSettings::default()
    };
    anyhow::ensure!(
        s.prompts >= 1 && s.window >= 1,
        "--check-prompts {} and --check-window {} must be at least 1",
        s.prompts,
        s.window
    );
    let set = b.prompts(
        s.prompts,
        s.prompt_len,
        s.key_digits,
        s.seed,
        s.chat,
        s.depth,
    )?;
    eprintln!(
        "check: {} {} prompts of {} tokens ({}-digit keys, depth {}..{}, {}, seed {}), restricted groups see {} sinks + {} recent keys",
        s.prompts,
        b.family.name(),
        s.prompt_len,
        s.key_digits,
        s.depth[0],
        s.depth[1],
        if s.chat { "chat framing" } else { "plain text" },
        s.seed,
        s.sinks,
        s.window
    );
    let t0 = std::time::Instant::now();
    let out = check_plan(base, &plan, report, &set, &s, &mut |m| {
        eprintln!("check: {m}")
    })?;
    if let Some(c) = &out.ceiling {
        let kept = c.swaps.iter().filter(|x| x.accepted).count();
        println!(
            "ceiling (base with the replaced groups restricted to {} sinks + {} recent keys), exact \
             passkeys of {}: base {}, plan {}, after {} kept swap(s) of {} tried {} ({:.0} s)",
            s.sinks,
            s.window,
            s.prompts,
            c.base_correct,
            c.planned_correct,
            kept,
            c.swaps.len(),
            c.final_correct,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(out)
}

/// `recurformer recency-diff`: how stable the scores and the chosen groups are between two
/// calibration sets.
#[derive(Args)]
pub struct RecencyDiffArgs {
    /// First recency report (e.g. from Austen).
    pub a: PathBuf,
    /// Second recency report of the same model (e.g. from the essays).
    pub b: PathBuf,
    /// Replacement fractions at which to compare the chosen group sets.
    #[arg(long, num_args = 1.., default_values_t = [0.25, 0.5, 0.75])]
    pub fractions: Vec<f64>,
    /// Minimum attention groups kept per layer for those plans.
    #[arg(long, default_value_t = 0)]
    pub min_attention_groups_per_layer: usize,
}

pub fn recency_diff(args: RecencyDiffArgs) -> Result<()> {
    use recurformer::convert::recency::{spearman, RecencyReport};
    let a = RecencyReport::load(&args.a)?;
    let b = RecencyReport::load(&args.b)?;
    if (a.num_layers, a.num_attention_heads, a.num_key_value_heads)
        != (b.num_layers, b.num_attention_heads, b.num_key_value_heads)
    {
        anyhow::bail!(
            "{} and {} are for different model shapes ({}x{} heads vs {}x{})",
            args.a.display(),
            args.b.display(),
            a.num_layers,
            a.num_attention_heads,
            b.num_layers,
            b.num_attention_heads
        );
    }
    let ga: Vec<f64> = a.group_scores().iter().map(|g| g.2).collect();
    let gb: Vec<f64> = b.group_scores().iter().map(|g| g.2).collect();
    let heads = |r: &RecencyReport| -> Vec<f64> {
        r.layers
            .iter()
            .flat_map(|l| l.heads.iter().map(|h| h.recency))
            .collect()
    };
    println!(
        "Spearman rank correlation, KV-group mean recency ({} groups): {:.4}",
        ga.len(),
        spearman(&ga, &gb)?
    );
    println!(
        "Spearman rank correlation, query-head recency ({} heads):  {:.4}",
        heads(&a).len(),
        spearman(&heads(&a), &heads(&b))?
    );
    println!(
        "{:>9} {:>9} {:>9} {:>8} {:>8}",
        "fraction", "replaced", "common", "changed", "jaccard"
    );
    for &f in &args.fractions {
        let pa = recurformer::model::plan::Plan::by_fraction(
            &a,
            f,
            args.min_attention_groups_per_layer,
        )?;
        let pb = recurformer::model::plan::Plan::by_fraction(
            &b,
            f,
            args.min_attention_groups_per_layer,
        )?;
        let set =
            |p: &recurformer::model::plan::Plan| -> std::collections::BTreeSet<(usize, usize)> {
                p.layers
                    .iter()
                    .flat_map(|l| l.mamba_groups.iter().map(move |&g| (l.layer, g)))
                    .collect()
            };
        let (sa, sb) = (set(&pa), set(&pb));
        let common = sa.intersection(&sb).count();
        let union = sa.union(&sb).count();
        println!(
            "{:>9.2} {:>9} {:>9} {:>8} {:>8.3}",
            f,
            sa.len(),
            common,
            sa.len() - common,
            if union == 0 {
                1.0
            } else {
                common as f64 / union as f64
            }
        );
    }
    Ok(())
}
