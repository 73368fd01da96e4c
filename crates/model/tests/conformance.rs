//! Every scoring case computed by the network's canonical scorer must match: loss within 1e-5
//! relative, each embedding component within 1e-5 absolute.

use std::path::{Path, PathBuf};

use somatrain_model::cpu::CpuModel;
use somatrain_model::io::{LoadOptions, load_file};
use somatrain_model::score::{ScoreOptions, score_data};

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/scoring")
}

struct Case {
    name: String,
    dir: PathBuf,
    expected: serde_json::Value,
}

fn cases() -> Vec<Case> {
    let dir = cases_dir();
    let index = std::fs::read_to_string(dir.join("index.json"))
        .unwrap_or_else(|e| panic!("conformance index {} is required: {e}", dir.display()));
    let names: Vec<String> = serde_json::from_str(&index).unwrap();
    assert!(!names.is_empty(), "the conformance index lists no case");
    names
        .into_iter()
        .map(|name| {
            let case_dir = dir.join(&name);
            let text = std::fs::read_to_string(case_dir.join("expected.json")).unwrap();
            Case {
                name,
                dir: case_dir,
                expected: serde_json::from_str(&text).unwrap(),
            }
        })
        .collect()
}

fn check(case: &Case, loss: f32, embedding: &[f32]) {
    let e = &case.expected;
    let expected_loss = e["loss"].as_f64().unwrap() as f32;
    let rel = ((loss - expected_loss) / expected_loss).abs();
    eprintln!(
        "{}: loss {loss} expected {expected_loss} rel {rel:e}",
        case.name
    );
    assert!(
        rel <= 1e-5,
        "{}: loss {loss} vs {expected_loss} (rel {rel:e})",
        case.name
    );
    let expected_emb: Vec<f32> = e["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        embedding.len(),
        expected_emb.len(),
        "{}: embedding length",
        case.name
    );
    for (i, (a, b)) in embedding.iter().zip(&expected_emb).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5,
            "{}: embedding[{i}] {a} vs {b}",
            case.name
        );
    }
}

fn options(case: &Case) -> ScoreOptions {
    let e = &case.expected;
    ScoreOptions {
        max_seq_len: e["max_seq_len"].as_u64().unwrap() as usize,
        batch_size: e["batch_size"].as_u64().unwrap() as usize,
        seed: e["seed"].as_u64().unwrap(),
    }
}

fn load(case: &Case) -> somatrain_model::Weights {
    let heads = case.expected["config"]["num_heads"].as_u64().unwrap() as usize;
    let weights = load_file(
        &case.dir.join("weights.safetensors"),
        LoadOptions {
            num_heads: Some(heads),
            preset: None,
        },
    )
    .unwrap();
    let cfg = &case.expected["config"];
    assert_eq!(
        weights.config.embedding_dim as u64,
        cfg["embedding_dim"].as_u64().unwrap()
    );
    assert_eq!(
        weights.config.num_layers as u64,
        cfg["num_layers"].as_u64().unwrap()
    );
    assert_eq!(
        weights.config.pwff_hidden_dim as u64,
        cfg["pwff_hidden_dim"].as_u64().unwrap()
    );
    weights
}

fn data(case: &Case) -> Vec<u8> {
    let bytes = std::fs::read(Path::new(&case.dir).join("data.bin")).unwrap();
    assert_eq!(
        bytes.len() as u64,
        case.expected["data_bytes"].as_u64().unwrap()
    );
    bytes
}

#[test]
fn cpu_scorer_matches_every_case() {
    for case in cases() {
        let mut model = CpuModel::new(load(&case));
        let score = score_data(&mut model, &data(&case), options(&case), &mut |_, _| {}).unwrap();
        check(&case, score.loss, &score.embedding);
    }
}
