//! The CPU backend's per-op timing (`baton_engine::backend::op_profile`). Its own test binary: the totals are
//! process-wide, and no other test may run ops while this one counts.

use baton_engine::backend::{op_profile, Backend};
use baton_engine::Cpu;

/// With timing on, the CPU backend's ops are counted once each (an op inside another is not counted again) with
/// a positive time; off, nothing is recorded; `take` starts the totals afresh.
#[test]
fn ops_are_counted_when_enabled_and_only_then() {
    let cpu = Cpu;
    let a = cpu.upload(&[1.0; 4096]).expect("upload");
    op_profile::set_enabled(true);
    let _ = op_profile::take();
    let b = cpu.duplicate(&a).expect("duplicate");
    let mut c = cpu.zeros(4096).expect("zeros");
    cpu.add_assign(&mut c, &b).expect("add_assign");
    cpu.add_assign(&mut c, &b).expect("add_assign");
    op_profile::set_enabled(false);
    cpu.add_assign(&mut c, &b).expect("add_assign");
    let times = op_profile::take();
    let calls = |op: &str| times.iter().find(|t| t.op == op).map_or(0, |t| t.calls);
    assert_eq!(calls("duplicate"), 1);
    assert_eq!(calls("upload"), 0, "the upload inside duplicate was counted again");
    assert_eq!(calls("zeros"), 1);
    assert_eq!(calls("add_assign"), 2, "an op was counted while timing was off");
    assert_eq!(times.len(), 3, "{times:?}");
    assert!(times.iter().all(|t| t.seconds > 0.0));
    assert!(op_profile::take().is_empty(), "take did not start afresh");
    assert_eq!(cpu.download(&c).expect("download"), vec![3.0; 4096]);
}
