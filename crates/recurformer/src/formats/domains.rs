//! The text domains that `scripts/setup.sh` places under `data/text/` (DESIGN.md, "Real parts"):
//! which files of each domain are for training and calibration, and which are held out for
//! evaluation only. One table, so the defaults of `analyze`, `train` and `eval`, the refusal of
//! held-out text as training data, and the split test all read the same lists.
//!
//! The new domains' folders hold `train/` and `heldout/` subfolders; `setup.sh` checks a manifest
//! hash that fixes which documents went where (one in eight by name hash, see
//! `scripts/decode_domains.py`). Naming a domain's folder itself as data takes both halves.

use crate::formats::text::collect_files;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One kind of text.
#[derive(Debug, Clone, Copy)]
pub struct Domain {
    /// The name `eval --domains` takes and reports.
    pub name: &'static str,
    /// What the text is, for `--help` and reports.
    pub about: &'static str,
    /// Training (and calibration) files or folders, relative to `data/text/`.
    pub train: &'static [&'static str],
    /// Files or folders held out for evaluation only, relative to `data/text/`; empty when the
    /// domain holds nothing out.
    pub heldout: &'static [&'static str],
}

/// The five Austen novels that calibration and training use (Persuasion is held out).
const AUSTEN_TRAIN: [&str; 5] = [
    "austen/sense_and_sensibility.txt",
    "austen/pride_and_prejudice.txt",
    "austen/mansfield_park.txt",
    "austen/emma.txt",
    "austen/northanger_abbey.txt",
];

/// Every domain, in report order.
pub const DOMAINS: [Domain; 6] = [
    Domain {
        name: "fiction",
        about: "Jane Austen's novels; Persuasion held out",
        train: &AUSTEN_TRAIN,
        heldout: &["austen/persuasion.txt"],
    },
    Domain {
        name: "essays",
        about: "Paul Graham's essays; all train, and they are the needle task's haystack",
        train: &["paul_graham"],
        heldout: &[],
    },
    Domain {
        name: "scripture",
        about: "the King James Bible by book; 9 of 66 books held out",
        train: &["kjv_books/train"],
        heldout: &["kjv_books/heldout"],
    },
    Domain {
        name: "technical",
        about: "Linux man pages rendered to text; 26 of 207 pages held out",
        train: &["man_pages/train"],
        heldout: &["man_pages/heldout"],
    },
    Domain {
        name: "code",
        about: "the Python source of networkx 3.4.2; 68 of 542 files held out",
        train: &["networkx/train"],
        heldout: &["networkx/heldout"],
    },
    Domain {
        name: "encyclopedic",
        about: "the Free On-line Dictionary of Computing; 72 of 569 parts held out",
        train: &["foldoc/train"],
        heldout: &["foldoc/heldout"],
    },
];

/// Files that contain held-out text without being a held-out document themselves (the whole
/// Bible holds the held-out books), relative to `data/text/`: refused as training data too.
pub const CONTAINS_HELDOUT: [&str; 1] = ["kjv/bible.txt"];

/// `data/text/` of this checkout.
pub fn text_root() -> PathBuf {
    crate::repo_root().join("data/text")
}

impl Domain {
    pub fn train_paths(&self, root: &Path) -> Vec<PathBuf> {
        self.train.iter().map(|p| root.join(p)).collect()
    }

    pub fn heldout_paths(&self, root: &Path) -> Vec<PathBuf> {
        self.heldout.iter().map(|p| root.join(p)).collect()
    }
}

/// The domain called `name`; the error lists the names there are.
pub fn domain(name: &str) -> Result<&'static Domain> {
    match DOMAINS.iter().find(|d| d.name == name) {
        Some(d) => Ok(d),
        None => bail!(
            "unknown text domain {name:?} (available: {})",
            DOMAINS.map(|d| d.name).join(", ")
        ),
    }
}

/// The domains that hold documents out, in report order.
pub fn heldout_domains() -> Vec<&'static Domain> {
    DOMAINS.iter().filter(|d| !d.heldout.is_empty()).collect()
}

/// The default training mix of `train` and `demo` (`train --mix`): each named domain's share of
/// the training tokens. Measured against the former default (Austen and the essays) in
/// BENCHMARKS.md, "A broad training mix": every other domain nearer the base for 1.7 % on
/// Persuasion; the shares themselves are a first choice, not tuned. The essays are left out
/// because they are the needle task's haystack.
pub const DEFAULT_MIX: &str =
    "fiction=0.4,scripture=0.15,technical=0.15,code=0.15,encyclopedic=0.15";

/// A training mix parsed from `name=share,...`: domains of [`DOMAINS`] with positive shares,
/// normalised to sum to 1, each named once.
pub fn parse_mix(spec: &str) -> Result<Vec<(&'static Domain, f64)>> {
    let mut out: Vec<(&'static Domain, f64)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, share)) = part.split_once('=') else {
            bail!("training mix {spec:?}: {part:?} is not name=share (e.g. fiction=0.4)");
        };
        let d = domain(name.trim()).with_context(|| format!("training mix {spec:?}"))?;
        let w: f64 = share.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "training mix {spec:?}: the share of {name} ({share:?}) is not a number"
            )
        })?;
        if !(w.is_finite() && w > 0.0) {
            bail!("training mix {spec:?}: the share of {name} is {w}, not a positive number");
        }
        if out.iter().any(|(o, _)| o.name == d.name) {
            bail!("training mix {spec:?}: {} is named twice", d.name);
        }
        out.push((d, w));
    }
    if out.is_empty() {
        bail!("training mix {spec:?} names no domain");
    }
    let total: f64 = out.iter().map(|(_, w)| w).sum();
    Ok(out.into_iter().map(|(d, w)| (d, w / total)).collect())
}

/// The training files of the default mix's domains ([`DEFAULT_MIX`]; `train` takes a seeded
/// selection of them in the mix's proportions).
pub fn default_train_files(root: &Path) -> Vec<PathBuf> {
    parse_mix(DEFAULT_MIX)
        .expect("DEFAULT_MIX parses")
        .iter()
        .flat_map(|(d, _)| d.train_paths(root))
        .collect()
}

/// The default calibration text of `analyze` (and of `plan`'s check prompts): the fiction
/// domain's training novels.
pub fn default_calibration_files(root: &Path) -> Vec<PathBuf> {
    domain("fiction")
        .expect("a name of DOMAINS")
        .train_paths(root)
}

/// The default held-out text of `train` and `eval`: the fiction domain's (Persuasion).
pub fn default_heldout_files(root: &Path) -> Vec<PathBuf> {
    domain("fiction")
        .expect("a name of DOMAINS")
        .heldout_paths(root)
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// Every file under the held-out paths of every domain that exists under `root` (a domain that
/// `setup.sh` has not placed yet is skipped), canonicalised, with the domain it belongs to.
pub fn heldout_files(root: &Path) -> Result<Vec<(PathBuf, &'static str)>> {
    let mut out = Vec::new();
    for d in heldout_domains() {
        let paths: Vec<PathBuf> = d
            .heldout_paths(root)
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        if paths.is_empty() {
            continue;
        }
        for f in collect_files(&paths)? {
            out.push((canonical(&f), d.name));
        }
    }
    Ok(out)
}

/// Refuses training or calibration data (`what` names the flag) that holds a held-out document of
/// any domain, or a file that contains held-out text (`CONTAINS_HELDOUT`).
pub fn check_not_heldout(paths: &[PathBuf], what: &str) -> Result<()> {
    check_not_heldout_under(&text_root(), paths, what)
}

/// `check_not_heldout` with the domains under `root` instead of `data/text/`.
pub fn check_not_heldout_under(root: &Path, paths: &[PathBuf], what: &str) -> Result<()> {
    let mut held: Vec<(PathBuf, String)> = heldout_files(root)?
        .into_iter()
        .map(|(p, d)| (p, format!("a held-out document of the {d} domain")))
        .collect();
    for c in CONTAINS_HELDOUT {
        held.push((
            canonical(&root.join(c)),
            "a file that contains held-out documents".into(),
        ));
    }
    let held: std::collections::BTreeMap<PathBuf, String> = held.into_iter().collect();
    let mut bad = BTreeSet::new();
    for f in collect_files(paths)? {
        if let Some(why) = held.get(&canonical(&f)) {
            bad.insert(format!("{} is {why}", f.display()));
        }
    }
    if !bad.is_empty() {
        bail!(
            "{what}: {} (held-out text is for evaluation only; name a domain's train/ folder, \
             not the domain's whole folder)",
            bad.into_iter().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_normalise_and_refuse_bad_parts() {
        let m = parse_mix("fiction=2, code=1,scripture=1").unwrap();
        let got: Vec<(&str, f64)> = m.iter().map(|(d, w)| (d.name, *w)).collect();
        assert_eq!(got, [("fiction", 0.5), ("code", 0.25), ("scripture", 0.25)]);
        let sum: f64 = parse_mix(DEFAULT_MIX).unwrap().iter().map(|p| p.1).sum();
        assert!((sum - 1.0).abs() < 1e-12);
        for (spec, says) in [
            ("fiction", "not name=share"),
            ("poetry=1", "unknown text domain \"poetry\""),
            ("fiction=x", "is not a number"),
            ("fiction=0", "not a positive number"),
            ("fiction=1,fiction=2", "named twice"),
            ("", "names no domain"),
        ] {
            let e = format!("{:#}", parse_mix(spec).unwrap_err());
            assert!(e.contains(says), "{spec:?}: {e}");
        }
    }

    #[test]
    fn names_are_unique_and_looked_up() {
        let names: BTreeSet<&str> = DOMAINS.iter().map(|d| d.name).collect();
        assert_eq!(names.len(), DOMAINS.len());
        assert_eq!(domain("code").unwrap().train, &["networkx/train"]);
        let e = domain("poetry").unwrap_err().to_string();
        assert!(e.contains("poetry") && e.contains("scripture"), "{e}");
        assert_eq!(
            heldout_domains().iter().map(|d| d.name).collect::<Vec<_>>(),
            ["fiction", "scripture", "technical", "code", "encyclopedic"]
        );
    }

    #[test]
    fn refuses_held_out_files_in_a_temporary_tree() {
        // The check itself, on the real table but under a root that has only what this test
        // writes: a heldout/ file named directly or through a folder above it is refused, and so
        // is the whole Bible.
        let dir = std::env::temp_dir().join(format!("rf-domains-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("networkx/train")).unwrap();
        std::fs::create_dir_all(dir.join("networkx/heldout")).unwrap();
        std::fs::write(dir.join("networkx/train/a.py.txt"), "x = 1\n").unwrap();
        std::fs::write(dir.join("networkx/heldout/b.py.txt"), "y = 2\n").unwrap();
        let held = heldout_files(&dir).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].1, "code");
        assert!(held[0].0.ends_with("networkx/heldout/b.py.txt"));
        let check = |p: &str| check_not_heldout_under(&dir, &[dir.join(p)], "--data");
        check("networkx/train").unwrap();
        for bad in ["networkx", "networkx/heldout", "networkx/heldout/b.py.txt"] {
            let e = format!("{:#}", check(bad).unwrap_err());
            assert!(
                e.starts_with("--data: ")
                    && e.contains("b.py.txt is a held-out document of the code domain"),
                "{e}"
            );
        }
        std::fs::create_dir_all(dir.join("kjv")).unwrap();
        std::fs::write(dir.join("kjv/bible.txt"), "Genesis 1\n").unwrap();
        let e = format!("{:#}", check("kjv").unwrap_err());
        assert!(
            e.contains("bible.txt is a file that contains held-out"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
