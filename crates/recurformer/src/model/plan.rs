//! The hybrid plan (DESIGN.md, "Selection is per KV group"): which KV groups of each layer stay
//! softmax attention and which become a Mamba mixer. This is `plan.json`.
//!
//! Under grouped-query attention the cache is stored per KV head, so a group (one KV head and the
//! `group_size` query heads that read it; head h reads group h / group_size) is replaced whole or
//! not at all. How a plan is chosen from the analysis is `convert::select`; this file is the plan
//! as data, which the decoder and the cache read.
//!
//! The plan is validated wherever it is read ([`Plan::load`], [`Plan::validate`]): layer count,
//! groups forming a partition of 0..num_key_value_heads, head lists holding exactly the query heads
//! of their groups. Its predicted cache bytes follow the accounting functions below, which are the
//! single source of truth the hybrid cache implementation follows.

use crate::formats::config::ModelConfig;
use crate::model::cache::KvDtype;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Context lengths at which a plan predicts its cache bytes (1K, 8K, 32K, 128K tokens).
pub const PREDICTED_TOKENS: [usize; 4] = [1024, 8192, 32768, 131072];

/// Causal depthwise conv kernel of the mixer (DESIGN.md, "The mixer").
pub const MIXER_CONV_KERNEL: usize = 4;

/// Bytes per cached element: KV cache, conv state and SSM state are all f32.
pub const F32_BYTES: usize = 4;

/// The model shape a plan is for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlanShape {
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl PlanShape {
    pub fn from_config(cfg: &ModelConfig) -> Self {
        PlanShape {
            num_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        }
    }

    /// The shape recorded in a recency report (no model needed).
    /// Query heads per KV group.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Query heads of KV group `g`: g*group_size .. (g+1)*group_size.
    pub fn group_heads(&self, g: usize) -> std::ops::Range<usize> {
        let gs = self.group_size();
        g * gs..(g + 1) * gs
    }

    fn check(&self) -> Result<()> {
        let s = self;
        if s.num_layers == 0 || s.num_attention_heads == 0 || s.num_key_value_heads == 0 {
            bail!(
                "shape has {} layers, {} query heads, {} KV heads: all must be positive",
                s.num_layers,
                s.num_attention_heads,
                s.num_key_value_heads
            );
        }
        if !s.num_attention_heads.is_multiple_of(s.num_key_value_heads) {
            bail!(
                "{} query heads cannot be grouped over {} KV heads",
                s.num_attention_heads,
                s.num_key_value_heads
            );
        }
        if s.head_dim == 0 {
            bail!("head_dim is 0");
        }
        Ok(())
    }
}

/// How the groups were chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selection {
    /// Nothing replaced ([`Plan::empty`]).
    None,
    /// Groups listed by hand ([`Plan::from_groups`]).
    Manual,
    /// Replace a group iff its mean recency >= `tau`.
    Threshold { tau: f64 },
    /// Replace the `requested_groups` = round(`replace_fraction` * total groups) highest-scoring
    /// groups (before the per-layer minimum hands some back).
    ReplaceFraction {
        replace_fraction: f64,
        requested_groups: usize,
    },
}

/// The rule and the inputs that produced a plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanRule {
    #[serde(flatten)]
    pub selection: Selection,
    /// Every layer keeps at least this many attention groups.
    pub min_attention_groups_per_layer: usize,
    /// Recency window w of the scores (from the report).
    pub window: Option<usize>,
    /// The recency file the scores came from (set by whoever read it).
    pub recency_file: Option<String>,
    /// The `model` string of that recency file.
    pub recency_model: Option<String>,
    /// Groups kept as attention on probe evidence (`convert::protect`); absent when no protection
    /// ran (plans written before it, or `plan --protect none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<Protection>,
    /// Present when the budget was filled by causal harm instead of recency (`plan --rank harm`,
    /// `convert::ceiling::group_harm`): the settings and every measured group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harm: Option<HarmRanking>,
    /// Present when the plan was refined by swaps measured in its own context (`plan --refine`,
    /// `convert::ceiling::refine_in_context`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<Refinement>,
}

/// One KV group named by layer and group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupRef {
    pub layer: usize,
    pub group: usize,
}

/// A plan refined in its own context: with the plan's groups restricted to `sinks` + `window`
/// recent keys, each replaced group was handed back alone and each kept candidate restricted as
/// well alone (`convert::ceiling::toggle_harm`) on `prompts` passkey prompts of `prompt_len`
/// tokens (needle depth `depth`, seed `seed`); then the replaced groups whose return gains most
/// were swapped, pair by pair, for the kept candidates whose loss costs least, while the gain
/// exceeded the cost (at most `max_swaps` pairs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Refinement {
    pub prompts: usize,
    pub prompt_len: usize,
    pub depth: [f64; 2],
    /// Which prompts (`convert::passkey::PromptFamily`); plans before this field: passkey.
    #[serde(default)]
    pub family: crate::convert::passkey::PromptFamily,
    pub seed: u64,
    pub sinks: usize,
    pub window: usize,
    pub max_swaps: usize,
    /// Every measured group in the plan's context before the swaps: a replaced group's `answer`
    /// is minus what handing it back gains, a kept group's what restricting it as well costs.
    pub groups: Vec<GroupHarmEntry>,
    /// The groups handed back to attention, in swap order.
    pub restored: Vec<GroupRef>,
    /// The groups replaced instead, pairwise with `restored`.
    pub replaced: Vec<GroupRef>,
}

/// What restricting one KV group alone to sinks + a recent window costs the base model, averaged
/// over the ranking's passkey prompts (`convert::ceiling::group_harm`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupHarm {
    /// Drop of the answer's log-probability (nats, summed over the answer's tokens).
    pub answer: f64,
    /// Rise of the mean log-loss of the prose tokens before the answer (nats per token).
    pub prose: f64,
}

/// One measured group of a [`HarmRanking`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupHarmEntry {
    pub layer: usize,
    pub group: usize,
    #[serde(flatten)]
    pub harm: GroupHarm,
}

/// The harm ranking of a plan: the `candidates` most recency-aware groups (less those the
/// protection rules keep, when `unprotected_only`) were each restricted alone to `sinks` +
/// `window` recent keys on `prompts` passkey prompts of `prompt_len` tokens (chat-framed, 7-digit
/// keys, the needle's depth drawn from `depth`, seed `seed`: not the check's prompts), and the
/// budget was filled with the least harmful (by `answer`) of them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HarmRanking {
    pub prompts: usize,
    pub prompt_len: usize,
    /// Range of the needle's depth in the prompts' filler (plans before this field: 0..1).
    #[serde(default = "full_depth")]
    pub depth: [f64; 2],
    /// Which prompts (`convert::passkey::PromptFamily`); plans before this field: passkey.
    #[serde(default)]
    pub family: crate::convert::passkey::PromptFamily,
    pub seed: u64,
    pub sinks: usize,
    pub window: usize,
    pub candidates: usize,
    /// The protected groups among the most recency-aware were not measured (they are never
    /// replaced); `candidates` counts the measured ones. Plans before this field: false.
    #[serde(default)]
    pub unprotected_only: bool,
    pub groups: Vec<GroupHarmEntry>,
    /// When this ranking combines several measurements (`plan --rank-from A --rank-from B`): the
    /// measurements themselves; `groups` then holds each group's largest cost over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<HarmRanking>,
}

impl HarmRanking {
    /// Combines rankings measured on different prompts (contexts, depths) of the same candidate
    /// groups: each group costs the most it cost in any of them, so a group that one setting
    /// shows to be needed is kept even where another sees no loss. `names` label the parts in
    /// errors. The header fields (prompts, context, ...) are the first part's; all parts are kept
    /// in `merged_from`.
    pub fn merge_max(parts: Vec<HarmRanking>, names: &[String]) -> anyhow::Result<HarmRanking> {
        anyhow::ensure!(!parts.is_empty(), "no harm ranking to merge");
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let key = |r: &HarmRanking| {
            let mut k: Vec<(usize, usize)> = r.groups.iter().map(|e| (e.layer, e.group)).collect();
            k.sort_unstable();
            k
        };
        let first = key(&parts[0]);
        for (i, p) in parts.iter().enumerate().skip(1) {
            if key(p) != first {
                anyhow::bail!(
                    "the harm rankings of {} and {} measured different groups ({} and {}): merge \
                     rankings of the same candidates",
                    names.first().map(String::as_str).unwrap_or("part 0"),
                    names.get(i).map(String::as_str).unwrap_or("another part"),
                    parts[0].groups.len(),
                    p.groups.len()
                );
            }
        }
        let mut groups = parts[0].groups.clone();
        for g in &mut groups {
            for p in &parts[1..] {
                let e = p
                    .groups
                    .iter()
                    .find(|e| (e.layer, e.group) == (g.layer, g.group))
                    .expect("same groups, checked above");
                g.harm.answer = g.harm.answer.max(e.harm.answer);
                g.harm.prose = g.harm.prose.max(e.harm.prose);
            }
        }
        let flat: Vec<HarmRanking> = parts
            .into_iter()
            .flat_map(|p| {
                if p.merged_from.is_empty() {
                    vec![p]
                } else {
                    p.merged_from
                }
            })
            .collect();
        let mut out = flat[0].clone();
        out.groups = groups;
        out.merged_from = flat;
        Ok(out)
    }
}

impl HarmRanking {
    /// The first prompt setting (prompts, context, depth, seed, sinks, window) in which `other`
    /// differs from this ranking, as `(field, ours, theirs)`; `None` when their measurements of a
    /// group are interchangeable (each group is restricted alone, so one group's harm does not
    /// depend on which other groups were measured).
    pub fn prompt_mismatch(&self, other: &HarmRanking) -> Option<(&'static str, String, String)> {
        let fields: [(&'static str, String, String); 7] = [
            (
                "family",
                self.family.name().to_string(),
                other.family.name().to_string(),
            ),
            (
                "prompts",
                self.prompts.to_string(),
                other.prompts.to_string(),
            ),
            (
                "prompt_len",
                self.prompt_len.to_string(),
                other.prompt_len.to_string(),
            ),
            (
                "depth",
                format!("{:?}", self.depth),
                format!("{:?}", other.depth),
            ),
            ("seed", self.seed.to_string(), other.seed.to_string()),
            ("sinks", self.sinks.to_string(), other.sinks.to_string()),
            ("window", self.window.to_string(), other.window.to_string()),
        ];
        fields.into_iter().find(|(_, a, b)| a != b)
    }
}

fn full_depth() -> [f64; 2] {
    [0.0, 1.0]
}

/// One protection rule: a KV group is kept as attention when its `probe` score (the max over its
/// query heads) is at least `min_score`, or when it is among the `top_k` groups by that score.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectRule {
    /// A probe name of `convert::probes` (induction, echo, previous_token, copy_top1, copy_mass).
    pub probe: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

/// A group kept as attention by the protection rules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectedGroup {
    pub layer: usize,
    pub group: usize,
    /// The probes whose rules picked it.
    pub probes: Vec<String>,
}

/// What protection did to a plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Protection {
    /// A group is protected when any rule picks it.
    pub rules: Vec<ProtectRule>,
    /// Every protected group (whether or not the recency rule wanted it), layer-major order.
    pub protected: Vec<ProtectedGroup>,
    /// Protected groups that the same rule without protection would have replaced.
    pub kept_from_recency: Vec<(usize, usize)>,
}

/// One layer's split. All four lists are sorted ascending.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerPlan {
    pub layer: usize,
    /// KV groups that stay softmax attention (and keep a KV cache).
    pub attention_groups: Vec<usize>,
    /// The query heads of `attention_groups`.
    pub attention_heads: Vec<usize>,
    /// KV groups whose heads are replaced by the layer's Mamba mixer.
    pub mamba_groups: Vec<usize>,
    /// The query heads of `mamba_groups`; the mixer writes their o_proj input slots.
    pub mamba_heads: Vec<usize>,
}

impl LayerPlan {
    /// Builds the layer from its set of replaced groups (any order, no duplicates).
    fn from_mamba_groups(layer: usize, shape: &PlanShape, mamba: &[usize]) -> Self {
        let mut mamba_groups = mamba.to_vec();
        mamba_groups.sort_unstable();
        let attention_groups: Vec<usize> = (0..shape.num_key_value_heads)
            .filter(|g| !mamba_groups.contains(g))
            .collect();
        let heads = |gs: &[usize]| -> Vec<usize> {
            gs.iter().flat_map(|&g| shape.group_heads(g)).collect()
        };
        LayerPlan {
            layer,
            attention_heads: heads(&attention_groups),
            mamba_heads: heads(&mamba_groups),
            attention_groups,
            mamba_groups,
        }
    }
}

/// Predicted cache bytes at one context length.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CacheBytes {
    pub tokens: usize,
    /// KV cache of the base model (every group kept).
    pub base_kv_bytes: usize,
    /// KV cache of the kept attention groups.
    pub kv_bytes: usize,
    /// Conv + SSM state of every layer's mixer (independent of `tokens`).
    pub mamba_state_bytes: usize,
    /// `kv_bytes + mamba_state_bytes`.
    pub total_bytes: usize,
    /// `total_bytes / base_kv_bytes`.
    pub ratio_to_base: f64,
}

/// KV-cache bytes of `kv_groups` kept KV groups (summed over layers) at `tokens` tokens:
/// `2 (K and V) * kv_groups * head_dim * 4 (f32) * tokens`.
pub fn kv_cache_bytes(kv_groups: usize, head_dim: usize, tokens: usize) -> usize {
    kv_cache_bytes_in(kv_groups, head_dim, tokens, KvDtype::F32)
}

/// [`kv_cache_bytes`] with keys and values stored as `kv` (2 bytes a value in f16).
pub fn kv_cache_bytes_in(kv_groups: usize, head_dim: usize, tokens: usize, kv: KvDtype) -> usize {
    2 * kv_groups * head_dim * kv.size() * tokens
}

/// Recurrent state bytes of the mixer part that replaces one KV group with `g` query heads, SSM
/// head size `p` (= head_dim), state size `n` (= head_dim) and conv kernel `kernel`, all f32:
///
/// - SSM state: one (p x n) matrix per query head: `g * p * n * 4`;
/// - conv state: the last `kernel - 1` inputs of every convolved channel. x (p channels, from the
///   group's W_v) and B (n channels, from the group's W_k) are shared by the group; C (n channels,
///   from each head's W_q) is per query head: `(p + n + g * n) * (kernel - 1) * 4`.
///
/// Example, SmolLM2-135M (g = 3, p = n = 64, kernel 4): 49152 + 3840 = 52992 bytes.
pub fn mixer_state_bytes(g: usize, p: usize, n: usize, kernel: usize) -> usize {
    let ssm = g * p * n;
    let conv = (p + n + g * n) * kernel.saturating_sub(1);
    (ssm + conv) * F32_BYTES
}

/// The hybrid plan: the content of `plan.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// The model shape this plan is for.
    pub shape: PlanShape,
    pub rule: PlanRule,
    /// One entry per layer, in order.
    pub layers: Vec<LayerPlan>,
    /// Predicted cache bytes at [`PREDICTED_TOKENS`]; derived from `layers`, recomputed by
    /// [`Plan::save`] and [`Plan::load`].
    pub predicted_cache: Vec<CacheBytes>,
    /// The causal check of the plan on held-out passkey prompts, with the swaps it made
    /// (`convert::ceiling`, `plan --check-model`); absent when it did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<CeilingCheck>,
}

/// Settings of the plan's causal check (`convert::ceiling`), recorded with its result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CeilingSettings {
    pub prompts: usize,
    /// Prompt tokens before the answer.
    pub prompt_len: usize,
    pub key_digits: usize,
    /// Which prompts (`convert::passkey::PromptFamily`); plans before this field: passkey.
    #[serde(default)]
    pub family: crate::convert::passkey::PromptFamily,
    pub seed: u64,
    pub sinks: usize,
    pub window: usize,
    /// Swap trials at most (0: measure only).
    pub max_swaps: usize,
    /// The prompts are framed by the model's chat template (`convert::passkey`).
    #[serde(default)]
    pub chat: bool,
    /// Range of the needle's depth in the filler.
    #[serde(default = "default_check_depth")]
    pub depth: [f64; 2],
}

fn default_check_depth() -> [f64; 2] {
    crate::convert::passkey::PASSKEY_DEPTH
}

impl Default for CeilingSettings {
    fn default() -> Self {
        CeilingSettings {
            prompts: 24,
            prompt_len: 1024,
            key_digits: 6,
            seed: 1009,
            sinks: 4,
            window: 32,
            max_swaps: 4,
            chat: false,
            depth: crate::convert::passkey::PASSKEY_DEPTH,
            family: crate::convert::passkey::PromptFamily::Passkey,
        }
    }
}

/// One swap trial: `out` (layer, group) handed back to attention, `into` replaced instead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwapTrial {
    pub out: (usize, usize),
    pub into: (usize, usize),
    /// Prompts answered exactly with the swap; `None` when the trial was stopped after the
    /// prompts the plan missed, none of which it answered (so it could not raise the count).
    pub correct: Option<usize>,
    pub accepted: bool,
}

/// The check's result, stored in plan.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CeilingCheck {
    pub settings: CeilingSettings,
    /// Prompts the base model answers exactly (every answer token the argmax).
    pub base_correct: usize,
    /// ... with the plan's groups restricted to the window, as the rules chose them.
    pub planned_correct: usize,
    /// ... after the accepted swaps (the plan written).
    pub final_correct: usize,
    pub swaps: Vec<SwapTrial>,
}

impl Plan {
    /// A plan that replaces nothing: the hybrid model equals the base model.
    pub fn empty(cfg: &ModelConfig) -> Self {
        Self::empty_for(PlanShape::from_config(cfg))
    }

    /// [`Plan::empty`] for a bare shape.
    pub fn empty_for(shape: PlanShape) -> Self {
        let rule = PlanRule {
            selection: Selection::None,
            min_attention_groups_per_layer: 0,
            window: None,
            recency_file: None,
            recency_model: None,
            protection: None,
            harm: None,
            refine: None,
        };
        Self::from_mamba_sets(shape, rule, &vec![Vec::new(); shape.num_layers])
    }

    /// A plan replacing exactly `mamba[l]` (KV group indices) in each layer l; validated.
    pub fn from_groups(cfg: &ModelConfig, mamba: &[Vec<usize>]) -> Result<Self> {
        let shape = PlanShape::from_config(cfg);
        if mamba.len() != shape.num_layers {
            bail!(
                "plan lists groups for {} layers, the model has {}",
                mamba.len(),
                shape.num_layers
            );
        }
        let rule = PlanRule {
            selection: Selection::Manual,
            min_attention_groups_per_layer: 0,
            window: None,
            recency_file: None,
            recency_model: None,
            protection: None,
            harm: None,
            refine: None,
        };
        let plan = Self::from_mamba_sets(shape, rule, mamba);
        plan.validate(cfg)?;
        Ok(plan)
    }

    pub(crate) fn from_mamba_sets(shape: PlanShape, rule: PlanRule, mamba: &[Vec<usize>]) -> Self {
        let layers = mamba
            .iter()
            .enumerate()
            .map(|(l, m)| LayerPlan::from_mamba_groups(l, &shape, m))
            .collect();
        let mut plan = Plan {
            shape,
            rule,
            layers,
            predicted_cache: Vec::new(),
            ceiling: None,
        };
        plan.refresh_predicted_cache();
        plan
    }

    /// Recomputes `predicted_cache` from the layers.
    pub fn refresh_predicted_cache(&mut self) {
        self.predicted_cache = PREDICTED_TOKENS
            .iter()
            .map(|&t| self.predicted_bytes(t))
            .collect();
    }

    /// Attention (kept) KV groups summed over layers.
    pub fn kept_groups(&self) -> usize {
        self.layers.iter().map(|l| l.attention_groups.len()).sum()
    }

    /// Replaced KV groups summed over layers.
    pub fn replaced_groups(&self) -> usize {
        self.layers.iter().map(|l| l.mamba_groups.len()).sum()
    }

    /// True when nothing is replaced.
    pub fn is_empty(&self) -> bool {
        self.replaced_groups() == 0
    }

    /// KV-cache bytes of the base model at `tokens`: [`kv_cache_bytes`] of every group.
    pub fn base_kv_bytes(&self, tokens: usize) -> usize {
        let all = self.shape.num_layers * self.shape.num_key_value_heads;
        kv_cache_bytes(all, self.shape.head_dim, tokens)
    }

    /// KV-cache bytes of the kept groups at `tokens`: [`kv_cache_bytes`] of [`Plan::kept_groups`].
    pub fn kv_bytes(&self, tokens: usize) -> usize {
        kv_cache_bytes(self.kept_groups(), self.shape.head_dim, tokens)
    }

    /// Mixer state bytes of layer `layer`: [`mixer_state_bytes`] per replaced group, with
    /// g = group_size, P = N = head_dim, kernel [`MIXER_CONV_KERNEL`]. 0 without replaced groups.
    pub fn layer_mamba_state_bytes(&self, layer: usize) -> usize {
        let s = &self.shape;
        let per_group =
            mixer_state_bytes(s.group_size(), s.head_dim, s.head_dim, MIXER_CONV_KERNEL);
        self.layers
            .get(layer)
            .map_or(0, |l| l.mamba_groups.len() * per_group)
    }

    /// Mixer state bytes of all layers (constant in the context length).
    pub fn mamba_state_bytes(&self) -> usize {
        (0..self.layers.len())
            .map(|l| self.layer_mamba_state_bytes(l))
            .sum()
    }

    /// Predicted cache bytes at `tokens`: KV of the kept groups plus the mixers' state, against the
    /// base model's KV cache.
    pub fn predicted_bytes(&self, tokens: usize) -> CacheBytes {
        self.predicted_bytes_in(tokens, KvDtype::F32)
    }

    /// [`Plan::predicted_bytes`] with the KV caches (the plan's and the base model's) stored as
    /// `kv`; the mixers' state stays f32.
    pub fn predicted_bytes_in(&self, tokens: usize, kv: KvDtype) -> CacheBytes {
        let all = self.shape.num_layers * self.shape.num_key_value_heads;
        let base_kv_bytes = kv_cache_bytes_in(all, self.shape.head_dim, tokens, kv);
        let kv_bytes = kv_cache_bytes_in(self.kept_groups(), self.shape.head_dim, tokens, kv);
        let mamba_state_bytes = self.mamba_state_bytes();
        let total_bytes = kv_bytes + mamba_state_bytes;
        let ratio_to_base = if base_kv_bytes == 0 {
            1.0
        } else {
            total_bytes as f64 / base_kv_bytes as f64
        };
        CacheBytes {
            tokens,
            base_kv_bytes,
            kv_bytes,
            mamba_state_bytes,
            total_bytes,
            ratio_to_base,
        }
    }

    /// Checks the plan against a model: head_dim, then [`Plan::validate_shape`].
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        if self.shape.head_dim != cfg.head_dim {
            bail!(
                "plan is for head_dim {}, model has head_dim {}",
                self.shape.head_dim,
                cfg.head_dim
            );
        }
        self.validate_shape(
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        )
    }

    /// Checks the plan against a model shape: the recorded shape matches, one entry per layer, each
    /// layer's groups partition 0..num_key_value_heads, head lists hold exactly the query heads of
    /// their groups (whole groups only), lists are sorted, the rule's per-layer minimum holds.
    pub fn validate_shape(
        &self,
        num_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
    ) -> Result<()> {
        let s = self.shape;
        s.check().context("plan shape")?;
        if (s.num_layers, s.num_attention_heads, s.num_key_value_heads)
            != (num_layers, num_attention_heads, num_key_value_heads)
        {
            bail!(
                "plan is for {} layers, {} query heads, {} KV heads; the model has {} layers, \
                 {} query heads, {} KV heads",
                s.num_layers,
                s.num_attention_heads,
                s.num_key_value_heads,
                num_layers,
                num_attention_heads,
                num_key_value_heads
            );
        }
        if self.layers.len() != num_layers {
            bail!(
                "plan lists {} layers, the model has {num_layers}",
                self.layers.len()
            );
        }
        match self.rule.selection {
            Selection::Threshold { tau } if !tau.is_finite() => {
                bail!("plan rule: threshold {tau} is not finite")
            }
            Selection::ReplaceFraction {
                replace_fraction: f,
                ..
            } if !(0.0..=1.0).contains(&f) => {
                bail!("plan rule: replace fraction {f} is outside [0, 1]")
            }
            _ => {}
        }
        if let Some(p) = &self.rule.protection {
            for g in &p.protected {
                let kept = self
                    .layers
                    .get(g.layer)
                    .is_some_and(|l| l.attention_groups.contains(&g.group));
                if !kept {
                    bail!(
                        "plan rule protects layer {} group {} ({}), but the plan does not keep it \
                         as attention",
                        g.layer,
                        g.group,
                        g.probes.join(", ")
                    );
                }
            }
        }
        let min_keep = self.rule.min_attention_groups_per_layer;
        for (i, lp) in self.layers.iter().enumerate() {
            if lp.layer != i {
                bail!("plan entry {i} is for layer {}", lp.layer);
            }
            self.validate_layer(lp)
                .with_context(|| format!("plan layer {i}"))?;
            if lp.attention_groups.len() < min_keep {
                bail!(
                    "plan layer {i}: {} attention groups, the rule keeps at least {min_keep}",
                    lp.attention_groups.len()
                );
            }
        }
        Ok(())
    }

    fn validate_layer(&self, lp: &LayerPlan) -> Result<()> {
        let s = self.shape;
        let (n_kv, n_q, gs) = (s.num_key_value_heads, s.num_attention_heads, s.group_size());
        for (name, list, bound, what) in [
            ("attention_groups", &lp.attention_groups, n_kv, "KV groups"),
            ("mamba_groups", &lp.mamba_groups, n_kv, "KV groups"),
            ("attention_heads", &lp.attention_heads, n_q, "query heads"),
            ("mamba_heads", &lp.mamba_heads, n_q, "query heads"),
        ] {
            if let Some(&x) = list.iter().find(|&&x| x >= bound) {
                bail!("{name} has index {x}, out of range (the model has {bound} {what})");
            }
            if let Some(w) = list.windows(2).find(|w| w[0] >= w[1]) {
                if w[0] == w[1] {
                    bail!("{name} lists {} twice", w[0]);
                }
                bail!("{name} {list:?} is not in ascending order");
            }
        }
        // Groups: a partition of 0..n_kv.
        for g in 0..n_kv {
            let a = lp.attention_groups.contains(&g);
            let m = lp.mamba_groups.contains(&g);
            if a && m {
                bail!("group {g} is in both attention_groups and mamba_groups");
            }
            if !a && !m {
                bail!("group {g} is in neither attention_groups nor mamba_groups");
            }
        }
        // Heads: exactly the query heads of the listed groups.
        check_heads(
            "attention_heads",
            &lp.attention_heads,
            &lp.attention_groups,
            "mamba_groups",
            gs,
        )?;
        check_heads(
            "mamba_heads",
            &lp.mamba_heads,
            &lp.mamba_groups,
            "attention_groups",
            gs,
        )?;
        Ok(())
    }

    /// Reads `plan.json` as it is, not yet checked against any model.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::formats::io::read_text(path, crate::formats::io::JSON_FILE_LIMIT)?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid plan file", path.display()))
    }

    /// Reads `plan.json`, validates it against `cfg` and recomputes `predicted_cache`.
    pub fn load(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let mut plan = Plan::read(path)?;
        plan.validate(cfg)
            .with_context(|| format!("{} does not fit the model", path.display()))?;
        plan.refresh_predicted_cache();
        Ok(plan)
    }

    /// Writes `plan.json` atomically, with `predicted_cache` recomputed from the layers.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut plan = self.clone();
        plan.refresh_predicted_cache();
        let mut text = serde_json::to_string_pretty(&plan)?;
        text.push('\n');
        crate::formats::io::write_atomic(path, text.as_bytes())
    }

    /// One line per layer: the replaced and kept groups with their heads.
    pub fn layer_summary(&self) -> String {
        let gs = self.shape.group_size();
        let fmt = |groups: &[usize]| -> String {
            if groups.is_empty() {
                return "-".to_string();
            }
            groups
                .iter()
                .map(|&g| format!("g{g} (h{}-{})", g * gs, (g + 1) * gs - 1))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.layers
            .iter()
            .map(|l| {
                format!(
                    "layer {:>3}: mamba {:<40} attention {}\n",
                    l.layer,
                    fmt(&l.mamba_groups),
                    fmt(&l.attention_groups)
                )
            })
            .collect()
    }

    /// The predicted-cache table in human-readable units.
    pub fn cache_table(&self) -> String {
        self.cache_table_in(KvDtype::F32)
    }

    /// [`Plan::cache_table`] with the KV caches stored as `kv`.
    pub fn cache_table_in(&self, kv: KvDtype) -> String {
        let mut out = format!(
            "{:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>7}\n",
            "tokens", "base KV", "KV", "Mamba state", "total", "ratio"
        );
        for c in PREDICTED_TOKENS
            .iter()
            .map(|&t| self.predicted_bytes_in(t, kv))
        {
            out.push_str(&format!(
                "{:>8}  {:>12}  {:>12}  {:>12}  {:>12}  {:>7.4}\n",
                human_tokens(c.tokens),
                human_bytes(c.base_kv_bytes),
                human_bytes(c.kv_bytes),
                human_bytes(c.mamba_state_bytes),
                human_bytes(c.total_bytes),
                c.ratio_to_base
            ));
        }
        out
    }
}

/// Checks that `heads` is exactly the query heads of `groups` (group g owns heads
/// g*gs .. (g+1)*gs); `other` names the list the remaining groups are in.
fn check_heads(
    name: &str,
    heads: &[usize],
    groups: &[usize],
    other: &str,
    gs: usize,
) -> Result<()> {
    for &h in heads {
        let g = h / gs;
        if !groups.contains(&g) {
            bail!(
                "{name} has head {h} of KV group {g}, but group {g} is in {other}: groups are \
                 replaced whole (group {g} is heads {}..={})",
                g * gs,
                (g + 1) * gs - 1
            );
        }
    }
    for &g in groups {
        for h in g * gs..(g + 1) * gs {
            if !heads.contains(&h) {
                bail!(
                    "{name} lacks head {h} of KV group {g}: groups are replaced whole (group {g} \
                     is heads {}..={})",
                    g * gs,
                    (g + 1) * gs - 1
                );
            }
        }
    }
    Ok(())
}

fn human_tokens(t: usize) -> String {
    if t >= 1024 && t.is_multiple_of(1024) {
        format!("{}K", t / 1024)
    } else {
        t.to_string()
    }
}

/// Bytes in binary units (KiB = 1024 B).
pub fn human_bytes(b: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{x:.0} {}", units[u])
    } else {
        format!("{x:.2} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::{GroupHarm, GroupHarmEntry, HarmRanking};

    #[test]
    fn a_harm_ranking_written_before_the_depth_field_loads_with_the_full_range() {
        let old = r#"{"prompts":8,"prompt_len":1024,"seed":2001,"sinks":4,"window":32,"candidates":0,"groups":[]}"#;
        let r: HarmRanking = serde_json::from_str(old).unwrap();
        assert_eq!(r.depth, [0.0, 1.0]);
        let new = serde_json::to_string(&HarmRanking {
            depth: [0.0, 0.3],
            ..r
        })
        .unwrap();
        let back: HarmRanking = serde_json::from_str(&new).unwrap();
        assert_eq!(back.depth, [0.0, 0.3]);
    }

    #[test]
    fn rankings_on_other_prompts_are_told_apart_by_the_first_differing_setting() {
        let a = ranking(1024, &[(0, 0, 0.1)]);
        assert_eq!(a.prompt_mismatch(&ranking(1024, &[(1, 2, 0.3)])), None);
        let b = HarmRanking {
            depth: [0.0, 0.3],
            window: 64,
            ..ranking(1024, &[])
        };
        assert_eq!(
            a.prompt_mismatch(&b),
            Some(("depth", "[0.0, 1.0]".into(), "[0.0, 0.3]".into()))
        );
        assert_eq!(
            a.prompt_mismatch(&ranking(4096, &[])).map(|m| m.0),
            Some("prompt_len")
        );
        let varied = HarmRanking {
            family: crate::convert::passkey::PromptFamily::Varied,
            ..ranking(1024, &[])
        };
        assert_eq!(
            a.prompt_mismatch(&varied),
            Some(("family", "passkey".into(), "varied".into()))
        );
    }

    fn ranking(len: usize, costs: &[(usize, usize, f64)]) -> HarmRanking {
        HarmRanking {
            prompts: 4,
            prompt_len: len,
            depth: [0.0, 1.0],
            family: Default::default(),
            seed: 1,
            sinks: 4,
            window: 32,
            candidates: costs.len(),
            unprotected_only: false,
            groups: costs
                .iter()
                .map(|&(layer, group, answer)| GroupHarmEntry {
                    layer,
                    group,
                    harm: GroupHarm {
                        answer,
                        prose: answer / 10.0,
                    },
                })
                .collect(),
            merged_from: Vec::new(),
        }
    }

    #[test]
    fn merged_rankings_keep_each_groups_largest_cost_and_their_parts() {
        let short = ranking(1024, &[(0, 0, 0.3), (1, 2, 0.0), (2, 1, -0.1)]);
        let long = ranking(4096, &[(2, 1, 0.5), (0, 0, 0.1), (1, 2, 0.02)]);
        let names = ["a".to_string(), "b".to_string()];
        let m = HarmRanking::merge_max(vec![short.clone(), long.clone()], &names).unwrap();
        let cost = |l, g| {
            m.groups
                .iter()
                .find(|e| (e.layer, e.group) == (l, g))
                .unwrap()
                .harm
                .answer
        };
        assert_eq!((cost(0, 0), cost(1, 2), cost(2, 1)), (0.3, 0.02, 0.5));
        assert_eq!(m.prompt_len, 1024);
        assert_eq!(m.merged_from, vec![short.clone(), long.clone()]);
        // Merging a merge flattens the parts.
        let again = HarmRanking::merge_max(vec![m, long.clone()], &names).unwrap();
        assert_eq!(again.merged_from.len(), 3);
        // Different candidates are refused, naming the files.
        let other = ranking(4096, &[(0, 0, 0.1), (1, 2, 0.0), (3, 0, 0.0)]);
        let e = HarmRanking::merge_max(vec![short, other], &names).unwrap_err();
        assert!(e.to_string().contains("a and b"), "{e}");
    }
}
