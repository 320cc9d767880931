//! The two communication seams of a pipeline. The executor moves activations and gradients between stages only
//! through a [`Transport`]; the optimizer phase reduces only through [`Collective`]s over groups of stages (the
//! global gradient norm over the stage group, tied-parameter sums over the stages holding the copies; data
//! parallelism plugs in here). Nothing above this module names a concrete implementation; the in-process ones
//! ([`LocalTransport`], [`LocalCollectives`]) are today's paths: crossbeam inboxes and the backend's copies (a
//! move on the CPU, CUDA peer copies on the receiver's copy stream).

mod collective;
mod nccl;
mod transport;

pub use collective::{Collective, Collectives, LocalCollectives, LocalGroup, Workers};
pub use nccl::{
    assign_ranks, nccl_available, nccl_missing_message, nccl_version, shard_ranges, NcclCollectives, NcclGroup,
};
pub(crate) use transport::clock_base;
pub use transport::{Endpoint, Endpoints, LocalTransport, MessageKey, MessageKind, Transport};
