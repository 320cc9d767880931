//! Helpers shared by the CLI tests: the real `baton` binary, fresh temporary directories, and the flags of the
//! tiny model most tests train.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// A command for the `baton` binary cargo built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_baton"))
}

/// Runs `baton args…` to completion.
pub fn baton(args: &[&str]) -> Output {
    bin().args(args).output().expect("the baton binary runs")
}

/// The run's stderr as text.
pub fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory path for this test process under the system's temporary directory, `baton-{suite}-{pid}-{name}`,
/// removed if it exists (not created) and removed again when the guard drops, so no run leaves its checkpoints
/// behind (a wide-head run writes hundreds of MB).
pub fn tmp(suite: &str, name: &str) -> TmpDir {
    let dir = std::env::temp_dir().join(format!("baton-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    TmpDir(dir)
}

/// A temporary path that is removed (with everything under it) on drop; derefs to the path.
#[derive(Debug)]
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TmpDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `baton train` on a 2-block model with d_model 16, 2 heads and context 16, a batch of 4 sequences in 2
/// micro-batches; the suites add the stages, steps and evaluation settings they need.
pub const TINY_MODEL: &[&str] = &[
    "train",
    "--layers",
    "2",
    "--d-model",
    "16",
    "--heads",
    "2",
    "--seq",
    "16",
    "--batch",
    "4",
    "--microbatches",
    "2",
];

/// [`TINY_MODEL`] followed by `extra`.
pub fn tiny_with(extra: &[&'static str]) -> Vec<&'static str> {
    [TINY_MODEL, extra].concat()
}

/// Runs `baton` with `base`, `--out <fresh dir>` and each case's flags, and checks that it exits 2 with one line
/// containing the case's text, writing nothing.
pub fn assert_usage_errors(suite: &str, base: &[&str], cases: &[(&[&str], &str)]) {
    for (flags, want) in cases {
        let out = tmp(suite, "bad");
        let mut args: Vec<&str> = base.to_vec();
        let out_s = out.to_str().unwrap().to_string();
        args.extend(["--out", &out_s]);
        args.extend(flags.iter());
        let o = baton(&args);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {e}");
        assert!(e.contains(want), "{flags:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{flags:?}: {e}");
        assert!(!out.exists(), "{flags:?}: nothing is written");
    }
}
