//! Generates the message types and service stubs from `proto/` with protox (no system `protoc`),
//! and the BCS side services (faucet, admin, scoring) from their Rust definitions.

use tonic_prost_build::manual::{Builder, Method, Service};

const PROTOS: &[&str] = &[
    "soma/rpc/object.proto",
    "soma/rpc/transaction.proto",
    "soma/rpc/system_state.proto",
    "soma/rpc/ledger_service.proto",
    "soma/rpc/state_service.proto",
    "soma/rpc/transaction_execution_service.proto",
    "soma/rpc/subscription_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(descriptors)?;

    let bcs_method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::side::{input}"))
            .output_type(format!("crate::side::{output}"))
            .codec_path("crate::side::BcsCodec")
            .build()
    };
    let services = [
        Service::builder()
            .name("Faucet")
            .package("faucet")
            .method(bcs_method(
                "request_gas",
                "RequestGas",
                "FaucetRequest",
                "FaucetResponse",
            ))
            .build(),
        Service::builder()
            .name("Admin")
            .package("admin")
            .method(bcs_method(
                "advance_epoch",
                "AdvanceEpoch",
                "AdvanceEpochRequest",
                "AdvanceEpochResponse",
            ))
            .build(),
        Service::builder()
            .name("Scoring")
            .package("scoring")
            .method(bcs_method(
                "score",
                "Score",
                "ScoreRequest",
                "ScoreResponse",
            ))
            .method(bcs_method(
                "health",
                "Health",
                "HealthRequest",
                "HealthResponse",
            ))
            .build(),
    ];
    Builder::new().compile(&services);
    Ok(())
}
