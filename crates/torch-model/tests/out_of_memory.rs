//! A micro-batch that does not fit: the engine says so, and names a micro-batch that does,
//! found by trying smaller ones on the same device.
//!
//! libtorch's CPU allocator fails like CUDA's when the address space runs out, so this test
//! caps its own process (`RLIMIT_AS`, the one test in this binary) a few hundred MB above what
//! it already maps, then asks for a micro-batch far larger than that. The cap is relative to the
//! process's own size, so it holds on any machine.

use somatrain_data::batches;
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_torch::train::TorchEngine;
use somatrain_train::{GradientEngine, TrainError};

mod common;

/// Bytes of address space this process maps now.
fn mapped_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .expect("a VmSize line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmSize in kB");
    kib * 1024
}

#[test]
fn out_of_memory_names_the_largest_micro_batch_that_fits() {
    if std::env::var("SOMATRAIN_TORCH_DEVICE").is_ok_and(|d| d != "torch-cpu") {
        eprintln!("this test caps host memory; it runs on libtorch's CPU device only");
        return;
    }
    let config = common::small_model(2);
    let weights = Weights::init(config, 3);
    let seq = 128;
    let rows = 4096;
    let data: Vec<u8> = (0..(rows * seq) as u32)
        .map(|i| (i * 31 + 7) as u8)
        .collect();
    let huge = batches(&data, seq, rows).next().unwrap();
    let small = batches(&data, seq, 2).next().unwrap();
    let noise = somatrain_noise::unit_column_noise(1, config.embedding_dim, SIGREG_SLICES);
    let options = TrainOptions {
        sigreg_coefficient: 0.02,
        ..TrainOptions::default()
    };
    // glibc would otherwise raise its mmap threshold after the first large free and keep
    // later large blocks in its heap, whose freed space still counts against the cap: each
    // failed try would shrink the room of the next.
    // SAFETY: mallopt only sets an allocator parameter.
    assert_eq!(
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) },
        1
    );
    let mut grads = Weights::zeros(config);
    // In f32: in bf16, libtorch's CPU path kept memory from the tries (oneDNN's caches, most
    // likely), and the micro-batch named after probing did not fit again in 2 of 6 runs.
    let mut engine = TorchEngine::new(common::device());
    // Everything that starts once (libtorch's threads, their allocator arenas) starts before
    // the cap, so that the cap measures micro-batches only.
    engine
        .loss_and_grad(&weights, 1, &small, &noise, options, &mut grads)
        .expect("a micro-batch of 2 runs");

    // The huge micro-batch needs a few GB (its logits alone are 4096 x 128 x 264 floats:
    // 550 MB); 400 MB of headroom holds a few hundred of its rows.
    let cap = mapped_bytes() + (400 << 20);
    let limit = libc::rlimit {
        rlim_cur: cap,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; only this process is affected.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);

    let error = engine
        .loss_and_grad(&weights, 1, &huge, &noise, options, &mut grads)
        .expect_err("4096 x 128 does not fit in 400 MB");
    let TrainError::OutOfMemory(oom) = &error else {
        panic!("not an out-of-memory error: {error}");
    };
    assert_eq!((oom.micro_batch, oom.seq_len), (rows, seq));
    let fits = oom
        .largest_fitting
        .expect("the engine tried smaller micro-batches");
    assert!(
        fits >= 2 && fits < rows,
        "{fits} rows fit under the cap, where 2 ran before it"
    );
    let told = error.with_accumulation(1).to_string();
    eprintln!("{told}");
    assert!(
        told.contains(&format!("A micro-batch of {fits} was tried and fits")),
        "{told}"
    );

    // What the engine named does run, under the same cap, in a fresh step.
    let fitting = batches(&data, seq, fits).next().unwrap();
    assert_eq!(fitting.batch, fits);
    engine
        .loss_and_grad(&weights, 1, &fitting, &noise, options, &mut grads)
        .unwrap_or_else(|e| panic!("the micro-batch of {fits} the engine named fails: {e}"));
}
