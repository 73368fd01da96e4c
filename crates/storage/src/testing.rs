//! Test support: a real S3-compatible server (moto, from PyPI, installed by `.ci/run`) on a free
//! loopback port, with one publicly readable bucket.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Backend, S3Config};

pub struct MotoServer {
    child: Child,
    pub addr: SocketAddr,
    pub bucket: String,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoServer {
    /// Starts `python3 -m moto.server` and creates `bucket` with a public-read policy.
    pub async fn start(bucket: &str) -> MotoServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] is needed (pip install 'moto[server]'); .ci/run installs it");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = MotoServer {
            child,
            addr,
            bucket: bucket.to_string(),
        };
        let http = somatrain_http::http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http.put(format!("http://{addr}/{bucket}")).send().await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => panic!("moto did not start (is moto[server] installed?): {other:?}"),
            }
        }
        let policy = format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":"*","Action":"s3:GetObject","Resource":"arn:aws:s3:::{bucket}/*"}}]}}"#
        );
        let answer = http
            .put(format!("http://{addr}/{bucket}?policy"))
            .body(policy)
            .send()
            .await
            .expect("moto answers");
        assert!(
            answer.status().is_success(),
            "bucket policy refused: {answer:?}"
        );
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The quickstart's environment variables for this server's bucket.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("S3_BUCKET", self.bucket.clone()),
            ("S3_ACCESS_KEY_ID", "test-key".into()),
            ("S3_SECRET_ACCESS_KEY", "test-secret".into()),
            ("S3_ENDPOINT_URL", self.endpoint()),
            ("S3_REGION", "us-east-1".into()),
        ]
    }

    pub fn backend_at(&self, endpoint: String) -> Backend {
        Backend::S3(S3Config {
            bucket: self.bucket.clone(),
            access_key_id: "test-key".into(),
            secret_access_key: "test-secret".into(),
            endpoint: Some(endpoint),
            public_url: None,
            region: "us-east-1".into(),
        })
    }
}
