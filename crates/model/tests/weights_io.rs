//! Saving and loading in the canonical layout, and every way a weights file can be refused.

use safetensors::tensor::{Dtype, TensorView};
use somatrain_model::io::{LoadOptions, WeightsError, load_bytes, load_file, save_file};
use somatrain_model::{Preset, Weights};

fn tiny() -> Weights {
    Weights::init(Preset::Tiny.config(), 11)
}

/// Serialises arbitrary tensors (name, dtype, shape, raw bytes) without any metadata, as the
/// official Python package writes files.
fn raw_file(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, bytes)| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

fn as_raw(weights: &Weights) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    Weights::specs(&weights.config)
        .into_iter()
        .zip(weights.tensors())
        .map(|(spec, (name, data))| {
            (
                name,
                Dtype::F32,
                spec.shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect()
}

fn heads(n: usize) -> LoadOptions {
    LoadOptions {
        num_heads: Some(n),
        preset: None,
    }
}

#[test]
fn save_then_load_is_bit_identical_and_records_heads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let weights = tiny();
    save_file(&weights, &path).unwrap();
    // No hint needed: our own files record the shape.
    let back = load_file(&path, LoadOptions::default()).unwrap();
    assert_eq!(back.config, weights.config);
    for ((name, a), (_, b)) in weights.tensors().iter().zip(back.tensors()) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} changed in the round trip");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
}

#[test]
fn file_without_metadata_needs_a_head_count() {
    let bytes = raw_file(as_raw(&tiny()));
    let err = load_bytes(&bytes, LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, WeightsError::UnknownHeads { embedding_dim: 16 }),
        "{err}"
    );
    assert!(err.to_string().contains("--num-heads"));
    assert_eq!(load_bytes(&bytes, heads(4)).unwrap(), tiny());
    let by_preset = LoadOptions {
        num_heads: None,
        preset: Some(Preset::Tiny),
    };
    assert_eq!(load_bytes(&bytes, by_preset).unwrap(), tiny());
}

#[test]
fn preset_must_match_the_file() {
    let bytes = raw_file(as_raw(&tiny()));
    let err = load_bytes(
        &bytes,
        LoadOptions {
            num_heads: None,
            preset: Some(Preset::Small),
        },
    )
    .unwrap_err();
    assert!(matches!(err, WeightsError::ConfigMismatch { .. }), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let mut raw = as_raw(&tiny());
    raw.retain(|(n, ..)| n != "encoder.layers.1.attention.value.bias");
    let err = load_bytes(&raw_file(raw), heads(4)).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Missing { name, expected } if name == "encoder.layers.1.attention.value.bias" && expected == &vec![16]),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let mut raw = as_raw(&tiny());
    let entry = raw
        .iter_mut()
        .find(|(n, ..)| n == "predictor.weight")
        .unwrap();
    entry.2 = vec![264, 16];
    let err = load_bytes(&raw_file(raw), heads(4)).unwrap_err();
    assert!(err.to_string().contains("predictor.weight"), "{err}");
    assert!(err.to_string().contains("[16, 264]"), "{err}");
}

#[test]
fn wrong_dtype_is_named() {
    let mut raw = as_raw(&tiny());
    let entry = raw
        .iter_mut()
        .find(|(n, ..)| n == "final_norm.beta")
        .unwrap();
    entry.1 = Dtype::I32;
    let err = load_bytes(&raw_file(raw), heads(4)).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Dtype { name, .. } if name == "final_norm.beta"),
        "{err}"
    );
}

#[test]
fn non_finite_value_is_named() {
    let mut weights = tiny();
    weights.layers[0].key_w[5] = f32::NAN;
    let err = load_bytes(&raw_file(as_raw(&weights)), heads(4)).unwrap_err();
    assert!(
        matches!(&err, WeightsError::NonFinite { name, index: 5, .. } if name == "encoder.layers.0.attention.key.weight"),
        "{err}"
    );
}

#[test]
fn truncated_and_garbage_files_are_refused() {
    let bytes = raw_file(as_raw(&tiny()));
    for cut in [0, 4, 8, 100, bytes.len() - 1] {
        let err = load_bytes(&bytes[..cut], heads(4)).unwrap_err();
        assert!(
            matches!(err, WeightsError::NotSafetensors(_)),
            "cut at {cut}: {err}"
        );
    }
    let err = load_bytes(b"this is not a safetensors file at all", heads(4)).unwrap_err();
    assert!(matches!(err, WeightsError::NotSafetensors(_)), "{err}");
}

#[test]
fn bf16_and_f64_tensors_are_converted() {
    let weights = tiny();
    let mut raw = Vec::new();
    let specs = Weights::specs(&weights.config);
    for (i, (spec, (name, data))) in specs.into_iter().zip(weights.tensors()).enumerate() {
        if i % 2 == 0 {
            let bytes = data
                .iter()
                .flat_map(|x| (*x as f64).to_le_bytes())
                .collect();
            raw.push((name, Dtype::F64, spec.shape, bytes));
        } else {
            let bytes = data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect();
            raw.push((name, Dtype::BF16, spec.shape, bytes));
        }
    }
    let back = load_bytes(&raw_file(raw), heads(4)).unwrap();
    for (i, ((name, a), (_, b))) in weights.tensors().iter().zip(back.tensors()).enumerate() {
        for (x, y) in a.iter().zip(b) {
            if i % 2 == 0 {
                assert_eq!(x.to_bits(), y.to_bits(), "{name}: f64 holds f32 exactly");
            } else {
                assert_eq!(
                    half::bf16::from_f32(*x).to_f32().to_bits(),
                    y.to_bits(),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn extra_tensors_are_ignored() {
    let mut raw = as_raw(&tiny());
    raw.push((
        "optimizer.step".into(),
        Dtype::F32,
        vec![1],
        vec![0, 0, 0, 0],
    ));
    assert_eq!(load_bytes(&raw_file(raw), heads(4)).unwrap(), tiny());
}

/// A full disk while writing weights: the error names the file, and the file already there is
/// untouched (the write goes to a temporary file first). The temporary file is pointed at
/// `/dev/full`, whose writes fail with ENOSPC, as a full disk's do, even for root.
#[test]
fn a_full_disk_names_the_file_and_keeps_the_old_one() {
    use somatrain_model::io::temp_path_for;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let old = Weights::init(Preset::Tiny.config(), 1);
    save_file(&old, &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    std::os::unix::fs::symlink("/dev/full", temp_path_for(&path)).unwrap();
    let new = Weights::init(Preset::Tiny.config(), 2);
    let err = save_file(&new, &path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old weights changed"
    );
}
