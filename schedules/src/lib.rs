//! Pipeline schedules for Baton: the IR, generators (GPipe, 1F1B, interleaved 1F1B, ZB-H1,
//! ZB-V, PipeDream-2BW and its weight versions), a list scheduler for any shape, a validator,
//! a discrete-event simulator (with the data-parallel gradient reduction), a planner (the fastest split,
//! schedule and micro-batch count under a memory budget), a cluster model and scale predictions (DP × PP
//! layouts on N GPUs over intra- and inter-node links),
//! PyTorch-compatible text formats (schedule interchange with PyTorch 2.15's
//! `torch.distributed.pipelining`, both ways) and renderers. Pure Rust: no device, no threads.

#![warn(missing_docs)]

mod buffers;
mod cluster;
mod data_parallel;
mod error;
mod generate;
mod graph;
mod ir;
mod list;
mod plan;
mod render;
mod scale;
mod simulate;
mod text;
mod torch;
mod two_bw;
mod validate;

pub use buffers::{peak_receive_buffers, peak_receive_buffers_batched};
pub use cluster::{
    Cluster, Link, LinkKind, GPUS_PER_NODE_DEFAULT, GPUS_PER_NODE_MAX, INFINIBAND_BYTES_PER_S, INFINIBAND_LATENCY_S,
    INFINIBAND_NDR, NVLINK_BYTES_PER_S, NVLINK_H200, NVLINK_LATENCY_S,
};
pub use data_parallel::{
    data_parallel_from_sim, simulate_data_parallel, DpCosts, DpReport, StageReduction, BUCKET_BYTES_DEFAULT,
    REPLICAS_MAX,
};
pub use error::ScheduleError;
pub use generate::{generate, gpipe, interleaved, one_f_one_b, zb_h1, zb_v};
pub use ir::{Action, Op, Placement, Schedule, ScheduleKind, CHUNKS_MAX, MICROBATCHES_MAX, STAGES_MAX};
pub use list::{interleaved_stash_cap, list_schedule, one_f_one_b_stash_cap, zb_h1_weight_stash_cap, ListOptions};
pub use plan::{
    evaluate_split, part_costs, partition, partition_below, plan, stage_memory, Candidate, CandidateOutcome,
    Evaluation, LostBy, MemoryModel, Outcome, Partition, Plan, PlanInput, PlanSpace, RunnerUp, SearchLimits,
    ShapeProfile, StageMemory, UnitProfile, INTERLEAVED_CHUNKS_DEFAULT, PLAN_CANDIDATES_MAX, PLAN_EVALUATIONS_MAX,
    PLAN_NODES_MAX, PLAN_TWO_BW_WINDOWS, PLAN_UNITS_MAX,
};
pub use render::{to_json, to_svg, to_svg_with, to_text, SvgOptions, SVG_WIDTH_MAX, TEXT_COLUMNS_MAX};
pub use scale::{
    layouts, predict_layout, scale, Layout, LayoutOutcome, LayoutReport, ScaleModel, ScaleOptions, ScaleReport,
    UnitsAt, SCALE_GPUS_MAX, SCALE_MICROBATCH_COUNTS_MAX,
};
pub use simulate::{simulate, Costs, SimReport, Span};
pub use text::{
    check_comms, from_csv, schedule_from_rank_actions, to_csv, to_rank_actions, CommOp, ParamOp, PipeAction,
    CSV_CELLS_MAX,
};
pub use torch::{lower_with_comms, schedule_from_csv};
pub use two_bw::{
    simulate_two_bw, two_bw, two_bw_delay, two_bw_stream, weight_versions, TwoBwReport, WeightVersions,
    DELAY_CHECK_WINDOWS, DELAY_MAX, STEADY_WINDOWS_MIN, WEIGHT_VERSIONS_MAX,
};
pub use validate::{peak_inflight, peak_weight_stash, validate, Validation};
