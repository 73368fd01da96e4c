//! Every byte that crosses between the host and a burn device goes through a [`Link`], which
//! counts it: the GPU path's claim that a training micro-batch moves only its batch up and its
//! loss down is measured, not assumed (a test also checks that no other file of this crate
//! calls `from_data` or `into_data`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use somatrain_model::score::ScoreError;

/// A device and the bytes moved to and from it so far.
#[derive(Debug)]
pub struct Link {
    device: Device,
    up: AtomicU64,
    down: AtomicU64,
    /// Time spent handing data to the backend, and in reads (which wait for the device to
    /// finish the work the value depends on), in nanoseconds.
    up_nanos: AtomicU64,
    read_nanos: AtomicU64,
}

/// Bytes moved so far, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traffic {
    pub host_to_device: u64,
    pub device_to_host: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;

    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic {
            host_to_device: self.host_to_device - earlier.host_to_device,
            device_to_host: self.device_to_host - earlier.device_to_host,
        }
    }
}

impl Link {
    pub fn new(device: Device) -> Arc<Link> {
        Arc::new(Link {
            device,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            up_nanos: AtomicU64::new(0),
            read_nanos: AtomicU64::new(0),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            host_to_device: self.up.load(Ordering::Relaxed),
            device_to_host: self.down.load(Ordering::Relaxed),
        }
    }

    /// Seconds spent uploading, and in reads (including the wait for the device), so far.
    pub fn seconds(&self) -> (f64, f64) {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e9;
        (s(&self.up_nanos), s(&self.read_nanos))
    }

    fn timed<T>(&self, clock: &AtomicU64, work: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let out = work();
        clock.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// `data` as an f32 tensor of `shape` on the device.
    pub fn floats<const D: usize>(&self, data: &[f32], shape: [usize; D]) -> Tensor<D> {
        self.up.fetch_add(4 * data.len() as u64, Ordering::Relaxed);
        self.timed(&self.up_nanos, || {
            Tensor::from_data(TensorData::new(data.to_vec(), shape), &self.device)
        })
    }

    /// `data` as an int tensor of `shape` on the device (sent as i64).
    pub fn ints<const D: usize>(&self, data: Vec<i64>, shape: [usize; D]) -> Tensor<D, Int> {
        self.up.fetch_add(8 * data.len() as u64, Ordering::Relaxed);
        self.timed(&self.up_nanos, || {
            Tensor::from_data(TensorData::new(data, shape), &self.device)
        })
    }

    /// The values of an f32 tensor, read back to the host.
    pub fn read<const D: usize>(&self, t: Tensor<D>) -> Result<Vec<f32>, ScoreError> {
        let values: Vec<f32> = self.timed(&self.read_nanos, || {
            t.into_data()
                .try_to_vec()
                .map_err(|e| ScoreError::Backend(format!("{e:?}")))
        })?;
        self.down
            .fetch_add(4 * values.len() as u64, Ordering::Relaxed);
        Ok(values)
    }
}
