//! The planner's split against the uniform one, **measured**, on a model with deliberately uneven units: GPT-2's
//! 50,257-token head on d 256 costs about sixteen blocks, so the uniform split of its ten units (embedding, eight
//! blocks, head) over two stages puts four blocks beside the head. With a CPU pool per stage (`--stage-threads 1`:
//! stages compute like separate devices, as the planner's simulator assumes) the planned split is faster.
//!
//! A timed test, so it stands alone in its binary (no other test competes for the cores), alternates the two
//! splits, takes each run's median pipeline time and the best of three runs per split (the one least disturbed by
//! other load on the machine), and asks for a clear margin (the planned split measured 0.74–0.84× the uniform
//! one's time on the development machine).

mod common;
use common::{baton, err, tmp};

const MODEL: &[&str] = &[
    "--layers",
    "8",
    "--d-model",
    "256",
    "--heads",
    "4",
    "--tokenizer",
    "gpt2",
    "--seq",
    "32",
    "--batch",
    "4",
    "--stages",
    "2",
    "--stage-threads",
    "1",
    "--device",
    "cpu",
];

/// Median over steps 2.. of the pipelined part of the step (step − optimizer), seconds.
fn median_pipeline_s(split: &str, name: &str) -> f64 {
    let out = tmp("cli-plan-measured", name);
    let out_s = out.to_str().unwrap().to_string();
    let mut args = vec!["train"];
    args.extend(MODEL);
    args.extend([
        "--schedule",
        "1f1b",
        "--microbatches",
        "4",
        "--steps",
        "6",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--split",
        split,
        "--out",
        &out_s,
    ]);
    let o = baton(&args);
    assert!(o.status.success(), "{}", err(&o));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut times: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["step_s"].as_f64().unwrap() - v["optimizer_s"].as_f64().unwrap()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
fn the_planned_split_beats_the_uniform_one_on_a_wide_head() {
    let dir = tmp("cli-plan-measured", "plan");
    let dir_s = dir.to_str().unwrap().to_string();
    let mut args = vec!["plan"];
    args.extend(MODEL);
    args.extend(["--schedules", "1f1b", "--microbatches", "4", "--out", &dir_s]);
    let o = baton(&args);
    let text = String::from_utf8(o.stdout.clone()).unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let chosen = text
        .lines()
        .find(|l| l.starts_with("chosen:"))
        .unwrap_or_else(|| panic!("{text}"));
    let split = chosen
        .split("split ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("{chosen}"))
        .to_string();
    let uniform = "0..5,5..10";
    assert_ne!(
        split, uniform,
        "the planner moves blocks off the head's stage: {chosen}"
    );
    let (mut planned, mut even) = (f64::MAX, f64::MAX);
    for round in 0..3 {
        even = even.min(median_pipeline_s(uniform, &format!("uniform{round}")));
        planned = planned.min(median_pipeline_s(&split, &format!("planned{round}")));
    }
    eprintln!(
        "planned {split}: {:.1} ms, uniform {uniform}: {:.1} ms ({:.2}×)",
        planned * 1e3,
        even * 1e3,
        planned / even
    );
    assert!(
        planned < 0.92 * even,
        "planned split {split}: {:.1} ms vs uniform {:.1} ms",
        planned * 1e3,
        even * 1e3
    );
}
