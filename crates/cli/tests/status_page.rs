//! The status page of `somatrain run`, in a real headless browser (Debian's `chromium`, which
//! `.ci/run` installs): against a run on a localnet process that has committed and waits for
//! its reveal window, the page loads with no console message, shows the reveal deadline and the
//! charts (their series' pixels in the screenshot), and the screenshot is kept in Cargo's
//! directory for tests' files (`target/tmp/status-page.png`). `/status.json` carries the same
//! deadline.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{GrpcLocalnet, KillOnDrop, OutputWithin, bin, sources};

/// Debian's Chromium, headless, with nothing that reaches out of the machine.
fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,1900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_reveal_deadline_and_the_charts_in_a_browser() {
    let found = Command::new("chromium").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "Debian's chromium is needed (apt-get install chromium; .ci/run installs it): {found:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    // A day-long epoch: after its commit the run waits for the window, deadline in view.
    let net = GrpcLocalnet::start(
        &dir.path().join("node"),
        &["--embedding-dim", "16", "--epoch-duration-ms", "86400000"],
    );
    let run = dir.path().join("run");
    let kp = somatrain_protocol::Keypair::generate();
    let mut daemon = bin()
        .args(["run", "--run-dir", run.to_str().unwrap()])
        .args(["--corpus-dir", sources().to_str().unwrap()])
        .args(common::TINY_SHAPE)
        .args(["--steps-per-round", "4", "--rounds", "1", "--faucet"])
        .args(["--status-addr", "127.0.0.1:0"])
        .args(net.args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = daemon.stderr.take().unwrap();
    let _daemon = KillOnDrop(daemon);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    let base = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no status page address within 120 s:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split("status page on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Wait for the commit: the page then has a reveal deadline.
    let http = somatrain_client::http_client();
    let status = loop {
        assert!(Instant::now() < deadline, "no commit within 120 s:\n{seen}");
        if let Ok(reply) = http.get(format!("{base}status.json")).send().await
            && let Ok(status) = reply.json::<serde_json::Value>().await
            && status["next"]["deadline_ms"].is_u64()
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["phase"], "awaiting_reveal", "{status}");
    let chart = http.get(format!("{base}chart.svg")).send().await.unwrap();
    assert_eq!(chart.status(), 200);
    assert_eq!(chart.headers()["content-type"], "image/svg+xml");

    let profile = dir.path().join("chromium");
    let dom = chromium(&profile)
        .arg("--dump-dom")
        .arg(&base)
        .output_within(Duration::from_secs(120))
        .unwrap();
    let (html, log) = (
        String::from_utf8_lossy(&dom.stdout).to_string(),
        String::from_utf8_lossy(&dom.stderr).to_string(),
    );
    assert!(dom.status.success(), "{log}");
    // The page has no script: any console message is a failure (a resource, a parse error).
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    assert!(html.contains("next: reveal round 1"), "{html}");
    assert!(html.contains("id=\"deadline\""), "{html}");
    assert!(html.contains("UTC"), "{html}");
    assert!(
        html.contains("<img id=\"chart\" src=\"/chart.svg\""),
        "{html}"
    );

    // The screenshot, kept after the test in Cargo's directory for tests' files; the chart's
    // loss line is in it.
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = chromium(&profile)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&base)
        .output_within(Duration::from_secs(120))
        .unwrap();
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let image = image::open(&screenshot).unwrap().to_rgb8();
    let (r, g, b) = somatrain_charts::LOSS_RGB;
    let loss_pixels = image.pixels().filter(|p| p.0 == [r, g, b]).count();
    assert!(
        loss_pixels > 50,
        "the chart's loss line is not in the screenshot ({loss_pixels} pixels)"
    );
}
