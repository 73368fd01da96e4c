//! The SOMA V1 model, exactly as the network scores it.
//!
//! Owns the model's shape ([`config`]), its parameters in the canonical safetensors layout
//! ([`weights`], [`io`]), the CPU forward pass ([`cpu`]), the loss terms ([`loss`]) and the
//! network's scoring procedure ([`score`]). It reads bytes through `somatrain-data` and noise
//! through `somatrain-noise`; it does no networking and opens no files except in [`io`].
//!
//! ```no_run
//! use somatrain_model::{cpu::CpuModel, io, score};
//! let weights = io::load_file("w.safetensors".as_ref(), Default::default()).unwrap();
//! let mut model = CpuModel::new(weights);
//! let s = score::score_data(&mut model, b"hello", Default::default(), &mut |_, _| {}).unwrap();
//! println!("loss {}", s.loss);
//! ```

// Numeric kernels index several parallel arrays by the same counter; iterators obscure that.
#![allow(clippy::needless_range_loop)]

pub mod config;
pub mod cpu;
pub mod io;
pub mod loss;
pub mod score;
pub mod weights;

pub use config::{ModelConfig, Preset};
pub use weights::Weights;
