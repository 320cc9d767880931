//! `baton schedule`: generate or import a schedule, validate, simulate, and render it; with `--data-parallel D`,
//! also predict the step with the gradients reduced across `D` replicas (`dp`); with `--schedule 2bw`, the
//! flush-free stream of `--windows` windows and its steady state against 1F1B (`two_bw`).

mod dp;
mod two_bw;

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::{write_output, CliError};
use crate::schedules::{
    generate, lower_with_comms, schedule_from_csv, simulate, to_csv, to_json, to_rank_actions, to_svg, to_svg_with,
    to_text, Costs, Schedule, ScheduleKind, SvgOptions,
};

/// Arguments of `baton schedule`.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Schedule family to generate.
    #[arg(long, value_enum, required_unless_present = "from_csv", conflicts_with = "from_csv")]
    pub schedule: Option<KindArg>,
    /// Import a per-rank CSV instead of generating: PyTorch pipelining's `_dump_csv`, compute-only
    /// or lowered (`compute_comms`), or Baton's own `--format csv` (with or without `--comms`).
    #[arg(long, value_name = "FILE")]
    pub from_csv: Option<PathBuf>,
    /// Number of pipeline stages (ranks). With --from-csv it is the file's row count; if given, it
    /// must match.
    #[arg(long, value_name = "P", required_unless_present = "from_csv")]
    pub stages: Option<u32>,
    /// Micro-batches per step.
    #[arg(long, value_name = "M", required_unless_present = "from_csv")]
    pub microbatches: Option<u32>,
    /// Model chunks per stage (default: 2 for interleaved and zb-v, else 1).
    #[arg(long, value_name = "V")]
    pub chunks: Option<u32>,
    /// With --schedule 2bw: windows (optimizer steps of M micro-batches each) of the flush-free stream to
    /// simulate and draw; at least 3 (default 4).
    #[arg(long, value_name = "N")]
    pub windows: Option<u32>,
    /// Cost model: forward, full backward, input-grad, weight-grad time per part, and per-hop latency
    /// (milliseconds with --data-parallel above 1, else time units).
    #[arg(long, value_name = "F,B,I,W,LAT", default_value = "1,1,0.5,0.5,0")]
    pub costs: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// With `--format csv`: write the lowered schedule PyTorch's `_load_csv(format="compute_comms")`
    /// reads (SEND / RECV, WAIT_SEND, UNSHARD / RESHARD, REDUCE_GRAD), as PyTorch lowers it.
    #[arg(long)]
    pub comms: bool,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Data parallelism: replicas, link, gradient bytes and buckets.
    #[command(flatten)]
    pub dp: dp::DpArgs,
}

/// Schedule family names on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    /// All forwards, then all backwards.
    Gpipe,
    /// One-forward-one-backward (PipeDream-Flush).
    #[value(name = "1f1b")]
    OneFOneB,
    /// Megatron's interleaved 1F1B (chunks >= 2).
    Interleaved,
    /// Zero-bubble H1.
    #[value(name = "zb-h1")]
    ZbH1,
    /// Zero-bubble V (chunks = 2).
    #[value(name = "zb-v")]
    ZbV,
    /// PipeDream-2BW: 1F1B without a flush, two weight versions per stage (chunks = 1).
    #[value(name = "2bw")]
    TwoBw,
}

impl From<KindArg> for ScheduleKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Gpipe => ScheduleKind::GPipe,
            KindArg::OneFOneB => ScheduleKind::OneFOneB,
            KindArg::Interleaved => ScheduleKind::Interleaved,
            KindArg::ZbH1 => ScheduleKind::ZbH1,
            KindArg::ZbV => ScheduleKind::ZbV,
            KindArg::TwoBw => ScheduleKind::TwoBw,
        }
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// ASCII timeline and summary.
    Text,
    /// The JSON document (schedule, placement, actions, simulation).
    Json,
    /// PyTorch pipelining's per-rank CSV.
    Csv,
    /// SVG timeline picture.
    Svg,
}

/// Parses `F,B,I,W,LAT`.
pub fn parse_costs(text: &str, parts: u32) -> Result<Costs, CliError> {
    let fields: Vec<&str> = text.split(',').map(str::trim).collect();
    if fields.len() != 5 {
        return Err(CliError::usage(format!(
            "--costs expects 5 numbers F,B,I,W,LAT, got {} in `{text}`",
            fields.len()
        )));
    }
    let mut v = [0.0f64; 5];
    for (slot, (name, field)) in v.iter_mut().zip(["F", "B", "I", "W", "LAT"].iter().zip(&fields)) {
        *slot = field
            .parse()
            .map_err(|_| CliError::usage(format!("--costs: {name} = `{field}` is not a number")))?;
        if !slot.is_finite() || *slot < 0.0 {
            return Err(CliError::usage(format!(
                "--costs: {name} = {field} must be finite and >= 0"
            )));
        }
    }
    Ok(Costs::uniform(parts, v[0], v[1], v[2], v[3], v[4]))
}

/// Runs `baton schedule`.
pub fn run(args: &ScheduleArgs) -> Result<(), CliError> {
    if args.comms && args.format != Format::Csv {
        return Err(CliError::usage("--comms only applies to --format csv"));
    }
    args.dp.check()?;
    if args.dp.enabled() && matches!(args.format, Format::Csv | Format::Svg) {
        return Err(CliError::usage(
            "--data-parallel above 1 only applies to --format text or json",
        ));
    }
    let kind = args.schedule.map(ScheduleKind::from);
    let windows = two_bw::windows(kind, args.windows)?;
    if kind == Some(ScheduleKind::TwoBw) && args.dp.enabled() {
        return Err(CliError::usage(
            "--data-parallel above 1 is not modelled for 2bw (its reduction runs per window, without a flush)",
        ));
    }
    let schedule = build_schedule(args, windows)?;
    let costs = parse_costs(&args.costs, schedule.placement.num_parts())?;
    let two_bw = two_bw::report(&schedule, args.microbatches.unwrap_or(1), windows, &costs)?;
    let sim = match &two_bw {
        Some(report) => report.stream.clone(),
        None => simulate(&schedule, &costs).map_err(|e| CliError::failure(e.to_string()))?,
    };
    let predictions = if args.dp.enabled() {
        args.dp.predict(&schedule, &sim)?
    } else {
        Vec::new()
    };
    let text = match args.format {
        Format::Text => {
            to_text(&schedule, &sim)
                + &two_bw.as_ref().map(two_bw::text).unwrap_or_default()
                + &args.dp.text(&predictions)
        }
        Format::Svg => match &two_bw {
            Some(report) => to_svg_with(
                &schedule,
                &sim,
                &SvgOptions {
                    title: Some(two_bw::svg_title(report)),
                    ..SvgOptions::default()
                },
            ),
            None => to_svg(&schedule, &sim),
        },
        Format::Json => {
            let mut doc = to_json(&schedule, &sim);
            if let (false, Some(map)) = (predictions.is_empty(), doc.as_object_mut()) {
                map.insert("data_parallel".into(), args.dp.json(&predictions)?);
            }
            if let (Some(report), Some(map)) = (&two_bw, doc.as_object_mut()) {
                map.insert("two_bw".into(), two_bw::json(report)?);
            }
            let mut s = serde_json::to_string_pretty(&doc).map_err(|e| CliError::failure(e.to_string()))?;
            s.push('\n');
            s
        }
        Format::Csv if args.comms => {
            let rows = lower_with_comms(&schedule).map_err(|e| CliError::failure(e.to_string()))?;
            to_csv(
                &rows
                    .into_iter()
                    .map(|r| r.into_iter().map(Some).collect())
                    .collect::<Vec<_>>(),
            )
        }
        Format::Csv => to_csv(&to_rank_actions(&schedule).map_err(|e| CliError::failure(e.to_string()))?),
    };
    write_output(args.out.as_deref(), &text)
}

/// Most compute actions `baton schedule` generates (stages × chunks × micro-batches × 2, or × 3 for the
/// zero-bubble families): beyond it the tables and drawings take minutes and gigabytes.
pub const SCHEDULE_ACTIONS_MAX: u64 = 1 << 24;

/// Bytes per action the output formats need at their peak (measured: 1F1B, 64 stages × 2048 micro-batches:
/// text 160, SVG 315, JSON 1,720), with headroom.
fn bytes_per_action(format: Format) -> u64 {
    match format {
        Format::Text => 256,
        Format::Svg | Format::Csv => 512,
        Format::Json => 2048,
    }
}

/// Refuses a size whose tables cannot be allocated (or would take far too long), before generating anything.
fn check_size(kind: ScheduleKind, p: u32, m: u32, v: u32, format: Format) -> Result<(), CliError> {
    let per_part = match kind {
        ScheduleKind::ZbH1 | ScheduleKind::ZbV => 3,
        _ => 2,
    };
    let actions = u64::from(p) * u64::from(v) * u64::from(m) * per_part;
    let need = actions * bytes_per_action(format);
    let available = crate::engine::memory::available_bytes();
    if actions > SCHEDULE_ACTIONS_MAX || available.is_some_and(|a| need > a) {
        return Err(CliError::usage(format!(
            "--stages {p} --microbatches {m}{}: {actions} actions, which would need about {} to build and draw \
             ({}); at most {SCHEDULE_ACTIONS_MAX} actions are generated here: use fewer stages or micro-batches",
            if v > 1 { format!(" --chunks {v}") } else { String::new() },
            crate::engine::memory::human_bytes(need),
            available.map_or("available memory unknown".into(), |a| format!(
                "{} available",
                crate::engine::memory::human_bytes(a)
            ))
        )));
    }
    Ok(())
}

/// The schedule to simulate and draw: imported, generated, or for 2bw the stream of `windows` windows.
fn build_schedule(args: &ScheduleArgs, windows: u32) -> Result<Schedule, CliError> {
    if let Some(path) = &args.from_csv {
        let text =
            std::fs::read_to_string(path).map_err(|e| CliError::failure(format!("reading {}: {e}", path.display())))?;
        let schedule = schedule_from_csv(&text).map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?;
        if let Some(p) = args.stages.filter(|&p| p != schedule.stages()) {
            return Err(CliError::failure(format!(
                "{}: the file holds {} rank rows but --stages is {p}",
                path.display(),
                schedule.stages()
            )));
        }
        if let Some(m) = args.microbatches.filter(|&m| m != schedule.microbatches) {
            return Err(CliError::failure(format!(
                "{}: the file holds {} micro-batches but --microbatches is {m}",
                path.display(),
                schedule.microbatches
            )));
        }
        return Ok(schedule);
    }
    let (Some(kind), Some(p), Some(m)) = (args.schedule, args.stages, args.microbatches) else {
        return Err(CliError::usage(
            "--schedule, --stages and --microbatches are required unless --from-csv is given",
        ));
    };
    let kind: ScheduleKind = kind.into();
    let v = args.chunks.unwrap_or(match kind {
        ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
        _ => 1,
    });
    if kind == ScheduleKind::TwoBw {
        check_size(kind, p, m.saturating_mul(windows), v, args.format)?;
        return two_bw::stream(p, m, v, windows);
    }
    check_size(kind, p, m, v, args.format)?;
    generate(kind, p, m, v).map_err(|e| CliError::usage(e.to_string()))
}
