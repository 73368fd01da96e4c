//! The burn forward pass matches every canonical scoring case, and the hand-written CPU path on
//! random weights of each small preset: on the flex CPU backend, or on the device named by
//! `SOMATRAIN_BURN_DEVICE` (see `common`).

use std::path::PathBuf;

use somatrain_burn::{BurnDevice, BurnModel, open_device};
use somatrain_model::cpu::CpuModel;
use somatrain_model::io::{LoadOptions, load_file};
use somatrain_model::score::{ScoreOptions, score_data};
use somatrain_model::{Preset, Weights};

mod common;

#[test]
fn burn_device_matches_every_case() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/scoring");
    let index = std::fs::read_to_string(dir.join("index.json"))
        .unwrap_or_else(|e| panic!("conformance index in {} is required: {e}", dir.display()));
    let names: Vec<String> = serde_json::from_str(&index).unwrap();
    assert!(!names.is_empty());
    let device = common::device();
    for name in names {
        let case = dir.join(&name);
        let e: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap())
                .unwrap();
        let heads = e["config"]["num_heads"].as_u64().unwrap() as usize;
        let weights = load_file(
            &case.join("weights.safetensors"),
            LoadOptions {
                num_heads: Some(heads),
                preset: None,
            },
        )
        .unwrap();
        let options = ScoreOptions {
            max_seq_len: e["max_seq_len"].as_u64().unwrap() as usize,
            batch_size: e["batch_size"].as_u64().unwrap() as usize,
            seed: e["seed"].as_u64().unwrap(),
        };
        let data = std::fs::read(case.join("data.bin")).unwrap();
        let mut model = BurnModel::new(&weights, device.clone());
        let score = score_data(&mut model, &data, options, &mut |_, _| {}).unwrap();
        let expected = e["loss"].as_f64().unwrap() as f32;
        let rel = ((score.loss - expected) / expected).abs();
        eprintln!(
            "{name}: loss {} expected {expected} rel {rel:e}",
            score.loss
        );
        assert!(rel <= 1e-5, "{name}: loss {} vs {expected}", score.loss);
        for (i, (a, b)) in score
            .embedding
            .iter()
            .zip(e["embedding"].as_array().unwrap())
            .enumerate()
        {
            let b = b.as_f64().unwrap() as f32;
            assert!((a - b).abs() <= 1e-5, "{name}: embedding[{i}] {a} vs {b}");
        }
    }
}

#[test]
fn burn_device_matches_cpu_kernels_on_random_weights() {
    let device = common::device();
    let data: Vec<u8> = (0..2500u32).map(|i| (i * 131 % 251) as u8).collect();
    let options = ScoreOptions {
        max_seq_len: 512,
        batch_size: 2,
        seed: 3,
    };
    for preset in [Preset::Tiny, Preset::Small] {
        let weights = Weights::init(preset.config(), 21);
        let mut burn = BurnModel::new(&weights, device.clone());
        let mut cpu = CpuModel::new(weights);
        let a = score_data(&mut burn, &data, options, &mut |_, _| {}).unwrap();
        let b = score_data(&mut cpu, &data, options, &mut |_, _| {}).unwrap();
        assert!(
            ((a.loss - b.loss) / b.loss).abs() < 1e-5,
            "{preset}: {} vs {}",
            a.loss,
            b.loss
        );
        for (x, y) in a.embedding.iter().zip(&b.embedding) {
            assert!((x - y).abs() < 1e-5, "{preset}: embedding {x} vs {y}");
        }
    }
}

/// Where a GPU and the `cuda` feature exist, the GPU path scores like the CPU path (within the
/// TF32-level tolerance GPU matmuls allow); elsewhere, asking for CUDA is a clear error.
#[test]
fn cuda_scores_like_cpu_or_is_a_clear_error() {
    match open_device(BurnDevice::Cuda(0)) {
        Ok(device) => {
            let weights = Weights::init(Preset::Small.config(), 5);
            let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
            let options = ScoreOptions::default();
            let mut gpu = BurnModel::new(&weights, device);
            let mut cpu = CpuModel::new(weights);
            let a = score_data(&mut gpu, &data, options, &mut |_, _| {}).unwrap();
            let b = score_data(&mut cpu, &data, options, &mut |_, _| {}).unwrap();
            assert!(
                ((a.loss - b.loss) / b.loss).abs() < 1e-3,
                "cuda {} vs cpu {}",
                a.loss,
                b.loss
            );
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("CUDA"), "{text}");
        }
    }
}
