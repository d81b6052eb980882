//! `recurformer eval --domains` on the default model (short windows): one table with a row per
//! held-out domain and a column per model, the per-domain numbers in eval.json; and training or
//! calibration data that holds a held-out document is refused.

use anyhow::{Context, Result};
use serde_json::Value;
use std::process::{Command, Output};

fn recurformer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_recurformer"))
        .args(args)
        .output()
        .expect("running recurformer")
}

#[test]
fn eval_domains_reports_one_table_of_every_heldout_domain() -> Result<()> {
    let model = recurformer::default_model_path();
    assert!(
        model.exists(),
        "{} is missing: run scripts/setup.sh",
        model.display()
    );
    let m = model.to_str().context("model path")?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("eval");
    let o = recurformer(&[
        "eval",
        "-m",
        m,
        "-m",
        m,
        "--tasks",
        "perplexity",
        "--domains",
        "--context",
        "32",
        "64",
        "--limit",
        "1",
        "--threads",
        "2",
        "--out",
        out.to_str().context("out path")?,
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "eval --domains failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{stdout}");
    let names = ["fiction", "scripture", "technical", "code", "encyclopedic"];
    assert!(
        stdout.contains("| domain | context | windows |"),
        "{stdout}"
    );
    for n in names {
        for c in [32, 64] {
            // The same model twice: the same perplexity, ratio 1.
            let row = stdout
                .lines()
                .find(|l| l.starts_with(&format!("| {n} | {c} | 1 |")))
                .with_context(|| format!("no row for {n} at {c} in\n{stdout}"))?;
            assert!(row.ends_with("(1.000x) |"), "{row}");
        }
    }
    // No --data table: the domains replace it.
    assert!(
        !stdout.contains("| model | context | windows | ppl (all)"),
        "{stdout}"
    );
    let j: Value = serde_json::from_str(&std::fs::read_to_string(out.join("eval.json"))?)?;
    let domains: Vec<&str> = j["domains"]
        .as_array()
        .context("eval.json has no domains")?
        .iter()
        .filter_map(|d| d["domain"].as_str())
        .collect();
    assert_eq!(domains, names);
    for r in j["results"].as_array().context("results")? {
        let per = r["perplexity_domains"]
            .as_array()
            .context("perplexity_domains")?;
        assert_eq!(per.len(), names.len());
        for (d, n) in per.iter().zip(names) {
            assert_eq!(d["domain"], n);
            let p = &d["perplexity"][1];
            assert_eq!(
                (p["context"].as_u64(), p["windows"].as_u64()),
                (Some(64), Some(1))
            );
            let ppl = p["ppl"].as_f64().context("ppl")?;
            assert!(ppl.is_finite() && ppl > 1.0, "{n}: perplexity {ppl}");
        }
        assert!(r["perplexity"].is_null());
    }

    // One domain by name, and a name that is not one.
    let o = recurformer(&[
        "eval",
        "-m",
        m,
        "--tasks",
        "perplexity",
        "--domains",
        "code",
        "--context",
        "32",
        "--limit",
        "1",
        "--threads",
        "2",
        "--out",
        out.to_str().context("out path")?,
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| code |"))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(!stdout.contains("| fiction |"), "{stdout}");
    let o = recurformer(&[
        "eval",
        "-m",
        m,
        "--domains",
        "poetry",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("poetry") && err.contains("encyclopedic"),
        "{err}"
    );
    Ok(())
}

#[test]
fn heldout_documents_are_refused_as_calibration_text() {
    // The whole networkx folder holds its heldout/ half; analyze refuses it before loading a model.
    let dir = recurformer::repo_root().join("data/text/networkx");
    assert!(
        dir.exists(),
        "{} is missing: run scripts/setup.sh",
        dir.display()
    );
    let o = recurformer(&[
        "analyze",
        "--data",
        dir.to_str().unwrap(),
        "--out",
        "/nonexistent/r.json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "analyze accepted held-out text");
    assert!(
        err.contains("analyze --data") && err.contains("held-out document of the code domain"),
        "{err}"
    );
}
