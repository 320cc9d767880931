//! `baton train --compress ... --sync ...`: bytes per step in the metrics, the compressed settings recorded, bad
//! settings refused in one line, and compression residuals and DiLoCo's state carried through a checkpoint (a run
//! stopped and resumed is bitwise the uninterrupted one).

mod common;

use std::path::Path;

use baton::engine::checkpoint;
use common::{baton, err, tmp};

const SUITE: &str = "cli-compress";

/// A 2-block model, global batch 8 over 2 replicas × 2 stages, context 16.
const MODEL: &[&str] = &[
    "train",
    "--layers",
    "2",
    "--d-model",
    "32",
    "--heads",
    "2",
    "--seq",
    "16",
    "--batch",
    "8",
    "--eval-every",
    "0",
    "--steps",
    "6",
    "--save-every",
    "0",
    "--data-parallel",
    "2",
    "--stages",
    "2",
    "--microbatches",
    "2",
];

fn run(out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&str> = MODEL.to_vec();
    let out_s = out.to_str().unwrap();
    args.extend(["--out", out_s]);
    args.extend(extra);
    let o = baton(&args);
    assert!(o.status.success(), "baton {}: {}", args.join(" "), err(&o));
    err(&o)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn bytes(out: &Path) -> Vec<u64> {
    metrics(out).iter().map(|m| m["comm_bytes"].as_u64().unwrap()).collect()
}

#[test]
fn bytes_per_step_follow_the_setting() {
    let none = tmp(SUITE, "none");
    run(&none, &["--steps", "3"]);
    let dense = bytes(&none);
    assert!(dense.iter().all(|&b| b == dense[0] && b > 0), "{dense:?}");
    let bf16 = tmp(SUITE, "bf16");
    let log = run(&bf16, &["--steps", "3", "--compress", "bf16"]);
    assert!(bytes(&bf16).iter().all(|&b| 2 * b == dense[0]), "{:?}", bytes(&bf16));
    assert!(log.contains("--compress bf16 --sync bsp"), "{log}");
    assert!(log.contains("2.0× less"), "{log}");
    let m = metrics(&bf16);
    assert_eq!(m[0]["data_parallel"]["compress"][0][0], "bf16", "{}", m[0]);
    // PowerSGD: two uncompressed warm-up steps, then far fewer bytes.
    let psgd = tmp(SUITE, "psgd");
    run(&psgd, &["--steps", "4", "--compress", "powersgd:2:2"]);
    let b = bytes(&psgd);
    assert_eq!(&b[..2], &[dense[0], dense[0]], "{b:?}");
    assert!(b[2] * 3 < dense[0] && b[3] == b[2], "{b:?}");
    // DiLoCo every 3 steps: nothing on inner steps, the outer delta on the third.
    let diloco = tmp(SUITE, "diloco");
    let log = run(&diloco, &["--steps", "6", "--sync", "diloco:3"]);
    let b = bytes(&diloco);
    assert_eq!(b, vec![0, 0, dense[0], 0, 0, dense[0]], "{log}");
    let m = metrics(&diloco);
    assert_eq!(m[2]["data_parallel"]["outer_step"], true);
    assert!(log.contains("3.0× less"), "{log}");
}

#[test]
fn bad_settings_are_one_line_errors() {
    common::assert_usage_errors(
        SUITE,
        MODEL,
        &[
            (&["--compress", "topk:2"][..], "--compress"),
            (&["--compress", "powersgd:0"][..], "PowerSGD rank"),
            (&["--compress", "gzip"][..], "expected none, bf16"),
            (&["--sync", "diloco:0"][..], "--sync"),
            (&["--sync", "gossip"][..], "expected bsp, diloco:H"),
            (&["--sync", "diloco:4", "--zero", "1"][..], "--zero 0"),
            (&["--compress", "bf16", "--data-parallel", "1"][..], "nothing to send"),
            (&["--compress", "auto", "--link-gbps", "-1"][..], "--link-gbps"),
            (&["--schedule", "2bw", "--compress", "bf16"][..], "--schedule 2bw"),
            (&["--schedule", "2bw", "--sync", "diloco:4"][..], "--schedule 2bw"),
        ],
    );
}

fn params(out: &Path) -> baton::engine::pipeline::TensorMap {
    checkpoint::load(&out.join("checkpoints")).unwrap().params
}

/// Six steps straight vs three, a checkpoint, and three more after `--resume latest`: the same bits.
fn resumes_bitwise(name: &str, flags: &[&str]) {
    let whole = tmp(SUITE, &format!("{name}-whole"));
    run(&whole, flags);
    let half = tmp(SUITE, &format!("{name}-half"));
    let mut first: Vec<&str> = flags.to_vec();
    first.extend(["--stop-at", "3"]);
    run(&half, &first);
    let ck = checkpoint::load(&half.join("checkpoints")).unwrap();
    assert!(!ck.state.is_empty(), "{name}: the checkpoint holds the replicas' state");
    let mut rest: Vec<&str> = flags.to_vec();
    rest.extend(["--resume", "latest"]);
    run(&half, &rest);
    let (want, got) = (params(&whole), params(&half));
    for (n, t) in &want {
        assert!(got[n] == *t, "{name}: `{n}` differs after the resume");
    }
}

#[test]
fn residuals_and_diloco_state_survive_a_checkpoint() {
    resumes_bitwise("topk", &["--compress", "topk:0.05"]);
    resumes_bitwise("diloco", &["--sync", "diloco:4", "--compress", "powersgd:1:0"]);
}

#[test]
fn two_bw_streams_windows_and_resumes_bitwise() {
    // One replica, two stages: PipeDream-2BW, windows streamed up to each checkpoint; the older weight version
    // travels in the checkpoint, so a stop at step 3 and a resume give the uninterrupted run's bits.
    let flags = ["--data-parallel", "1", "--microbatches", "4", "--schedule", "2bw"];
    let whole = tmp(SUITE, "2bw-whole");
    let log = run(&whole, &flags);
    assert!(log.contains("2bw"), "{log}");
    let m = metrics(&whole);
    assert_eq!(m.len(), 6);
    assert!(m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    let half = tmp(SUITE, "2bw-half");
    let mut first = flags.to_vec();
    first.extend(["--stop-at", "3"]);
    run(&half, &first);
    let ck = checkpoint::load(&half.join("checkpoints")).unwrap();
    assert!(
        ck.state.keys().any(|k| k.starts_with("2bw.prev.")),
        "the older weights are saved"
    );
    let mut rest = flags.to_vec();
    rest.extend(["--resume", "latest"]);
    run(&half, &rest);
    let (want, got) = (params(&whole), params(&half));
    for (n, t) in &want {
        assert!(got[n] == *t, "2bw: `{n}` differs after the resume");
    }
}
