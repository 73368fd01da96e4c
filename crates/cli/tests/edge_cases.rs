//! What a careless user types gets a clear error and a failing exit code, never a panic, an
//! unbounded read or silent garbage.

use std::path::Path;
use std::process::Output;

use somatrain_model::{Preset, Weights};

mod common;
use common::bin;
use common::{COMMAND_DEADLINE, OutputWithin};

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .env_remove("SOMA_SECRET_KEY")
        .output_within(COMMAND_DEADLINE)
        .unwrap()
}

/// Fails with exit code 1 (an error, not a panic's 101) and `needle` in the message.
fn refused(out: Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
}

fn tiny_weights(dir: &Path) -> String {
    let path = dir.join("w.safetensors");
    somatrain_model::io::save_file(&Weights::init(Preset::Tiny.config(), 7), &path).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn score_refuses_nonsense_settings_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(dir.path());
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "some bytes to score").unwrap();
    let data = data.to_str().unwrap();
    let score = |extra: &[&str]| {
        let mut args = vec!["score", "--weights", &weights, "--data", data];
        args.extend_from_slice(extra);
        run(&args)
    };
    refused(
        score(&["--max-seq-len", "0"]),
        "--max-seq-len 0 is out of range",
    );
    refused(
        score(&["--batch-size", "0"]),
        "--batch-size 0 is out of range",
    );
    refused(
        score(&["--max-seq-len", "99999999999"]),
        "--max-seq-len 99999999999 is out of range",
    );
    refused(
        score(&["--batch-size", "1000000000"]),
        "--batch-size 1000000000 is out of range",
    );
    let zero = dir.path().join("zero.json");
    std::fs::write(&zero, "[0, 0, 0]").unwrap();
    refused(
        score(&["--distance-to", zero.to_str().unwrap()]),
        "no direction",
    );
    // The wrong length is refused before any scoring (the tiny preset embeds into 16).
    let short = dir.path().join("short.json");
    std::fs::write(&short, "[1, 2, 3]").unwrap();
    refused(
        score(&["--distance-to", short.to_str().unwrap()]),
        "--distance-to has 3 values, but",
    );
    let nan = dir.path().join("nan.json");
    std::fs::write(&nan, "[1, 1e999, 0]").unwrap();
    let out = score(&["--distance-to", nan.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // A directory where a weights file belongs.
    refused(
        run(&[
            "score",
            "--weights",
            dir.path().to_str().unwrap(),
            "--data",
            data,
        ]),
        "is a directory, not a weights file",
    );
    // /dev/zero never ends: refused before it is opened instead of read forever.
    refused(
        run(&["score", "--weights", &weights, "--data", "/dev/zero"]),
        "/dev/zero is not a regular file",
    );
}

#[test]
fn decrypt_checks_the_result_and_nothing_is_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(dir.path());
    let enc = dir.path().join("w.enc");
    let out = run(&["encrypt", &weights, enc.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Over an existing file: refused, the file untouched.
    let before = std::fs::read(&enc).unwrap();
    refused(
        run(&["encrypt", &weights, enc.to_str().unwrap()]),
        "pass --force to replace it",
    );
    assert_eq!(std::fs::read(&enc).unwrap(), before);
    // A wrong key gives random bytes: refused, nothing written.
    let plain = dir.path().join("plain.safetensors");
    let wrong = somatrain_protocol::EncryptionKey::generate().to_base58();
    refused(
        run(&[
            "decrypt",
            "--key",
            &wrong,
            enc.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]),
        "most likely a wrong key",
    );
    assert!(!plain.exists());
    // --raw keeps them anyway; the right key gives the weights back; --force replaces.
    let raw = run(&[
        "decrypt",
        "--key",
        &wrong,
        "--raw",
        enc.to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    assert!(raw.status.success());
    refused(
        run(&[
            "decrypt",
            "--key",
            &key,
            enc.to_str().unwrap(),
            plain.to_str().unwrap(),
        ]),
        "pass --force",
    );
    let good = run(&[
        "decrypt",
        "--key",
        &key,
        "--force",
        enc.to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&weights).unwrap()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&plain).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "decrypted weights are the owner's alone"
        );
    }
}

#[test]
fn crypto_commands_read_only_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let key = somatrain_protocol::EncryptionKey::generate().to_base58();
    let dir_path = dir.path().to_str().unwrap();
    // /dev/zero never ends: refused at once instead of filling the disk.
    for (args, needle) in [
        (vec!["encrypt", "/dev/zero", out], "not a regular file"),
        (
            vec!["decrypt", "--key", &key, "/dev/zero", out],
            "not a regular file",
        ),
        (vec!["commitment", "/dev/zero"], "not a regular file"),
        (vec!["encrypt", dir_path, out], "is a directory"),
        (vec!["commitment", dir_path], "is a directory"),
    ] {
        refused(run(&args), needle);
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

#[test]
fn small_inputs_are_read_with_a_cap_and_files_are_sized_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let weights = tiny_weights(dir.path());
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "some bytes to score").unwrap();
    let data = data.to_str().unwrap();
    let key = somatrain_protocol::EncryptionKey::generate().to_base58();
    refused(
        run(&[
            "score",
            "--encrypted-weights",
            "/dev/zero",
            "--key",
            &key,
            "--data",
            data,
        ]),
        "/dev/zero is not a regular file",
    );
    refused(
        run(&[
            "score",
            "--encrypted-weights",
            &weights,
            "--key",
            "@/dev/zero",
            "--data",
            data,
        ]),
        "/dev/zero is not a regular file",
    );
    refused(
        run(&[
            "score",
            "--weights",
            &weights,
            "--data",
            data,
            "--distance-to",
            "/dev/zero",
        ]),
        "/dev/zero is not a regular file",
    );
    refused(
        run(&["commitment", "--embedding", "/dev/zero"]),
        "/dev/zero is not a regular file",
    );
    // 17 GiB that take no disk: refused from its size, before a byte is read.
    let huge = dir.path().join("huge.enc");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(17 << 30)
        .unwrap();
    refused(
        run(&[
            "score",
            "--encrypted-weights",
            huge.to_str().unwrap(),
            "--key",
            &key,
            "--data",
            data,
        ]),
        &format!("holds {} bytes, more than {}", 17u64 << 30, 16u64 << 30),
    );
}

#[test]
fn a_keystore_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.json");
    let ks = keystore.to_str().unwrap();
    let out = run(&["wallet", "new", "--keystore", ks]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        run(&[
            "transfer",
            "--keystore",
            ks,
            "--to",
            &"1".repeat(64),
            "--amount",
            "1",
        ]),
        &format!("chmod 600 {ks}"),
    );
}

/// How to run `somatrain` as a user whom file permissions bind. Tests run as root on our
/// machines, and root reads a mode-000 directory anyway; then the binary is copied under `dir`
/// (where any user may execute it) and run as `nobody`, with `writable` handed to `nobody`. A
/// process that permissions already bind runs the binary as it is.
struct Unprivileged {
    program: std::path::PathBuf,
    /// The user and home to run as, where this process bypasses permissions.
    nobody: Option<(u32, std::path::PathBuf)>,
}

impl Unprivileged {
    fn prepare(dir: &Path, writable: &Path) -> Unprivileged {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let probe = dir.join("probe");
        std::fs::create_dir(&probe).unwrap();
        mode(&probe, 0o000);
        let bypasses_permissions = std::fs::read_dir(&probe).is_ok();
        mode(&probe, 0o700);
        if !bypasses_permissions {
            return Unprivileged {
                program: env!("CARGO_BIN_EXE_somatrain").into(),
                nobody: None,
            };
        }
        const NOBODY: u32 = 65534;
        mode(dir, 0o755);
        let program = dir.join("somatrain");
        std::fs::copy(env!("CARGO_BIN_EXE_somatrain"), &program).unwrap();
        mode(&program, 0o755);
        std::os::unix::fs::chown(writable, Some(NOBODY), Some(NOBODY)).unwrap();
        Unprivileged {
            program,
            nobody: Some((NOBODY, writable.to_path_buf())),
        }
    }

    /// Runs `somatrain args` and waits for it.
    fn output(&self, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(&self.program);
        command.args(args);
        if let Some((user, home)) = &self.nobody {
            command.uid(*user).gid(*user).env("HOME", home);
        }
        // Another test's child, forked while the copy was being written, may still hold it
        // open for writing until it execs: the kernel then refuses to run the copy ("text file
        // busy"). That lasts an instant; 10 s is a deadline, not a wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match command.output_within(COMMAND_DEADLINE) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                result => return result.expect("running the copied somatrain"),
            }
        }
    }
}

#[test]
fn an_unreadable_corpus_directory_is_an_error_and_unreadable_parts_are_counted() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // Under /tmp, which every user can enter, whatever TMPDIR says.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let corpus = dir.path().join("corpus");
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(corpus.join("locked")).unwrap();
    std::fs::create_dir(&run_dir).unwrap();
    for (name, text) in [
        ("a.txt", "the first readable document of this corpus"),
        ("b.txt", "a second one, also readable by anyone at all"),
        ("c.txt", "and a third, so that training has enough text"),
        ("locked/hidden.txt", "in a directory nobody may list"),
        ("secret.txt", "a file nobody may read"),
    ] {
        std::fs::write(corpus.join(name), text).unwrap();
    }
    mode(&corpus.join("locked"), 0o000);
    mode(&corpus.join("secret.txt"), 0o000);
    let user = Unprivileged::prepare(dir.path(), &run_dir);
    let train = |steps: &str| {
        let mut args = vec!["train", "--run-dir", run_dir.to_str().unwrap()];
        args.extend(["--corpus-dir", corpus.to_str().unwrap()]);
        args.extend(common::TINY_SHAPE);
        args.extend(["--heldout-bytes", "64", "--steps", steps]);
        user.output(&args)
    };

    let out = train("1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The locked directory and the unreadable file; the three others were read.
    assert!(
        stdout.contains("3 training documents, 0 held-out; skipped: 2 unreadable"),
        "{stdout}"
    );
    let locked = corpus.join("locked");
    assert!(
        stderr.contains(&format!("{}: cannot be read", locked.display())),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("cannot be read").count(),
        1,
        "said once: {stderr}"
    );

    mode(&corpus, 0o000);
    let refused_run = train("2");
    mode(&corpus, 0o755);
    mode(&locked, 0o755);
    refused(
        refused_run,
        &format!("cannot read the corpus directory {}", corpus.display()),
    );
}

#[test]
fn train_says_when_there_is_nothing_to_train_and_names_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let sources = common::sources();
    let train = |run_dir: &Path, steps: &str| {
        run(&[
            "train",
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--preset",
            "tiny",
            "--corpus-dir",
            sources.to_str().unwrap(),
            "--seq-len",
            "64",
            "--steps",
            steps,
        ])
    };
    let out = train(&dir.path().join("run"), "0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("no steps to train (the run is at step 0)"),
        "{stdout}"
    );
    assert!(!stdout.contains("NaN"), "{stdout}");

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = train(&file, "1");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    refused(out, "File exists");
    assert_eq!(stderr.matches("File exists").count(), 1, "{stderr}");
}

#[test]
fn shell_completions_name_every_command_and_parse() {
    let out = common::bin()
        .args(["completions", "bash"])
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for command in [
        "train",
        "run",
        "reveal",
        "plot",
        "localnet-cycle",
        "completions",
    ] {
        assert!(script.contains(command), "{command} is not completed");
    }
    // bash itself reads it without a syntax error.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("somatrain.bash");
    std::fs::write(&path, &script).unwrap();
    let checked = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output_within(COMMAND_DEADLINE)
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = common::bin()
            .args(["completions", shell])
            .output_within(COMMAND_DEADLINE)
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
}
