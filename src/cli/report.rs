//! `baton report RUN`: a run's self-contained `report.html` (no scripts, no network: every chart is inline SVG
//! drawn with `plotters`) with loss and validation-loss curves, tokens/s, learning rate, gradient norm, per-stage
//! busy share and bubble over time, the measured timeline of the last step and the configuration; and `loss.svg`
//! beside it. `baton train` writes both at its end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;
use plotters::prelude::*;

use super::{write_output, CliError};

/// The report's file name inside the run directory.
pub const REPORT_FILE: &str = "report.html";
/// The loss curve's file name inside the run directory.
pub const LOSS_SVG: &str = "loss.svg";
/// The measured timeline of the last step (written by `baton train`).
pub const TIMELINE_FILE: &str = "timeline.svg";
/// Chart size in pixels.
pub const CHART_SIZE: (u32, u32) = (720, 320);

/// Arguments of `baton report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory (`runs/<name>`, holding `metrics.jsonl`).
    #[arg(value_name = "RUN")]
    pub run: PathBuf,
}

/// Runs `baton report`.
pub fn run(args: &ReportArgs) -> Result<(), CliError> {
    let (html, svg) = write_report(&args.run)?;
    eprintln!("report: {} (loss curve: {})", html.display(), svg.display());
    Ok(())
}

/// One step's figures as `metrics.jsonl` holds them.
#[derive(Clone, Debug, Default)]
pub struct StepRow {
    /// Step (1-based).
    pub step: u64,
    /// Training loss.
    pub loss: f64,
    /// Validation loss, when evaluated.
    pub val_loss: Option<f64>,
    /// Learning rate.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Measured bubble.
    pub bubble: f64,
    /// Per stage busy share.
    pub busy: Vec<f64>,
}

/// Reads `metrics.jsonl`: one row per step (a step re-taken after a restart keeps its last figures).
pub fn read_metrics(path: &Path) -> Result<Vec<StepRow>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?;
    let mut rows = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| CliError::failure(format!("{}:{}: {e}", path.display(), n + 1)))?;
        if v.get("event").is_some() {
            continue;
        }
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let Some(step) = v.get("step").and_then(serde_json::Value::as_u64) else {
            return Err(CliError::failure(format!("{}:{}: no `step`", path.display(), n + 1)));
        };
        rows.insert(
            step,
            StepRow {
                step,
                loss: num("loss").unwrap_or(f64::NAN),
                val_loss: num("val_loss"),
                lr: num("lr").unwrap_or(0.0),
                grad_norm: num("grad_norm").unwrap_or(f64::NAN),
                tokens_per_s: num("tokens_per_s").unwrap_or(0.0),
                bubble: num("bubble").unwrap_or(0.0),
                busy: v
                    .get("busy")
                    .and_then(serde_json::Value::as_array)
                    .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                    .unwrap_or_default(),
            },
        );
    }
    Ok(rows.into_values().collect())
}

/// Stage colours (Tableau 10), then the bubble in black.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// One line of a chart: its legend name, (step, value) points, colour, and whether each point gets a dot.
type Series = (String, Vec<(f64, f64)>, RGBColor, bool);

/// A line chart of named series over steps, as an SVG string.
fn chart(title: &str, y_label: &str, series: &[Series]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let points = series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(y1.abs() * 1e-3).max(1e-9);
        let mut ctx = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| e.to_string())?;
        ctx.configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, data, colour, dots) in series {
            let colour = *colour;
            let clean: Vec<(f64, f64)> = data
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let drawn = ctx
                .draw_series(LineSeries::new(clean.clone(), colour.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            if *dots {
                ctx.draw_series(clean.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        if series.len() > 1 {
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The loss chart: training loss per step and validation loss where evaluated.
pub fn loss_svg(rows: &[StepRow]) -> Result<String, String> {
    let train: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.loss)).collect();
    let val: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
        .collect();
    chart(
        "loss",
        "cross-entropy (nats/token)",
        &[
            ("train loss".into(), train, PALETTE[0], false),
            ("validation loss".into(), val, PALETTE[1], true),
        ],
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Strips the XML prologue so an SVG can sit inline in HTML.
fn inline(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// Writes `report.html` and `loss.svg` for the run in `dir`; returns their paths.
pub fn write_report(dir: &Path) -> Result<(PathBuf, PathBuf), CliError> {
    let metrics = dir.join("metrics.jsonl");
    if !metrics.is_file() {
        return Err(CliError::usage(format!(
            "{}: no metrics.jsonl here; give a run directory that `baton train` wrote (runs/<name>)",
            dir.display()
        )));
    }
    let rows = read_metrics(&metrics)?;
    if rows.is_empty() {
        return Err(CliError::failure(format!(
            "{}: no steps recorded yet",
            metrics.display()
        )));
    }
    let fail = |e: String| CliError::failure(format!("drawing the report: {e}"));
    let steps: Vec<f64> = rows.iter().map(|r| r.step as f64).collect();
    let loss = loss_svg(&rows).map_err(fail)?;
    let series =
        |f: &dyn Fn(&StepRow) -> f64| -> Vec<(f64, f64)> { rows.iter().zip(&steps).map(|(r, &s)| (s, f(r))).collect() };
    let tokens = chart(
        "throughput",
        "tokens / s",
        &[("tokens/s".into(), series(&|r| r.tokens_per_s), PALETTE[4], false)],
    )
    .map_err(fail)?;
    let lr = chart(
        "learning rate",
        "lr",
        &[("lr".into(), series(&|r| r.lr), PALETTE[6], false)],
    )
    .map_err(fail)?;
    let grad = chart(
        "gradient norm (before clipping)",
        "global L2 norm",
        &[("grad norm".into(), series(&|r| r.grad_norm), PALETTE[2], false)],
    )
    .map_err(fail)?;
    let stages = rows.iter().map(|r| r.busy.len()).max().unwrap_or(0);
    let mut busy_series: Vec<Series> = (0..stages)
        .map(|s| {
            (
                format!("stage {s} busy"),
                rows.iter()
                    .filter_map(|r| r.busy.get(s).map(|b| (r.step as f64, b * 100.0)))
                    .collect(),
                PALETTE[s % PALETTE.len()],
                false,
            )
        })
        .collect();
    busy_series.push(("bubble".into(), series(&|r| r.bubble * 100.0), BLACK, false));
    let busy = chart(
        "per-stage busy share and bubble",
        "% of the pipeline time",
        &busy_series,
    )
    .map_err(fail)?;
    let timeline = std::fs::read_to_string(dir.join(TIMELINE_FILE)).ok();
    let config: Option<serde_json::Value> = std::fs::read_to_string(dir.join(crate::cli::train::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());

    let last = rows.last().cloned().unwrap_or_default();
    let first_val = rows.iter().find_map(|r| r.val_loss);
    let last_val = rows.iter().rev().find_map(|r| r.val_loss);
    let mut tps: Vec<f64> = rows.iter().map(|r| r.tokens_per_s).filter(|t| t.is_finite()).collect();
    tps.sort_by(f64::total_cmp);
    let median_tps = tps.get(tps.len() / 2).copied().unwrap_or(0.0);
    let title = format!("Baton run report — {}", dir.display());
    let mut html = String::new();
    html.push_str(&format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 24px; color: #222; background: #fafafa; }}\n\
         h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}\n\
         .grid {{ display: flex; flex-wrap: wrap; gap: 16px; }}\n\
         .card {{ background: #fff; border: 1px solid #ddd; padding: 8px; }}\n\
         .wide {{ overflow-x: auto; max-width: 100%; background: #fff; border: 1px solid #ddd; }}\n\
         table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}\n\
         .figures td:first-child {{ color: #555; }}\n</style></head><body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    ));
    html.push_str("<table class=\"figures\" id=\"figures\">\n");
    for (k, v) in [
        ("steps", format!("{}", last.step)),
        ("final training loss", format!("{:.4}", last.loss)),
        (
            "validation loss",
            format!(
                "{} → {}",
                first_val.map_or("-".into(), |v| format!("{v:.4}")),
                last_val.map_or("-".into(), |v| format!("{v:.4}"))
            ),
        ),
        ("median tokens/s", format!("{median_tps:.0}")),
        ("last learning rate", format!("{:.3e}", last.lr)),
        ("last bubble", format!("{:.1}%", last.bubble * 100.0)),
    ] {
        html.push_str(&format!("<tr><td>{k}</td><td>{}</td></tr>\n", escape(&v)));
    }
    html.push_str("</table>\n<h2>Training</h2>\n<div class=\"grid\">\n");
    for (id, svg) in [
        ("loss", &loss),
        ("tokens", &tokens),
        ("lr", &lr),
        ("grad-norm", &grad),
        ("busy", &busy),
    ] {
        html.push_str(&format!(
            "<div class=\"card chart\" id=\"chart-{id}\">{}</div>\n",
            inline(svg)
        ));
    }
    html.push_str("</div>\n<h2>Schedule timeline of the last step (measured)</h2>\n");
    match &timeline {
        Some(svg) => html.push_str(&format!("<div class=\"wide\" id=\"timeline\">{}</div>\n", inline(svg))),
        None => html.push_str("<p>No timeline.svg in this run directory.</p>\n"),
    }
    html.push_str("<h2>Configuration</h2>\n");
    match config
        .as_ref()
        .and_then(|c| c.get("config"))
        .and_then(serde_json::Value::as_object)
    {
        Some(map) => {
            html.push_str("<table id=\"config\"><tr><th>setting</th><th>value</th></tr>\n");
            for (k, v) in map {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "—".into(),
                    // f32 settings as written (0.002, not 0.0020000000949949026).
                    serde_json::Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or(0.0) as f32),
                    other => other.to_string(),
                };
                html.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>\n", escape(k), escape(&text)));
            }
            html.push_str("</table>\n");
            if let Some(est) = config
                .as_ref()
                .and_then(|c| c.get("memory_estimate_bytes"))
                .and_then(serde_json::Value::as_u64)
            {
                html.push_str(&format!(
                    "<p>Memory estimated before the run: {}.</p>\n",
                    crate::engine::memory::human_bytes(est)
                ));
            }
        }
        None => html.push_str("<p>No config.json in this run directory.</p>\n"),
    }
    html.push_str("</body></html>\n");
    let html_path = dir.join(REPORT_FILE);
    let svg_path = dir.join(LOSS_SVG);
    write_output(Some(&svg_path), &loss)?;
    write_output(Some(&html_path), &html)?;
    Ok((html_path, svg_path))
}
