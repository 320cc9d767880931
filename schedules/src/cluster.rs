//! The cluster a layout runs on: links with a latency and a bandwidth, and nodes of GPUs joined by a fast link
//! inside the node and a slower one across nodes, with the rank map that places a layout's workers on them.
//!
//! **Rank map.** Worker (replica `r`, stage `s`) of a `D × P` layout is global rank `r·P + s`, and rank `g` sits
//! on node `g / gpus_per_node`. So the stages of one pipeline are neighbours: inside one node when
//! `P <= gpus_per_node` and `P` divides `gpus_per_node`, and the replicas fill the nodes after them. A hop between
//! two stages, or a data-parallel group of one stage's `D` copies, uses the intra-node link when all its members
//! are on one node and the inter-node link otherwise.
//!
//! **Presets** are assumptions, named with their units, not measurements: [`NVLINK_H200`] (NVLink 4 through
//! NVSwitch: 900 GB/s per GPU counting both directions, so 450 GB/s per direction, a few microseconds per
//! message) and [`INFINIBAND_NDR`] (one 400 Gbit/s NDR adapter per GPU, as in an 8-GPU HGX node with a
//! rail-optimised fabric: 50 GB/s per direction, about 5 µs per message).

use serde::Serialize;

use crate::error::ScheduleError;

/// Most GPUs one node of a [`Cluster`] may hold.
pub const GPUS_PER_NODE_MAX: u32 = 1024;

/// Assumed NVLink 4 bandwidth of one H200 SXM per direction, bytes per second (900 GB/s both ways together).
pub const NVLINK_BYTES_PER_S: f64 = 450e9;

/// Assumed latency of one NVLink message through NVSwitch, seconds (a few microseconds, as NCCL's small-message
/// latency inside a node).
pub const NVLINK_LATENCY_S: f64 = 3e-6;

/// Assumed InfiniBand NDR bandwidth per GPU per direction, bytes per second (one 400 Gbit/s adapter per GPU).
pub const INFINIBAND_BYTES_PER_S: f64 = 400e9 / 8.0;

/// Assumed latency of one InfiniBand message between nodes, seconds.
pub const INFINIBAND_LATENCY_S: f64 = 5e-6;

/// Assumed GPUs per node (an HGX H200 board).
pub const GPUS_PER_NODE_DEFAULT: u32 = 8;

/// The NVLink-class link inside a node: [`NVLINK_BYTES_PER_S`], [`NVLINK_LATENCY_S`].
pub const NVLINK_H200: Link = Link {
    latency_s: NVLINK_LATENCY_S,
    bytes_per_s: NVLINK_BYTES_PER_S,
};

/// The InfiniBand-class link across nodes: [`INFINIBAND_BYTES_PER_S`], [`INFINIBAND_LATENCY_S`].
pub const INFINIBAND_NDR: Link = Link {
    latency_s: INFINIBAND_LATENCY_S,
    bytes_per_s: INFINIBAND_BYTES_PER_S,
};

/// One link: a message of `n` bytes takes `latency_s + n / bytes_per_s` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Link {
    /// Seconds before the first byte of a message arrives (finite, >= 0).
    pub latency_s: f64,
    /// Bytes per second one GPU sends in one direction (finite, > 0).
    pub bytes_per_s: f64,
}

impl Link {
    /// Seconds to send one message of `bytes` bytes: `latency_s + bytes / bytes_per_s`.
    pub fn transfer_s(&self, bytes: f64) -> f64 {
        self.latency_s + bytes / self.bytes_per_s
    }

    /// Refuses a latency or bandwidth out of range, naming the link (`what`) and the value.
    pub fn check(&self, what: &str) -> Result<(), ScheduleError> {
        if !self.latency_s.is_finite() || self.latency_s < 0.0 {
            return Err(ScheduleError::Costs(format!(
                "{what} link latency is {} s; it must be finite and >= 0",
                self.latency_s
            )));
        }
        if !self.bytes_per_s.is_finite() || self.bytes_per_s <= 0.0 {
            return Err(ScheduleError::Costs(format!(
                "{what} link bandwidth is {} bytes/s; it must be finite and > 0",
                self.bytes_per_s
            )));
        }
        Ok(())
    }
}

/// Which link a transfer or a group uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LinkKind {
    /// Nothing crosses a link (one stage, or one replica).
    None,
    /// Every member on one node: [`Cluster::intra`].
    Intra,
    /// Members on more than one node: [`Cluster::inter`].
    Inter,
}

impl LinkKind {
    /// `none`, `intra-node`, `inter-node`.
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::None => "none",
            LinkKind::Intra => "intra-node",
            LinkKind::Inter => "inter-node",
        }
    }
}

/// GPUs in nodes of `gpus_per_node`, joined by `intra` inside a node and `inter` across nodes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Cluster {
    /// GPUs per node (1..=[`GPUS_PER_NODE_MAX`]).
    pub gpus_per_node: u32,
    /// The link between two GPUs of one node.
    pub intra: Link,
    /// The link between two GPUs of different nodes (each GPU with its own adapter).
    pub inter: Link,
}

impl Default for Cluster {
    /// [`Cluster::hgx_h200`].
    fn default() -> Self {
        Cluster::hgx_h200()
    }
}

impl Cluster {
    /// The assumed H200 cluster: [`GPUS_PER_NODE_DEFAULT`] GPUs per node on [`NVLINK_H200`], nodes on
    /// [`INFINIBAND_NDR`].
    pub fn hgx_h200() -> Self {
        Cluster {
            gpus_per_node: GPUS_PER_NODE_DEFAULT,
            intra: NVLINK_H200,
            inter: INFINIBAND_NDR,
        }
    }

    /// Refuses a node size or a link out of range, naming the value.
    pub fn check(&self) -> Result<(), ScheduleError> {
        if self.gpus_per_node == 0 || self.gpus_per_node > GPUS_PER_NODE_MAX {
            return Err(ScheduleError::Planner(format!(
                "cluster: gpus_per_node is {}; it must be in 1..={GPUS_PER_NODE_MAX}",
                self.gpus_per_node
            )));
        }
        self.intra.check("intra-node")?;
        self.inter.check("inter-node")
    }

    /// The link of `kind` (`None` for [`LinkKind::None`]).
    pub fn link(&self, kind: LinkKind) -> Option<Link> {
        match kind {
            LinkKind::None => None,
            LinkKind::Intra => Some(self.intra),
            LinkKind::Inter => Some(self.inter),
        }
    }

    /// The node global rank `rank` sits on.
    pub fn node_of(&self, rank: u64) -> u64 {
        rank / u64::from(self.gpus_per_node.max(1))
    }

    /// The slowest link any pipeline hop of a `replicas × stages` layout crosses under the rank map (see the
    /// module docs): [`LinkKind::Inter`] when some replica's stages `s` and `s + 1` are on different nodes.
    pub fn hop_link(&self, replicas: u32, stages: u32) -> LinkKind {
        if stages <= 1 {
            return LinkKind::None;
        }
        let p = u64::from(stages);
        let crosses = (0..u64::from(replicas)).any(|r| self.node_of(r * p) != self.node_of(r * p + p - 1));
        if crosses {
            LinkKind::Inter
        } else {
            LinkKind::Intra
        }
    }

    /// The slowest link any stage's data-parallel group of a `replicas × stages` layout uses: [`LinkKind::Inter`]
    /// when some stage's `replicas` copies are not all on one node.
    pub fn dp_link(&self, replicas: u32, stages: u32) -> LinkKind {
        if replicas <= 1 {
            return LinkKind::None;
        }
        let p = u64::from(stages);
        let last = u64::from(replicas) - 1;
        let crosses = (0..p).any(|s| self.node_of(s) != self.node_of(last * p + s));
        if crosses {
            LinkKind::Inter
        } else {
            LinkKind::Intra
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_map_keeps_pipelines_inside_nodes_while_they_fit() {
        let c = Cluster::hgx_h200();
        // 8 stages on 8-GPU nodes: every pipeline fills one node; replicas cross nodes.
        assert_eq!(c.hop_link(4, 8), LinkKind::Intra);
        assert_eq!(c.dp_link(4, 8), LinkKind::Inter);
        // 2 stages × 4 replicas: the whole layout is one node.
        assert_eq!(c.hop_link(4, 2), LinkKind::Intra);
        assert_eq!(c.dp_link(4, 2), LinkKind::Intra);
        // 16 stages: every pipeline spans two nodes.
        assert_eq!(c.hop_link(2, 16), LinkKind::Inter);
        // 3 stages on 8-GPU nodes: replica 2 (ranks 6..9) straddles two nodes.
        assert_eq!(c.hop_link(3, 3), LinkKind::Inter);
        assert_eq!(c.hop_link(1, 1), LinkKind::None);
        assert_eq!(c.dp_link(1, 8), LinkKind::None);
    }

    #[test]
    fn bad_links_are_refused_naming_the_value() {
        let mut c = Cluster::hgx_h200();
        c.inter.bytes_per_s = 0.0;
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("inter-node link bandwidth is 0"), "{err}");
        let mut c = Cluster::hgx_h200();
        c.intra.latency_s = f64::NAN;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .contains("intra-node link latency is NaN"));
        let c = Cluster {
            gpus_per_node: 0,
            ..Cluster::hgx_h200()
        };
        assert!(c.check().unwrap_err().to_string().contains("gpus_per_node is 0"));
    }

    #[test]
    fn a_message_pays_latency_then_bandwidth() {
        let l = Link {
            latency_s: 1e-6,
            bytes_per_s: 1e9,
        };
        assert!((l.transfer_s(1e6) - (1e-6 + 1e-3)).abs() < 1e-15);
    }
}
