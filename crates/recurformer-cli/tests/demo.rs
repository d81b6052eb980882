//! `recurformer demo --quick` end to end on the default model (tiny sizes): every stage runs, the
//! report carries the answers, a second run reuses every finished stage, and changing a setting
//! reruns exactly the stages it affects.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn demo(out: &Path, extra: &[&str]) -> Result<Output> {
    let o = Command::new(env!("CARGO_BIN_EXE_recurformer"))
        .args(["demo", "--quick", "--threads", "2", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .context("running recurformer demo")?;
    if !o.status.success() {
        panic!(
            "demo failed: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(o)
}

fn json(path: &Path) -> Result<Value> {
    Ok(serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

const STAGES: [&str; 8] = [
    "analyze",
    "plan",
    "convert",
    "train",
    "eval-perplexity",
    "eval-domains",
    "eval-retrieval",
    "bench",
];

#[test]
fn quick_demo_runs_end_to_end_and_reuses_finished_stages() -> Result<()> {
    let model = recurformer::default_model_path();
    assert!(
        model.exists(),
        "{} is missing: run scripts/setup.sh",
        model.display()
    );
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo");

    // First run: every stage runs.
    let o = demo(&out, &[])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("expected time on a 2-core CPU"), "{err}");
    let state = json(&out.join("demo_state.json"))?;
    for s in STAGES {
        assert_eq!(state["stages"][s]["status"], "done", "stage {s}: {state}");
    }
    let report = std::fs::read_to_string(out.join("REPORT.md"))?;
    for needle in [
        "## The answers",
        "| 8K |",
        "| 32K |",
        "**Quality.**",
        "**Speed.**",
        "![decode speed](bench/decode_speed.png)",
        "## 2. Training",
    ] {
        assert!(
            report.contains(needle),
            "REPORT.md lacks {needle:?}:\n{report}"
        );
    }
    // Models are named by a path relative to where the demo ran, never by this machine's
    // absolute path (the report is committed and read elsewhere).
    let root = recurformer::repo_root().display().to_string();
    for file in [
        "REPORT.md",
        "eval_perplexity/eval.md",
        "eval_retrieval/eval.md",
        "plan.json",
    ] {
        let text = std::fs::read_to_string(out.join(file))?;
        assert!(
            !text.contains(&root),
            "{file} names the absolute path {root}:\n{text}"
        );
    }
    for png in [
        "plan.png",
        "trained/loss.png",
        "bench/decode_speed.png",
        "bench/cache_bytes.png",
        "bench/ttft.png",
        "eval_retrieval/needle_0.png",
    ] {
        assert!(out.join(png).is_file(), "{png} missing");
    }
    // The evaluation compared base, untrained and trained on the same windows, with real numbers.
    let ppl = json(&out.join("eval_perplexity/eval.json"))?;
    let res = ppl["results"].as_array().context("results")?;
    assert_eq!(res.len(), 3);
    for r in res {
        let p = r["perplexity"][0]["ppl"].as_f64().context("ppl")?;
        assert!(p.is_finite() && p > 1.0, "{r}");
    }
    // Per-domain perplexity: every held-out domain for all three models, and its table in the
    // report (one row per domain, the trained-vs-base ratio filled in).
    let dom = json(&out.join("eval_domains/eval.json"))?;
    let dres = dom["results"].as_array().context("domain results")?;
    assert_eq!(dres.len(), 3);
    let names: Vec<&str> = dres[0]["perplexity_domains"]
        .as_array()
        .context("perplexity_domains")?
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    assert_eq!(
        names,
        ["fiction", "scripture", "technical", "code", "encyclopedic"]
    );
    for name in names {
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {name} | 128 | 1 |")))
            .with_context(|| format!("no {name} row in the domain table:\n{report}"))?;
        assert!(row.ends_with("x** |"), "{row}");
    }
    // Retrieval: teacher-forced by default, exact match with its interval and the McNemar test of
    // trained vs base in the report's answer, the induction probe for both models.
    let tasks = json(&out.join("eval_retrieval/eval.json"))?;
    assert_eq!(tasks["scoring"], "teacher-forced");
    let tres = tasks["results"].as_array().context("results")?;
    let p = tres[1]["needle"]["mcnemar_vs_first"]["p_value"]
        .as_f64()
        .context("McNemar p")?;
    assert!((0.0..=1.0).contains(&p), "{p}");
    for r in tres {
        let em = &r["needle"]["summary"]["exact_match"];
        assert!(em["low"].as_f64() <= em["rate"].as_f64(), "{em}");
        assert!(
            r["induction"]["overall"]["trials"].as_u64() == Some(2 * 3 * 15),
            "{r}"
        );
    }
    let line = report
        .lines()
        .find(|l| l.starts_with("Retrieval at contexts"))
        .context("retrieval answer line")?;
    assert!(
        line.contains("teacher-forced scoring")
            && line.contains("McNemar p = ")
            && line.contains("Induction")
            && line.contains("% ["),
        "{line}"
    );

    // The converted model's cache is smaller than the base's at every context.
    let bench = json(&out.join("bench/bench.json"))?;
    let pts = bench["recurformer"].as_array().context("points")?;
    for (b, h) in pts[0]
        .as_array()
        .context("base")?
        .iter()
        .zip(pts[1].as_array().context("hybrid")?)
    {
        assert!(
            h["cache_bytes"].as_f64() < b["cache_bytes"].as_f64(),
            "{b} vs {h}"
        );
        assert!(b["ttft_s"].as_f64().unwrap_or(0.0) > 0.0);
    }

    // Second run: nothing to do; every stage is reused and no output is rewritten.
    let stamp = |s: &str, st: &Value| st["stages"][s]["finished_unix"].clone();
    let model_mtime = std::fs::metadata(out.join("trained/model.safetensors"))?.modified()?;
    let o = demo(&out, &[])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("reused  ").count(),
        STAGES.len(),
        "every stage should be reused:\n{err}"
    );
    assert_eq!(
        std::fs::metadata(out.join("trained/model.safetensors"))?.modified()?,
        model_mtime
    );
    let state2 = json(&out.join("demo_state.json"))?;
    for s in STAGES {
        assert_eq!(stamp(s, &state), stamp(s, &state2), "stage {s} reran");
    }

    // A different fraction keeps the analysis and reruns the plan and everything after it.
    demo(&out, &["--fraction", "0.25"])?;
    let state3 = json(&out.join("demo_state.json"))?;
    assert_eq!(stamp("analyze", &state), stamp("analyze", &state3));
    let plan = json(&out.join("plan.json"))?;
    assert_eq!(plan["rule"]["replace_fraction"].as_f64(), Some(0.25));
    let args: Vec<String> = state3["stages"]["plan"]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    assert!(args.contains(&"0.25".to_string()), "{args:?}");
    for s in STAGES {
        assert_eq!(state3["stages"][s]["status"], "done", "stage {s}");
    }

    // A fraction the per-layer minimum cannot honour (90 % of 30 x 3 groups while every layer
    // keeps one) is capped at 2 of 3 groups per layer, and `plan` says so. (Without probe
    // protection, which would keep more groups: checked below.)
    let capped = dir.path().join("capped.json");
    let plan_cmd = |extra: &[&str], out_file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_recurformer"))
            .args(["plan", "--recency"])
            .arg(out.join("recency.json"))
            .args([
                "--replace-fraction",
                "0.9",
                "--min-attention-groups-per-layer",
                "1",
            ])
            .args(extra)
            .arg("--out")
            .arg(out_file)
            .output()
    };
    let o = plan_cmd(&["--protect", "none"], &capped)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("asks for 81 groups") && err.contains("replaced 60 instead"),
        "{err}"
    );
    let plan = json(&capped)?;
    let replaced: usize = plan["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .map(|l| l["mamba_groups"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(replaced, 60);
    assert!(plan["rule"].get("protection").is_none());

    // With the default probe protection, the protected groups are not replaced either, and the
    // warning names them.
    let protected = dir.path().join("protected.json");
    let o = plan_cmd(&[], &protected)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let plan = json(&protected)?;
    let prot = plan["rule"]["protection"]["protected"]
        .as_array()
        .context("protected groups")?;
    assert!(!prot.is_empty(), "{plan}");
    for g in prot {
        let (l, k) = (g["layer"].as_u64().unwrap(), g["group"].as_u64().unwrap());
        let mamba = plan["layers"][l as usize]["mamba_groups"]
            .as_array()
            .unwrap();
        assert!(
            !mamba.iter().any(|x| x.as_u64() == Some(k)),
            "L{l}G{k} replaced"
        );
    }
    assert!(
        err.contains(&format!("{} protected groups", prot.len())),
        "{err}"
    );

    // The harm ranking measures only groups protection leaves replaceable, and --rank-extend
    // measures only the candidates an earlier ranking on the same prompts lacks, reusing its
    // entries as they are.
    let protected_set: std::collections::BTreeSet<(u64, u64)> = prot
        .iter()
        .map(|g| (g["layer"].as_u64().unwrap(), g["group"].as_u64().unwrap()))
        .collect();
    let harm_plan = |candidates: &str, context: &str, extend: Option<&Path>, out_file: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_recurformer"));
        c.args(["plan", "--recency"])
            .arg(out.join("recency.json"))
            .args([
                "--replace-fraction",
                "0.01",
                "--rank",
                "harm",
                "--check-model",
            ])
            .arg(&model)
            .args(["--rank-prompts", "1", "--rank-context", context])
            .args(["--rank-candidates", candidates])
            .args([
                "--check-prompts",
                "1",
                "--check-context",
                "128",
                "--max-swaps",
                "0",
            ])
            .args(["--threads", "2", "--out"])
            .arg(out_file);
        if let Some(e) = extend {
            c.arg("--rank-extend").arg(e);
        }
        c.output()
    };
    let entries = |plan: &Value| -> Vec<(u64, u64, f64)> {
        plan["rule"]["harm"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["layer"].as_u64().unwrap(),
                    e["group"].as_u64().unwrap(),
                    e["answer"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let small = dir.path().join("harm_small.json");
    let o = harm_plan("3", "160", None, &small)?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let small_plan = json(&small)?;
    assert_eq!(small_plan["rule"]["harm"]["unprotected_only"], true);
    let first = entries(&small_plan);
    let larger = dir.path().join("harm_large.json");
    let o = harm_plan("8", "160", Some(&small), &larger)?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let second = entries(&json(&larger)?);
    assert!(
        !first.is_empty() && second.len() > first.len(),
        "the quick analysis should leave more unprotected groups among the top 8 than the top 3: {first:?} {second:?}"
    );
    assert!(
        err.contains(&format!(
            "{} of the {} candidates reused",
            first.len(),
            second.len()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "rank: {} groups, each restricted alone",
            second.len() - first.len()
        )),
        "{err}"
    );
    for e in &first {
        assert!(second.contains(e), "{e:?} not reused as it was: {second:?}");
    }
    for (l, g, _) in &second {
        assert!(
            !protected_set.contains(&(*l, *g)),
            "protected L{l}G{g} was measured"
        );
    }
    // Another prompt length is another measurement: refused, naming the field and both values.
    let o = harm_plan("8", "128", Some(&small), &dir.path().join("refused.json"))?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("prompt_len 160") && err.contains("asks for 128"),
        "{err}"
    );
    Ok(())
}
