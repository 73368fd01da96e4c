//! `somatrain plot` on a real short run (two rounds revealed on a localnet process): the SVG and
//! the PNG carry their axes, legends and every series.

mod common;
use common::{COMMAND_DEADLINE, GrpcLocalnet, OutputWithin, bin, sources};

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02X}{g:02X}{b:02X}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_plots_as_svg_and_png_with_axes_and_every_series() {
    let dir = tempfile::tempdir().unwrap();
    let net = GrpcLocalnet::start(
        &dir.path().join("node"),
        &["--embedding-dim", "16", "--epoch-duration-ms", "86400000"],
    );
    let run = dir.path().join("run");
    let kp = somatrain_protocol::Keypair::generate();
    let out = bin()
        .args(["run", "--run-dir", run.to_str().unwrap()])
        // The workspace's Rust sources: enough documents for a held-out split.
        .args(["--corpus-dir", sources().join("../..").to_str().unwrap()])
        .args(["--include", "**/*.rs"])
        .args(common::TINY_SHAPE)
        .args(["--heldout-per-mille", "200", "--heldout-bytes", "2048"])
        .args(["--steps-per-round", "3", "--rounds", "2", "--lr", "3e-3"])
        .args(["--advance-epochs", "--faucet", "--poll-ms", "100"])
        .args(net.args())
        .env("SOMA_SECRET_KEY", kp.secret_hex())
        .env_remove("S3_BUCKET")
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    common::succeeded(&out);
    let plot = |name: &str| {
        let path = dir.path().join(name);
        let out = bin()
            .args(["plot", "--run-dir", run.to_str().unwrap(), "--out"])
            .arg(&path)
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("6 steps, 2 revealed rounds"), "{stdout}");
        path
    };

    let svg = std::fs::read_to_string(plot("chart.svg")).unwrap();
    for text in [
        "Loss",
        "loss (nats per byte)",
        "optimizer step",
        "Learning rate",
        "Throughput",
        "bytes per second",
        "training loss (cross-entropy + SIGReg)",
        "held-out loss of each revealed round",
    ] {
        assert!(
            svg.contains(text),
            "{text:?} is not in the SVG; rounds: {}",
            std::fs::read_to_string(run.join("rounds.jsonl")).unwrap_or_default()
        );
    }
    for rgb in [
        somatrain_charts::LOSS_RGB,
        somatrain_charts::LR_RGB,
        somatrain_charts::THROUGHPUT_RGB,
    ] {
        let stroke = format!("stroke=\"{}\"", hex(rgb));
        // The series' line and its legend sample.
        assert!(svg.matches(&stroke).count() >= 2, "no {stroke} line");
    }
    // One point per revealed round, plus the legend's.
    let held_out = format!("fill=\"{}\"", hex(somatrain_charts::HELDOUT_RGB));
    assert_eq!(svg.matches(&held_out).count(), 3, "held-out points");

    let png = image::open(plot("chart.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), somatrain_charts::SIZE);
    let count = |(r, g, b): (u8, u8, u8)| png.pixels().filter(|p| p.0 == [r, g, b]).count();
    for (name, rgb) in [
        ("training loss", somatrain_charts::LOSS_RGB),
        ("held-out loss", somatrain_charts::HELDOUT_RGB),
        ("learning rate", somatrain_charts::LR_RGB),
        ("throughput", somatrain_charts::THROUGHPUT_RGB),
    ] {
        assert!(
            count(rgb) > 50,
            "the {name} series is not drawn ({} pixels)",
            count(rgb)
        );
    }
    // Text (axes, captions, legends) is drawn without a system font: dark pixels well beyond
    // the axes' own lines.
    let dark = png
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 5_000, "only {dark} dark pixels: no text?");
}
