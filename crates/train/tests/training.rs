//! The training loop: loss goes down, accumulation equals a big batch, checkpoints survive
//! corruption.

use std::path::{Path, PathBuf};

use somatrain_data::batches;
use somatrain_model::config::SIGREG_SLICES;
use somatrain_model::cpu::train::{TrainOptions, TrainPass};
use somatrain_model::{Preset, Weights};
use somatrain_train::checkpoint;
use somatrain_train::corpus::{CorpusConfig, Source};
use somatrain_train::{TrainSettings, Until, run};

/// The workspace's own Rust sources.
fn repo_sources() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn settings() -> TrainSettings {
    let mut corpus = CorpusConfig::new(vec![Source::Dir {
        path: repo_sources(),
    }]);
    corpus.max_seq_len = 128;
    corpus.heldout_per_mille = 200;
    let mut s = TrainSettings::reference(Preset::Tiny.config(), corpus);
    s.micro_batch = 4;
    s.accumulation = 2;
    s.optim.lr = 3e-3;
    s.dropout = 0.0;
    s.heldout_bytes = 4096;
    s
}

#[test]
fn loss_goes_down_on_real_sources() {
    let dir = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    let summary = run(dir.path(), &settings(), Until::Step(40), &mut |log| {
        losses.push(log.loss)
    })
    .unwrap();
    assert_eq!(summary.end_step, 40);
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(last < first - 0.5, "loss {first} -> {last}");
    let heldout = summary.round.heldout.expect("held-out score");
    assert!(
        heldout.loss.is_finite() && heldout.bits_per_byte < 8.0,
        "{heldout:?}"
    );
    assert_eq!(summary.round.embedding.len(), 16);
    assert!(dir.path().join(&summary.round.weights).exists());
}

#[test]
fn accumulating_micro_batches_equals_one_big_batch() {
    let config = Preset::Tiny.config();
    let weights = Weights::init(config, 8);
    let data: Vec<u8> = (0..4 * 64u32).map(|i| (i * 13 % 251) as u8).collect();
    let noise = somatrain_noise::unit_column_noise(4, 16, SIGREG_SLICES);
    let big = batches(&data, 64, 4).next().unwrap();
    let mut whole = Weights::zeros(config);
    TrainPass::new().loss_and_grad(&weights, &big, &noise, TrainOptions::default(), &mut whole);
    let mut accumulated = Weights::zeros(config);
    let mut pass = TrainPass::new();
    for micro in batches(&data, 64, 1) {
        let options = TrainOptions {
            grad_scale: 0.25,
            ..TrainOptions::default()
        };
        pass.loss_and_grad(&weights, &micro, &noise, options, &mut accumulated);
    }
    for ((name, a), (_, b)) in whole.tensors().iter().zip(accumulated.tensors()) {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * scale, "{name}: {x} vs {y}");
        }
    }
}

fn corrupt_file(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn corrupt_and_truncated_checkpoints_fall_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings();
    run(dir.path(), &s, Until::Step(3), &mut |_| {}).unwrap();
    let root = dir.path().join("checkpoints");
    let listed: Vec<u64> = checkpoint::list(&root).iter().map(|(s, _)| *s).collect();
    assert_eq!(listed, vec![3, 2, 1]);

    corrupt_file(&root.join("step-0000000003/weights.safetensors"));
    let (loaded, rejected) = checkpoint::load_latest(&root);
    assert_eq!(loaded.unwrap().state.step, 2);
    assert!(
        rejected[0].to_string().contains("checksum mismatch"),
        "{}",
        rejected[0]
    );

    let opt = root.join("step-0000000002/optimizer.safetensors");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let state = root.join("step-0000000001/state.json");
    let text = std::fs::read_to_string(&state)
        .unwrap()
        .replace("\"step\": 1", "\"step\": 7");
    std::fs::write(&state, text).unwrap();
    let (loaded, rejected) = checkpoint::load_latest(&root);
    assert!(loaded.is_none());
    assert_eq!(rejected.len(), 3);
    assert!(
        rejected[2].to_string().contains("state.json checksum"),
        "{}",
        rejected[2]
    );

    // A run on a directory whose checkpoints are all bad stops, says why, and deletes nothing.
    let error =
        run(dir.path(), &s, Until::Step(1), &mut |_| {}).expect_err("no checkpoint verifies");
    assert!(
        error.to_string().contains("--restart-from-scratch"),
        "{error}"
    );
    assert_eq!(checkpoint::list(&root).len(), 3);
    // Asked to, it starts over, with the old ones kept aside and reported.
    let restart = TrainSettings {
        restart_from_scratch: true,
        ..s.clone()
    };
    let summary = run(dir.path(), &restart, Until::Step(1), &mut |_| {}).unwrap();
    assert_eq!(summary.start_step, 0);
    assert_eq!(summary.rejected_checkpoints.len(), 3);
}

#[test]
fn changed_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &settings(), Until::Step(1), &mut |_| {}).unwrap();
    let mut other = settings();
    other.seed = 9;
    let err = run(dir.path(), &other, Until::Step(2), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
}

#[test]
fn a_resumed_run_may_split_its_steps_differently_but_not_resize_them() {
    let dir = tempfile::tempdir().unwrap();
    let four_by_two = settings();
    run(dir.path(), &four_by_two, Until::Step(1), &mut |_| {}).unwrap();
    // 8 sequences per step either way: the run goes on, and the new split is stored.
    let two_by_four = TrainSettings {
        micro_batch: 2,
        accumulation: 4,
        ..four_by_two.clone()
    };
    let summary = run(dir.path(), &two_by_four, Until::Step(2), &mut |_| {}).unwrap();
    assert_eq!((summary.start_step, summary.end_step), (1, 2));
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("settings.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            stored["micro_batch"].as_u64(),
            stored["accumulation"].as_u64()
        ),
        (Some(2), Some(4))
    );
    // The data goes on where a run split one way throughout stands.
    let straight = tempfile::tempdir().unwrap();
    run(straight.path(), &four_by_two, Until::Step(2), &mut |_| {}).unwrap();
    let position = |root: &Path| {
        let (loaded, _) = checkpoint::load_latest(&root.join("checkpoints"));
        let loaded = loaded.expect("a checkpoint");
        assert_eq!(loaded.state.step, 2);
        loaded.corpus
    };
    assert_eq!(position(dir.path()), position(straight.path()));
    // Another number of sequences per step is another run.
    let smaller = TrainSettings {
        micro_batch: 2,
        accumulation: 2,
        ..four_by_two
    };
    let err = run(dir.path(), &smaller, Until::Step(3), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("sequences per step"), "{err}");
}

/// Base58 Blake2b-256, as checkpoints write their checksums.
fn digest_b58(bytes: &[u8]) -> String {
    use blake2::Digest;
    bs58::encode(blake2::Blake2b::<blake2::digest::consts::U32>::digest(
        bytes,
    ))
    .into_string()
}

#[test]
fn the_stream_cursor_is_checked_and_older_checkpoints_resume_by_replay() {
    let s = settings();
    let whole = tempfile::tempdir().unwrap();
    run(whole.path(), &s, Until::Step(4), &mut |_| {}).unwrap();
    let expected = std::fs::read(whole.path().join("round/weights.safetensors")).unwrap();

    // A checkpoint written before `corpus.bin` existed: no cursor file and no digest for it.
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &s, Until::Step(2), &mut |_| {}).unwrap();
    let step2 = dir.path().join("checkpoints/step-0000000002");
    std::fs::remove_file(step2.join("corpus.bin")).unwrap();
    let text = std::fs::read_to_string(step2.join("state.json")).unwrap();
    let body = text.trim_end().rsplit_once('\n').unwrap().0;
    let mut state: serde_json::Value = serde_json::from_str(body).unwrap();
    state["files"].as_object_mut().unwrap().remove("corpus.bin");
    let body = serde_json::to_string_pretty(&state).unwrap();
    std::fs::write(
        step2.join("state.json"),
        format!("{body}\n{}\n", digest_b58(body.as_bytes())),
    )
    .unwrap();
    let (loaded, rejected) = checkpoint::load_latest(&dir.path().join("checkpoints"));
    assert!(rejected.is_empty(), "{rejected:?}");
    assert!(!loaded.unwrap().corpus.has_cursor());
    let summary = run(dir.path(), &s, Until::Step(4), &mut |_| {}).unwrap();
    assert_eq!(summary.start_step, 2);
    assert_eq!(
        std::fs::read(dir.path().join("round/weights.safetensors")).unwrap(),
        expected
    );

    // A damaged cursor rejects its checkpoint like any other damaged file.
    corrupt_file(&dir.path().join("checkpoints/step-0000000004/corpus.bin"));
    let (loaded, rejected) = checkpoint::load_latest(&dir.path().join("checkpoints"));
    assert_eq!(loaded.unwrap().state.step, 3);
    assert!(
        rejected[0]
            .to_string()
            .contains("corpus.bin checksum mismatch"),
        "{}",
        rejected[0]
    );
}

/// A CPU engine whose gradients turn non-finite at optimizer step `bad_version`: a diverging run.
struct DivergesAt {
    inner: TrainPass,
    bad_version: u64,
}

impl somatrain_train::GradientEngine for DivergesAt {
    fn loss_and_grad(
        &mut self,
        weights: &Weights,
        version: u64,
        batch: &somatrain_data::Batch,
        noise: &[f32],
        options: TrainOptions,
        grads: &mut Weights,
    ) -> Result<somatrain_model::score::BatchOutput, somatrain_train::TrainError> {
        let out = self
            .inner
            .loss_and_grad(weights, batch, noise, options, grads);
        if version == self.bad_version {
            grads.tensors_mut()[0].1[0] = f32::INFINITY;
        }
        Ok(out)
    }
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings();
    s.checkpoint_every = 1;
    let good = run(dir.path(), &s, Until::Step(3), &mut |_| {}).unwrap();
    let round_before = std::fs::read(dir.path().join("round/round.json")).unwrap();
    let newest = || {
        checkpoint::list(&dir.path().join("checkpoints"))
            .into_iter()
            .map(|(step, _)| step)
            .max()
    };
    assert_eq!(good.end_step, 3);
    assert_eq!(newest(), Some(3));

    let mut engine = DivergesAt {
        inner: TrainPass::new(),
        bad_version: 4,
    };
    let error = somatrain_train::run_with(dir.path(), &s, Until::Step(8), &mut engine, &mut |_| {})
        .expect_err("a non-finite gradient must stop the run");
    let text = error.to_string();
    assert!(text.contains("diverged at step 5"), "{text}");
    // Step 4 was good and saved; nothing of step 5 was, and the round was not rewritten.
    assert_eq!(newest(), Some(4));
    assert_eq!(
        std::fs::read(dir.path().join("round/round.json")).unwrap(),
        round_before
    );
    let resumed = run(dir.path(), &s, Until::Step(5), &mut |_| {}).unwrap();
    assert_eq!(resumed.start_step, 4);
}

#[test]
fn a_mistyped_corpus_path_writes_nothing_and_the_corrected_one_trains() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut s = settings();
    let missing = dir.path().join("no-such-corpus");
    s.corpus.sources = vec![Source::Dir {
        path: missing.clone(),
    }];
    let error = run(&run_dir, &s, Until::Step(1), &mut |_| {}).expect_err("a missing corpus");
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );
    assert!(!run_dir.exists(), "the run directory was created");
    // Nothing pins the run directory to the wrong path.
    let summary = run(&run_dir, &settings(), Until::Step(1), &mut |_| {}).unwrap();
    assert_eq!(summary.end_step, 1);
}

#[test]
fn a_run_directory_inside_the_corpus_is_not_read_as_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    for i in 0..20 {
        let text: String = (0..60).map(|j| format!("doc {i} line {j}; ")).collect();
        std::fs::write(corpus.join(format!("doc-{i:02}.txt")), text).unwrap();
    }
    let mut s = settings();
    s.corpus.sources = vec![Source::Dir {
        path: corpus.clone(),
    }];
    // First a run kept outside, while the corpus holds only the documents.
    let outside = dir.path().join("run-outside");
    run(&outside, &s, Until::Step(4), &mut |_| {}).unwrap();
    // Then one inside the corpus, stopped and resumed: its settings, checkpoints and round
    // appear between the two invocations.
    let inside = corpus.join("run");
    run(&inside, &s, Until::Step(2), &mut |_| {}).unwrap();
    let resumed = run(&inside, &s, Until::Step(4), &mut |_| {}).unwrap();
    assert_eq!(resumed.start_step, 2);
    assert_eq!(
        resumed.corpus.skipped_invalid_utf8, 0,
        "{:?}",
        resumed.corpus
    );
    let weights = |run: &Path| std::fs::read(run.join("round/weights.safetensors")).unwrap();
    assert!(
        weights(&inside) == weights(&outside),
        "the run inside the corpus read something else"
    );
}

#[test]
fn out_of_range_settings_are_refused_before_anything_is_written() {
    type Spoil = fn(&mut TrainSettings);
    let cases: Vec<(&str, Spoil)> = vec![
        ("--lr", |s| s.optim.lr = f32::NAN),
        ("--lr", |s| s.optim.lr = 1e12),
        ("--lr", |s| s.optim.lr = 0.0),
        ("--dropout", |s| s.dropout = 1.5),
        ("--sigreg-coefficient", |s| s.sigreg_coefficient = -1.0),
        ("beta2", |s| s.optim.beta2 = 1.0),
        ("eps", |s| s.optim.eps = 0.0),
        ("--seq-len", |s| s.corpus.max_seq_len = 0),
        ("micro-batch", |s| s.micro_batch = 0),
        ("--heldout-bytes", |s| s.heldout_bytes = 0),
        // Terabytes of activations: more than any machine has.
        ("smaller --micro-batch", |s| s.micro_batch = 1 << 24),
    ];
    for (name, spoil) in cases {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let mut s = settings();
        spoil(&mut s);
        let error = run(&run_dir, &s, Until::Step(1), &mut |_| {}).expect_err(name);
        assert!(error.to_string().contains(name), "{name}: {error}");
        assert!(!run_dir.exists(), "{name}: the run directory was created");
    }
}

/// `checkpoint_minutes` spaces checkpoints by time as well as by steps, and the last step of a
/// run is saved however soon it comes; a run resumed from there goes on from it.
#[test]
fn checkpoints_wait_their_minutes_but_a_run_always_saves_its_last_step() {
    let steps = |dir: &Path| -> Vec<u64> {
        let mut steps: Vec<u64> = checkpoint::list(&dir.join("checkpoints"))
            .into_iter()
            .map(|(step, _)| step)
            .collect();
        steps.sort();
        steps
    };
    let every_step = tempfile::tempdir().unwrap();
    let mut s = settings();
    s.keep_checkpoints = 10;
    run(every_step.path(), &s, Until::Step(3), &mut |_| {}).unwrap();
    assert_eq!(steps(every_step.path()), [1, 2, 3]);

    let spaced = tempfile::tempdir().unwrap();
    s.checkpoint_minutes = 60.0;
    run(spaced.path(), &s, Until::Step(3), &mut |_| {}).unwrap();
    assert_eq!(steps(spaced.path()), [3]);
    let resumed = run(spaced.path(), &s, Until::Step(5), &mut |_| {}).unwrap();
    assert_eq!(resumed.start_step, 3);
    assert_eq!(steps(spaced.path()), [3, 5]);
}
