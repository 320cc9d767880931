//! `baton schedule` end to end: every format, import from CSV, and one-line errors for bad arguments.

use std::process::Output;

mod common;
use common::baton;

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn text_format_shows_a_timeline_and_summary() {
    let text = stdout(&baton(&[
        "schedule",
        "--schedule",
        "1f1b",
        "--stages",
        "4",
        "--microbatches",
        "8",
    ]));
    assert!(text.contains("stage 0 |F0 F1 F2 F3 "), "{text}");
    assert!(text.contains("makespan 22.0000, bubble 27.27%"), "{text}");
}

#[test]
fn json_format_matches_the_documented_shape() {
    let out = baton(&[
        "schedule",
        "--schedule",
        "1f1b",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--format",
        "json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(j["schedule"], "1f1b");
    assert_eq!(j["sim"]["makespan"], 22.0);
    assert_eq!(j["sim"]["bubble"], 0.2727);
    assert_eq!(j["sim"]["peak_inflight"], serde_json::json!([4, 3, 2, 1]));
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    for key in [
        "schedule",
        "stages",
        "microbatches",
        "chunks",
        "placement",
        "actions",
        "sim",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn csv_export_imports_back_and_simulates_the_same() {
    let dir = std::env::temp_dir().join(format!("baton-cli-csv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (kind, extra) in [
        ("zb-v", vec![]),
        ("interleaved", vec!["--chunks", "3"]),
        ("zb-h1", vec![]),
    ] {
        let csv = dir.join(format!("{kind}.csv"));
        let mut args = vec![
            "schedule",
            "--schedule",
            kind,
            "--stages",
            "4",
            "--microbatches",
            "8",
            "--format",
            "csv",
        ];
        args.extend(&extra);
        args.extend(["--out", csv.to_str().unwrap(), "--comms"]);
        stdout(&baton(&args));
        let imported = baton(&[
            "schedule",
            "--from-csv",
            csv.to_str().unwrap(),
            "--stages",
            "4",
            "--format",
            "json",
        ]);
        let j: serde_json::Value = serde_json::from_str(&stdout(&imported)).unwrap();
        let mut args = vec![
            "schedule",
            "--schedule",
            kind,
            "--stages",
            "4",
            "--microbatches",
            "8",
            "--format",
            "json",
        ];
        args.extend(&extra);
        let original: serde_json::Value = serde_json::from_str(&stdout(&baton(&args))).unwrap();
        assert_eq!(j["schedule"], "custom");
        assert_eq!(j["actions"], original["actions"], "{kind}");
        assert_eq!(j["placement"], original["placement"], "{kind}");
        assert_eq!(j["sim"], original["sim"], "{kind}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn torch_golden(stem: &str) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schedules/tests/golden/torch/{stem}.csv"));
    path.to_str().unwrap().to_string()
}

#[test]
fn pytorch_dumps_import_without_stages() {
    let generated: serde_json::Value = serde_json::from_str(&stdout(&baton(&[
        "schedule",
        "--schedule",
        "zb-v",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--format",
        "json",
    ])))
    .unwrap();
    for format in ["compute", "comms"] {
        let file = torch_golden(&format!("zbv_p4_m8_v2.{format}"));
        let j: serde_json::Value =
            serde_json::from_str(&stdout(&baton(&["schedule", "--from-csv", &file, "--format", "json"]))).unwrap();
        assert_eq!(j["schedule"], "custom", "{format}");
        assert_eq!(
            (j["stages"].as_u64(), j["chunks"].as_u64(), j["microbatches"].as_u64()),
            (Some(4), Some(2), Some(8))
        );
        assert_eq!(
            j["placement"],
            serde_json::json!([[0, 7], [1, 6], [2, 5], [3, 4]]),
            "{format}"
        );
        // PyTorch's ZBV is Baton's zb-v order.
        assert_eq!(j["actions"], generated["actions"], "{format}");
        assert_eq!(j["sim"], generated["sim"], "{format}");
    }
    // --stages, if given, must match the file.
    let out = baton(&[
        "schedule",
        "--from-csv",
        &torch_golden("zbv_p4_m8_v2.comms"),
        "--stages",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("holds 4 rank rows but --stages is 2") && err.trim_end().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn comms_export_is_what_pytorch_lowers() {
    // PyTorch's ScheduleInterleaved1F1B for 2 ranks is Baton's interleaved order; Baton's --comms
    // file is the one PyTorch dumps for it (PyTorch writes CRLF).
    let ours = stdout(&baton(&[
        "schedule",
        "--schedule",
        "interleaved",
        "--stages",
        "2",
        "--microbatches",
        "8",
        "--format",
        "csv",
        "--comms",
    ]));
    let theirs = std::fs::read_to_string(torch_golden("interleaved-1f1b_p2_m8_v2.comms")).unwrap();
    assert_eq!(ours, theirs.replace("\r\n", "\n"));
}

#[test]
fn a_bad_lowered_file_is_one_line_naming_the_cell() {
    let path = std::env::temp_dir().join(format!("baton-cli-bad-comms-{}.csv", std::process::id()));
    let golden = std::fs::read_to_string(torch_golden("interleaved-1f1b_p2_m8_v2.comms")).unwrap();
    std::fs::write(&path, golden.replacen(",2RECV_F0,", ",", 1)).unwrap();
    let out = baton(&["schedule", "--from-csv", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("`1SEND_F0` at rank 1 (row 2), column 5 has no matching `2RECV_F0`: rank 0 never receives it"),
        "{err}"
    );
}

#[test]
fn svg_goes_to_a_file() {
    let path = std::env::temp_dir().join(format!("baton-cli-{}.svg", std::process::id()));
    let out = baton(&[
        "schedule",
        "--schedule",
        "zb-h1",
        "--stages",
        "4",
        "--microbatches",
        "8",
        "--format",
        "svg",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(stdout(&out).is_empty());
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("weight grad (W)"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_arguments_exit_non_zero_with_one_line_or_clap_s_message() {
    let cases: [(&[&str], &str); 8] = [
        (
            &["schedule", "--schedule", "nope", "--stages", "4", "--microbatches", "8"],
            "invalid value 'nope'",
        ),
        (
            &["schedule", "--schedule", "1f1b", "--stages", "0", "--microbatches", "8"],
            "stages must be in",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "1f1b",
                "--stages",
                "four",
                "--microbatches",
                "8",
            ],
            "invalid value 'four'",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "interleaved",
                "--stages",
                "4",
                "--microbatches",
                "3",
            ],
            "at least 4 micro-batches",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "zb-v",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--chunks",
                "3",
            ],
            "--chunks 2",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "1f1b",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--costs",
                "1,2",
            ],
            "5 numbers",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "1f1b",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--costs",
                "1,-2,1,1,0",
            ],
            ">= 0",
        ),
        (
            &["schedule", "--from-csv", "/nonexistent/x.csv", "--stages", "4"],
            "/nonexistent/x.csv",
        ),
    ];
    for (args, needle) in cases {
        let out = baton(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        if err.starts_with("error: ") {
            // clap's own message: what is wrong (with the valid values), then where help is; exit code 2.
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains("--help"), "{args:?}: {err}");
        } else {
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        }
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

fn schedule_args<'a>(kind: &'a str, p: &'a str, m: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["schedule", "--schedule", kind, "--stages", p, "--microbatches", m];
    args.extend(extra);
    args
}

/// The cell of the data-parallel table's row `name`, one per mode.
fn dp_row(text: &str, name: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no `{name}` row in {text}"));
    let cells = line.trim_start()[name.len()..].trim();
    cells
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn data_parallel_text_adds_step_time_exposed_comm_and_bubble() {
    // The default model's 3.34 MiB of fp32 gradients over 2 parts, 2 replicas, 1 Gbit/s, 5 us: each stage sends
    // 1,750,528 bytes (2(D-1)/D = 1) in 14.004 ms plus 2 latencies. Stage 0 ends the pipeline at 10 ms, so with
    // one bucket per part overlap hides nothing of it: 24.0142 ms either way.
    let text = stdout(&baton(&schedule_args(
        "1f1b",
        "2",
        "4",
        &["--data-parallel", "2", "--link-gbps", "1"],
    )));
    assert!(text.starts_with("1f1b schedule: 2 stages"), "{text}");
    assert!(text.contains("makespan 10.0000, bubble 20.00%"), "{text}");
    assert!(
        text.contains(
            "data parallel: 2 replicas, link 1 Gbit/s and 5 us per message, buckets of 25 MiB; --costs in ms"
        ),
        "{text}"
    );
    assert!(text.contains("3.34 MiB reduced, 3.34 MiB sent"), "{text}");
    let header = text
        .lines()
        .find(|l| l.contains("overlap") && !l.contains(':'))
        .unwrap();
    assert!(
        header.trim_start().starts_with("overlap") && header.trim_end().ends_with("after flush"),
        "{header}"
    );
    assert_eq!(dp_row(&text, "step time"), ["24.0142 ms", "24.0142 ms"], "{text}");
    assert_eq!(dp_row(&text, "compute makespan"), ["10.0000 ms", "10.0000 ms"]);
    assert_eq!(dp_row(&text, "exposed comm"), ["14.0142 ms", "14.0142 ms"]);
    assert_eq!(dp_row(&text, "bubble (compute)"), ["20.00%", "20.00%"]);
    // Stage 1 finishes at 9 ms: with overlap its reduction starts there, after the flush at 10 ms.
    assert!(
        text.contains("stage 1: 1.67 MiB in 1 bucket(s), link busy 14.0142 ms; overlap 9.0000..23.0142 ms"),
        "{text}"
    );
}

#[test]
fn data_parallel_matches_the_closed_form_and_overlap_helps_interleaved() {
    // One stage, GPipe, 2 micro-batches of F = B = 1 ms: 4 ms of compute, then 1 MiB over 4 replicas at 8 Gbit/s
    // (1e6 bytes/ms) without latency: 1.5 MiB on the wire, 1.572864 ms.
    let text = stdout(&baton(&schedule_args(
        "gpipe",
        "1",
        "2",
        &[
            "--data-parallel",
            "4",
            "--link-gbps",
            "8",
            "--link-latency-us",
            "0",
            "--grad-mib",
            "1",
            "--no-overlap",
        ],
    )));
    assert_eq!(dp_row(&text, "step time"), ["5.5729 ms"], "{text}");
    assert_eq!(dp_row(&text, "exposed comm"), ["1.5729 ms"], "{text}");
    assert!(!text.contains("  overlap"), "--no-overlap shows the flush only: {text}");
    // Interleaved: a stage's first chunk is final before its last backward, so its buckets leave early.
    let text = stdout(&baton(&schedule_args(
        "interleaved",
        "2",
        "4",
        &[
            "--data-parallel",
            "4",
            "--link-gbps",
            "10",
            "--grad-mib",
            "20",
            "--bucket-mib",
            "4",
        ],
    )));
    let ms = |cell: &str| cell.trim_end_matches(" ms").parse::<f64>().unwrap();
    let step = dp_row(&text, "step time");
    assert!(ms(&step[0]) < ms(&step[1]), "{text}");
    assert!(text.contains("40.00 MiB in 10 bucket(s)"), "{text}");
}

#[test]
fn data_parallel_json_holds_both_modes_and_one_replica_changes_nothing() {
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = schedule_args("zb-h1", "4", "8", &["--format", "json"]);
        args.extend(extra);
        serde_json::from_str(&stdout(&baton(&args))).unwrap()
    };
    let j = json(&["--data-parallel", "8", "--link-gbps", "25", "--grad-mib", "5,10,10,5"]);
    let dp = &j["data_parallel"];
    assert_eq!(dp["unit"], "ms");
    assert_eq!(dp["replicas"], 8);
    let (with, without) = (&dp["modes"]["overlap"], &dp["modes"]["after_flush"]);
    assert_eq!(with["overlap"], true);
    assert_eq!(without["overlap"], false);
    assert_eq!(with["grad_bytes"], 30.0 * 1024.0 * 1024.0);
    assert_eq!(with["stages"].as_array().unwrap().len(), 4);
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert!(f(&with["step_time"]) <= f(&without["step_time"]));
    assert!(f(&with["exposed_comm"]) <= f(&without["exposed_comm"]));
    assert_eq!(f(&with["compute_makespan"]), f(&j["sim"]["makespan"]));
    // D = 1: no data-parallel section, and the same document and text as without the flags.
    let plain = json(&[]);
    assert!(plain.get("data_parallel").is_none());
    assert_eq!(json(&["--data-parallel", "1", "--link-gbps", "1"]), plain);
    let text = |extra: &[&str]| stdout(&baton(&schedule_args("1f1b", "4", "8", extra)));
    assert_eq!(text(&["--data-parallel", "1", "--no-overlap"]), text(&[]));
}

#[test]
fn bad_data_parallel_flags_are_one_line_usage_errors() {
    let cases: [(&[&str], &str); 8] = [
        (&["--data-parallel", "0"], "--data-parallel 0 must be in 1..="),
        (
            &["--data-parallel", "2", "--link-gbps", "0"],
            "--link-gbps 0 must be finite and > 0",
        ),
        (
            &["--data-parallel", "2", "--link-gbps", "-5"],
            "--link-gbps -5 must be finite and > 0",
        ),
        (
            &["--data-parallel", "2", "--link-latency-us", "-1"],
            "--link-latency-us -1",
        ),
        (
            &["--data-parallel", "2", "--bucket-mib", "0"],
            "--bucket-mib 0 must be > 0",
        ),
        (
            &["--data-parallel", "2", "--grad-mib", "1,x"],
            "--grad-mib: value 2 = `x` is not a number",
        ),
        (
            &["--data-parallel", "2", "--grad-mib", "1,2,3"],
            "--grad-mib lists 3 values",
        ),
        (
            &["--data-parallel", "2", "--format", "svg"],
            "only applies to --format text or json",
        ),
    ];
    for (extra, needle) in cases {
        let out = baton(&schedule_args("1f1b", "2", "4", extra));
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(out.stdout.is_empty(), "{extra:?}");
    }
}

#[test]
fn two_bw_prints_the_stream_delay_weight_versions_and_the_ratio_to_1f1b() {
    // Unit costs F = 1, B = 2: stage 0's B(i) ends at 3p + 3i, so window w ends at 12 + 3(8w + 7); a window
    // takes 8 × 3 = 24 against 1F1B's flush (8 + 4 - 1) × 3 = 33.
    let text = stdout(&baton(&schedule_args("2bw", "4", "8", &["--costs", "1,2,1,1,0"])));
    assert!(
        text.starts_with("2bw schedule: 4 stages, 32 micro-batches, 1 chunk(s) per stage"),
        "{text}"
    );
    assert!(
        text.contains("2bw: 4 windows of 8 micro-batches (one optimizer step each), no flush; delay 1"),
        "{text}"
    );
    assert!(
        text.contains("window ends (stage 0's last backward of each window): 33.0000, 57.0000, 81.0000, 105.0000"),
        "{text}"
    );
    assert!(
        text.contains("peak weight versions per stage: 2, 2, 2, 2 (1f1b with a flush: 1); weight copies 2 vs 1"),
        "{text}"
    );
    assert!(
        text.contains("steady state per window: 2bw 24.0000, 1f1b with a flush 33.0000; ratio 1.3750x"),
        "{text}"
    );
    assert!(
        text.contains("bubble: 2bw 0.00% (steady state), 1f1b with a flush 27.27%"),
        "{text}"
    );
    assert!(
        text.contains("peak stashed activations per stage: 2bw 4, 3, 2, 1; 1f1b with a flush 4, 3, 2, 1"),
        "{text}"
    );
    // The stream is drawn: micro-batch 31 is the last window's last.
    assert!(text.contains("B31"), "{text}");
    // One stage: no delay, one version, no gain (2BW is then plain 1F1B).
    let text = stdout(&baton(&schedule_args("2bw", "1", "3", &["--windows", "5"])));
    assert!(
        text.contains("2bw: 5 windows of 3 micro-batches (one optimizer step each), no flush; delay 0"),
        "{text}"
    );
    assert!(
        text.contains("peak weight versions per stage: 1 (1f1b with a flush: 1)"),
        "{text}"
    );
    assert!(text.contains("ratio 1.0000x"), "{text}");
}

#[test]
fn two_bw_json_and_svg_carry_the_comparison() {
    let out = baton(&schedule_args(
        "2bw",
        "4",
        "8",
        &["--costs", "1,2,1,1,0", "--windows", "6", "--format", "json"],
    ));
    let j: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(j["schedule"], "2bw");
    assert_eq!(j["microbatches"], 48);
    let r = &j["two_bw"];
    assert_eq!(
        (r["delay"].as_u64(), r["window"].as_u64(), r["windows"].as_u64()),
        (Some(1), Some(8), Some(6))
    );
    assert_eq!(r["window_time"], 24.0);
    assert_eq!(r["flush_window_time"], 33.0);
    assert_eq!(r["speedup"], 1.375);
    assert_eq!(r["peak_weight_versions"], serde_json::json!([2, 2, 2, 2]));
    assert_eq!(
        (r["weight_copies"].as_u64(), r["flush_weight_copies"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(
        r.get("stream").is_none(),
        "the stream's spans are the document's, not repeated: {r}"
    );
    let svg = stdout(&baton(&schedule_args("2bw", "4", "8", &["--format", "svg"])));
    assert!(
        svg.starts_with("<svg") && svg.contains("2bw — 4 stages, 4 windows of 8 micro-batches, no flush, delay 1"),
        "{}",
        &svg[..svg.len().min(600)]
    );
}

#[test]
fn two_bw_shapes_it_cannot_serve_exit_2_with_one_line() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["schedule", "--schedule", "2bw", "--stages", "4", "--microbatches", "2"],
            "2bw cannot serve stages=4, microbatches=2, chunks=1: stage 0 runs 3 forwards ahead of its backwards",
        ),
        (
            &["schedule", "--schedule", "2bw", "--stages", "4", "--microbatches", "2"],
            "use microbatches >= stages - 1 = 3",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "2bw",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--chunks",
                "2",
            ],
            "--chunks 1",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "2bw",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--windows",
                "2",
            ],
            "--windows 2: the steady state is measured between window ends, so give 3 or more",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "1f1b",
                "--stages",
                "4",
                "--microbatches",
                "8",
                "--windows",
                "4",
            ],
            "--windows only applies to --schedule 2bw",
        ),
        (
            &[
                "schedule",
                "--schedule",
                "2bw",
                "--stages",
                "2",
                "--microbatches",
                "4",
                "--data-parallel",
                "2",
            ],
            "--data-parallel above 1 is not modelled for 2bw",
        ),
    ];
    for (args, needle) in cases {
        let out = baton(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
