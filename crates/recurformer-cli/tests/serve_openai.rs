//! `recurformer serve` end to end: the real binary on loopback with the default model, driven by
//! the real Python `openai` client (tests/serve_openai.py: streamed vs whole greedy answers,
//! seeds, 8 concurrent clients, a disconnect mid-stream, a catalogue of bad requests).
//!
//! The client is installed by this test into the git-ignored `.venvs/openai` at the repository
//! root the first time (`python3 -m venv`, then pip; about a minute), and reused afterwards.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The client version the checks were written against.
const OPENAI: &str = "openai==3.51.0";

fn venv_python() -> Result<PathBuf> {
    let venv = recurformer::repo_root().join(".venvs/openai");
    let py = venv.join("bin/python");
    let has_client = |py: &Path| {
        Command::new(py)
            .args([
                "-c",
                &format!(
                    "import openai; assert openai.__version__ == '{}'",
                    &OPENAI[8..]
                ),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    if py.exists() && has_client(&py) {
        return Ok(py);
    }
    eprintln!("installing {OPENAI} into {} (once)", venv.display());
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("running python3 -m venv")?;
    if !ok.success() {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", OPENAI])
        .status()
        .context("running pip")?;
    if !ok.success() || !has_client(&py) {
        bail!("pip install {OPENAI} into {} failed", venv.display());
    }
    Ok(py)
}

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_openai_client_talks_to_the_real_server() -> Result<()> {
    let model = recurformer::default_model_path();
    assert!(
        model.exists(),
        "{} is missing: run scripts/setup.sh",
        model.display()
    );
    let py = venv_python()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_recurformer"))
        .args(["serve", "--port", "0", "--parallel", "4", "--threads", "2"])
        .arg("--model")
        .arg(&model)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting recurformer serve")?;
    let stderr = child.stderr.take().context("server stderr")?;
    let server = Server(child);
    // The server prints its address first; the rest of its log is kept for a failure message.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("[server] {line}");
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    while addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the server printed no address within 30 s")?;
        addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(String::from);
    }
    let base = addr.expect("set above");
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py"))
        .arg(&base)
        .arg(model.file_name().expect("a file name"))
        .output()
        .context("running tests/serve_openai.py")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "serve_openai.py failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"));
    drop(server);
    Ok(())
}
