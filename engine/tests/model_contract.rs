//! A model or pipeline that breaks the engine's contract is refused when the pipeline is built, with an error
//! naming what is wrong — never a panic and never mid-step: duplicate parameter names, a tied group naming a
//! parameter no unit holds or copies of different shapes, a schedule whose stage count is not the number of
//! backends, a builder without a schedule, a split by a unit name the model does not have.

mod common;

use std::sync::Arc;

use baton_engine::model::{Forward, Layer, MicroBatch, Model, Param, Saved, TiedGroup};
use baton_engine::{Cpu, EngineError, Gpt2, Pipeline, Result, StageSplit};
use baton_schedules::{generate, ScheduleKind};

/// Units that each hold one parameter; `names[u]` and `lens[u]` say which.
struct Toy {
    names: Vec<&'static str>,
    lens: Vec<usize>,
    tied: Vec<TiedGroup>,
}

struct Unit {
    params: Vec<Param<Cpu>>,
}

impl Layer<Cpu> for Unit {
    fn name(&self) -> String {
        self.params[0].name.clone()
    }
    fn params(&self) -> &[Param<Cpu>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<Cpu>] {
        &mut self.params
    }
    fn forward(
        &self,
        _be: &Cpu,
        x: Option<baton_engine::backend::CpuBuf>,
        _mb: &MicroBatch<Cpu>,
    ) -> Result<Forward<Cpu>> {
        Ok(Forward {
            out: x,
            losses: None,
            saved: Saved::empty(),
        })
    }
    fn backward_input(
        &self,
        _be: &Cpu,
        _s: &mut Saved<Cpu>,
        d: Option<baton_engine::backend::CpuBuf>,
        _mb: &MicroBatch<Cpu>,
    ) -> Result<Option<baton_engine::backend::CpuBuf>> {
        Ok(d)
    }
    fn backward_weight(&mut self, _be: &Cpu, _s: Saved<Cpu>, _mb: &MicroBatch<Cpu>) -> Result<()> {
        Ok(())
    }
}

impl Model<Cpu> for Toy {
    fn kind(&self) -> String {
        "toy".into()
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn num_units(&self) -> usize {
        self.names.len()
    }
    fn unit_name(&self, unit: usize) -> String {
        format!("u{unit}")
    }
    fn build_unit(&self, unit: usize, be: &Cpu) -> Result<Box<dyn Layer<Cpu>>> {
        let len = self.lens[unit];
        Ok(Box::new(Unit {
            params: vec![Param::new(be, self.names[unit], vec![len], vec![0.0; len], true)?],
        }))
    }
    fn tied_groups(&self) -> Vec<TiedGroup> {
        self.tied.clone()
    }
    fn vocab_size(&self) -> usize {
        8
    }
    fn max_seq(&self) -> usize {
        8
    }
}

fn build(model: Toy) -> Result<Pipeline<Cpu>> {
    Pipeline::builder(Arc::new(model))
        .schedule(generate(ScheduleKind::OneFOneB, 2, 2, 1)?)
        .build(vec![Cpu; 2])
}

fn model_error(r: Result<Pipeline<Cpu>>) -> String {
    match r {
        Err(EngineError::Model(why)) => why,
        Err(other) => panic!("expected a model error, got {other}"),
        Ok(_) => panic!("expected a model error, the pipeline was built"),
    }
}

#[test]
fn a_model_that_breaks_the_contract_is_refused_when_built() {
    let why = model_error(build(Toy {
        names: vec!["a", "b", "a"],
        lens: vec![2, 2, 2],
        tied: vec![],
    }));
    assert!(why.contains("`a`") && why.contains("unique"), "{why}");

    let tied = vec![TiedGroup::new(["a", "missing"])];
    let why = model_error(build(Toy {
        names: vec!["a", "b", "c"],
        lens: vec![2, 2, 2],
        tied,
    }));
    assert!(why.contains("missing") && why.contains("no unit holds"), "{why}");

    let tied = vec![TiedGroup::new(["a", "c"])];
    let why = model_error(build(Toy {
        names: vec!["a", "b", "c"],
        lens: vec![2, 2, 3],
        tied,
    }));
    assert!(why.contains("`a`") && why.contains("shape"), "{why}");

    let tied = vec![TiedGroup::new(["a"])];
    let why = model_error(build(Toy {
        names: vec!["a", "b", "c"],
        lens: vec![2, 2, 2],
        tied,
    }));
    assert!(why.contains("at least two"), "{why}");

    // The same model with a proper tied group builds.
    let tied = vec![TiedGroup::new(["a", "c"])];
    build(Toy {
        names: vec!["a", "b", "c"],
        lens: vec![2, 2, 2],
        tied,
    })
    .unwrap();
}

#[test]
fn a_pipeline_that_does_not_fit_its_schedule_is_refused() {
    let gpt = Arc::new(Gpt2::new(common::tiny_model(), 1).unwrap());
    // Three backends for a two-stage schedule.
    let r = Pipeline::builder(gpt.clone())
        .schedule(generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap())
        .build(vec![Cpu; 3]);
    match r {
        Err(EngineError::Config {
            field: "stages",
            reason,
            ..
        }) => assert!(reason.contains("2 stages"), "{reason}"),
        Err(other) => panic!("expected a stages error, got {other}"),
        Ok(_) => panic!("built with the wrong number of backends"),
    }
    // No schedule.
    assert!(matches!(
        Pipeline::builder(gpt.clone()).build(vec![Cpu; 1]),
        Err(EngineError::Config { field: "schedule", .. })
    ));
    // A split by a unit name the model does not have.
    let r = Pipeline::builder(gpt)
        .schedule(generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap())
        .split(StageSplit::parse("embedding..=h.1,h.2..=nowhere").unwrap())
        .build(vec![Cpu; 2]);
    match r {
        Err(EngineError::Split(why)) => assert!(why.contains("nowhere"), "{why}"),
        Err(other) => panic!("expected a split error, got {other}"),
        Ok(_) => panic!("built with an unknown unit name"),
    }
}
