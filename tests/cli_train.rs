//! `baton train`, `generate` and `export` end to end on a tiny model, and the bad-input table.

use std::path::Path;
use std::process::Output;

mod common;
use common::baton;

/// A fresh, empty directory.
fn tmp(name: &str) -> common::TmpDir {
    let dir = common::tmp("cli-train", name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny model on 2 stages for 4 steps, evaluated every 2.
fn tiny() -> Vec<&'static str> {
    common::tiny_with(&["--stages", "2", "--steps", "4", "--eval-every", "2"])
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = tiny();
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    baton(&args)
}

#[test]
fn train_writes_metrics_trace_and_a_checkpoint_that_generate_and_export_read() {
    let dir = tmp("full");
    let out = train(&dir, &["--trace", "--schedule", "zb-h1", "--peak-tflops", "0.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["step"], i + 1);
        for key in [
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "bubble",
            "flops_per_token",
            "mfu",
        ] {
            assert!(line[key].is_number(), "step {}: {key} missing in {line}", i + 1);
        }
    }
    assert!(lines[1]["val_loss"].is_number() && lines[3]["val_loss"].is_number());
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    // One process per stage (pid = stage): thread 0 computes, thread 1 receives copies, thread 2 is the optimizer.
    let spans = |copy: bool| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["ph"] == "X" && e["cat"] != "optimizer" && e["cat"] != "eval" && (e["cat"] == "copy") == copy)
            .collect()
    };
    let tracks = |copy: bool| -> Vec<(u64, u64)> {
        let set: std::collections::BTreeSet<(u64, u64)> = spans(copy)
            .iter()
            .map(|e| (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()))
            .collect();
        set.into_iter().collect()
    };
    assert_eq!(tracks(false), vec![(0, 0), (1, 0)], "one compute track per stage");
    assert_eq!(tracks(true), vec![(0, 1), (1, 1)], "one copy track per stage");
    // ZB-H1 with 2 micro-batches on 2 stages: 3 actions per micro-batch per stage, 4 steps;
    // per step 2 activations to stage 1 and 2 gradients to stage 0.
    assert_eq!(spans(false).len(), 4 * 2 * 2 * 3);
    assert_eq!(spans(true).len(), 4 * 4);
    assert!(spans(true).iter().all(|e| e["dur"].as_f64().unwrap() >= 0.0));

    let ckpt = dir.join("checkpoints");
    let gen = baton(&[
        "generate",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--prompt",
        "KING HENRY.",
        "--tokens",
        "20",
    ]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let text = String::from_utf8_lossy(&gen.stdout);
    assert!(text.starts_with("KING HENRY."), "{text}");
    assert!(text.len() > "KING HENRY.".len(), "{text}");

    let hf = dir.join("hf");
    let exp = baton(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--format",
        "hf",
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(exp.status.success(), "{}", String::from_utf8_lossy(&exp.stderr));
    assert!(hf.join("model.safetensors").is_file() && hf.join("config.json").is_file());

    // --init-from the exported directory starts from the trained weights: the first loss is
    // lower than a fresh start's.
    let again = tmp("init");
    let out = train(
        &again,
        &["--init-from", hf.to_str().unwrap(), "--steps", "1", "--seq", "8"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = tmp("fresh");
    let out = train(&fresh, &["--steps", "1", "--seq", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first_loss = |d: &Path| -> f64 {
        let line = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        serde_json::from_str::<serde_json::Value>(line.lines().next().unwrap()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    assert!(
        first_loss(&again) < first_loss(&fresh),
        "{} vs {}",
        first_loss(&again),
        first_loss(&fresh)
    );
    for d in [dir, again, fresh] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn bad_input_exits_non_zero_with_one_line_and_writes_nothing() {
    let dir = tmp("bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [0x66, 0x6f, 0xff, 0xfe, 0x6f]).unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let shard = dir.join("bad.bin");
    let mut header = vec![0u8; 1024];
    header[..4].copy_from_slice(&1234i32.to_le_bytes());
    std::fs::write(&shard, &header).unwrap();
    let toml = dir.join("bad.toml");
    std::fs::write(&toml, "layerz = 3\n").unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--split".into(), "0..1,2..4".into()], "dropped"),
        (vec!["--split".into(), "0..2,1..4".into()], "repeats or reorders"),
        (vec!["--split".into(), "0..x".into()], "not a range"),
        (
            vec!["--stages".into(), "5".into(), "--microbatches".into(), "1".into()],
            "the model has 4 units (embedding, 2 blocks, head): use --layers 3 or --stages 4",
        ),
        (vec!["--microbatches".into(), "3".into()], "must divide --batch"),
        (vec!["--schedule".into(), "pipedream".into()], "unknown schedule"),
        (vec!["--heads".into(), "3".into()], "must divide d_model"),
        (vec!["--layers".into(), "0".into()], "layers = 0"),
        (vec!["--lr=-1".into()], "--lr -1 must be finite and >= 0"),
        (vec!["--steps".into(), "0".into()], "--steps"),
        (vec!["--data".into(), p(&empty)], "empty"),
        (vec!["--data".into(), p(&binary)], "UTF-8"),
        (vec!["--data".into(), p(&short)], "tokens"),
        (vec!["--data".into(), p(&shard)], "magic"),
        (vec!["--data".into(), p(&dir.join("missing.txt"))], "missing.txt"),
        (vec!["--config".into(), p(&toml)], "layerz"),
        (vec!["--device".into(), "tpu".into()], "expected cpu, cuda or auto"),
        (vec!["--tokenizer".into(), "sentencepiece".into()], "sentencepiece"),
        (vec!["--d-model".into(), "0".into()], "d_model = 0"),
        (vec!["--seq".into(), "0".into()], "max_seq = 0"),
        (vec!["--batch".into(), "0".into()], "--batch must be >= 1"),
        (vec!["--seq".into(), "70000".into()], "max_seq = 70000"),
        (vec!["--chunks".into(), "3".into()], "--chunks 1"),
        (
            vec![
                "--schedule".into(),
                "interleaved".into(),
                "--microbatches".into(),
                "1".into(),
            ],
            "at least 2 micro-batches",
        ),
        (vec!["--max-skips".into(), "0".into()], "--max-skips"),
        (vec!["--on-nonfinite".into(), "ignore".into()], "skip or abort"),
        (vec!["--precision".into(), "fp8".into()], "expected bf16, f32 or auto"),
        (
            vec!["--split".into(), "0..1,1..2,2..4".into()],
            "3 ranges given but the pipeline has 2 parts",
        ),
    ];
    for (extra, needle) in cases {
        let out_dir = dir.join("run");
        let extra_refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = train(&out_dir, &extra_refs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out_dir.join("metrics.jsonl").exists(), "{extra:?} wrote a run");
    }
    let missing = baton(&["generate", "--checkpoint", dir.join("nope").to_str().unwrap()]);
    assert!(!missing.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--device cuda` trains on a GPU when there is one, and otherwise fails with one line saying
/// why, writing nothing; `--device auto` falls back to the CPU.
#[test]
fn device_cuda_needs_a_gpu_and_auto_falls_back() {
    let dir = tmp("device");
    let out = train(&dir.join("cuda"), &["--device", "cuda", "--steps", "1"]);
    if baton::kernels::cuda::driver_available().is_ok() && baton::kernels::cuda::device_count().unwrap_or(0) > 0 {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("--device cuda:") && err.trim_end().lines().count() == 1,
            "{err}"
        );
        assert!(!dir.join("cuda").exists());
        let auto = train(&dir.join("auto"), &["--device", "auto", "--steps", "1"]);
        assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--schedule-csv` trains with a schedule PyTorch dumped (stages and micro-batches from the file); flags that
/// contradict the file, and a model with fewer units than the file's parts, are one-line usage errors.
#[test]
fn train_with_a_pytorch_schedule_csv() {
    let dir = tmp("csv");
    let csv = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schedules/tests/golden/torch/zbv_p2_m8_v2.comms.csv"
    );
    let base = [
        "train",
        "--layers",
        "2",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--seq",
        "16",
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--schedule-csv",
        csv,
    ];
    let run = |out: &Path, extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        baton(&args)
    };
    let out = run(&dir.join("ok"), &["--batch", "8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("2 stages") && err.contains("zbv_p2_m8_v2.comms.csv"),
        "{err}"
    );
    let metrics = std::fs::read_to_string(dir.join("ok/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let ck = baton::engine::checkpoint::load(&dir.join("ok/checkpoints")).unwrap();
    let s = &ck.manifest.schedule;
    assert_eq!(
        (s.kind, s.stages, s.microbatches, s.chunks),
        (baton::schedules::ScheduleKind::Custom, 2, 8, 2)
    );
    for (extra, needle) in [
        (vec!["--batch", "8", "--stages", "3"], "has 2 stages"),
        (vec!["--batch", "4"], "has 8 micro-batches"),
        (
            vec!["--batch", "8", "--layers", "1"],
            "4 parts (stages × chunks) but the model has only 3 layers",
        ),
    ] {
        let target = dir.join("bad");
        let out = run(&target, &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in: {err}");
        assert!(!target.join("metrics.jsonl").exists(), "{extra:?} wrote a run");
    }
    let missing = run(
        &dir.join("bad"),
        &["--batch", "8", "--schedule-csv", "/nonexistent.csv"],
    );
    assert!(!missing.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}
