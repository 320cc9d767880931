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

/// What an op is called in the legend.
fn op_name(op: Op) -> &'static str {
    match op {
        Op::F => "forward (F)",
        Op::B => "backward (B)",
        Op::I => "input grad (I)",
        Op::W => "weight grad (W)",
    }
}

/// `colour` mixed with white by `amount` (0: unchanged, 1: white): later chunks are lighter shades.
fn shade(hex: &str, amount: f64) -> String {
    let channel = |i: usize| u8::from_str_radix(&hex[1 + 2 * i..3 + 2 * i], 16).unwrap_or(0) as f64;
    let mix = |x: f64| (x + (255.0 - x) * amount).round().clamp(0.0, 255.0) as u8;
    format!("#{:02x}{:02x}{:02x}", mix(channel(0)), mix(channel(1)), mix(channel(2)))
}

/// Fill of `op` on chunk `chunk` of `chunks`: chunk 0 the full colour, later chunks lighter.
fn fill(op: Op, chunk: u32, chunks: u32) -> String {
    if chunks <= 1 {
        colour(op).to_string()
    } else {
        shade(colour(op), 0.5 * f64::from(chunk) / f64::from(chunks - 1))
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn tick_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Most pixels an SVG timeline is wide; beyond it labels shrink and then disappear (the boxes keep a tooltip).
pub const SVG_WIDTH_MAX: f64 = 24_000.0;

/// How an SVG timeline is labelled.
#[derive(Clone, Debug)]
pub struct SvgOptions {
    /// The title line (default: the schedule, its shape and the simulated makespan and bubble).
    pub title: Option<String>,
    /// The time axis' unit, e.g. `ms` (default: `time units` of the cost model).
    pub time_unit: String,
    /// Multiply times by this for the axis (e.g. 1000 for seconds shown in ms).
    pub time_scale: f64,
}

impl Default for SvgOptions {
    fn default() -> Self {
        SvgOptions {
            title: None,
            time_unit: "time units".into(),
            time_scale: 1.0,
        }
    }
}

/// An SVG timeline: one lane per stage, forward / backward / input-grad / weight-grad boxes in distinct colours
/// (later chunks in lighter shades, labelled `F3.1` for chunk 1, so ZB-V's V and the interleaved loops show)
/// with the micro-batch inside, idle time as a grey lane, a time axis with ticks, and a legend of the kinds that
/// occur. The width grows with the actions per lane so labels stay readable, up to [`SVG_WIDTH_MAX`].
pub fn to_svg(schedule: &Schedule, sim: &SimReport) -> String {
    to_svg_with(schedule, sim, &SvgOptions::default())
}

/// [`to_svg`] with a title and time unit of the caller's (e.g. a measured step in milliseconds).
pub fn to_svg_with(schedule: &Schedule, sim: &SimReport, options: &SvgOptions) -> String {
    let chunks = schedule.chunks();
    let lane = 30.0;
    let left = 70.0;
    let top = 34.0;
    let label_chars = sim
        .spans
        .iter()
        .flatten()
        .map(|s| label(schedule, s.action.op, s.action.mb, s.action.chunk).len())
        .max()
        .unwrap_or(2) as f64;
    let per_lane = sim.spans.iter().map(Vec::len).max().unwrap_or(0) as f64;
    // About 7 px per label character plus padding per action in the busiest lane; at least 900 px.
    let want = per_lane * (label_chars * 7.0 + 6.0);
    let plot_width = want.clamp(900.0, SVG_WIDTH_MAX);
    let scale = if sim.makespan > 0.0 {
        plot_width / sim.makespan
    } else {
        1.0
    };
    let shortest_px = sim
        .spans
        .iter()
        .flatten()
        .map(|s| (s.end - s.start) * scale)
        .filter(|w| *w > 0.0)
        .fold(f64::INFINITY, f64::min);
    // The label font shrinks to fit the shortest box, down to 6 px; below that, boxes carry only a tooltip.
    let font = if shortest_px.is_finite() {
        (shortest_px / (label_chars * 0.62 + 0.5)).min(12.0)
    } else {
        12.0
    };
    let show_labels = font >= 6.0;
    let stages = sim.spans.len() as f64;
    let axis_y = top + stages * lane + 4.0;
    let legend_y = axis_y + 34.0;
    let mut kinds: Vec<(Op, u32)> = sim
        .spans
        .iter()
        .flatten()
        .map(|s| (s.action.op, s.action.chunk))
        .collect();
    kinds.sort_by_key(|(op, chunk)| (Op::ALL.iter().position(|o| o == op), *chunk));
    kinds.dedup();
    let any_idle = sim.idle.iter().any(|&i| i > 1e-12);
    let legend_entries = kinds.len() + usize::from(any_idle);
    let legend_per_row = ((plot_width + left) / 190.0).floor().max(1.0) as usize;
    let legend_rows = legend_entries.div_ceil(legend_per_row).max(1);
    let height = legend_y + legend_rows as f64 * 20.0 + 10.0;
    let width = left + plot_width + 30.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="#ffffff"/>"##
    );
    let title = options.title.clone().unwrap_or_else(|| {
        format!(
            "{} — {} stages, {} micro-batches, {} chunk(s); makespan {:.2}, bubble {:.2}%",
            schedule.kind,
            schedule.stages(),
            schedule.microbatches,
            chunks,
            sim.makespan * options.time_scale,
            sim.bubble * 100.0
        )
    });
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="20" font-size="13">{}</text>"#,
        escape(&title)
    );
    for (s, list) in sim.spans.iter().enumerate() {
        let y = top + s as f64 * lane;
        let _ = writeln!(out, r#"<text x="4" y="{:.1}">stage {s}</text>"#, y + lane * 0.6);
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
                r##"<rect x="{x:.2}" y="{y:.1}" width="{w:.2}" height="{:.1}" fill="{}" stroke="#ffffff" stroke-width="0.5"><title>{name} (part {}) {:.3}–{:.3} {}</title></rect>"##,
                lane - 4.0,
                fill(span.action.op, span.action.chunk, chunks),
                span.part,
                span.start * options.time_scale,
                span.end * options.time_scale,
                escape(&options.time_unit)
            );
            if show_labels {
                let text_fill = if chunks > 1 && span.action.chunk > 0 {
                    "#1a1a1a"
                } else {
                    "#ffffff"
                };
                let _ = writeln!(
                    out,
                    r##"<text x="{:.2}" y="{:.1}" fill="{text_fill}" font-size="{font:.1}" text-anchor="middle">{name}</text>"##,
                    x + w / 2.0,
                    y + (lane - 4.0) / 2.0 + font * 0.35,
                );
            }
        }
    }
    // Time axis: a baseline, ticks at 1/2/5 × 10^k, labels in the caller's unit.
    let total = sim.makespan * options.time_scale;
    let step = tick_step(total, (plot_width / 110.0).max(2.0));
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333333"/>"##,
        left + plot_width
    );
    let mut k = 0u32;
    loop {
        let t = f64::from(k) * step;
        if t > total * (1.0 + 1e-9) || k > 10_000 {
            break;
        }
        let x = left + t / options.time_scale * scale;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.2}" y1="{axis_y:.1}" x2="{x:.2}" y2="{:.1}" stroke="#333333"/><text x="{x:.2}" y="{:.1}" text-anchor="middle">{}</text>"##,
            axis_y + 5.0,
            axis_y + 17.0,
            trim_number(t)
        );
        k += 1;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">time ({})</text>"#,
        left + plot_width,
        axis_y + 30.0,
        escape(&options.time_unit)
    );
    let mut entries: Vec<(String, String)> = kinds
        .iter()
        .map(|&(op, chunk)| {
            let name = if chunks > 1 {
                format!("{}, chunk {chunk}", op_name(op))
            } else {
                op_name(op).to_string()
            };
            (name, fill(op, chunk, chunks))
        })
        .collect();
    if any_idle {
        entries.push(("idle".into(), "#e6e6e6".into()));
    }
    for (k, (name, colour)) in entries.iter().enumerate() {
        let x = left + (k % legend_per_row) as f64 * 190.0;
        let y = legend_y + (k / legend_per_row) as f64 * 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{y}" width="14" height="14" fill="{colour}"/><text x="{}" y="{}">{name}</text>"#,
            x + 20.0,
            y + 11.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// `12.5`, `3`, `0.25`: a tick label without trailing zeros.
fn trim_number(x: f64) -> String {
    let text = format!("{x:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-0" {
        "0".into()
    } else {
        text.to_string()
    }
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
