//! Golden files for a handful of small cases: the text timeline, the CSV and the JSON document.
//! Regenerate with `BATON_BLESS=1 cargo test -p baton-schedules --test golden` and review the diff.

use std::path::PathBuf;

use baton_schedules::{generate, simulate, to_csv, to_json, to_rank_actions, to_svg, to_text, Costs, ScheduleKind};

const CASES: [(ScheduleKind, u32, u32, u32); 5] = [
    (ScheduleKind::GPipe, 2, 3, 1),
    (ScheduleKind::OneFOneB, 4, 8, 1),
    (ScheduleKind::Interleaved, 2, 4, 2),
    (ScheduleKind::ZbH1, 3, 4, 1),
    (ScheduleKind::ZbV, 2, 3, 2),
];

fn check(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("BATON_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (bless with BATON_BLESS=1)", path.display()));
    assert_eq!(got, want, "{name} differs from its golden file");
}

#[test]
fn golden_text_csv_and_json() {
    for (kind, p, m, v) in CASES {
        let s = generate(kind, p, m, v).unwrap();
        let sim = simulate(&s, &Costs::uniform(p * v, 1.0, 1.0, 0.5, 0.5, 0.0)).unwrap();
        let stem = format!("{}_p{p}_m{m}_v{v}", kind.name());
        check(&format!("{stem}.txt"), &to_text(&s, &sim));
        check(&format!("{stem}.csv"), &to_csv(&to_rank_actions(&s).unwrap()));
        check(
            &format!("{stem}.json"),
            &(serde_json::to_string_pretty(&to_json(&s, &sim)).unwrap() + "\n"),
        );
    }
}

#[test]
fn json_has_the_documented_shape() {
    let s = generate(ScheduleKind::OneFOneB, 4, 8, 1).unwrap();
    let sim = simulate(&s, &Costs::uniform(4, 1.0, 1.0, 0.5, 0.5, 0.0)).unwrap();
    let j = to_json(&s, &sim);
    assert_eq!(j["schedule"], "1f1b");
    assert_eq!(j["stages"], 4);
    assert_eq!(j["microbatches"], 8);
    assert_eq!(j["chunks"], 1);
    assert_eq!(j["placement"], serde_json::json!([[0], [1], [2], [3]]));
    assert_eq!(j["actions"][0][0], serde_json::json!({"op": "F", "mb": 0, "chunk": 0}));
    assert_eq!(j["actions"].as_array().unwrap().len(), 4);
    assert_eq!(j["actions"][3].as_array().unwrap().len(), 16);
    assert_eq!(j["sim"]["makespan"], 22.0);
    assert_eq!(j["sim"]["bubble"], 0.2727);
    assert_eq!(j["sim"]["idle"], serde_json::json!([6.0, 6.0, 6.0, 6.0]));
    assert_eq!(j["sim"]["peak_inflight"], serde_json::json!([4, 3, 2, 1]));
}

#[test]
fn svg_draws_every_action_with_its_colour() {
    let s = generate(ScheduleKind::ZbH1, 2, 3, 1).unwrap();
    let sim = simulate(&s, &Costs::uniform(2, 1.0, 2.0, 1.0, 1.0, 0.0)).unwrap();
    let svg = to_svg(&s, &sim);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // One box per action plus the idle lanes and legend swatches.
    assert_eq!(svg.matches("<title>F").count(), 6);
    assert_eq!(svg.matches("<title>I").count(), 6);
    assert_eq!(svg.matches("<title>W").count(), 6);
    for colour in ["#4e79a7", "#59a14f", "#f28e2b", "#e6e6e6"] {
        assert!(svg.contains(colour), "{colour}");
    }
}
