//! `baton plan --gpus N --model ...` end to end: every D × P layout of the GPU count appears (printed, too big or
//! unable to run), the printed figures agree with each other (tokens/s = global batch · context / step), the
//! assumptions are printed, a slower inter-node link never makes the best layout faster, and bad flags are
//! one-line usage errors. The predicted (H200) costs need no device and no profiling.

use std::process::Output;

mod common;
use common::{baton, err, tmp};

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", err(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The rows of the layout table: (D, P, step seconds, tokens/s).
fn rows(text: &str) -> Vec<(u32, u32, f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // `D × P schedule... mb step unit tokens/s ...`
            if f.len() < 8 || f[1] != "×" || f[0].parse::<u32>().is_err() || f[3].ends_with(':') {
                return None;
            }
            let unit_at = f.iter().position(|w| *w == "ms" || *w == "s")?;
            let value: f64 = f[unit_at - 1].parse().ok()?;
            let step = if f[unit_at] == "ms" { value / 1e3 } else { value };
            let tokens: f64 = f[unit_at + 1].parse().ok()?;
            Some((f[0].parse().ok()?, f[2].parse().ok()?, step, tokens))
        })
        .collect()
}

/// The best layout's step in seconds, from the `best:` line.
fn best_step(text: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("best:"))
        .expect("a best line");
    let f: Vec<&str> = line.split_whitespace().collect();
    let at = f.iter().position(|w| *w == "per").expect("`per step`");
    let v: f64 = f[at - 2].parse().unwrap();
    if f[at - 1] == "ms" {
        v / 1e3
    } else {
        v
    }
}

#[test]
fn every_layout_of_8_gpus_is_predicted_with_consistent_figures() {
    let text = stdout(&baton(&["plan", "--gpus", "8", "--model", "gpt2-124m", "--top", "10"]));
    for needle in [
        "predicted for the H200, not measured",
        "989 TFLOP/s",
        "4.8 TB/s",
        "450 GB/s",
        "400 Gbit/s",
        "budget 141.0 GB per GPU",
        "global batch 512 sequences",
        "8 GPUs (1 node):",
    ] {
        assert!(text.contains(needle), "`{needle}` missing:\n{text}");
    }
    let r = rows(&text);
    // 124M has 14 units: P in {1, 2, 4, 8}, all with D dividing the batch of 512: four predicted layouts.
    let mut ps: Vec<u32> = r.iter().map(|x| x.1).collect();
    ps.sort_unstable();
    assert_eq!(ps, [1, 2, 4, 8], "{text}");
    for &(d, p, step, tokens) in &r {
        assert_eq!(d * p, 8);
        // tokens/s = 512 sequences × 1024 tokens / step, to the printed precision (the step to ±0.05 ms).
        let expect = 512.0 * 1024.0 / step;
        assert!(
            (tokens - expect).abs() <= expect * 0.05e-3 / step + 1.0,
            "{d}×{p}: {tokens} vs {expect}"
        );
    }
    // Fastest first, and the best line names the first row.
    assert!(r.windows(2).all(|w| w[0].2 <= w[1].2), "{text}");
    assert!((best_step(&text) - r[0].2).abs() <= 1e-4, "{text}");
}

#[test]
fn a_slower_inter_node_link_never_makes_the_best_layout_faster() {
    // Two nodes of 4 GPUs: replicas cross nodes. Halving the GPUs per node cannot speed any layout up.
    let eight = stdout(&baton(&["plan", "--gpus", "8", "--model", "gpt2-124m"]));
    let four = stdout(&baton(&[
        "plan",
        "--gpus",
        "8",
        "--model",
        "gpt2-124m",
        "--gpus-per-node",
        "4",
    ]));
    assert!(four.contains("8 GPUs (2 nodes):"), "{four}");
    assert!(best_step(&four) >= best_step(&eight) - 1e-4, "{eight}\n{four}");
    // Not overlapping the reduction cannot be faster either.
    let flush = stdout(&baton(&["plan", "--gpus", "8", "--model", "gpt2-124m", "--no-overlap"]));
    assert!(flush.contains("after the pipeline flush"), "{flush}");
    assert!(best_step(&flush) >= best_step(&eight) - 1e-4, "{eight}\n{flush}");
}

#[test]
fn layouts_that_do_not_fit_or_cannot_run_say_so() {
    // 8 GB per GPU: 1.5B on one or two stages needs more (its parameters, gradients and moments alone are ~27 GB
    // without sharding).
    let text = stdout(&baton(&[
        "plan",
        "--gpus",
        "8",
        "--model",
        "gpt2-1.5b",
        "--zero",
        "0",
        "--memory-budget",
        "8GB",
    ]));
    assert!(text.contains("8 × 1: does not fit"), "{text}");
    // A batch of 4 sequences: 8 replicas cannot share it.
    let text = stdout(&baton(&["plan", "--gpus", "8", "--model", "gpt2-124m", "--batch", "4"]));
    assert!(
        text.contains("8 × 1: cannot run: 8 replicas do not divide the global batch of 4"),
        "{text}"
    );
}

#[test]
fn measured_cpu_costs_feed_the_same_prediction() {
    let dir = tmp("plan-scale", "cpu");
    let args = [
        "plan",
        "--gpus",
        "2",
        "--model",
        "gpt2-124m",
        "--device",
        "cpu",
        "--seq",
        "8",
        "--batch",
        "4",
        "--profile-cache",
        dir.to_str().unwrap(),
    ];
    let text = stdout(&baton(&args));
    assert!(text.contains("costs: measured on cpu"), "{text}");
    let r = rows(&text);
    assert_eq!(r.len(), 2, "{text}");
    // The profile is cached: the second run of the same command reads it.
    let again = stdout(&baton(&args));
    assert!(again.contains("from the cache"), "{again}");
}

#[test]
fn bad_scale_flags_are_one_line_usage_errors() {
    for (args, needle) in [
        (vec!["plan", "--gpus", "8"], "--gpus needs --model"),
        (vec!["plan", "--gpus", "8", "--model", "gpt9"], "--model `gpt9`"),
        (vec!["plan", "--gpus", "0", "--model", "gpt2-124m"], "--gpus `0`"),
        (vec!["plan", "--model", "gpt2-124m"], "give --gpus N as well"),
        (
            vec!["plan", "--gpus", "8", "--model", "gpt2-124m", "--stages", "2"],
            "leave out --stages",
        ),
        (
            vec!["plan", "--gpus", "8", "--model", "gpt2-124m", "--device", "tpu"],
            "--device `tpu`",
        ),
    ] {
        let out = baton(&args);
        let text = err(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
}
