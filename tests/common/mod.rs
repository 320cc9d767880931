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

/// A path for this test process under the system's temporary directory, `baton-{suite}-{pid}-{name}`, removed
/// if it exists (not created).
pub fn tmp(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
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
