//! File output that never leaves a half-written file behind: write a temporary sibling, then rename.

use anyhow::{Context, Result};
use std::path::Path;

/// How a path is named in reports, tables and recorded commands: relative to the current
/// directory (climbing with `..` where the two share more than the filesystem root), otherwise as
/// given. A report run from the repository then names `data/models/x.gguf`, not the absolute path
/// of the machine that made it.
pub fn shown_path(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_absolute() => relative_to(path, &cwd),
        _ => path.display().to_string(),
    }
}

/// `path` relative to the directory `base` (both absolute), or `path` itself when they share
/// nothing below the root.
fn relative_to(path: &Path, base: &Path) -> String {
    use std::path::Component;
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let only_root = p
        .iter()
        .take(common)
        .all(|c| matches!(c, Component::RootDir | Component::Prefix(_)));
    if only_root {
        return path.display().to_string();
    }
    let mut rel = std::path::PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &p[common..] {
        rel.push(c.as_os_str());
    }
    if rel.as_os_str().is_empty() {
        rel.push(".");
    }
    rel.display().to_string()
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_shown_relative_to_the_working_directory() {
        let base = Path::new("/work/repo/crates/cli");
        assert_eq!(
            relative_to(Path::new("/work/repo/crates/cli/x.json"), base),
            "x.json"
        );
        assert_eq!(
            relative_to(Path::new("/work/repo/data/m.gguf"), base),
            "../../data/m.gguf"
        );
        assert_eq!(relative_to(Path::new("/work/repo/crates/cli"), base), ".");
        // Nothing in common below the root: the path as given.
        assert_eq!(
            relative_to(Path::new("/tmp/out/r.md"), base),
            "/tmp/out/r.md"
        );
        assert_eq!(shown_path(Path::new("runs/demo")), "runs/demo");
    }
}
