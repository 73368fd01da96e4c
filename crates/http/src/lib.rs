//! The project's HTTP set-up, shared by the chain client and storage (so that storage needs
//! nothing of the chain to download a blob).
//!
//! Owns the TLS provider (rustls with `ring`, installed once per process) and the HTTP client
//! built on it. It knows nothing of what is fetched.

#![forbid(unsafe_code)]

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
