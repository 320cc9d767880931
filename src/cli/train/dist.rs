//! `baton train` started by `mpirun -np N` or `srun --mpi=pmix -n N`: the MPI world, the rank map (which ranks
//! run which replica's stages), and the refusal to run N copies of a single-process job when the binary was
//! built without MPI.

use super::TrainConfig;
#[cfg(not(feature = "mpi"))]
use crate::cli::CliError;

/// Whether the environment says a launcher started this process as one of several ranks.
pub(crate) fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse::<usize>().ok()))
        .filter(|&n| n > 1)
        .or_else(|| {
            // Under srun with PMIx the size variables can be absent: a rank variable is still there.
            ["PMIX_RANK", "OMPI_COMM_WORLD_RANK"]
                .iter()
                .any(|v| std::env::var_os(v).is_some())
                .then_some(0)
        })
}

#[cfg(feature = "mpi")]
pub(crate) use with_mpi::{detect, Dist};

#[cfg(not(feature = "mpi"))]
/// Without MPI a launched job would be N independent runs writing into one directory: refused.
pub(crate) fn detect(_c: &TrainConfig) -> Result<Option<Dist>, CliError> {
    match launched_ranks() {
        Some(n) if n != 1 => Err(CliError::usage(format!(
            "started as one of {} ranks by mpirun or srun, but this baton was built without MPI: build it with \
             `cargo build --release --features mpi` (needs an MPI library and libclang)",
            if n == 0 { "several".to_string() } else { n.to_string() }
        ))),
        _ => Ok(None),
    }
}

#[cfg(not(feature = "mpi"))]
/// Never made without the `mpi` feature.
pub(crate) enum Dist {}

#[cfg(not(feature = "mpi"))]
/// Never called: there is no `Dist` without the `mpi` feature.
pub(crate) fn cuda_for_rank(dist: &Dist, _gpus: usize) -> Result<usize, CliError> {
    match *dist {}
}

#[cfg(feature = "mpi")]
pub(crate) use with_mpi::cuda_for_rank;

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::any::Any;
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use super::{launched_ranks, TrainConfig};
    use crate::cli::CliError;
    use crate::engine::backend::Cuda;
    use crate::engine::comm::mpi::{MpiCollectives, MpiWorld, RankMap};
    use crate::engine::comm::{Collectives, NcclTransport, NcclWorld, NcclWorldCollectives, Transport, Workers};
    use crate::engine::{Backend, Hosting};
    use baton_schedules::Schedule;

    /// This process's place in a multi-process run.
    pub(crate) struct Dist {
        /// The MPI world.
        pub world: Arc<MpiWorld>,
        /// Which rank runs which worker.
        pub map: RankMap,
        /// Every wait on another rank gives up after this.
        pub timeout: Duration,
        /// The NCCL world when the ranks train on GPUs of their own ([`cuda_for_rank`]); stage traffic and
        /// collectives then go over NCCL instead of MPI's host staging.
        pub nccl: OnceLock<Arc<NcclWorld>>,
    }

    /// This rank's GPU for a `--device cuda` run over several ranks: the one of its local rank on its host. When
    /// every rank has a GPU of its own, sets up NCCL (libnccl checked first: a clear error when it is missing);
    /// when ranks of a host outnumber its `gpus`, they share GPUs, which NCCL refuses, and the run keeps MPI's
    /// host-staged transport and collectives (said on stderr by rank 0). Collective: every rank calls it.
    pub(crate) fn cuda_for_rank(d: &Dist, gpus: usize) -> Result<usize, CliError> {
        let local = d.world.local_rank();
        let gpu = local % gpus.max(1);
        let nccl = crate::engine::comm::nccl_available();
        // 0: shares a GPU; 1: own GPU, no NCCL; 2: own GPU and NCCL. Every rank decides on everyone's answer.
        let mine = if local >= gpus {
            0.0
        } else if nccl.is_err() {
            1.0
        } else {
            2.0
        };
        let all = d
            .world
            .all_gather_f64(&[mine], d.timeout)
            .map_err(|e| CliError::failure(e.to_string()))?;
        let worst = all.iter().filter_map(|v| v.first().copied()).fold(2.0f64, f64::min);
        if worst < 0.5 {
            if d.world.rank() == 0 {
                eprintln!(
                    "warning: {} ranks on hosts with {gpus} GPU(s) share GPUs, which NCCL does not allow in one \
                     communicator; stages and replicas on different ranks move through host memory over MPI",
                    d.map.ranks()
                );
            }
            return Ok(gpu);
        }
        if worst < 1.5 {
            let why = nccl.err().unwrap_or_else(|| "another rank cannot load libnccl".into());
            return Err(CliError::failure(format!(
                "--device cuda over {} ranks needs NCCL between the processes: {why}",
                d.map.ranks()
            )));
        }
        let workers = d.map.replicas() * d.map.stages();
        let rank_of_worker: Vec<usize> = (0..workers).map(|w| d.map.rank_of_worker(w)).collect();
        let world = NcclWorld::init(d.world.as_ref(), gpu, rank_of_worker, d.map.stages(), d.timeout)
            .map_err(|e| CliError::failure(format!("setting up NCCL: {e}")))?;
        if d.world.rank() == 0 {
            eprintln!("ranks: one GPU each; stages on different ranks and the collectives use NCCL");
        }
        let _ = d.nccl.set(world);
        Ok(gpu)
    }

    /// How long a collective waits for another rank: `BATON_COMM_TIMEOUT_S` seconds, default 120 (a collective
    /// waits for the slowest rank's whole schedule, so this is well above one receive's deadline).
    fn comm_timeout() -> Result<Duration, CliError> {
        match std::env::var("BATON_COMM_TIMEOUT_S") {
            Err(_) => Ok(Duration::from_secs(120)),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
                _ => Err(CliError::usage(format!(
                    "BATON_COMM_TIMEOUT_S `{v}`: expected a positive number of seconds"
                ))),
            },
        }
    }

    /// The MPI world when a launcher started several ranks (`None` for a plain single-process run).
    pub(crate) fn detect(c: &TrainConfig) -> Result<Option<Dist>, CliError> {
        if launched_ranks().is_none() {
            return Ok(None);
        }
        let world = MpiWorld::init().map_err(|e| CliError::failure(e.to_string()))?;
        if world.size() == 1 {
            return Ok(None);
        }
        let map = RankMap::new(c.data_parallel as usize, c.stages as usize, world.size()).map_err(|e| {
            CliError::usage(format!(
                "{e} (--data-parallel {} --stages {})",
                c.data_parallel, c.stages
            ))
        })?;
        let timeout = comm_timeout()?;
        Ok(Some(Dist {
            world,
            map,
            timeout,
            nccl: OnceLock::new(),
        }))
    }

    impl Dist {
        /// This process's rank.
        pub fn rank(&self) -> usize {
            self.world.rank()
        }

        /// The rank map as printed at start, with every rank's host.
        pub fn describe(&self) -> Result<String, CliError> {
            let hosts = self
                .world
                .hosts(self.timeout)
                .map_err(|e| CliError::failure(e.to_string()))?;
            Ok(format!(
                "ranks: {} processes over {} host(s), {} replica(s) × {} stages\n  {}",
                self.map.ranks(),
                {
                    let mut h = hosts.clone();
                    h.sort();
                    h.dedup();
                    h.len()
                },
                self.map.replicas(),
                self.map.stages(),
                self.map.describe(&hosts).join("\n  ")
            ))
        }

        /// What the pipeline builder needs to run this rank's workers: transports per replica (NCCL when this run
        /// set it up and `B` is [`Cuda`], else MPI) and the cohort.
        pub fn hosting<B: Backend>(&self, schedule: &Schedule) -> Hosting<B> {
            if let Some(nccl) = self.nccl.get() {
                let (nccl, placement) = (Arc::clone(nccl), schedule.placement.clone());
                let h: Hosting<Cuda> = Hosting {
                    workers: self.map.workers_of(self.world.rank()).collect(),
                    transports: Box::new(move |backends| {
                        backends
                            .iter()
                            .enumerate()
                            .map(|(r, b)| {
                                let t: Arc<dyn Transport<Cuda>> =
                                    Arc::new(NcclTransport::new(&nccl, r, Arc::clone(b), &placement)?);
                                Ok(t)
                            })
                            .collect()
                    }),
                    cohort: Arc::clone(&self.world) as Arc<dyn crate::engine::comm::Cohort>,
                };
                // `B` is `Cuda` whenever NCCL was set up (only `cuda_for_rank` sets it).
                let boxed: Box<dyn Any> = Box::new(h);
                if let Ok(h) = boxed.downcast::<Hosting<B>>() {
                    return *h;
                }
            }
            crate::engine::comm::mpi::hosting(&self.world, &self.map, schedule)
        }

        /// The collectives over every rank's workers.
        pub fn collectives<B: Backend>(
            &self,
        ) -> impl FnOnce(&Workers<B>) -> crate::engine::Result<Arc<dyn Collectives<B>>> + 'static {
            let (world, map, timeout) = (Arc::clone(&self.world), self.map.clone(), self.timeout);
            let nccl = self.nccl.get().cloned();
            move |w| {
                if let Some(nccl) = nccl {
                    // NCCL is set up only for `Cuda` (see `hosting`).
                    let any: &dyn Any = w;
                    if let Some(w) = any.downcast_ref::<Workers<Cuda>>() {
                        let c: Arc<dyn Collectives<Cuda>> = Arc::new(NcclWorldCollectives::new(&nccl, w.clone()));
                        let boxed: Box<dyn Any> = Box::new(c);
                        if let Ok(c) = boxed.downcast::<Arc<dyn Collectives<B>>>() {
                            return Ok(*c);
                        }
                    }
                }
                let c: Arc<dyn Collectives<B>> = Arc::new(MpiCollectives::new(&world, &map, w.clone(), timeout));
                Ok(c)
            }
        }
    }
}
