//! Scale predictions against closed forms: one stage on free links is pure compute, P uniform stages under 1F1B
//! have the bubble (P−1)/(m+P−1), a data-parallel step adds the ring all-reduce time, slower links never make a
//! layout faster, and the memory budget decides which layouts fit.

use baton_schedules::{
    layouts, predict_layout, scale, Cluster, Layout, LayoutOutcome, LayoutReport, Link, LinkKind, MemoryModel,
    PlanSpace, ScaleModel, ScaleOptions, ScheduleError, ScheduleKind, SearchLimits, UnitProfile, BUCKET_BYTES_DEFAULT,
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

/// A unit whose times and bytes grow linearly with the micro-batch: `f` and `b` seconds of F and B per sequence
/// (I = W = b/2), `act` stashed and `out` sent bytes per sequence, `params` parameter bytes.
#[derive(Clone, Copy)]
struct Unit {
    f: f64,
    b: f64,
    act: u64,
    out: u64,
    params: u64,
}

fn profiles(units: &[Unit], mb: u32) -> Vec<UnitProfile> {
    let n = f64::from(mb);
    let last = units.len() - 1;
    units
        .iter()
        .enumerate()
        .map(|(k, u)| UnitProfile {
            costs: [u.f * n, u.b * n, u.b * n / 2.0, u.b * n / 2.0],
            activation_bytes: u.act * u64::from(mb),
            weight_stash_bytes: u.act * u64::from(mb),
            output_bytes: if k == last { 0 } else { u.out * u64::from(mb) },
            param_bytes: u.params,
            scratch_bytes: 0,
        })
        .collect()
}

/// Only 1F1B, no recomputation, generated orders: the family the closed forms are about.
fn one_f_one_b_space() -> PlanSpace {
    PlanSpace {
        kinds: vec![ScheduleKind::OneFOneB],
        interleaved_chunks: vec![],
        recompute: vec![false],
        list_orders: false,
    }
}

fn free_link() -> Link {
    Link {
        latency_s: 0.0,
        bytes_per_s: 1e300,
    }
}

fn options(cluster: Cluster) -> ScaleOptions {
    ScaleOptions {
        cluster,
        memory: MemoryModel::default(),
        zero1: false,
        space: one_f_one_b_space(),
        limits: SearchLimits::default(),
        microbatches: None,
        grad_bytes_per_param_byte: 2.0,
        bucket_bytes: f64::INFINITY,
        bucket_bytes_per_replica: 0.0,
        overlap: true,
    }
}

fn predicted(o: LayoutOutcome) -> LayoutReport {
    match o {
        LayoutOutcome::Predicted(r) => *r,
        other => panic!("expected a prediction, got {other:?}"),
    }
}

#[test]
fn one_stage_on_free_links_is_pure_compute() {
    let units = [
        Unit {
            f: 0.1,
            b: 0.3,
            act: 10,
            out: 8,
            params: 1000,
        },
        Unit {
            f: 1.0,
            b: 2.0,
            act: 10,
            out: 8,
            params: 5000,
        },
        Unit {
            f: 0.7,
            b: 1.1,
            act: 10,
            out: 0,
            params: 3000,
        },
    ];
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "three units".into(),
        global_batch_seqs: 24,
        seq_tokens: 16,
        units: units.len(),
        units_at: &units_at,
    };
    let per_seq: f64 = units.iter().map(|u| u.f + u.b).sum();
    let cluster = Cluster {
        gpus_per_node: 2,
        intra: free_link(),
        inter: free_link(),
    };
    for d in [1u32, 2, 4, 8] {
        let r = predicted(predict_layout(&model, &options(cluster), Layout { replicas: d, stages: 1 }).unwrap());
        // Every micro-batch count runs the replica's 24/d sequences one after another.
        let compute = per_seq * 24.0 / f64::from(d);
        assert!(close(r.pipeline_s, compute), "D={d}: {r:?}");
        assert!(close(r.step_s, compute), "D={d}: {r:?}");
        assert_eq!(r.bubble, 0.0);
        assert!(r.exposed_comm_s <= 1e-200);
        assert!(close(r.tokens_per_s, 24.0 * 16.0 / compute));
        assert_eq!(r.hop_link, LinkKind::None);
        assert_eq!(
            r.dp_link,
            if d == 1 {
                LinkKind::None
            } else if d <= 2 {
                LinkKind::Intra
            } else {
                LinkKind::Inter
            }
        );
    }
}

#[test]
fn uniform_stages_under_1f1b_have_the_closed_form_bubble() {
    for p in [2u32, 4, 8] {
        // One unit per stage, no bytes across hops: the hop costs the link's latency, here 0.
        let units = vec![
            Unit {
                f: 1.0,
                b: 2.0,
                act: 1,
                out: 0,
                params: 0,
            };
            p as usize
        ];
        let units_at = |mb: u32| Ok(profiles(&units, mb));
        for m in [1u32, 4, 8, 16] {
            let model = ScaleModel {
                name: "uniform".into(),
                global_batch_seqs: m,
                seq_tokens: 1,
                units: units.len(),
                units_at: &units_at,
            };
            let opts = ScaleOptions {
                microbatches: Some(vec![m]),
                ..options(Cluster {
                    gpus_per_node: 8,
                    intra: free_link(),
                    inter: free_link(),
                })
            };
            let r = predicted(predict_layout(&model, &opts, Layout { replicas: 1, stages: p }).unwrap());
            let (pf, mf) = (f64::from(p), f64::from(m));
            assert_eq!(r.candidate.microbatches, m);
            assert!(close(r.bubble, (pf - 1.0) / (mf + pf - 1.0)), "P={p} m={m}: {r:?}");
            assert!(close(r.step_s, (mf + pf - 1.0) * 3.0), "P={p} m={m}: {r:?}");
            assert_eq!(r.ranges.len(), p as usize);
        }
    }
}

#[test]
fn a_hop_costs_latency_plus_message_over_bandwidth() {
    // 2 stages on one node: each hop carries `out · mb` bytes over the intra-node link.
    let units = [Unit {
        f: 1.0,
        b: 2.0,
        act: 1,
        out: 1_000,
        params: 0,
    }; 2];
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "two".into(),
        global_batch_seqs: 4,
        seq_tokens: 1,
        units: 2,
        units_at: &units_at,
    };
    let link = Link {
        latency_s: 0.25,
        bytes_per_s: 4_000.0,
    };
    let opts = ScaleOptions {
        microbatches: Some(vec![2]),
        ..options(Cluster {
            gpus_per_node: 2,
            intra: link,
            inter: free_link(),
        })
    };
    let r = predicted(predict_layout(&model, &opts, Layout { replicas: 1, stages: 2 }).unwrap());
    assert_eq!(r.hop_link, LinkKind::Intra);
    // Micro-batches of 2 sequences: 2000 bytes, 0.25 + 0.5 s.
    assert!(close(r.hop_s, 0.75), "{r:?}");
    // The same layout with 2 stages straddling two 1-GPU nodes uses the inter-node link instead.
    let split = ScaleOptions {
        cluster: Cluster {
            gpus_per_node: 1,
            intra: free_link(),
            inter: link,
        },
        ..opts.clone()
    };
    let r2 = predicted(predict_layout(&model, &split, Layout { replicas: 1, stages: 2 }).unwrap());
    assert_eq!(r2.hop_link, LinkKind::Inter);
    assert!(close(r2.hop_s, 0.75));
    assert!(close(r2.step_s, r.step_s));
    // Free links: the step is the latency-free 1F1B makespan, (m + P − 1)·(F + B) with 2-sequence micro-batches.
    let free = ScaleOptions {
        cluster: Cluster {
            gpus_per_node: 2,
            intra: free_link(),
            inter: free_link(),
        },
        ..opts
    };
    let r0 = predicted(predict_layout(&model, &free, Layout { replicas: 1, stages: 2 }).unwrap());
    assert!(close(r0.step_s, 3.0 * 2.0 * 3.0), "{r0:?}");
    assert!(r.step_s > r0.step_s);
}

#[test]
fn data_parallel_adds_the_ring_all_reduce_time() {
    let units = [Unit {
        f: 1.0,
        b: 2.0,
        act: 1,
        out: 0,
        params: 3_000_000,
    }];
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "one".into(),
        global_batch_seqs: 16,
        seq_tokens: 1,
        units: 1,
        units_at: &units_at,
    };
    let intra = Link {
        latency_s: 1e-3,
        bytes_per_s: 1e9,
    };
    let inter = Link {
        latency_s: 5e-3,
        bytes_per_s: 1e8,
    };
    for (gpus_per_node, d, link) in [(8u32, 4u32, intra), (8, 8, intra), (2, 4, inter), (1, 16, inter)] {
        for (floor, per_replica) in [(f64::INFINITY, 0.0), (1_000_000.0, 0.0), (1_000_000.0, 1_000_000.0)] {
            // Megatron-Core's rule: the bucket grows with the group.
            let bucket = f64::max(floor, f64::from(d) * per_replica);
            let opts = ScaleOptions {
                overlap: false,
                bucket_bytes: floor,
                bucket_bytes_per_replica: per_replica,
                ..options(Cluster {
                    gpus_per_node,
                    intra,
                    inter,
                })
            };
            let r = predicted(predict_layout(&model, &opts, Layout { replicas: d, stages: 1 }).unwrap());
            let df = f64::from(d);
            let compute = 3.0 * 16.0 / df;
            let bytes = 2.0 * 3_000_000.0;
            let buckets = if bucket.is_finite() {
                (bytes / bucket).ceil()
            } else {
                1.0
            };
            let ring = 2.0 * (df - 1.0) / df * bytes / link.bytes_per_s + buckets * 2.0 * (df - 1.0) * link.latency_s;
            assert!(close(r.pipeline_s, compute), "{r:?}");
            assert!(close(r.allreduce_s, ring), "D={d} bucket={bucket}: {r:?}");
            assert!(close(r.step_s, compute + ring), "D={d}: {r:?}");
            assert!(close(r.comm_share, ring / (compute + ring)));
            assert_eq!(r.grad_bytes, bytes);
            // One stage: its last backward is the flush, so overlapping changes nothing.
            let with = predicted(
                predict_layout(
                    &model,
                    &ScaleOptions { overlap: true, ..opts },
                    Layout { replicas: d, stages: 1 },
                )
                .unwrap(),
            );
            assert!(close(with.step_s, r.step_s));
        }
    }
}

/// Embedding, blocks and head of different weights, so the planner's choices are not trivial.
fn lumpy_model_units() -> Vec<Unit> {
    let mut units = vec![Unit {
        f: 0.05,
        b: 0.1,
        act: 100,
        out: 4_000,
        params: 40_000_000,
    }];
    units.extend((0..6).map(|_| Unit {
        f: 1.0,
        b: 2.0,
        act: 20_000,
        out: 4_000,
        params: 20_000_000,
    }));
    units.push(Unit {
        f: 1.5,
        b: 3.0,
        act: 50_000,
        out: 0,
        params: 40_000_000,
    });
    units
}

fn realistic_cluster(scale_bw: f64, scale_lat: f64) -> Cluster {
    Cluster {
        gpus_per_node: 4,
        intra: Link {
            latency_s: 3e-6 * scale_lat,
            bytes_per_s: 4e8 * scale_bw,
        },
        inter: Link {
            latency_s: 5e-6 * scale_lat,
            bytes_per_s: 5e7 * scale_bw,
        },
    }
}

#[test]
fn a_slower_link_never_makes_a_layout_faster() {
    let units = lumpy_model_units();
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "lumpy".into(),
        global_batch_seqs: 16,
        seq_tokens: 1,
        units: units.len(),
        units_at: &units_at,
    };
    let space = PlanSpace {
        kinds: vec![ScheduleKind::OneFOneB, ScheduleKind::ZbH1],
        interleaved_chunks: vec![],
        recompute: vec![false],
        list_orders: false,
    };
    for gpus in [4u32, 8, 16] {
        let fast_opts = ScaleOptions {
            space: space.clone(),
            microbatches: Some(vec![1, 2, 4, 8, 16]),
            bucket_bytes: BUCKET_BYTES_DEFAULT,
            ..options(realistic_cluster(1.0, 1.0))
        };
        let fast = scale(&model, &fast_opts, gpus).unwrap();
        for (bw, lat) in [(0.5, 1.0), (1.0, 10.0), (0.1, 100.0)] {
            let slow_opts = ScaleOptions {
                cluster: realistic_cluster(bw, lat),
                ..fast_opts.clone()
            };
            let slow = scale(&model, &slow_opts, gpus).unwrap();
            for layout in layouts(gpus, units.len()) {
                let find = |rep: &baton_schedules::ScaleReport| {
                    rep.layouts
                        .iter()
                        .find(|(l, _)| *l == layout)
                        .map(|(_, o)| o.clone())
                        .unwrap()
                };
                if let (LayoutOutcome::Predicted(f), LayoutOutcome::Predicted(s)) = (find(&fast), find(&slow)) {
                    assert!(f.exact && s.exact, "the closed argument needs exact searches");
                    assert!(
                        s.step_s >= f.step_s * (1.0 - 1e-12),
                        "N={gpus} {layout:?} bw×{bw} lat×{lat}: {} < {}",
                        s.step_s,
                        f.step_s
                    );
                }
            }
            let (bf, bs) = (fast.best().unwrap(), slow.best().unwrap());
            assert!(bs.step_s >= bf.step_s * (1.0 - 1e-12));
        }
        // The report is sorted: fitting layouts first, by step time.
        let times: Vec<f64> = fast
            .layouts
            .iter()
            .filter_map(|(_, o)| match o {
                LayoutOutcome::Predicted(r) => Some(r.step_s),
                _ => None,
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        assert_eq!(fast.best().map(|b| b.step_s), times.first().copied());
    }
}

#[test]
fn the_memory_budget_decides_which_layouts_fit() {
    let units = lumpy_model_units();
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "lumpy".into(),
        global_batch_seqs: 8,
        seq_tokens: 1,
        units: units.len(),
        units_at: &units_at,
    };
    let params: u64 = units.iter().map(|u| u.params).sum();
    // AdamW in fp32: parameters, gradients and two moments, 4× the parameter bytes on one stage; stashes on top.
    let budget = 3 * params;
    let opts = ScaleOptions {
        memory: MemoryModel::with_budget(budget),
        ..options(realistic_cluster(1.0, 1.0))
    };
    let one = predict_layout(&model, &opts, Layout { replicas: 1, stages: 1 }).unwrap();
    match one {
        LayoutOutcome::TooBig {
            needed_bytes,
            budget_bytes,
            ..
        } => {
            assert_eq!(budget_bytes, budget);
            assert!(needed_bytes >= 4 * params, "{needed_bytes}");
        }
        other => panic!("one stage holding everything cannot fit 3× the parameters: {other:?}"),
    }
    // Four stages hold a quarter each (or so): they fit, and no stage is over the budget.
    let four = predicted(predict_layout(&model, &opts, Layout { replicas: 1, stages: 4 }).unwrap());
    assert!(four.peak_memory.1 <= budget, "{four:?}");
    // ZeRO-1 over 8 replicas shards the moments: one stage then needs parameters + gradients + 2/8 of the
    // moments, under 3×, and fits.
    let zero = ScaleOptions {
        zero1: true,
        memory: MemoryModel::with_budget(budget),
        ..opts.clone()
    };
    let sharded = predicted(predict_layout(&model, &zero, Layout { replicas: 8, stages: 1 }).unwrap());
    assert!(sharded.peak_memory.1 >= params * 2 + params / 4);
    assert!(sharded.peak_memory.1 <= budget);
}

#[test]
fn layouts_that_cannot_run_are_reported_and_bad_inputs_refused() {
    let units = lumpy_model_units();
    let units_at = |mb: u32| Ok(profiles(&units, mb));
    let model = ScaleModel {
        name: "lumpy".into(),
        global_batch_seqs: 6,
        seq_tokens: 1,
        units: units.len(),
        units_at: &units_at,
    };
    let opts = options(realistic_cluster(1.0, 1.0));
    match predict_layout(&model, &opts, Layout { replicas: 4, stages: 1 }).unwrap() {
        LayoutOutcome::Unsupported(why) => assert!(why.contains("4 replicas do not divide"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Every layout of 8 GPUs with P ≤ 8 units appears, exactly once.
    let rep = scale(&model, &opts, 8).unwrap();
    let mut ps: Vec<u32> = rep.layouts.iter().map(|(l, _)| l.stages).collect();
    ps.sort_unstable();
    assert_eq!(ps, [1, 2, 4, 8]);
    assert!(rep.layouts.iter().all(|(l, _)| l.replicas * l.stages == 8));
    let mut bad = opts.clone();
    bad.cluster.inter.bytes_per_s = 0.0;
    let err = scale(&model, &bad, 8).unwrap_err().to_string();
    assert!(err.contains("inter-node link bandwidth is 0"), "{err}");
    assert!(scale(&model, &opts, 0).unwrap_err().to_string().contains("0 GPUs"));
    let short = |_: u32| Ok(profiles(&units[..3], 1));
    let wrong = ScaleModel {
        units_at: &short,
        ..model
    };
    let err = predict_layout(&wrong, &opts, Layout { replicas: 1, stages: 2 }).unwrap_err();
    assert!(
        matches!(err, ScheduleError::Planner(ref s) if s.contains("gave 3 units")),
        "{err}"
    );
}
