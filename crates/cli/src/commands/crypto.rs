//! `somatrain encrypt`, `decrypt` and `commitment`: the SDK's weights crypto on files, streamed.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use somatrain_protocol::EncryptionKey;
use somatrain_protocol::crypto::{
    Commitment, decrypt_stream, embedding_commitment, encrypt_stream,
};

#[derive(Args)]
pub struct EncryptArgs {
    /// Base58 key, or @FILE to read it from a file; a fresh random key when omitted (printed
    /// to standard output so it can be saved).
    #[arg(long)]
    key: Option<String>,
    input: PathBuf,
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct DecryptArgs {
    /// Base58 key, or @FILE.
    #[arg(long)]
    key: String,
    input: PathBuf,
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    force: bool,
    /// Write the decrypted bytes whatever they are (by default they must form a safetensors
    /// file, which catches a wrong key).
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
pub struct CommitmentArgs {
    /// A file to hash (Blake2b-256, Base58).
    #[arg(required_unless_present = "embedding", conflicts_with = "embedding")]
    file: Option<PathBuf>,
    /// A JSON array of floats: the commitment of the embedding as the network encodes it.
    #[arg(long)]
    embedding: Option<PathBuf>,
}

pub fn parse_key(spec: &str) -> Result<EncryptionKey> {
    let text = match spec.strip_prefix('@') {
        Some(path) => super::read_text(Path::new(path), super::MAX_KEY_FILE_BYTES)
            .with_context(|| format!("reading the key file {path}"))?,
        None => spec.to_string(),
    };
    // The error deliberately omits the key text.
    EncryptionKey::from_base58(&text).context("invalid key")
}

/// Streams `input` through the cipher into `output` via a temporary file and a rename, so a
/// failure never leaves a half-written output under the final name.
fn transform(
    input: &Path,
    output: &Path,
    force: bool,
    check: impl FnOnce(&Path) -> Result<()>,
    run: impl FnOnce(BufReader<File>, &mut BufWriter<File>) -> Result<Commitment>,
) -> Result<(Commitment, u64)> {
    if output.exists() && !force {
        bail!("{} exists; pass --force to replace it", output.display());
    }
    let reader = BufReader::with_capacity(1 << 20, super::open_regular_file(input)?);
    // Owner-only from the first byte: a decryption in progress is plaintext weights.
    let (tmp, file) = somatrain_model::io::create_private_temp(output)
        .with_context(|| format!("creating a temporary file beside {}", output.display()))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let result = run(reader, &mut writer).and_then(|c| {
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let len = file.metadata()?.len();
        check(&tmp)?;
        somatrain_model::io::finish_atomic(&tmp, output)
            .with_context(|| format!("writing {}", output.display()))?;
        Ok((c, len))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn run_encrypt(args: EncryptArgs) -> Result<()> {
    let (key, generated) = match &args.key {
        Some(spec) => (parse_key(spec)?, false),
        None => (EncryptionKey::generate(), true),
    };
    let (commitment, len) = transform(
        &args.input,
        &args.output,
        args.force,
        |_| Ok(()),
        |r, w| Ok(encrypt_stream(&key, r, w)?.output_commitment),
    )?;
    eprintln!("encrypted {len} bytes; checksum (Blake2b-256 of the encrypted file): {commitment}");
    eprintln!("key commitment: {}", key.commitment());
    if generated {
        // Asked for: the only way to learn a generated key. Standard output, never a log.
        println!("{}", key.to_base58());
    }
    Ok(())
}

pub fn run_decrypt(args: DecryptArgs) -> Result<()> {
    let key = parse_key(&args.key)?;
    let raw = args.raw;
    let (commitment, len) = transform(
        &args.input,
        &args.output,
        args.force,
        |plain| {
            if raw {
                Ok(())
            } else {
                safetensors_header(plain)
            }
        },
        |r, w| Ok(decrypt_stream(&key, r, w)?.output_commitment),
    )?;
    eprintln!("decrypted {len} bytes; Blake2b-256 of the plaintext: {commitment}");
    Ok(())
}

/// The decrypted file starts like a safetensors file: an 8-byte header length that fits the
/// file, then a JSON object. Decrypting with a wrong key gives random bytes, which fail this.
fn safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let wrong = || {
        anyhow::anyhow!(
            "the decrypted bytes are not a safetensors file: most likely a wrong key (pass --raw to \
             keep them anyway)"
        )
    };
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut size = [0u8; 8];
    file.read_exact(&mut size).map_err(|_| wrong())?;
    let header_len = u64::from_le_bytes(size);
    if header_len < 2 || header_len > len - 8 || header_len > 100 << 20 {
        return Err(wrong());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|_| wrong())?;
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header)
        .map_err(|_| wrong())?;
    Ok(())
}

pub fn run_commitment(args: CommitmentArgs) -> Result<()> {
    match (&args.file, &args.embedding) {
        (Some(path), None) => {
            let file = super::open_regular_file(path)?;
            let (c, _) = Commitment::of_reader(BufReader::with_capacity(1 << 20, file))?;
            println!("{c}");
        }
        (None, Some(path)) => {
            let text = super::read_text(path, super::MAX_EMBEDDING_JSON_BYTES)?;
            let values: Vec<f32> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of numbers", path.display()))?;
            println!("{}", embedding_commitment(&values));
        }
        _ => bail!("give a FILE or --embedding FILE.json"),
    }
    Ok(())
}
