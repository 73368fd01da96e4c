//! Limits that keep the node serving under load.
//!
//! - [`ConnectionLimits`]: at most `per_peer` open connections from one IP address and `total`
//!   in all. A connection past either is closed at once, before anything is read from it, and
//!   counted. When accepting itself fails (out of file descriptors), the accept loop waits
//!   before it tries again instead of spinning.
//! - [`ExecutionSlots`]: at most [`EXECUTION_SLOTS`] transactions between their signature check
//!   and their reply at once; the rest wait, using no CPU, for a slot.
//! - [`runtime`]: the node's threads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::idle::IdleTimeout;

/// Connections from one address, at most (the rest are closed at once).
pub const MAX_CONNECTIONS_PER_PEER: usize = 1_024;
/// Connections in all, at most; lowered to three quarters of the process's file limit.
pub const MAX_CONNECTIONS: usize = 16_384;
/// How long the accept loop waits after accepting failed.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Transactions in execution at once, at most. Each group commit wakes every transaction in
/// it, and their replies are queued ahead of any read that arrives then. The bound keeps a group
/// large enough for full write rate while a read waits behind at most that many replies
/// (`bench localnet --transactions-per-account 20` on 2 cores, 1,000 writers, a read every
/// 5 ms beside them: read p99 27-37 ms unbounded; 11-15 ms at 64 slots and 3,830-3,890 tx/s;
/// 15 ms at 96 and 3,980-4,100 tx/s; 17-19 ms at 128; 21-28 ms at 192).
pub const EXECUTION_SLOTS: usize = 96;

/// The turn-taking of [`EXECUTION_SLOTS`]; clones share the slots.
#[derive(Debug, Clone)]
pub struct ExecutionSlots(Arc<tokio::sync::Semaphore>);

impl ExecutionSlots {
    pub fn new(slots: usize) -> Self {
        ExecutionSlots(Arc::new(tokio::sync::Semaphore::new(slots)))
    }

    /// Waits for a slot; the slot is free again when the permit drops.
    pub async fn take(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.0.acquire().await.expect("the slots are never closed")
    }
}

impl Default for ExecutionSlots {
    fn default() -> Self {
        Self::new(EXECUTION_SLOTS)
    }
}

/// The node's runtime: a worker thread per core, and at least four. On a small machine at full
/// load, a read then waits for the OS to give one of the node's threads a turn rather than for
/// every ready task ahead of it on two (`bench localnet`, 2 cores, 1,000 writers, with
/// [`ExecutionSlots`]: read p99 21 ms on two threads, 12-16 ms on four).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.max(4))
        .thread_name("node")
        .enable_all()
        .build()
}

#[derive(Debug)]
pub struct ConnectionLimits {
    per_peer: usize,
    total: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    refused: AtomicU64,
}

impl ConnectionLimits {
    pub fn new(per_peer: usize, total: usize) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            per_peer,
            total,
            open: Mutex::new((0, HashMap::new())),
            refused: AtomicU64::new(0),
        })
    }

    /// The defaults, with the total kept below the process's open-file limit.
    pub fn for_this_process() -> Arc<Self> {
        let total = open_file_limit().map_or(MAX_CONNECTIONS, |limit| {
            MAX_CONNECTIONS.min((limit as usize).saturating_mul(3) / 4)
        });
        Self::new(MAX_CONNECTIONS_PER_PEER.min(total), total)
    }

    /// A permit for one more connection from `peer`, if both limits allow it.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Permit> {
        let mut open = self.open.lock().expect("limits lock");
        let from_peer = open.1.get(&peer).copied().unwrap_or(0);
        if open.0 >= self.total || from_peer >= self.per_peer {
            drop(open);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.0 += 1;
        open.1.insert(peer, from_peer + 1);
        Some(Permit {
            limits: self.clone(),
            peer,
        })
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("limits lock").0
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    peer: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("limits lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.peer);
            }
        }
    }
}

/// The soft limit on open files (Linux: `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Connections accepted on `listener` within `limits`, each closed after `idle` without a byte
/// from the peer. Refusals and accept errors are logged at most once a second.
pub fn limited_connections(
    listener: tokio::net::TcpListener,
    limits: Arc<ConnectionLimits>,
    idle: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<IdleTimeout>> {
    async_stream::stream! {
        let mut quiet_until = Instant::now();
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match limits.admit(peer.ip()) {
                    Some(permit) => {
                        // As tonic's own listener does: a small reply written in two frames
                        // must not wait on Nagle for the peer's delayed ACK (40 ms).
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!("TCP_NODELAY on a connection from {peer}: {e}");
                        }
                        yield Ok(IdleTimeout::new(stream, idle).holding(permit))
                    }
                    None => {
                        drop(stream);
                        if Instant::now() >= quiet_until {
                            tracing::warn!(
                                "connection from {peer} refused: over the limit ({} refused so far)",
                                limits.refused()
                            );
                            quiet_until = Instant::now() + Duration::from_secs(1);
                        }
                    }
                },
                Err(e) => {
                    if Instant::now() >= quiet_until {
                        tracing::warn!("accepting a connection failed: {e}; retrying shortly");
                        quiet_until = Instant::now() + Duration::from_secs(1);
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_peer_and_in_all() {
        let limits = ConnectionLimits::new(2, 3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third from one peer");
        let _third = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "a fourth in all");
        assert_eq!((limits.open(), limits.refused()), (3, 2));
        drop(first);
        assert!(limits.admit(a).is_some(), "a place freed");
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }
}
