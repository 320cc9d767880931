//! `baton plan` and `baton train --plan auto` end to end: the printed split, schedule and prediction, the SVG and
//! the profile cache, training with the plan, and one-line errors (exit 2) that leave nothing written.

use std::process::Output;

mod common;
use common::{baton, err, tmp};

/// The tiny model's flags for `baton plan` (as `baton train`'s tiny model, without the micro-batches).
const TINY_PLAN: &[&str] = &[
    "plan",
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
    "--device",
    "cpu",
];

fn plan_with(extra: &[&str]) -> Output {
    baton(&[TINY_PLAN, extra].concat())
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", err(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A usage error: exit status 2 and exactly one line on stderr.
fn assert_one_line_usage_error(out: &Output) -> String {
    let text = err(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {text}");
    assert_eq!(text.trim_end().lines().count(), 1, "stderr: {text}");
    text
}

#[test]
fn plan_prints_the_split_schedule_prediction_memory_and_runner_up_and_draws_the_timeline() {
    let dir = tmp("plan", "print");
    let out = plan_with(&["--stages", "2", "--out", dir.to_str().unwrap()]);
    let text = stdout(&out);
    for needle in [
        "plan for 2 stages",
        "chosen: ",
        "micro-batches",
        "search: exact",
        "split (units: 0 embedding, 1..=L blocks, L+1 head):",
        "stage 0 chunk 0: part 0, units 0..",
        "(embedding",
        "head)",
        "predicted step: ",
        "bubble ",
        "peak memory per stage:",
        "  stage 1: ",
        "runner-up: ",
        "candidates: ",
        "timeline: ",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    assert!(text.contains("measured"), "{text}");
    let svg = std::fs::read_to_string(dir.join("plan.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    let cached: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("profile-"))
        .collect();
    // One profile per micro-batch count: 1, 2 and 4 divide the batch of 4.
    assert_eq!(cached.len(), 3, "{cached:?}");
    // The second run reads the cache and plans the same.
    let again = stdout(&plan_with(&["--stages", "2", "--out", dir.to_str().unwrap()]));
    assert!(
        again.contains("from the cache") && !again.contains("measured"),
        "{again}"
    );
    let chosen = |t: &str| t.lines().find(|l| l.starts_with("chosen: ")).unwrap().to_string();
    assert_eq!(chosen(&text), chosen(&again));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plan_takes_a_list_of_stage_counts_and_a_list_of_candidates() {
    let dir = tmp("plan", "list");
    let text = stdout(&plan_with(&[
        "--stages",
        "1,2",
        "--microbatches",
        "2,4",
        "--schedules",
        "1f1b,zb-h1",
        "--recompute",
        "off",
        "--candidates",
        "--svg",
        dir.join("t.svg").to_str().unwrap(),
    ]));
    assert!(
        text.contains("plan for 1 stages") && text.contains("plan for 2 stages"),
        "{text}"
    );
    // 2 micro-batch counts × (1f1b, its list order, zb-h1, its list order).
    assert!(text.contains("candidates: 8 considered"), "{text}");
    assert!(!text.contains("gpipe") && !text.contains("recompute:"), "{text}");
    assert!(dir.join("t-p1.svg").exists() && dir.join("t-p2.svg").exists());
    // Without --out or --profile-cache nothing is cached.
    assert!(text.contains("not cached"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_and_infeasible_budgets_exit_2_with_one_line_and_write_nothing() {
    let dir = tmp("plan", "budget");
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("keep.svg");
    std::fs::write(&svg, "old").unwrap();
    for budget in ["2XB", "0", "1.5.5GiB"] {
        let out = plan_with(&[
            "--stages",
            "2",
            "--memory-budget",
            budget,
            "--svg",
            svg.to_str().unwrap(),
        ]);
        let text = assert_one_line_usage_error(&out);
        assert!(text.contains("--memory-budget"), "{text}");
    }
    // A budget nothing fits: the error names the stage and its bytes.
    let out = plan_with(&[
        "--stages",
        "2",
        "--memory-budget",
        "16KiB",
        "--svg",
        svg.to_str().unwrap(),
        "--profile-cache",
        dir.join("cache").to_str().unwrap(),
    ]);
    let text = assert_one_line_usage_error(&out);
    assert!(
        text.contains("no split fits the budget of 16384 bytes") && text.contains("on stage"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(&svg).unwrap(), "old");
    assert!(!dir.join("cache").exists());
    // The same with `baton train --plan auto`: no run directory appears.
    let run = dir.join("run");
    let args = tiny_train(&[
        "--stages",
        "2",
        "--steps",
        "2",
        "--plan",
        "auto",
        "--memory-budget",
        "16KiB",
        "--out",
        run.to_str().unwrap(),
    ]);
    let text = assert_one_line_usage_error(&self::run(&args));
    assert!(text.contains("on stage"), "{text}");
    assert!(!run.exists(), "{} was created", run.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `baton train` on the tiny model without the micro-batches (the plan chooses them).
fn tiny_train(extra: &[&str]) -> Vec<String> {
    [
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
        "--device",
        "cpu",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    baton(&refs)
}

#[test]
fn train_plan_auto_trains_two_steps_with_the_plan_and_prints_it() {
    let dir = tmp("plan", "train");
    let out = run(&tiny_train(&[
        "--stages",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--plan",
        "auto",
        "--memory-budget",
        "64MiB",
        "--out",
        dir.to_str().unwrap(),
    ]));
    let text = err(&out);
    assert!(out.status.success(), "{text}");
    let choice = text
        .lines()
        .find(|l| l.starts_with("plan: ") && l.contains("micro-batches"))
        .unwrap_or_else(|| panic!("no plan line in:\n{text}"));
    assert!(text.contains("plan: runner-up: "), "{text}");
    assert!(
        text.contains("plan: predicted ") && text.contains(" measured "),
        "{text}"
    );
    // The run trained with what the plan chose: its split and schedule are in config.json.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let kind = config["schedule"]["kind"].as_str().unwrap();
    assert!(choice.starts_with(&format!("plan: {kind}")), "{choice} vs {kind}");
    let m = config["schedule"]["microbatches"].as_u64().unwrap();
    assert!(choice.contains(&format!(", {m} micro-batches")), "{choice}");
    let split: Vec<String> = config["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}..{}", r[0], r[1]))
        .collect();
    assert!(
        choice.contains(&format!("split {}:", split.join(","))),
        "{choice} vs {split:?}"
    );
    assert_eq!(config["config"]["plan"], "auto");
    assert_eq!(config["schedule"]["stages"], 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_plan_auto_refuses_the_flags_it_chooses_and_unknown_modes() {
    for flag in [
        &["--schedule", "1f1b"][..],
        &["--microbatches", "2"],
        &["--split", "0..2,2..4"],
        &["--recompute"],
    ] {
        let mut args = tiny_train(&["--stages", "2", "--steps", "1", "--plan", "auto"]);
        args.extend(flag.iter().map(|s| s.to_string()));
        let text = assert_one_line_usage_error(&run(&args));
        assert!(text.contains(&format!("leave out {}", flag[0])), "{text}");
    }
    let text = assert_one_line_usage_error(&run(&tiny_train(&["--stages", "2", "--steps", "1", "--plan", "fast"])));
    assert!(text.contains("expected auto"), "{text}");
}

#[test]
fn batched_weight_grads_train_but_are_refused_where_the_planner_would_model_them() {
    let dir = tmp("plan", "batched");
    let out = dir.to_str().unwrap();
    // Two stages with batched weight gradients, and `flags`.
    let batched = |flags: &str| {
        let mut args: Vec<&str> = "--stages 2 --batch-weight-grads --out".split(' ').collect();
        args.push(out);
        args.extend(flags.split(' '));
        run(&tiny_train(&args))
    };
    for (flags, refusal) in [
        (
            "--steps 1 --plan auto",
            "--plan auto does not model --batch-weight-grads",
        ),
        (
            "--microbatches 2 --steps 1 --memory-budget 1GiB",
            "--memory-budget does not model --batch-weight-grads",
        ),
    ] {
        let text = assert_one_line_usage_error(&batched(flags));
        assert!(text.contains(refusal), "{flags}: {text}");
        assert!(!dir.exists(), "{flags}");
    }
    let trained = batched("--microbatches 4 --steps 2 --eval-every 0");
    assert!(trained.status.success(), "{}", err(&trained));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["config"]["batch_weight_grads"], true, "{config}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_memory_budget_without_a_plan_checks_the_configured_layout() {
    let dir = tmp("plan", "check");
    let text = assert_one_line_usage_error(&run(&tiny_train(&[
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--steps",
        "1",
        "--memory-budget",
        "32KiB",
        "--out",
        dir.to_str().unwrap(),
    ])));
    assert!(text.contains("--memory-budget 32KiB: stage 0 needs"), "{text}");
    assert!(!dir.exists());
    // A budget the layout fits trains.
    let out = run(&tiny_train(&[
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--steps",
        "1",
        "--eval-every",
        "0",
        "--memory-budget",
        "1GiB",
        "--out",
        dir.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", err(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}
