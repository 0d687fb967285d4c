//! The processes of one crafting job: one process (the default), or the ranks of an MPI job
//! (`mpirun -np N metapoison craft ...`, srun likewise) in a build with the cargo feature
//! `mpi`. Rank r owns surrogates r, r + N, ...; the ranks sum their meta-gradients once a
//! craft step, so that every rank applies the same outer step and holds the same
//! perturbation. Rank 0 owns the run folder.
//!
//! Collective calls come from the crafting thread only, one at a time (MPI's "serialized"
//! threading); MPI itself is started and finished on the main thread (`RanksGuard`).

use std::sync::Arc;

/// Why the ranks cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RanksError {
    #[error("this process was started by mpirun or srun as one of {size} ranks, but this build has no MPI: build with `cargo build --release --features mpi` (Debian: libopenmpi-dev)")]
    NoMpi { size: usize },
    #[error("MPI was already started in this process")]
    AlreadyStarted,
    #[error("MPI cannot run its calls from the crafting thread (it offers {0}): use an MPI built with thread support")]
    Threading(String),
}

/// This process's place among the job's processes. Cheap to clone.
#[derive(Clone)]
pub struct Ranks {
    rank: usize,
    size: usize,
    /// Nanoseconds spent in collective calls so far (the benchmark's communication time).
    comm_nanos: Arc<std::sync::atomic::AtomicU64>,
    #[cfg(feature = "mpi")]
    world: Option<Arc<std::sync::Mutex<mpi_backend::World>>>,
    #[cfg(not(feature = "mpi"))]
    _private: Arc<()>,
}

impl std::fmt::Debug for Ranks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank, self.size)
    }
}

/// Keeps MPI started while it lives; dropping it (on the main thread, last) finishes MPI.
pub struct RanksGuard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// The number of ranks the launcher (mpirun, srun) says this job has, if it started us.
/// (Not SLURM_NTASKS: a shell inside an allocation has it without being a rank.)
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// This rank's index among the ranks on its machine (which GPU it takes).
pub fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// How many ranks of the job run on this machine (they share its cores).
pub fn local_size() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(1)
}

/// Starts MPI when a launcher started this process (and the build has MPI); one process
/// otherwise. Call once, on the main thread, and keep the guard until the end.
pub fn start() -> Result<(Ranks, RanksGuard), RanksError> {
    #[cfg(feature = "mpi")]
    {
        if launched_size().is_some() {
            return mpi_backend::start();
        }
        Ok((Ranks::solo(), RanksGuard { _universe: None }))
    }
    #[cfg(not(feature = "mpi"))]
    {
        match launched_size() {
            Some(size) if size > 1 => Err(RanksError::NoMpi { size }),
            _ => Ok((Ranks::solo(), RanksGuard {})),
        }
    }
}

impl Ranks {
    /// One process: every collective is the identity.
    pub fn solo() -> Ranks {
        Ranks {
            rank: 0,
            size: 1,
            comm_nanos: Arc::default(),
            #[cfg(feature = "mpi")]
            world: None,
            #[cfg(not(feature = "mpi"))]
            _private: Arc::new(()),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes the run folder and talks to viewers.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    pub fn several(&self) -> bool {
        self.size > 1
    }

    /// Whether surrogate `m` is this rank's.
    pub fn owns(&self, m: usize) -> bool {
        m % self.size == self.rank
    }

    /// Seconds spent in collective calls since the job started.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    /// Runs a collective call, adding its time to `comm_seconds`.
    #[cfg(feature = "mpi")]
    fn timed<T>(&self, call: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let out = call();
        let nanos = started.elapsed().as_nanos() as u64;
        self.comm_nanos
            .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// Sums `buf` element-wise over the ranks, in place on every rank.
    pub fn sum_f64(&self, buf: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            self.timed(|| lock(w).sum_f64(buf));
        }
        let _ = buf;
    }

    /// Sums `buf` element-wise over the ranks, in place on every rank.
    pub fn sum_f32(&self, buf: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            self.timed(|| lock(w).sum_f32(buf));
        }
        let _ = buf;
    }

    /// Whether `flag` holds on any rank (every rank learns the answer).
    pub fn any(&self, flag: bool) -> bool {
        let mut v = [if flag { 1.0 } else { 0.0 }];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Every rank's `mine`, in rank order, on rank 0 (empty elsewhere).
    pub fn gather_bytes(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return self.timed(|| lock(w).gather_bytes(mine));
        }
        vec![mine]
    }

    /// Rank 0's `buf` on every rank.
    pub fn broadcast_bytes(&self, buf: &mut Vec<u8>) {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            self.timed(|| lock(w).broadcast_bytes(buf));
        }
        let _ = buf;
    }
}

#[cfg(feature = "mpi")]
fn lock(w: &std::sync::Mutex<mpi_backend::World>) -> std::sync::MutexGuard<'_, mpi_backend::World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use super::{Ranks, RanksError, RanksGuard};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;
    use std::sync::{Arc, Mutex};

    /// The world communicator. MPI was started with "serialized" threading, and every call
    /// goes through the `Ranks` mutex, so the handle may move to the crafting thread.
    pub struct World(SimpleCommunicator);

    // SAFETY: MPI runs with MPI_THREAD_SERIALIZED (checked at start), and the handle is only
    // used under a mutex, one call at a time, as that level requires.
    unsafe impl Send for World {}

    pub fn start() -> Result<(Ranks, RanksGuard), RanksError> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or(RanksError::AlreadyStarted)?;
        if threading < mpi::Threading::Serialized {
            return Err(RanksError::Threading(format!("{threading:?}")));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok((
            Ranks {
                rank,
                size,
                comm_nanos: Arc::default(),
                world: Some(Arc::new(Mutex::new(World(world)))),
            },
            RanksGuard {
                _universe: Some(universe),
            },
        ))
    }

    impl World {
        pub fn sum_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            self.0
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }

        pub fn sum_f32(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.0
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }

        pub fn gather_bytes(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
            let root = self.0.process_at_rank(0);
            if self.0.rank() == 0 {
                let mut all = vec![mine];
                for r in 1..self.0.size() {
                    let (bytes, _) = self.0.process_at_rank(r).receive_vec::<u8>();
                    all.push(bytes);
                }
                all
            } else {
                root.send(&mine[..]);
                Vec::new()
            }
        }

        pub fn broadcast_bytes(&self, buf: &mut Vec<u8>) {
            let root = self.0.process_at_rank(0);
            let mut len = buf.len() as u64;
            root.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            root.broadcast_into(&mut buf[..]);
        }
    }
}
