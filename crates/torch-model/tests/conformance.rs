//! The libtorch forward pass matches every canonical scoring case, and the hand-written CPU
//! kernels on random weights of each small preset: on libtorch's CPU device, or the device named
//! by `SOMATRAIN_TORCH_DEVICE`.

use std::path::PathBuf;

use somatrain_model::cpu::CpuModel;
use somatrain_model::io::{LoadOptions, load_file};
use somatrain_model::score::{ScoreOptions, score_data};
use somatrain_model::{Preset, Weights};
use somatrain_torch::TorchModel;

mod common;

#[test]
fn libtorch_matches_every_case() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/scoring");
    let index = std::fs::read_to_string(dir.join("index.json"))
        .unwrap_or_else(|e| panic!("conformance index in {} is required: {e}", dir.display()));
    let names: Vec<String> = serde_json::from_str(&index).unwrap();
    assert!(!names.is_empty());
    let device = common::device();
    let (mut worst_loss, mut worst_embedding) = (0f32, 0f32);
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
        let mut model = TorchModel::new(&weights, device);
        let score = score_data(&mut model, &data, options, &mut |_, _| {}).unwrap();
        let expected = e["loss"].as_f64().unwrap() as f32;
        let rel = ((score.loss - expected) / expected).abs();
        worst_loss = worst_loss.max(rel);
        assert!(rel <= 1e-5, "{name}: loss {} vs {expected}", score.loss);
        for (i, (a, b)) in score
            .embedding
            .iter()
            .zip(e["embedding"].as_array().unwrap())
            .enumerate()
        {
            let b = b.as_f64().unwrap() as f32;
            worst_embedding = worst_embedding.max((a - b).abs());
            assert!((a - b).abs() <= 1e-5, "{name}: embedding[{i}] {a} vs {b}");
        }
    }
    eprintln!("worst loss error {worst_loss:e} (relative), embedding {worst_embedding:e}");
}

#[test]
fn libtorch_matches_the_cpu_kernels_on_random_weights() {
    let device = common::device();
    let data: Vec<u8> = (0..2500u32).map(|i| (i * 131 % 251) as u8).collect();
    let options = ScoreOptions {
        max_seq_len: 512,
        batch_size: 2,
        seed: 3,
    };
    for preset in [Preset::Tiny, Preset::Small] {
        let weights = Weights::init(preset.config(), 21);
        let mut torch = TorchModel::new(&weights, device);
        let mut cpu = CpuModel::new(weights);
        let a = score_data(&mut torch, &data, options, &mut |_, _| {}).unwrap();
        let b = score_data(&mut cpu, &data, options, &mut |_, _| {}).unwrap();
        assert!(
            ((a.loss - b.loss) / b.loss).abs() < 1e-5,
            "{preset:?}: {} vs {}",
            a.loss,
            b.loss
        );
        let drift = a
            .embedding
            .iter()
            .zip(&b.embedding)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(drift < 1e-5, "{preset:?}: embeddings differ by {drift}");
    }
}
