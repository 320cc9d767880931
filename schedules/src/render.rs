//! Renderers for a simulated schedule: an ASCII timeline with a summary, an SVG picture, and
//! the JSON document that outside tools read.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::ir::{Op, Schedule};
use crate::simulate::SimReport;

/// Most character cells an ASCII timeline row may hold; coarser time steps are used beyond.
pub const TEXT_COLUMNS_MAX: usize = 4000;

/// Rounds to 4 decimals, as the JSON format shows figures.
fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn label(schedule: &Schedule, op: Op, mb: u32, chunk: u32) -> String {
    if schedule.chunks() > 1 {
        format!("{op}{mb}.{chunk}")
    } else {
        format!("{op}{mb}")
    }
}

/// The JSON document: `{"schedule", "stages", "microbatches", "chunks", "placement",
/// "actions", "sim": {"makespan", "bubble", "idle", "peak_inflight", "peak_receive_buffers"}}`. `actions` lists compute
/// actions only; `placement[s][c]` is the part held by chunk c of stage s.
pub fn to_json(schedule: &Schedule, sim: &SimReport) -> Value {
    let actions: Vec<Value> = schedule
        .actions
        .iter()
        .map(|list| {
            list.iter()
                .map(|a| json!({"op": a.op.letter().to_string(), "mb": a.mb, "chunk": a.chunk}))
                .collect::<Vec<_>>()
                .into()
        })
        .collect();
    json!({
        "schedule": schedule.kind.name(),
        "stages": schedule.stages(),
        "microbatches": schedule.microbatches,
        "chunks": schedule.chunks(),
        "placement": schedule.placement.as_rows(),
        "actions": actions,
        "sim": {
            "makespan": round4(sim.makespan),
            "bubble": round4(sim.bubble),
            "idle": sim.idle.iter().map(|&x| round4(x)).collect::<Vec<_>>(),
            "peak_inflight": sim.peak_inflight,
            "peak_receive_buffers": crate::peak_receive_buffers(schedule).unwrap_or_default(),
        }
    })
}

/// An ASCII timeline, one row per stage (`F3` forward of micro-batch 3, `B`, `I`, `W` likewise,
/// `.3` suffix for chunk 3 when there are several, `-` the rest of a long action, `.` idle),
/// followed by the simulation summary.
pub fn to_text(schedule: &Schedule, sim: &SimReport) -> String {
    let spans = sim.spans.iter().flatten();
    // One cell per time quantum: the shortest action, coarsened to fit the column limit.
    let shortest = spans
        .clone()
        .map(|s| s.end - s.start)
        .filter(|&d| d > 0.0)
        .fold(f64::INFINITY, f64::min);
    let mut quantum = if shortest.is_finite() { shortest } else { 1.0 };
    let width = spans
        .clone()
        .map(|s| label(schedule, s.action.op, s.action.mb, s.action.chunk).len())
        .max()
        .unwrap_or(2)
        + 1;
    while sim.makespan / quantum * width as f64 > TEXT_COLUMNS_MAX as f64 {
        quantum *= 2.0;
    }
    let cells = (sim.makespan / quantum).ceil() as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} schedule: {} stages, {} micro-batches, {} chunk(s) per stage; one cell = {} time unit(s)",
        schedule.kind,
        schedule.stages(),
        schedule.microbatches,
        schedule.chunks(),
        quantum
    );
    let tag_width = format!("stage {}", schedule.stages().saturating_sub(1)).len();
    for (s, list) in sim.spans.iter().enumerate() {
        let mut row = vec![b'.'; cells * width];
        for span in list {
            let first = (span.start / quantum).round() as usize;
            let last = ((span.end / quantum).round() as usize).max(first + 1).min(cells);
            let text = label(schedule, span.action.op, span.action.mb, span.action.chunk);
            for (k, cell) in row[first * width..last * width].iter_mut().enumerate() {
                *cell = if k < text.len() {
                    text.as_bytes()[k]
                } else if k % width == width - 1 && k + 1 == (last - first) * width {
                    b' '
                } else {
                    b'-'
                };
            }
        }
        let row = String::from_utf8(row).expect("labels are ASCII");
        let _ = writeln!(out, "{:>tag_width$} |{}|", format!("stage {s}"), row.trim_end());
    }
    let _ = writeln!(out, "makespan {:.4}, bubble {:.2}%", sim.makespan, sim.bubble * 100.0);
    let receive = crate::peak_receive_buffers(schedule).unwrap_or_default();
    for s in 0..sim.busy.len() {
        let _ =
            writeln!(
            out,
            "  stage {s}: busy {:.4}, idle {:.4} ({:.1}%), peak stashed activations {}, peak weight-grad stashes {}, \
             receive buffers {}",
            sim.busy[s],
            sim.idle[s],
            if sim.makespan > 0.0 { sim.idle[s] / sim.makespan * 100.0 } else { 0.0 },
            sim.peak_inflight[s],
            sim.peak_weight_stash[s],
            receive.get(s).copied().unwrap_or(0)
        );
    }
    out
}

/// Fill colour per op.
fn colour(op: Op) -> &'static str {
    match op {
        Op::F => "#4e79a7",
        Op::B => "#9c6ade",
        Op::I => "#59a14f",
        Op::W => "#f28e2b",
    }
}

/// An SVG timeline: one lane per stage, forward / backward / input-grad / weight-grad boxes in
/// distinct colours with the micro-batch number inside, idle time as a grey lane, and a legend.
pub fn to_svg(schedule: &Schedule, sim: &SimReport) -> String {
    let lane = 28.0;
    let left = 70.0;
    let top = 30.0;
    let plot_width = 1200.0f64.max(sim.makespan * 4.0).min(20_000.0);
    let scale = if sim.makespan > 0.0 {
        plot_width / sim.makespan
    } else {
        1.0
    };
    let stages = sim.spans.len() as f64;
    let height = top + stages * lane + 60.0;
    let width = left + plot_width + 20.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="18" font-size="13">{} — {} stages, {} micro-batches, {} chunk(s); makespan {:.2}, bubble {:.2}%</text>"#,
        schedule.kind,
        schedule.stages(),
        schedule.microbatches,
        schedule.chunks(),
        sim.makespan,
        sim.bubble * 100.0
    );
    for (s, list) in sim.spans.iter().enumerate() {
        let y = top + s as f64 * lane;
        let _ = writeln!(out, r#"<text x="4" y="{:.1}">stage {s}</text>"#, y + lane * 0.65);
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{y:.1}" width="{plot_width:.1}" height="{:.1}" fill="#e6e6e6"><title>idle</title></rect>"##,
            lane - 4.0
        );
        for span in list {
            let x = left + span.start * scale;
            let w = ((span.end - span.start) * scale).max(0.5);
            let name = label(schedule, span.action.op, span.action.mb, span.action.chunk);
            let _ = writeln!(
                out,
                r##"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="{}" stroke="#ffffff" stroke-width="0.5"><title>{name} part {} [{:.3}, {:.3}]</title></rect>"##,
                lane - 4.0,
                colour(span.action.op),
                span.part,
                span.start,
                span.end
            );
            if w >= 12.0 {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.2}" y="{:.1}" fill="#ffffff" text-anchor="middle">{}</text>"##,
                    x + w / 2.0,
                    y + lane * 0.55,
                    span.action.mb
                );
            }
        }
    }
    let legend_y = top + stages * lane + 20.0;
    let entries = [
        ("forward (F)", colour(Op::F)),
        ("backward (B)", colour(Op::B)),
        ("input grad (I)", colour(Op::I)),
        ("weight grad (W)", colour(Op::W)),
        ("idle", "#e6e6e6"),
    ];
    for (k, (name, fill)) in entries.iter().enumerate() {
        let x = left + k as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{legend_y}" width="14" height="14" fill="{fill}"/>"#
        );
        let _ = writeln!(out, r#"<text x="{}" y="{}">{name}</text>"#, x + 20.0, legend_y + 11.0);
    }
    out.push_str("</svg>\n");
    out
}
