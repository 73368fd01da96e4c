//! Bit-for-bit agreement with the reference values of the network's generator.

use std::path::PathBuf;

#[test]
fn normal_matches_reference_bits() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/noise/normal.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("conformance file {} is required: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let count: usize = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        let mean = case["mean"].as_f64().unwrap() as f32;
        let std = case["std"].as_f64().unwrap() as f32;
        let got = somatrain_noise::normal_array(seed, count, mean, std);
        let bits = case["bits"].as_array().unwrap();
        assert_eq!(
            bits.len(),
            count,
            "seed {seed}: reference has one bit pattern per value"
        );
        for (i, (value, expected)) in got.iter().zip(bits).enumerate() {
            let expected = u32::from_str_radix(expected.as_str().unwrap(), 16).unwrap();
            assert_eq!(
                value.to_bits(),
                expected,
                "seed {seed} element {i}: {value}"
            );
        }
    }
}
