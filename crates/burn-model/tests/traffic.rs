//! What crosses between host and device in a training step on the GPU path, measured by the
//! crate's transfer counter: per micro-batch the batch goes up (token ids, positions and
//! targets, 8 bytes each per token) and three loss scalars come down; per step the SIGReg
//! projections go up once and two scalars come down; the weights and Adam moments go up once per
//! run. A source check keeps every transfer behind the counter.

use somatrain_burn::train::BurnEngine;
use somatrain_burn::transfer::Traffic;
use somatrain_data::batches;
use somatrain_model::Weights;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::TrainOptions;
use somatrain_train::GradientEngine;
use somatrain_train::optim::{AdamState, OptimConfig};

mod common;

#[test]
fn a_micro_batch_moves_only_its_batch_and_its_loss() {
    let config = common::small_model(2);
    let mut weights = Weights::init(config, 9);
    let mut adam = AdamState::new(&weights);
    let parameter_bytes = 4 * weights
        .tensors()
        .iter()
        .map(|(_, t)| t.len())
        .sum::<usize>() as u64;
    let data: Vec<u8> = (0..900u32).map(|i| (i * 41 + 5) as u8).collect();
    let micro: Vec<_> = batches(&data, 48, 2).take(4).collect();
    let (b, t) = (micro[0].batch, micro[0].seq_len);
    let batch_bytes = 3 * 8 * (b * t) as u64;
    let noise_bytes = 4 * (16 * SIGREG_SLICES) as u64;
    let mut engine = BurnEngine::new(common::device());
    let mut unused = Weights::zeros(config);
    let optim = OptimConfig::default();
    let options = |key| TrainOptions {
        dropout: 0.1,
        dropout_key: key,
        sigreg_coefficient: 0.02,
        grad_scale: 0.5,
    };
    let mut last = engine.traffic();
    let mut moved = |engine: &BurnEngine| {
        let now = engine.traffic();
        let delta = now - last;
        last = now;
        delta
    };
    for step in 0..3u64 {
        let noise = somatrain_noise::unit_column_noise(step, 16, SIGREG_SLICES);
        for m in 0..2 {
            let batch = &micro[(step as usize * 2 + m) % micro.len()];
            engine
                .loss_and_grad(
                    &weights,
                    step,
                    batch,
                    &noise,
                    options(step * 2 + m as u64),
                    &mut unused,
                )
                .unwrap();
            let delta = moved(&engine);
            assert_eq!(
                delta.device_to_host, 12,
                "step {step}, micro-batch {m}: {delta:?}"
            );
            let expected_up = match (step, m) {
                // The run's first micro-batch also takes the weights, the RoPE table and
                // SIGReg's grid up: checked as at least the weights.
                (0, 0) => {
                    assert!(delta.host_to_device > parameter_bytes + batch_bytes + noise_bytes);
                    continue;
                }
                (_, 0) => batch_bytes + noise_bytes,
                _ => batch_bytes,
            };
            assert_eq!(
                delta,
                Traffic {
                    host_to_device: expected_up,
                    device_to_host: 12
                },
                "step {step}, micro-batch {m}"
            );
        }
        engine
            .optimizer_step(&optim, &mut weights, &mut adam, &mut unused)
            .unwrap();
        assert_eq!(engine.first_nonfinite_parameter(&weights).unwrap(), None);
        let delta = moved(&engine);
        // The first step takes the moments up (two sets of zeros shaped like the weights).
        let up = if step == 0 { 2 * parameter_bytes } else { 0 };
        assert_eq!(
            delta,
            Traffic {
                host_to_device: up,
                device_to_host: 8
            },
            "optimizer step {step}: the gradient norm and the finiteness sum only"
        );
    }
    // A checkpoint reads the weights and both moments back, once.
    engine.sync_to_host(&mut weights, &mut adam).unwrap();
    assert_eq!(
        moved(&engine),
        Traffic {
            host_to_device: 0,
            device_to_host: 3 * parameter_bytes
        }
    );
}

/// Every host-device transfer of the crate goes through `transfer::Link`, so the counts above
/// are complete: no other source file makes a tensor from host data or reads one back.
#[test]
fn only_the_link_moves_data() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "transfer.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for call in ["from_data(", "into_data(", "TensorData::new(", "to_data("] {
            assert!(
                !text.contains(call),
                "{} calls {call} outside transfer.rs",
                path.display()
            );
        }
    }
}
