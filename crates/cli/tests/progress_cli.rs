//! Progress on a terminal: `train` run under a pseudo-terminal (util-linux `script`) draws a
//! step bar, and its log lines still come through whole.

mod common;
use common::{COMMAND_DEADLINE, OutputWithin, TINY_SHAPE};

#[test]
fn training_on_a_terminal_draws_a_step_bar() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut command = vec![
        env!("CARGO_BIN_EXE_somatrain").to_string(),
        "train".into(),
        "--run-dir".into(),
        run.to_str().unwrap().into(),
        "--corpus-dir".into(),
        common::sources().to_str().unwrap().into(),
        "--heldout-bytes".into(),
        "2048".into(),
        "--until-step".into(),
        "3".into(),
    ];
    command.extend(TINY_SHAPE.iter().map(|s| s.to_string()));
    let out = std::process::Command::new("script")
        .args(["-qec", &command.join(" "), "/dev/null"])
        .env("COLUMNS", "160")
        .output_within(COMMAND_DEADLINE)
        .expect("util-linux `script` runs the command under a pseudo-terminal");
    let screen = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{screen}");
    // indicatif draws "step K/3 [====…]" with the loss on the line (which K it draws depends on
    // its redraw rate against the steps' speed).
    assert!(
        (1..=3).any(|k| screen.contains(&format!("step {k}/3 ["))) && screen.contains("tok/s"),
        "no step bar on the terminal:\n{screen}"
    );
    // The trainer's own lines are not cut by the bar.
    assert!(
        screen
            .lines()
            .any(|l| l.contains("INFO") && l.contains("step 3 loss")),
        "{screen}"
    );
}
