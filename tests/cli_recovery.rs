//! Resume, resharding, automatic recovery and non-finite handling through the real `baton`
//! binary, each in fresh processes: the results must be bitwise those of an uninterrupted run.

use std::path::Path;
use std::process::Output;

use baton::engine::checkpoint;

mod common;

/// The tiny model on 4 stages, no evaluation in between, every checkpoint kept.
fn tiny() -> Vec<&'static str> {
    common::tiny_with(&["--stages", "4", "--eval-every", "0", "--keep-last", "0"])
}

fn tmp(name: &str) -> common::TmpDir {
    common::tmp("cli-recovery", name)
}

fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args: Vec<&str> = tiny();
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    let mut cmd = common::bin();
    cmd.args(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the baton binary runs")
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

/// Every parameter and AdamW moment of the newest checkpoint, as bits.
fn final_state(out: &Path) -> State {
    let ck = checkpoint::load(&out.join("checkpoints")).unwrap();
    let mut all = Vec::new();
    for (tag, map) in [("p", &ck.params), ("m", &ck.adam_m), ("v", &ck.adam_v)] {
        for (name, t) in map {
            all.push((format!("{tag}:{name}"), t.data.iter().map(|x| x.to_bits()).collect()));
        }
    }
    (ck.manifest.step, all)
}

type State = (u64, Vec<(String, Vec<u32>)>);

/// Bitwise equality of two final states, naming the first tensor that differs.
fn assert_same(got: &State, want: &State, what: &str) {
    assert_eq!(got.0, want.0, "{what}: final step");
    assert_eq!(got.1.len(), want.1.len(), "{what}: tensor count");
    for ((name, a), (name_b, b)) in got.1.iter().zip(&want.1) {
        assert_eq!(name, name_b, "{what}");
        assert!(a == b, "{what}: {name} differs from the uninterrupted run");
    }
}

fn losses(out: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"].is_null())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                (v["loss"].as_f64().unwrap() as f32).to_bits(),
            )
        })
        .collect()
}

#[test]
fn resume_reshard_and_recovery_equal_an_uninterrupted_run() {
    let whole = tmp("whole");
    ok(train(&whole, &["--steps", "6", "--save-every", "2"], &[]));
    let want = final_state(&whole);
    assert_eq!(want.0, 6);
    let want_losses = losses(&whole);
    assert_eq!(want_losses.len(), 6);

    // 3 steps, exit, resume in a new process to 6.
    let split = tmp("split");
    ok(train(&split, &["--steps", "6", "--stop-at", "3"], &[]));
    ok(train(&split, &["--steps", "6", "--resume", "latest"], &[]));
    assert_same(&final_state(&split), &want, "resume");
    assert_eq!(losses(&split), want_losses);

    // Resume into another layout: 2 stages with ZB-H1, and 3 stages.
    for (stages, schedule) in [("2", "zb-h1"), ("3", "1f1b")] {
        let re = tmp(&format!("reshard{stages}"));
        ok(train(&re, &["--steps", "6", "--stop-at", "3"], &[]));
        ok(train(
            &re,
            &[
                "--steps",
                "6",
                "--resume",
                "latest",
                "--stages",
                stages,
                "--schedule",
                schedule,
            ],
            &[],
        ));
        assert_same(
            &final_state(&re),
            &want,
            &format!("resharded to {stages} stages ({schedule})"),
        );
        std::fs::remove_dir_all(&re).unwrap();
    }

    // A panic injected once at step 5: without restarts the run fails with one clear line...
    let failing = tmp("failing");
    let out = train(
        &failing,
        &["--steps", "6", "--save-every", "2"],
        &[("BATON_FAIL_AT", "stage:1,action:3,kind:panic,step:5")],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stage 1 failed at action #3") && err.contains("panic"),
        "{err}"
    );
    // ...and with --max-restarts it reloads step 4 and ends bitwise where the clean run ends.
    let recovered = tmp("recovered");
    let log = ok(train(
        &recovered,
        &["--steps", "6", "--save-every", "2", "--max-restarts", "1"],
        &[("BATON_FAIL_AT", "stage:1,action:3,kind:panic,step:5")],
    ));
    assert!(
        log.contains("restart 1/1: step 5 failed") && log.contains("step 4"),
        "{log}"
    );
    assert_same(&final_state(&recovered), &want, "recovery");
    let metrics = std::fs::read_to_string(recovered.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains(r#""event":"restart""#), "{metrics}");

    for d in [whole, split, failing, recovered] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn an_injected_nan_skips_one_step_and_is_logged() {
    let out = tmp("nan");
    let log = ok(train(
        &out,
        &["--steps", "3"],
        &[("BATON_FAIL_AT", "stage:2,action:0,kind:nan,step:2")],
    ));
    assert!(
        log.contains("non-finite loss (first seen on stage 2); optimizer step skipped"),
        "{log}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "3 steps plus one skipped");
    assert_eq!(lines.iter().filter(|l| l["skipped"] == true).count(), 1);
    for l in &lines {
        for key in ["busy", "peak_mem_bytes", "skipped_total", "restarts"] {
            assert!(!l[key].is_null(), "{key} missing in {l}");
        }
    }
    let abort = tmp("nan-abort");
    let res = train(
        &abort,
        &["--steps", "3", "--on-nonfinite", "abort"],
        &[("BATON_FAIL_AT", "stage:2,action:0,kind:nan")],
    );
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("non-finite loss at step 1 (first seen on stage 2"));
    for d in [out, abort] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn bad_checkpoints_and_conflicting_resumes_are_refused_without_touching_the_run() {
    let run = tmp("bad");
    ok(train(&run, &["--steps", "2"], &[]));
    let metrics_before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let ck = checkpoint::latest(&run.join("checkpoints")).unwrap().unwrap();
    let expect_fail = |extra: &[&str], needle: &str| {
        let out = train(&run, extra, &[]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in {err}");
        assert_eq!(
            std::fs::read(run.join("metrics.jsonl")).unwrap(),
            metrics_before,
            "{extra:?} touched metrics"
        );
    };
    expect_fail(&["--steps", "4"], "already holds checkpoints");
    expect_fail(
        &["--steps", "4", "--resume", "latest", "--layers", "3"],
        "--layers 3: the checkpoint's model has 2",
    );
    expect_fail(&["--steps", "4", "--resume", "/nonexistent/ckpt"], "/nonexistent/ckpt");
    expect_fail(
        &["--steps", "4", "--resume", "latest", "--on-nonfinite", "ignore"],
        "skip or abort",
    );
    // Corrupt the stage file: the checksum check names it.
    let file = ck.join("stage-1.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    expect_fail(
        &["--steps", "4", "--resume", ck.to_str().unwrap()],
        "stage-1.safetensors",
    );
    // Truncate it.
    std::fs::write(&file, &bytes[..mid]).unwrap();
    expect_fail(
        &["--steps", "4", "--resume", ck.to_str().unwrap()],
        "stage-1.safetensors",
    );
    std::fs::remove_dir_all(&run).unwrap();
}
