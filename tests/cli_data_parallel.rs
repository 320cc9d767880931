//! `baton train --data-parallel D`: the device map, the metrics and the trace's communication track, bad
//! combinations refused, and checkpoints that resume with another number of replicas, stages or ZeRO setting —
//! bit for bit where the arithmetic is the same (same D and micro-batch size), within 1e-5 where it is not.

mod common;

use std::path::Path;

use baton::engine::checkpoint;
use common::{baton, err, tmp};

const SUITE: &str = "cli-dp";

/// A 2-block model, global batch 8, context 16.
const MODEL: &[&str] = &[
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
    "8",
    "--eval-every",
    "0",
    "--steps",
    "6",
    "--save-every",
    "0",
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

fn last_metrics(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn the_run_prints_its_device_map_and_records_the_reduction() {
    let out = tmp(SUITE, "map");
    let log = run(
        &out,
        &[
            "--data-parallel",
            "2",
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--trace",
            "--steps",
            "3",
        ],
    );
    assert!(
        log.contains("data parallel: 2 replicas × 2 stages, 4 sequences per replica in 2 micro-batches"),
        "{log}"
    );
    assert!(log.contains("replica 0: stage 0 → cpu, stage 1 → cpu"), "{log}");
    assert!(log.contains("replica 1: stage 0 → cpu, stage 1 → cpu"), "{log}");
    assert!(log.contains("reduced per replica per step"), "{log}");
    let m = last_metrics(&out);
    assert!(m["comm_bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["data_parallel"]["replicas"], 2);
    assert_eq!(m["data_parallel"]["replica_busy_s"].as_array().unwrap().len(), 2);
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["args"]["name"] == "gradient reduction"));
    let buckets = events.iter().filter(|e| e["cat"] == "comm").count();
    assert!(buckets >= 2 * 3, "a bucket per stage and step at least: {buckets}");
    // One replica: no reduction, no data-parallel record.
    let one = tmp(SUITE, "one");
    run(&one, &["--stages", "2", "--microbatches", "2", "--steps", "2"]);
    let m = last_metrics(&one);
    assert_eq!(m["comm_bytes"], 0);
    assert!(m.get("data_parallel").is_none());
    for dir in [out, one] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn bad_data_parallel_settings_are_one_line_errors() {
    common::assert_usage_errors(
        SUITE,
        MODEL,
        &[
            (&["--data-parallel", "0"][..], "--data-parallel must be >= 1"),
            (
                &["--data-parallel", "3", "--microbatches", "2"][..],
                "--data-parallel 3 × --microbatches 2 must divide --batch 8",
            ),
            (&["--data-parallel", "2", "--zero", "2"][..], "--zero 2"),
            (&["--data-parallel", "2", "--bucket-mib", "0"][..], "--bucket-mib 0"),
        ],
    );
}

fn params(out: &Path) -> baton::engine::pipeline::TensorMap {
    checkpoint::load(&out.join("checkpoints")).unwrap().params
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .args(["-r", from.to_str().unwrap(), to.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn a_checkpoint_resumes_with_other_replicas_stages_and_zero() {
    // The reference: D=2 × p=2, six steps, micro-batches of 2 sequences.
    let whole = tmp(SUITE, "whole");
    run(
        &whole,
        &["--data-parallel", "2", "--stages", "2", "--microbatches", "2"],
    );
    let want = params(&whole);
    // The same run saved at step 3 under ZeRO-1 (moments gathered from their owners on save) …
    let half = tmp(SUITE, "half");
    run(
        &half,
        &[
            "--data-parallel",
            "2",
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--zero",
            "1",
            "--stop-at",
            "3",
        ],
    );
    // … resumed on one stage per replica, without ZeRO, without overlap: the same D and micro-batch size, so the
    // same sums in the same order — bit for bit.
    let same = tmp(SUITE, "same");
    copy_dir(&half, &same);
    run(
        &same,
        &[
            "--data-parallel",
            "2",
            "--stages",
            "1",
            "--microbatches",
            "2",
            "--no-overlap",
            "--resume",
            "latest",
        ],
    );
    let got = params(&same);
    assert_eq!(got.len(), want.len());
    for (name, t) in &want {
        assert!(
            got[name] == *t,
            "`{name}` differs after resuming D=2 p=2 ZeRO-1 as D=2 p=1"
        );
    }
    // Resumed with one replica (4 micro-batches of 2) and with four (1 micro-batch each): other partial sums, the
    // same gradients up to rounding.
    for (d, m) in [("1", "4"), ("4", "1")] {
        let other = tmp(SUITE, &format!("d{d}"));
        copy_dir(&half, &other);
        let log = run(
            &other,
            &[
                "--data-parallel",
                d,
                "--stages",
                "2",
                "--microbatches",
                m,
                "--resume",
                "latest",
            ],
        );
        assert!(log.contains("resuming"), "{log}");
        let got = params(&other);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (name, t) in &want {
            for (a, b) in got[name].data.iter().zip(&t.data) {
                num += (f64::from(*a) - f64::from(*b)).powi(2);
                den += f64::from(*b).powi(2);
            }
        }
        let rel = (num / den).sqrt();
        assert!(
            rel < 1e-5,
            "D={d}: parameters differ by {rel:e} from the uninterrupted D=2 run"
        );
        std::fs::remove_dir_all(other).unwrap();
    }
    for dir in [whole, half, same] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}
