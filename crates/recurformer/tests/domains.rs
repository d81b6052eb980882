//! The held-out split of the text domains (`formats::domains`, placed by scripts/setup.sh): no
//! held-out document is in a default training or calibration list or in any domain's training
//! folder, by path or by content, and each domain holds out what the split rule says.

mod common;
use anyhow::{ensure, Context, Result};
use common::*;
use recurformer::formats::domains::{self, DOMAINS};
use recurformer::formats::text::collect_files;
use recurformer::train::fnv64;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    for p in paths {
        ensure!(
            p.exists(),
            "{} is missing: run scripts/setup.sh",
            p.display()
        );
    }
    Ok(collect_files(paths)?
        .into_iter()
        .map(|p| p.canonicalize().unwrap_or(p))
        .collect())
}

#[test]
fn heldout_documents_never_train_or_calibrate() -> Result<()> {
    let root = root().join("data/text");
    // Held-out files of every domain, by path and by content hash.
    let mut held: BTreeMap<PathBuf, &str> = BTreeMap::new();
    for d in domains::heldout_domains() {
        for f in files(&d.heldout_paths(&root))? {
            held.insert(f, d.name);
        }
    }
    let mut held_hash: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for f in held.keys() {
        held_hash.insert(fnv64(&std::fs::read(f)?, 0), f.clone());
    }
    // Everything that trains or calibrates: the defaults and every domain's training folders.
    let mut lists: Vec<(String, Vec<PathBuf>)> = vec![
        (
            "default training".into(),
            domains::default_train_files(&root),
        ),
        (
            "default calibration".into(),
            domains::default_calibration_files(&root),
        ),
    ];
    for d in DOMAINS {
        lists.push((format!("{} training", d.name), d.train_paths(&root)));
    }
    let mut checked = 0;
    for (what, paths) in &lists {
        for f in files(paths)? {
            if let Some(d) = held.get(&f) {
                panic!("{} is held out ({d}) but in the {what} files", f.display());
            }
            let h = fnv64(&std::fs::read(&f)?, 0);
            if let Some(h) = held_hash.get(&h) {
                panic!(
                    "{} (in the {what} files) has the same text as the held-out {}",
                    f.display(),
                    h.display()
                );
            }
            checked += 1;
        }
    }
    println!(
        "{} held-out files against {checked} training / calibration files",
        held.len()
    );
    // The default held-out text of train and eval is the fiction domain's.
    assert_eq!(
        files(&domains::default_heldout_files(&root))?,
        files(&domains::domain("fiction")?.heldout_paths(&root))?
    );
    Ok(())
}

#[test]
fn heldout_text_is_not_copied_into_its_domains_training_text() -> Result<()> {
    // Whole-file hashes miss a document that was renamed or reflowed; a stretch from the middle
    // of each held-out document must not occur in its domain's training text either.
    let root = root().join("data/text");
    for d in domains::heldout_domains() {
        let mut train = String::new();
        for f in files(&d.train_paths(&root))? {
            train.push_str(&std::fs::read_to_string(&f)?);
            train.push('\n');
        }
        let mut n = 0;
        for f in files(&d.heldout_paths(&root))? {
            let text = std::fs::read_to_string(&f)?;
            let chars: Vec<char> = text.chars().collect();
            if chars.len() < 400 {
                continue;
            }
            let mid = chars.len() / 2;
            let probe: String = chars[mid - 100..mid + 100].iter().collect();
            assert!(
                !train.contains(&probe),
                "{}: 200 characters from its middle occur in the {} training text: {probe:?}",
                f.display(),
                d.name
            );
            n += 1;
        }
        println!("{}: {n} held-out documents probed", d.name);
    }
    Ok(())
}

#[test]
fn new_domains_hold_out_one_document_in_eight() -> Result<()> {
    // scripts/decode_domains.py: ceil(n / 8) documents, at least 2, held out in each split domain.
    let root = root().join("data/text");
    for d in domains::heldout_domains() {
        if d.name == "fiction" {
            continue; // the Austen novels: Persuasion, chosen by hand long before the rule
        }
        let train = files(&d.train_paths(&root))?.len();
        let held = files(&d.heldout_paths(&root))?.len();
        let n = train + held;
        assert_eq!(
            held,
            n.div_ceil(8).max(2),
            "{}: {held} of {n} held out",
            d.name
        );
        // The documents of a folder are disjoint by name too (a split, not a copy).
        let names = |ps: &[PathBuf]| -> Result<BTreeSet<String>> {
            files(ps)?
                .iter()
                .map(|p| {
                    p.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .context("file name")
                })
                .collect()
        };
        let (a, b) = (
            names(&d.train_paths(&root))?,
            names(&d.heldout_paths(&root))?,
        );
        assert!(a.is_disjoint(&b), "{}: a name is in both halves", d.name);
        // The table's description says the same counts.
        assert!(
            d.about.contains(&format!("{held} of {n}")),
            "{}: the description {:?} does not say {held} of {n}",
            d.name,
            d.about
        );
    }
    Ok(())
}
