//! Clients of a SOMA network.
//!
//! - [`chain::ChainClient`]: the network's own protocol (gRPC and the BCS side services), for
//!   the public testnet and `somatrain localnet` alike.
//! - [`view`]: what commands read (the epoch and its clock, models, targets) as plain values.
//! - [`http_client`]: the HTTP client (rustls) used for weights and data downloads.
//!
//! Owns request building, coin selection, waiting for checkpoints and the mapping of answers to
//! refused / unavailable / executed-but-failed. It never touches the disk.

#![forbid(unsafe_code)]

pub mod chain;
pub mod view;

/// Installs the TLS crypto provider (ring) once per process. Every HTTP client in the project
/// is built after this call, so `https://` nodes and buckets work without a C crypto library.
pub fn init_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error only means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An HTTP client with the project's TLS set-up and a connect timeout.
pub fn http_client() -> reqwest::Client {
    init_tls();
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("the HTTP client's configuration is static")
}
