//! `docs/openapi.json` and the server agree: every documented operation is served (with the
//! documented success or error status), and every response field the spec requires is present.

use std::path::PathBuf;

use somatrain_node::{Node, NodeConfig};
use somatrain_protocol::chain::Params;

fn spec() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn every_documented_operation_is_served_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: dir.path().to_path_buf(),
        genesis: Params {
            embedding_dim: 4,
            ..Params::default()
        },
        admin_token: Some("t".into()),
    };
    let node = Node::open(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(somatrain_node::serve(
        node,
        listener,
        std::future::pending(),
    ));
    let http = somatrain_client::http_client();
    let spec = spec();
    let address = "ab".repeat(32);
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let url = format!(
                "{base}{}",
                path.replace("{address}", &address)
                    .replace("{digest}", "11111111111111111111111111111111")
                    .replace("{id}", &format!("0x{}", "00".repeat(32)))
                    .replace("{name}", "spec-check.bin")
            );
            let request = match method.as_str() {
                "get" => http.get(&url),
                "post" if path.ends_with("faucet") => http
                    .post(&url)
                    .json(&serde_json::json!({"address": address})),
                "post" if path.contains("admin") => http.post(&url).bearer_auth("t"),
                "post" => http.post(&url).json(
                    &serde_json::json!({"body": "{}", "public_key": "00", "signature": "00"}),
                ),
                "put" => http.put(&url).body(vec![1u8, 2, 3]),
                other => panic!("undocumented method {other}"),
            };
            // Blobs are read after they are written (the map is ordered get, put).
            if method == "get" && path.contains("blobs") {
                http.put(&url).body(vec![1u8]).send().await.unwrap();
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16().to_string();
            let documented = op["responses"].as_object().unwrap();
            assert!(
                documented.contains_key(&status),
                "{method} {path} answered {status}, not documented"
            );
            let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
            let schema = &documented[&status]["content"]["application/json"]["schema"];
            if let Some(reference) = schema["$ref"].as_str() {
                let name = reference.rsplit('/').next().unwrap();
                let required = &spec["components"]["schemas"][name]["required"];
                for field in required.as_array().into_iter().flatten() {
                    let field = field.as_str().unwrap();
                    assert!(
                        body.get(field).is_some(),
                        "{method} {path}: field '{field}' missing in {body}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 12, "every operation of the spec was exercised");
}
