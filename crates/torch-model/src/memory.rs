//! A CUDA device's memory, as the CUDA runtime that libtorch loaded counts it.
//!
//! tch exposes none of libtorch's allocator statistics, and those live behind C++ classes. The
//! CUDA runtime's C function `cudaMemGetInfo` tells the device's free and total bytes. libtorch's
//! caching allocator keeps every block it reserves until it runs out (it then frees its cache
//! and retries) or is told to empty it, so what the device has in use after a step, less what it
//! had in use when the engine opened it, is the most this run has reserved: [`MemoryMeter`]
//! keeps that high-water mark, sampled where the engine already waits on nothing (the sample
//! itself does not synchronise).
//!
//! Owns nothing of the model; it never loads a CUDA runtime of its own (only the one already in
//! the process is used, so the numbers are the ones libtorch's device sees).

use std::ffi::{CStr, c_char, c_int, c_void};

/// The CUDA runtime's sonames, newest first: PyTorch 2.11's default wheels use CUDA 13.
const RUNTIME_NAMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// The few functions of the process's CUDA runtime that memory reading needs.
struct CudaRuntime {
    name: &'static str,
    mem_get_info: MemGetInfo,
    get_device: GetDevice,
    set_device: SetDevice,
    get_error_string: GetErrorString,
}

impl CudaRuntime {
    /// The CUDA runtime libtorch has loaded, if any (the library is never loaded here).
    fn loaded() -> Result<&'static CudaRuntime, String> {
        static RUNTIME: std::sync::OnceLock<Result<CudaRuntime, String>> =
            std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                for name in RUNTIME_NAMES {
                    // SAFETY: RTLD_NOLOAD only returns a library already in the process, so no
                    // initialiser runs; the handle is leaked so the symbols stay valid.
                    let opened = unsafe {
                        libloading::os::unix::Library::open(
                            Some(name),
                            libc::RTLD_NOLOAD | libloading::os::unix::RTLD_NOW,
                        )
                    };
                    let Ok(library) = opened else { continue };
                    // SAFETY: the signatures are the CUDA runtime API's, unchanged since CUDA 3.
                    let runtime = unsafe {
                        let symbol = |s: &[u8]| -> Result<*mut c_void, String> {
                            library
                                .get::<*mut c_void>(s)
                                .map(|f| *f)
                                .map_err(|e| format!("{name} has no {}: {e}", show(s)))
                        };
                        CudaRuntime {
                            name,
                            mem_get_info: std::mem::transmute::<*mut c_void, MemGetInfo>(symbol(
                                b"cudaMemGetInfo\0",
                            )?),
                            get_device: std::mem::transmute::<*mut c_void, GetDevice>(symbol(
                                b"cudaGetDevice\0",
                            )?),
                            set_device: std::mem::transmute::<*mut c_void, SetDevice>(symbol(
                                b"cudaSetDevice\0",
                            )?),
                            get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(
                                symbol(b"cudaGetErrorString\0")?,
                            ),
                        }
                    };
                    std::mem::forget(library);
                    return Ok(runtime);
                }
                Err(format!(
                    "no CUDA runtime is loaded in this process (looked for {})",
                    RUNTIME_NAMES.join(", ")
                ))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn check(&self, call: &str, code: c_int) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: cudaGetErrorString returns a static string for every code.
        let text = unsafe { CStr::from_ptr((self.get_error_string)(code)) };
        Err(format!(
            "{call} failed in {}: {} (CUDA error {code})",
            self.name,
            text.to_string_lossy()
        ))
    }

    /// `(free, total)` bytes of device `index`; the thread's current device is left as it was.
    fn free_and_total(&self, index: usize) -> Result<(u64, u64), String> {
        let mut previous: c_int = 0;
        // SAFETY: plain CUDA runtime calls with valid out-pointers.
        unsafe {
            self.check("cudaGetDevice", (self.get_device)(&mut previous))?;
            let switch = previous as usize != index;
            if switch {
                self.check("cudaSetDevice", (self.set_device)(index as c_int))?;
            }
            let (mut free, mut total) = (0usize, 0usize);
            let read = self.check("cudaMemGetInfo", (self.mem_get_info)(&mut free, &mut total));
            if switch {
                self.check("cudaSetDevice", (self.set_device)(previous))?;
            }
            read?;
            Ok((free as u64, total as u64))
        }
    }
}

fn show(symbol: &[u8]) -> String {
    String::from_utf8_lossy(symbol.strip_suffix(b"\0").unwrap_or(symbol)).into_owned()
}

/// `(free, total)` bytes of CUDA device `index`, from the CUDA runtime libtorch loaded.
pub fn cuda_free_and_total(index: usize) -> Result<(u64, u64), String> {
    CudaRuntime::loaded()?.free_and_total(index)
}

/// One reading of a device: its size and what is in use on it (by every process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub free: u64,
    pub total: u64,
}

impl Reading {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// The high-water mark of what a run has added on its device since it opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMeter {
    /// In use on the device when the meter started (other processes, the CUDA context).
    baseline_used: u64,
    last: Reading,
    peak_added: u64,
}

impl MemoryMeter {
    pub fn start(reading: Reading) -> Self {
        MemoryMeter {
            baseline_used: reading.used(),
            last: reading,
            peak_added: 0,
        }
    }

    pub fn sample(&mut self, reading: Reading) {
        self.last = reading;
        self.peak_added = self
            .peak_added
            .max(reading.used().saturating_sub(self.baseline_used));
    }

    /// What the device holds now, in the trainer's terms.
    pub fn report(&self) -> somatrain_train::trainer::DeviceMemory {
        somatrain_train::trainer::DeviceMemory {
            bytes_in_use: self.last.used(),
            total_bytes: self.last.total,
            peak_bytes_reserved: self.peak_added,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CUDA runtime PyTorch's CUDA wheels link into libtorch is found and called: on a GPU
    /// machine it reads the device; without a driver it answers with a CUDA error, not a crash.
    #[test]
    fn the_loaded_cuda_runtime_is_found_and_answers() {
        // libtorch is linked into this test binary, and with it the runtime it needs.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        match cuda_free_and_total(0) {
            Ok((free, total)) => assert!(total > 0 && free <= total, "{free} of {total}"),
            Err(why) => {
                eprintln!("{why}");
                assert!(why.contains("CUDA error"), "{why}")
            }
        }
    }

    #[test]
    fn the_peak_is_the_most_added_since_the_start_and_never_falls() {
        let gib = 1u64 << 30;
        let total = 80 * gib;
        let reading = |used: u64| Reading {
            free: total - used,
            total,
        };
        let mut meter = MemoryMeter::start(reading(2 * gib));
        meter.sample(reading(30 * gib));
        meter.sample(reading(12 * gib)); // the cache was emptied after an out-of-memory retry
        let report = meter.report();
        assert_eq!(report.peak_bytes_reserved, 28 * gib);
        assert_eq!(report.bytes_in_use, 12 * gib);
        assert_eq!(report.total_bytes, total);
        // Another process freeing memory below the baseline is not a negative reservation.
        meter.sample(reading(gib));
        assert_eq!(meter.report().peak_bytes_reserved, 28 * gib);
    }
}
