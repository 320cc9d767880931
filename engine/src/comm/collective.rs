//! Reductions over groups of stages: the [`Collective`] seam, the [`Collectives`] factory that makes groups, and
//! the in-process implementation. Every reduction has one fixed order — members are summed in member order,
//! `((x0 + x1) + x2) + …` — so results never depend on timing, transport or placement.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{EngineError, Result};

/// A member's buffer as a collective sees it: `(member index, buffer)`. A process passes only the members it
/// hosts (in-process: all of them).
pub type Local<'a, T> = (usize, T);

/// Collective operations over a fixed group of members (stages, or copies of a tied parameter held by stages),
/// with one reduction order: member order. Each call is made once per process, with the members that process
/// hosts; every member must be covered exactly once across the processes of the group.
pub trait Collective<B: Backend>: Send + Sync {
    /// Members in the group.
    fn members(&self) -> usize;
    /// `x_i ← Σ_j x_j` for every member (same length everywhere), summed in member order.
    fn all_reduce(&self, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()>;
    /// `x_root ← Σ_j x_j` (summed in member order); the other members' buffers are left as they are or hold the sum
    /// (implementations may do either; callers read only the root's). The default is [`Collective::all_reduce`].
    fn reduce(&self, root: usize, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        if root >= self.members() {
            return Err(EngineError::Comm {
                seam: "collective",
                stage: 0,
                reason: format!("reduce to member {root} of a group of {}", self.members()),
            });
        }
        self.all_reduce(bufs)
    }
    /// `x_i ← x_root` for every member.
    fn broadcast(&self, root: usize, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()>;
    /// Member `i` receives shard `i` of `Σ_j x_j` (summed in member order): the input of length `n·members` is
    /// cut into `members` shards of `n`; `out[i]` must hold `n` elements.
    fn reduce_scatter(&self, input: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()>;
    /// Every member receives the concatenation of all members' shards in member order: `out[i]` holds
    /// `n·members` elements for shards of `n`.
    fn all_gather(&self, shards: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()>;
    /// Every member's host values, in member order (small data: norms, counters, flags).
    fn all_gather_host(&self, values: &[Local<'_, Vec<f64>>]) -> Result<Vec<Vec<f64>>>;
    /// Returns once every member's queued work has finished and every member has arrived.
    fn barrier(&self) -> Result<()>;
}

/// Makes the groups a pipeline reduces over.
pub trait Collectives<B: Backend>: Send + Sync {
    /// A group whose member `i` lives on stage `stages[i]` (a stage may hold several members).
    fn group(&self, stages: &[usize]) -> Result<Box<dyn Collective<B>>>;
}

/// The backends of every worker of this process: `replicas[r][s]` runs stage `s` of replica `r`; worker
/// `r·p + s` in group member lists.
pub struct Workers<B: Backend> {
    replicas: Arc<Vec<Arc<Vec<B>>>>,
}

impl<B: Backend> Clone for Workers<B> {
    fn clone(&self) -> Self {
        Workers {
            replicas: Arc::clone(&self.replicas),
        }
    }
}

impl<B: Backend> Workers<B> {
    /// The stages of one replica.
    fn one(backends: Arc<Vec<B>>) -> Self {
        Workers {
            replicas: Arc::new(vec![backends]),
        }
    }

    /// The workers of `replicas` (each one backend per stage, all of the same length).
    pub fn new(replicas: Vec<Arc<Vec<B>>>) -> Result<Self> {
        let p = replicas.first().map_or(0, |r| r.len());
        if p == 0 || replicas.iter().any(|r| r.len() != p) {
            return Err(comm_err(
                0,
                "every replica needs the same, non-zero number of stages".into(),
            ));
        }
        Ok(Workers {
            replicas: Arc::new(replicas),
        })
    }

    /// Workers in all.
    pub fn len(&self) -> usize {
        self.replicas.len() * self.replicas[0].len()
    }

    /// Never true (a worker set has at least one stage).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Worker `w`'s backend.
    pub fn get(&self, w: usize) -> Option<&B> {
        let p = self.replicas[0].len().max(1);
        self.replicas.get(w / p).and_then(|r| r.get(w % p))
    }
}

/// Groups of workers that all live in this process ([`LocalGroup`]).
pub struct LocalCollectives<B: Backend> {
    workers: Workers<B>,
}

impl<B: Backend> LocalCollectives<B> {
    /// Groups over `backends` (one per stage: one replica).
    pub fn new(backends: Arc<Vec<B>>) -> Self {
        LocalCollectives {
            workers: Workers::one(backends),
        }
    }

    /// Groups over every worker of several replicas.
    pub fn over(workers: Workers<B>) -> Self {
        LocalCollectives { workers }
    }
}

impl<B: Backend> Collectives<B> for LocalCollectives<B> {
    fn group(&self, workers: &[usize]) -> Result<Box<dyn Collective<B>>> {
        Ok(Box::new(LocalGroup::on(self.workers.clone(), workers.to_vec())?))
    }
}

/// A group whose members all live in this process. `all_reduce` and `broadcast` run on the devices (the
/// backend's copies between stages and its `add_assign`); `reduce_scatter` and `all_gather` go through host
/// memory (correct and order-fixed; the data-parallel path will give them device versions).
pub struct LocalGroup<B: Backend> {
    workers: Workers<B>,
    /// Member `i` lives on worker `stages[i]`.
    stages: Vec<usize>,
}

impl<B: Backend> LocalGroup<B> {
    /// A group whose member `i` lives on stage `stages[i]` of `backends`.
    pub fn new(backends: Arc<Vec<B>>, stages: Vec<usize>) -> Result<Self> {
        LocalGroup::on(Workers::one(backends), stages)
    }

    /// A group whose member `i` lives on worker `workers[i]`.
    pub fn on(all: Workers<B>, workers: Vec<usize>) -> Result<Self> {
        if workers.is_empty() {
            return Err(comm_err(0, "a group needs at least one member".into()));
        }
        if let Some(&w) = workers.iter().find(|&&w| w >= all.len()) {
            return Err(comm_err(
                w,
                format!("a group member on worker {w}, but there are {} workers", all.len()),
            ));
        }
        Ok(LocalGroup {
            workers: all,
            stages: workers,
        })
    }

    fn be(&self, member: usize) -> &B {
        self.workers.get(self.stages[member]).expect("checked in `on`")
    }

    fn order(&self, members: impl Iterator<Item = usize>) -> Result<Vec<usize>> {
        member_order("collective", &self.stages, members)
    }

    /// Whether member `to`'s backend reads member `from`'s buffers in place (the same stage, or one address space:
    /// the CPU), so no copy between them is needed.
    fn reads_in_place(&self, from: usize, to: usize) -> bool {
        self.stages[from] == self.stages[to] || self.be(to).reads_buffers_of(self.be(from))
    }

    /// A copy of `buf` (on member `from`'s stage) on member `to`'s stage.
    fn copy_to(&self, from: usize, to: usize, buf: &B::Buf) -> Result<B::Buf> {
        let dup = self.be(from).duplicate(buf)?;
        if self.stages[from] == self.stages[to] {
            Ok(dup)
        } else {
            self.be(from).transfer(dup, self.be(to))
        }
    }

    fn check_len(&self, member: usize, got: usize, want: usize, what: &str) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(comm_err(
                self.stages[member],
                format!("{what} of member {member} holds {got} elements, expected {want}"),
            ))
        }
    }
}

/// Checks that `members` (the member index of each buffer passed, in the order passed) names each of the
/// `workers.len()` members exactly once, and returns the buffers' positions in member order. Errors name the
/// member's worker and `seam`.
pub(crate) fn member_order(
    seam: &'static str,
    workers: &[usize],
    members: impl Iterator<Item = usize>,
) -> Result<Vec<usize>> {
    let err = |worker: usize, reason: String| EngineError::Comm {
        seam,
        stage: worker as u32,
        reason,
    };
    let n = workers.len();
    let mut at = vec![None; n];
    for (pos, m) in members.enumerate() {
        let slot = at.get_mut(m).ok_or_else(|| {
            err(
                workers.first().copied().unwrap_or(0),
                format!("member {m} of a group of {n}"),
            )
        })?;
        if slot.replace(pos).is_some() {
            return Err(err(workers[m], format!("member {m} given twice")));
        }
    }
    at.into_iter()
        .enumerate()
        .map(|(m, pos)| pos.ok_or_else(|| err(workers[m], format!("member {m} is missing"))))
        .collect()
}

/// [`member_order`] for a group spread over processes: checks that `members` (the member index of each buffer
/// passed, in the order passed) names every member this process hosts (`here(m)`, `m < n`) exactly once and no
/// other, and returns `(member, position passed)` for them in member order. `who` names this process in the
/// error; `err` makes the error for member `m`.
pub(crate) fn hosted_order(
    n: usize,
    here: impl Fn(usize) -> bool,
    members: impl Iterator<Item = usize>,
    who: &str,
    err: impl Fn(usize, String) -> EngineError,
) -> Result<Vec<(usize, usize)>> {
    let mut at: Vec<Option<usize>> = vec![None; n];
    for (pos, m) in members.enumerate() {
        if m >= n || !here(m) {
            return Err(err(
                m.min(n.saturating_sub(1)),
                format!("member {m} is not hosted by {who}"),
            ));
        }
        if at[m].replace(pos).is_some() {
            return Err(err(m, format!("member {m} given twice")));
        }
    }
    (0..n)
        .filter(|&m| here(m))
        .map(|m| {
            at[m]
                .map(|pos| (m, pos))
                .ok_or_else(|| err(m, format!("member {m}, hosted here, is missing")))
        })
        .collect()
}

/// Every member's host values in member order (the positions from [`member_order`]).
pub(crate) fn gather_host(values: &[Local<'_, Vec<f64>>], order: &[usize]) -> Vec<Vec<f64>> {
    order.iter().map(|&pos| values[pos].1.clone()).collect()
}

/// The buffers at positions `a` and `b` (distinct) of `bufs`, the first mutable.
fn pair_mut<'s, T: ?Sized>(bufs: &'s mut [(usize, &mut T)], a: usize, b: usize) -> (&'s mut T, &'s mut T) {
    debug_assert_ne!(a, b);
    if a < b {
        let (lo, hi) = bufs.split_at_mut(b);
        (&mut *lo[a].1, &mut *hi[0].1)
    } else {
        let (lo, hi) = bufs.split_at_mut(a);
        (&mut *hi[0].1, &mut *lo[b].1)
    }
}

fn comm_err(stage: usize, reason: String) -> EngineError {
    EngineError::Comm {
        seam: "collective",
        stage: stage as u32,
        reason,
    }
}

impl<B: Backend> Collective<B> for LocalGroup<B> {
    fn members(&self) -> usize {
        self.stages.len()
    }

    fn all_reduce(&self, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let order = self.order(bufs.iter().map(|(m, _)| *m))?;
        let len = self.be(0).len(bufs[order[0]].1);
        for (m, &pos) in order.iter().enumerate() {
            self.check_len(m, self.be(m).len(bufs[pos].1), len, "the buffer")?;
        }
        // Member 0's buffer becomes the sum, in member order: ((x0 + x1) + x2) + …
        let p0 = order[0];
        for (m, &pos) in order.iter().enumerate().skip(1) {
            let (sum, x) = pair_mut(bufs, p0, pos);
            if self.reads_in_place(m, 0) {
                self.be(0).add_assign(sum, x)?;
            } else {
                let x = self.copy_to(m, 0, x)?;
                self.be(0).add_assign(sum, &x)?;
            }
        }
        for (m, &pos) in order.iter().enumerate().skip(1) {
            let (sum, x) = pair_mut(bufs, p0, pos);
            if self.reads_in_place(0, m) {
                self.be(m).copy(x, sum)?;
            } else {
                let y = self.copy_to(0, m, sum)?;
                self.be(m).copy(x, &y)?;
            }
        }
        Ok(())
    }

    fn reduce(&self, root: usize, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let order = self.order(bufs.iter().map(|(m, _)| *m))?;
        let root_pos = *order
            .get(root)
            .ok_or_else(|| comm_err(0, format!("reduce to member {root} of a group of {}", order.len())))?;
        let len = self.be(0).len(bufs[order[0]].1);
        for (m, &pos) in order.iter().enumerate() {
            self.check_len(m, self.be(m).len(bufs[pos].1), len, "the buffer")?;
        }
        // The sum in member order, ((x0 + x1) + x2) + …, built on the root's device whatever the root is: the
        // bits are those of `all_reduce`.
        let mut sum = self.copy_to(0, root, bufs[order[0]].1)?;
        for (m, &pos) in order.iter().enumerate().skip(1) {
            if m == root || self.reads_in_place(m, root) {
                self.be(root).add_assign(&mut sum, bufs[pos].1)?;
            } else {
                let x = self.copy_to(m, root, bufs[pos].1)?;
                self.be(root).add_assign(&mut sum, &x)?;
            }
        }
        self.be(root).copy(bufs[root_pos].1, &sum)
    }

    fn broadcast(&self, root: usize, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let order = self.order(bufs.iter().map(|(m, _)| *m))?;
        let root_pos = *order
            .get(root)
            .ok_or_else(|| comm_err(0, format!("broadcast from member {root} of a group of {}", order.len())))?;
        let src = self.be(root).duplicate(bufs[root_pos].1)?;
        for (m, &pos) in order.iter().enumerate() {
            if m != root {
                let x = self.copy_to(root, m, &src)?;
                self.check_len(m, self.be(m).len(bufs[pos].1), self.be(m).len(&x), "the buffer")?;
                self.be(m).copy(bufs[pos].1, &x)?;
            }
        }
        Ok(())
    }

    fn reduce_scatter(&self, input: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let n = self.members();
        let ins = self.order(input.iter().map(|(m, _)| *m))?;
        let outs = self.order(out.iter().map(|(m, _)| *m))?;
        let total = self.be(0).len(input[ins[0]].1);
        if total % n != 0 {
            return Err(comm_err(
                self.stages[0],
                format!("reduce-scatter of {total} elements over {n} members: not a multiple"),
            ));
        }
        let shard = total / n;
        let mut sum = vec![0.0f32; total];
        for (m, &pos) in ins.iter().enumerate() {
            let x = self.be(m).download(input[pos].1)?;
            self.check_len(m, x.len(), total, "the input")?;
            if m == 0 {
                sum.copy_from_slice(&x);
            } else {
                sum.iter_mut().zip(&x).for_each(|(s, v)| *s += v);
            }
        }
        for (m, &pos) in outs.iter().enumerate() {
            self.check_len(m, self.be(m).len(out[pos].1), shard, "the output shard")?;
            let part = self.be(m).upload(&sum[m * shard..(m + 1) * shard])?;
            self.be(m).copy(out[pos].1, &part)?;
        }
        Ok(())
    }

    fn all_gather(&self, shards: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let ins = self.order(shards.iter().map(|(m, _)| *m))?;
        let outs = self.order(out.iter().map(|(m, _)| *m))?;
        let shard = self.be(0).len(shards[ins[0]].1);
        let mut all = Vec::with_capacity(shard * ins.len());
        for (m, &pos) in ins.iter().enumerate() {
            let x = self.be(m).download(shards[pos].1)?;
            self.check_len(m, x.len(), shard, "the shard")?;
            all.extend_from_slice(&x);
        }
        for (m, &pos) in outs.iter().enumerate() {
            self.check_len(m, self.be(m).len(out[pos].1), all.len(), "the output")?;
            let whole = self.be(m).upload(&all)?;
            self.be(m).copy(out[pos].1, &whole)?;
        }
        Ok(())
    }

    fn all_gather_host(&self, values: &[Local<'_, Vec<f64>>]) -> Result<Vec<Vec<f64>>> {
        let order = self.order(values.iter().map(|(m, _)| *m))?;
        Ok(gather_host(values, &order))
    }

    fn barrier(&self) -> Result<()> {
        for m in 0..self.members() {
            self.be(m).synchronize()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    fn group(stages: Vec<usize>) -> LocalGroup<Cpu> {
        LocalGroup::new(Arc::new(vec![Cpu; 3]), stages).unwrap()
    }

    #[test]
    fn all_reduce_sums_in_member_order_into_every_member() {
        let g = group(vec![2, 0, 2]);
        let be = Cpu;
        let (mut a, mut b, mut c) = (
            be.upload(&[1.0, 1e8]).unwrap(),
            be.upload(&[2.0, 1.0]).unwrap(),
            be.upload(&[3.0, -1e8]).unwrap(),
        );
        // Given out of order: the sum is still ((a + b) + c).
        g.all_reduce(&mut [(2, &mut c), (0, &mut a), (1, &mut b)]).unwrap();
        let want = vec![6.0f32, (1e8f32 + 1.0) - 1e8];
        for x in [&a, &b, &c] {
            assert_eq!(be.download(x).unwrap(), want);
        }
    }

    #[test]
    fn a_missing_or_repeated_member_is_an_error() {
        let g = group(vec![0, 1]);
        let be = Cpu;
        let (mut a, mut b) = (be.upload(&[1.0]).unwrap(), be.upload(&[2.0]).unwrap());
        assert!(g.all_reduce(&mut [(0, &mut a)]).is_err());
        assert!(g.all_reduce(&mut [(0, &mut a), (0, &mut b)]).is_err());
        let mut long = be.upload(&[1.0, 2.0]).unwrap();
        assert!(g.all_reduce(&mut [(0, &mut a), (1, &mut long)]).is_err());
        assert!(LocalGroup::new(Arc::new(vec![Cpu; 2]), vec![0, 5]).is_err());
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce() {
        let g = group(vec![0, 1]);
        let be = Cpu;
        let xs = [
            be.upload(&[1.0, 2.0, 3.0, 4.0]).unwrap(),
            be.upload(&[10.0, 20.0, 30.0, 40.0]).unwrap(),
        ];
        let (mut s0, mut s1) = (be.zeros(2).unwrap(), be.zeros(2).unwrap());
        g.reduce_scatter(&[(0, &xs[0]), (1, &xs[1])], &mut [(0, &mut s0), (1, &mut s1)])
            .unwrap();
        assert_eq!(be.download(&s0).unwrap(), vec![11.0, 22.0]);
        assert_eq!(be.download(&s1).unwrap(), vec![33.0, 44.0]);
        let (mut o0, mut o1) = (be.zeros(4).unwrap(), be.zeros(4).unwrap());
        g.all_gather(&[(1, &s1), (0, &s0)], &mut [(0, &mut o0), (1, &mut o1)])
            .unwrap();
        for o in [&o0, &o1] {
            assert_eq!(be.download(o).unwrap(), vec![11.0, 22.0, 33.0, 44.0]);
        }
        let odd = be.zeros(3).unwrap();
        assert!(g
            .reduce_scatter(&[(0, &odd), (1, &odd)], &mut [(0, &mut s0), (1, &mut s1)])
            .is_err());
    }

    #[test]
    fn reduce_gives_the_root_the_all_reduce_bits() {
        let g = group(vec![0, 1, 2]);
        let be = Cpu;
        let inputs = [[1e8f32, 0.5], [1.0, 0.25], [-1e8, 0.125]];
        let mut want = inputs.iter().map(|x| be.upload(x).unwrap()).collect::<Vec<_>>();
        let mut views: Vec<_> = want.iter_mut().enumerate().collect();
        g.all_reduce(&mut views).unwrap();
        let want = be.download(&want[0]).unwrap();
        for root in 0..3 {
            let mut bufs = inputs.iter().map(|x| be.upload(x).unwrap()).collect::<Vec<_>>();
            let mut views: Vec<_> = bufs.iter_mut().enumerate().rev().collect();
            g.reduce(root, &mut views).unwrap();
            assert_eq!(be.download(&bufs[root]).unwrap(), want, "root {root}");
        }
        let mut bufs = inputs.iter().map(|x| be.upload(x).unwrap()).collect::<Vec<_>>();
        let mut views: Vec<_> = bufs.iter_mut().enumerate().collect();
        assert!(g.reduce(3, &mut views).is_err());
    }

    #[test]
    fn broadcast_and_host_gather_follow_member_order() {
        let g = group(vec![1, 0, 2]);
        let be = Cpu;
        let (mut a, mut b, mut c) = (
            be.upload(&[1.0]).unwrap(),
            be.upload(&[2.0]).unwrap(),
            be.upload(&[3.0]).unwrap(),
        );
        g.broadcast(1, &mut [(0, &mut a), (1, &mut b), (2, &mut c)]).unwrap();
        for x in [&a, &b, &c] {
            assert_eq!(be.download(x).unwrap(), vec![2.0]);
        }
        let got = g
            .all_gather_host(&[(2, vec![3.0]), (0, vec![1.0, 1.5]), (1, vec![])])
            .unwrap();
        assert_eq!(got, vec![vec![1.0, 1.5], vec![], vec![3.0]]);
        g.barrier().unwrap();
    }
}
