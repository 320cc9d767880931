//! PipeDream-2BW on the executor (CPU backend, bitwise):
//!
//! - with one micro-batch in flight (one stage: delay 0) it is plain 1F1B, bit for bit;
//! - with a pipeline the delay is one window: the second window's loss is the first weights' loss on that batch;
//! - every backward reads the weight version its forward read, and that version is `max(window − 1, 0)`;
//! - a stream of windows without a flush gives the same bits as the windows one at a time, and as a stream cut by
//!   a checkpoint (the older weight version travels in the checkpoint's state);
//! - a failure inside a stream leaves the pipeline as before it.

mod common;

use baton_engine::data::Batch;
use baton_engine::executor::{FailureKind, FailurePoint};
use baton_engine::pipeline::TensorMap;
use baton_engine::{Cpu, Pipeline, PipelineConfig};
use baton_schedules::{two_bw_stream, Op, ScheduleKind};

fn batches(n: usize) -> Vec<Batch> {
    common::batches_with(n, common::BATCH, common::SEQ, common::VOCAB, 0x2b_2b2b_0016)
}

fn config(kind: ScheduleKind, p: u32, m: u32, steps: u64) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(common::tiny_model(), p, kind, m);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = steps;
    cfg.optimizer.grad_clip = 0.5;
    cfg
}

fn pipeline(cfg: &PipelineConfig) -> Pipeline<Cpu> {
    Pipeline::new(cfg.clone(), vec![Cpu; cfg.stages as usize]).unwrap()
}

/// Losses, gradient norms (bits) and the final parameters of `steps` one-window steps.
fn stepwise(cfg: &PipelineConfig, data: &[Batch]) -> (Vec<u32>, Vec<u32>, TensorMap) {
    let mut pipe = pipeline(cfg);
    let (mut l, mut n) = (Vec::new(), Vec::new());
    for b in data {
        let r = pipe.train_step(b).unwrap();
        l.push(r.loss.to_bits());
        n.push(r.grad_norm.to_bits());
    }
    (l, n, pipe.parameters().unwrap())
}

#[test]
fn one_micro_batch_in_flight_is_plain_1f1b() {
    let data = batches(4);
    let two_bw = stepwise(&config(ScheduleKind::TwoBw, 1, 2, 4), &data);
    let plain = stepwise(&config(ScheduleKind::OneFOneB, 1, 2, 4), &data);
    assert_eq!(two_bw.0, plain.0, "losses");
    assert_eq!(two_bw.1, plain.1, "norms");
    assert!(two_bw.2 == plain.2, "parameters");
    // Streamed: the stage waits for each new version (delay 0), and the bits stay.
    let mut pipe = pipeline(&config(ScheduleKind::TwoBw, 1, 2, 4));
    let reports = pipe.train_windows(&data).unwrap();
    let losses: Vec<u32> = reports.iter().map(|r| r.loss.to_bits()).collect();
    assert_eq!(losses, plain.0);
    assert!(pipe.parameters().unwrap() == plain.2);
}

#[test]
fn a_pipeline_reads_weights_one_window_old() {
    let data = batches(3);
    let cfg = config(ScheduleKind::TwoBw, 2, 2, 3);
    let two_bw = stepwise(&cfg, &data);
    let plain = stepwise(&config(ScheduleKind::OneFOneB, 2, 2, 3), &data);
    assert_eq!(
        two_bw.0[0], plain.0[0],
        "the first window reads the initial weights either way"
    );
    assert_ne!(two_bw.0[1], plain.0[1], "1F1B's second step reads W1, 2BW's W0");
    // 2BW's second window is computed with the initial weights: its loss is theirs on that batch.
    let fresh = pipeline(&cfg).eval_loss(&data[1]);
    let fresh = fresh.unwrap();
    let got = f32::from_bits(two_bw.0[1]);
    assert!(((got - fresh) / fresh).abs() < 1e-6, "{got} vs {fresh}");
}

#[test]
fn every_backward_reads_its_forwards_version() {
    for (p, m, k) in [(2u32, 2u32, 4usize), (4, 4, 3), (3, 2, 3)] {
        let data = batches(2 + k);
        let mut pipe = pipeline(&config(ScheduleKind::TwoBw, p, m, 8));
        // Two windows first, so the stream starts at step 2 with an older version on hand.
        pipe.train_windows(&data[..2]).unwrap();
        let reports = pipe.train_windows(&data[2..]).unwrap();
        let versions = &reports.last().unwrap().weight_versions;
        let stream = two_bw_stream(p, m, k as u32).unwrap();
        assert_eq!(versions.len(), p as usize);
        for (s, list) in stream.actions.iter().enumerate() {
            assert_eq!(versions[s].len(), list.len(), "p={p} stage {s}: one version per action");
            let mut at_forward = std::collections::HashMap::new();
            for (a, &v) in list.iter().zip(&versions[s]) {
                let window = 2 + u64::from(a.mb / m);
                assert_eq!(v, window - 1, "p={p} m={m} stage {s} {a}: reads W(window − 1)");
                match a.op {
                    Op::F => {
                        at_forward.insert(a.mb, v);
                    }
                    _ => assert_eq!(
                        at_forward.get(&a.mb),
                        Some(&v),
                        "p={p} stage {s} {a}: its forward's version"
                    ),
                }
            }
            // Both versions are in use at once somewhere on the stage (that is the second copy's job).
            let distinct: std::collections::BTreeSet<u64> = versions[s].iter().copied().collect();
            assert!(distinct.len() >= 2, "p={p} stage {s}: {distinct:?}");
        }
    }
}

#[test]
fn a_stream_gives_the_bits_of_its_windows_one_at_a_time_and_across_a_checkpoint() {
    for (p, m) in [(2u32, 2u32), (4, 4), (3, 2)] {
        let data = batches(5);
        let cfg = config(ScheduleKind::TwoBw, p, m, 5);
        let (losses, norms, params) = stepwise(&cfg, &data);
        let mut pipe = pipeline(&cfg);
        let reports = pipe.train_windows(&data).unwrap();
        assert_eq!(reports.len(), 5);
        let got: Vec<u32> = reports.iter().map(|r| r.loss.to_bits()).collect();
        let got_norms: Vec<u32> = reports.iter().map(|r| r.grad_norm.to_bits()).collect();
        assert_eq!(got, losses, "p={p} m={m}: losses");
        assert_eq!(got_norms, norms, "p={p} m={m}: norms");
        assert!(pipe.parameters().unwrap() == params, "p={p} m={m}: parameters");
        assert_eq!(pipe.step(), 5);
        // Two windows, a checkpoint's worth of state, a fresh pipeline, three more.
        let mut first = pipeline(&cfg);
        first.train_windows(&data[..2]).unwrap();
        let values = first.parameters().unwrap();
        let (mo, ve) = first.optimizer_state().unwrap();
        let state = first.sync_state().unwrap();
        assert!(
            state.keys().any(|k| k.starts_with("2bw.prev.")),
            "the older version is saved"
        );
        let mut second = pipeline(&cfg);
        second.load(&values, Some((&mo, &ve))).unwrap();
        second.set_step(2);
        second.load_sync_state(&state).unwrap();
        second.train_windows(&data[2..]).unwrap();
        assert!(
            second.parameters().unwrap() == params,
            "p={p} m={m}: resumed between streams"
        );
    }
}

#[test]
fn a_failure_inside_a_stream_changes_nothing() {
    let data = batches(3);
    let cfg = config(ScheduleKind::TwoBw, 2, 2, 6);
    let mut pipe = pipeline(&cfg);
    pipe.train_windows(&data[..1]).unwrap();
    let before = pipe.parameters().unwrap();
    let moments = pipe.optimizer_state().unwrap();
    pipe.set_failure(Some(FailurePoint {
        stage: 1,
        action: 5,
        kind: FailureKind::Error,
        step: None,
    }));
    let e = pipe.train_windows(&data[1..]).unwrap_err().to_string();
    assert!(e.contains("stage 1"), "{e}");
    assert!(pipe.parameters().unwrap() == before, "weights as before the stream");
    assert!(
        pipe.optimizer_state().unwrap() == moments,
        "moments as before the stream"
    );
    assert_eq!(pipe.step(), 1);
    // And it trains on.
    pipe.train_windows(&data[1..]).unwrap();
    assert_eq!(pipe.step(), 3);
}

#[test]
fn streams_need_the_2bw_schedule_and_plain_data_parallelism() {
    let data = batches(1);
    let mut plain = pipeline(&config(ScheduleKind::OneFOneB, 2, 2, 2));
    let e = plain.train_windows(&data).unwrap_err().to_string();
    assert!(e.contains("2bw"), "{e}");
    let mut cfg = config(ScheduleKind::TwoBw, 2, 2, 2);
    cfg.data_parallel = baton_engine::DataParallel {
        zero: true,
        ..baton_engine::DataParallel::replicas(2)
    };
    let mut two = Pipeline::new(cfg, vec![Cpu; 4]).unwrap();
    let e = two.train_windows(&data).unwrap_err().to_string();
    assert!(e.contains("no ZeRO-1"), "{e}");
    let mut ok = pipeline(&config(ScheduleKind::TwoBw, 2, 2, 2));
    assert!(ok.train_windows(&[]).is_err());
}

/// `D` replicas of `cfg`, one-window steps or one stream; losses, and every replica's parameters at the end.
fn replicated(cfg: &PipelineConfig, d: u32, data: &[Batch], stream: bool) -> (Vec<u32>, Vec<TensorMap>) {
    let mut cfg = cfg.clone();
    cfg.data_parallel = baton_engine::DataParallel::replicas(d);
    let mut pipe = Pipeline::new(cfg.clone(), vec![Cpu; (cfg.stages * d) as usize]).unwrap();
    let reports = if stream {
        pipe.train_windows(data).unwrap()
    } else {
        data.iter().map(|b| pipe.train_step(b).unwrap()).collect()
    };
    for r in &reports {
        assert!(r.reduced_bytes > 0, "the replicas' gradients are summed every window");
    }
    let params = (0..d as usize).map(|r| pipe.replica_parameters(r).unwrap()).collect();
    (reports.iter().map(|r| r.loss.to_bits()).collect(), params)
}

#[test]
fn data_parallel_2bw_sums_replicas_every_window() {
    let data = batches(4);
    // One stage: 2BW is 1F1B, with replicas too.
    let (a, pa) = replicated(&config(ScheduleKind::TwoBw, 1, 2, 4), 2, &data, true);
    let (b, pb) = replicated(&config(ScheduleKind::OneFOneB, 1, 2, 4), 2, &data, false);
    assert_eq!(a, b, "D=2 p=1: 2BW vs 1F1B losses");
    assert!(pa[0] == pb[0], "D=2 p=1: 2BW vs 1F1B parameters");
    // Two stages: a stream equals its windows one at a time, and the replicas stay equal.
    let cfg = config(ScheduleKind::TwoBw, 2, 2, 4);
    let (s, ps) = replicated(&cfg, 2, &data, true);
    let (w, pw) = replicated(&cfg, 2, &data, false);
    assert_eq!(s, w, "D=2 p=2: stream vs windows");
    assert!(ps[0] == pw[0], "D=2 p=2: stream vs windows, parameters");
    assert!(ps[0] == ps[1], "D=2 p=2: the replicas agree");
}

on_every_backend!(a_stream_matches_its_windows_on_every_backend);

/// The flush-free stream against the same windows one at a time, on the backend under test (CUDA: the updater
/// steps AdamW on the stages' streams from its own thread while they compute): bitwise on the CPU, within the
/// device's tolerance elsewhere; and against the CPU's stream.
fn a_stream_matches_its_windows_on_every_backend(dev: &impl common::Device) {
    let data = batches(4);
    let cfg = config(ScheduleKind::TwoBw, 2, 2, 4);
    let mut windows = Pipeline::new(cfg.clone(), dev.stages(2)).unwrap();
    let one: Vec<f32> = data.iter().map(|b| windows.train_step(b).unwrap().loss).collect();
    let mut stream = Pipeline::new(cfg.clone(), dev.stages(2)).unwrap();
    let all: Vec<f32> = stream.train_windows(&data).unwrap().iter().map(|r| r.loss).collect();
    let mut cpu = pipeline(&cfg);
    let reference: Vec<f32> = cpu.train_windows(&data).unwrap().iter().map(|r| r.loss).collect();
    let (a, b) = (stream.parameters().unwrap(), windows.parameters().unwrap());
    match dev.tolerance() {
        None => {
            assert_eq!(all, one, "stream vs windows");
            assert!(a == b, "stream vs windows: parameters");
        }
        Some(tol) => {
            for (x, y) in all.iter().zip(&one).chain(all.iter().zip(&reference)) {
                assert!(((x - y) / y).abs() as f64 <= tol, "loss {x} vs {y}");
            }
            for (name, t) in &a {
                let e = common::rel_err(&t.data, &b[name].data);
                assert!(e <= 10.0 * tol, "`{name}`: {e:e}");
            }
        }
    }
}

/// Batched weight gradients in a 2BW stream: each window's weight halves run once its last micro-batch has reached
/// them (before its gradients go to the updater), so a stream gives the bits of the same windows batched one at a
/// time, and every window trains the bits of one micro-batch of its whole batch (m = 1 with the same delay).
#[test]
fn batched_weight_grads_run_per_window_in_a_stream() {
    let data = batches(3);
    let batched = |m: u32| {
        let mut cfg = config(ScheduleKind::TwoBw, 2, m, 3);
        cfg.batch_weight_grads = true;
        cfg
    };
    let stepwise_batched = stepwise(&batched(4), &data);
    let mut pipe = pipeline(&batched(4));
    let reports = pipe.train_windows(&data).unwrap();
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|r| r.loss.is_finite()));
    assert!(
        pipe.parameters().unwrap() == stepwise_batched.2,
        "a stream of batched windows equals the batched windows one at a time"
    );
    let one = stepwise(&batched(1), &data);
    assert!(
        stepwise_batched.2 == one.2,
        "batched windows of 4 micro-batches equal windows of one micro-batch"
    );
    let unbatched = stepwise(&config(ScheduleKind::TwoBw, 2, 4, 3), &data);
    assert!(
        unbatched.2 != one.2,
        "unbatched, m = 4 accumulates four products per weight"
    );
}
