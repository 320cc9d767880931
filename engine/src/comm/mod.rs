//! The two communication seams of a pipeline. The executor moves activations and gradients between stages only
//! through a [`Transport`]; the optimizer phase reduces only through [`Collective`]s over groups of stages (the
//! global gradient norm over the stage group, tied-parameter sums over the stages holding the copies; data
//! parallelism plugs in here). Nothing above this module names a concrete implementation; the in-process ones
//! ([`LocalTransport`], [`LocalCollectives`]) are today's paths: crossbeam inboxes and the backend's copies (a
//! move on the CPU, CUDA peer copies on the receiver's copy stream).

mod collective;
#[cfg(feature = "mpi")]
pub mod mpi;
mod nccl;
mod nccl_world;
mod transport;

pub use collective::{Collective, Collectives, LocalCollectives, LocalGroup, Workers};
pub use nccl::{
    assign_ranks, nccl_available, nccl_missing_message, nccl_version, shard_ranges, NcclCollectives, NcclGroup,
};
pub use nccl_world::{
    broadcast_id, nonblocking_config, plan_channels, shared_gpus, NcclComm, NcclId, NcclTransport, NcclWorld,
    NcclWorldCollectives,
};
pub(crate) use transport::clock_base;

/// The processes of a job that spreads one pipeline's workers over several (an MPI world): who this one is, and
/// the one collective the host side needs — every process's bytes, in rank order. Checkpoints use it to write one
/// checkpoint from every process (each its own stage files, the manifest last by rank 0).
pub trait Cohort: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Processes in the job.
    fn size(&self) -> usize;
    /// Every process's `mine`, in rank order. Collective: every rank calls it, in the same order; only one
    /// thread per process uses a cohort at a time.
    fn all_gather_bytes(&self, mine: &[u8]) -> crate::error::Result<Vec<Vec<u8>>>;
}
pub use transport::{Endpoint, Endpoints, LocalTransport, MessageKey, MessageKind, Transport};
