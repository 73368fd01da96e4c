//! Safetensors in the network's canonical layout: strict loading, atomic saving.
//!
//! Loading follows the canonical scorer (missing tensor or wrong shape: refused; extra tensors:
//! ignored; BF16/F16/F64: converted to f32) and is stricter where a trainer wants to know early:
//! non-finite values and unsupported dtypes are refused, each error naming the tensor.
//! The shape of the model is inferred from the file; only the head count needs a hint.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::config::{ModelConfig, Preset, VOCAB_SIZE};
use crate::weights::Weights;

/// Metadata key under which our trainer records the model shape (the head count cannot be
/// inferred from tensor shapes).
pub const META_CONFIG: &str = "somatrain.config";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("not a valid safetensors file (bad header or truncated data): {0}")]
    NotSafetensors(String),
    #[error("tensor '{name}' is missing (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor '{name}' has dtype {found}, expected F32 (BF16, F16 and F64 are converted)")]
    Dtype { name: String, found: String },
    #[error("tensor '{name}' holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("cannot infer the model shape: {0}")]
    Shape0(String),
    #[error(
        "the head count of a width-{embedding_dim} model is not recorded in the file; pass --num-heads N or --preset NAME"
    )]
    UnknownHeads { embedding_dim: usize },
    #[error("the file's shape {found:?} does not match {what} {expected:?}")]
    ConfigMismatch {
        what: String,
        expected: ModelConfig,
        found: ModelConfig,
    },
}

/// Hints for the parts of the config that tensor shapes cannot show.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Head count given by the user; must agree with the file's metadata when both exist.
    pub num_heads: Option<usize>,
    /// A preset the file must match exactly.
    pub preset: Option<Preset>,
}

/// Loads weights whose head count is recorded in the file, or, for files that do not record it
/// (the network's own files), the head count of the preset of that width.
pub fn load_file_any_width(path: &Path) -> Result<Weights, WeightsError> {
    match load_file(path, LoadOptions::default()) {
        Err(WeightsError::UnknownHeads { embedding_dim }) => {
            let Some(preset) = Preset::ALL
                .into_iter()
                .find(|p| p.config().embedding_dim == embedding_dim)
            else {
                return Err(WeightsError::UnknownHeads { embedding_dim });
            };
            let options = LoadOptions {
                num_heads: Some(preset.config().num_heads),
                preset: None,
            };
            load_file(path, options)
        }
        other => other,
    }
}

/// Loads a weights file; the file is memory-mapped so a V1 model is never held twice.
pub fn load_file(path: &Path, options: LoadOptions) -> Result<Weights, WeightsError> {
    let io_err = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    // SAFETY: the map is read-only and dropped before returning; a concurrent writer of the same
    // path could change the bytes, which at worst makes this load fail validation or read
    // garbage values, never memory-unsafe in practice for read-only maps of regular files.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
    load_bytes(&map, options)
}

pub fn load_bytes(bytes: &[u8], options: LoadOptions) -> Result<Weights, WeightsError> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| WeightsError::NotSafetensors(e.to_string()))?;
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| WeightsError::NotSafetensors(e.to_string()))?;
    let recorded: Option<ModelConfig> = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_CONFIG))
        .and_then(|text| serde_json::from_str(text).ok());
    let config = infer_config(&tensors, recorded, options)?;
    let mut weights = Weights::zeros(config);
    let specs = Weights::specs(&config);
    for (spec, (name, buffer)) in specs.iter().zip(weights.tensors_mut()) {
        debug_assert_eq!(spec.name, name);
        let view = tensors.tensor(&name).map_err(|_| WeightsError::Missing {
            name: name.clone(),
            expected: spec.shape.clone(),
        })?;
        if view.shape() != spec.shape.as_slice() {
            return Err(WeightsError::Shape {
                name,
                expected: spec.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        convert_into(&name, view.dtype(), view.data(), buffer)?;
        if let Some(index) = buffer.iter().position(|x| !x.is_finite()) {
            return Err(WeightsError::NonFinite {
                name,
                index,
                value: buffer[index],
            });
        }
    }
    Ok(weights)
}

fn shape_of(tensors: &SafeTensors<'_>, name: &str) -> Result<Vec<usize>, WeightsError> {
    tensors
        .tensor(name)
        .map(|v| v.shape().to_vec())
        .map_err(|_| WeightsError::Missing {
            name: name.to_string(),
            expected: vec![],
        })
}

fn infer_config(
    tensors: &SafeTensors<'_>,
    recorded: Option<ModelConfig>,
    options: LoadOptions,
) -> Result<ModelConfig, WeightsError> {
    let embedding = shape_of(tensors, "embedding.weight")?;
    let [vocab, embedding_dim] = embedding[..] else {
        return Err(WeightsError::Shape {
            name: "embedding.weight".into(),
            expected: vec![VOCAB_SIZE, 0],
            found: embedding,
        });
    };
    if vocab != VOCAB_SIZE {
        return Err(WeightsError::Shape {
            name: "embedding.weight".into(),
            expected: vec![VOCAB_SIZE, embedding_dim],
            found: vec![vocab, embedding_dim],
        });
    }
    let num_layers = (0..)
        .take_while(|l| {
            tensors
                .tensor(&format!("encoder.layers.{l}.norm_1.gamma"))
                .is_ok()
        })
        .count();
    if num_layers == 0 {
        return Err(WeightsError::Missing {
            name: "encoder.layers.0.norm_1.gamma".into(),
            expected: vec![embedding_dim],
        });
    }
    let inner_name = "encoder.layers.0.pwff.linear_inner.weight";
    let inner = shape_of(tensors, inner_name)?;
    let [_, pwff_hidden_dim] = inner[..] else {
        return Err(WeightsError::Shape {
            name: inner_name.into(),
            expected: vec![embedding_dim, 0],
            found: inner,
        });
    };
    let recorded_heads = recorded
        .filter(|c| c.embedding_dim == embedding_dim)
        .map(|c| c.num_heads);
    let num_heads = match (options.num_heads, recorded_heads, options.preset) {
        (Some(flag), Some(file), _) if flag != file => {
            return Err(WeightsError::Shape0(format!(
                "--num-heads {flag} contradicts the {file} heads recorded in the file"
            )));
        }
        (Some(n), _, _) | (None, Some(n), _) => n,
        (None, None, Some(preset)) => preset.config().num_heads,
        (None, None, None) if embedding_dim == Preset::V1.config().embedding_dim => {
            Preset::V1.config().num_heads
        }
        (None, None, None) => return Err(WeightsError::UnknownHeads { embedding_dim }),
    };
    let config = ModelConfig {
        embedding_dim,
        num_layers,
        num_heads,
        pwff_hidden_dim,
        vocab_size: vocab,
    };
    config.validate().map_err(WeightsError::Shape0)?;
    if let Some(preset) = options.preset
        && preset.config() != config
    {
        return Err(WeightsError::ConfigMismatch {
            what: format!("preset '{preset}'"),
            expected: preset.config(),
            found: config,
        });
    }
    Ok(config)
}

fn convert_into(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), WeightsError> {
    match dtype {
        Dtype::F32 => {
            for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *dst = f32::from_le_bytes(src.try_into().expect("4-byte chunk"));
            }
        }
        Dtype::F64 => {
            for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *dst = f64::from_le_bytes(src.try_into().expect("8-byte chunk")) as f32;
            }
        }
        Dtype::BF16 => {
            for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *dst = half::bf16::from_le_bytes([src[0], src[1]]).to_f32();
            }
        }
        Dtype::F16 => {
            for (dst, src) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *dst = half::f16::from_le_bytes([src[0], src[1]]).to_f32();
            }
        }
        other => {
            return Err(WeightsError::Dtype {
                name: name.to_string(),
                found: format!("{other:?}"),
            });
        }
    }
    Ok(())
}

struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            std::borrow::Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Saves `weights` in the canonical layout (f32), recording the shape (and preset, if any) in
/// the metadata. The write is atomic: a temporary file is written and synced, then renamed over
/// `path`, so a crash leaves either the old file or the new one.
pub fn save_file(weights: &Weights, path: &Path) -> Result<(), WeightsError> {
    let specs = Weights::specs(&weights.config);
    let tensors = specs
        .into_iter()
        .zip(weights.tensors())
        .map(|(spec, (name, data))| (name, spec.shape, data))
        .collect();
    // One key only: safetensors writes metadata in hash-map order, and a single entry keeps the
    // file's bytes (and so its commitment) reproducible.
    let metadata = HashMap::from([(
        META_CONFIG.to_string(),
        serde_json::to_string(&weights.config).expect("config serialises"),
    )]);
    save_named(path, tensors, metadata)
}

/// Writes named f32 tensors (for example optimizer moments) as safetensors, atomically.
pub fn save_named(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, &[f32])>,
    metadata: HashMap<String, String>,
) -> Result<(), WeightsError> {
    let io_err = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let views: Vec<(String, F32View<'_>)> = tensors
        .into_iter()
        .map(|(name, shape, data)| (name, F32View { shape, data }))
        .collect();
    let tmp = temp_path_for(path);
    let result = safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| match e {
            safetensors::SafeTensorError::IoError(source) => io_err(source),
            other => WeightsError::NotSafetensors(other.to_string()),
        })
        .and_then(|()| finish_atomic(&tmp, path).map_err(io_err));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Fills every tensor of `into` from `prefix + canonical name` in a safetensors buffer, which
/// must hold each one as f32 with the canonical shape.
pub fn load_named_into(bytes: &[u8], prefix: &str, into: &mut Weights) -> Result<(), WeightsError> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| WeightsError::NotSafetensors(e.to_string()))?;
    let specs = Weights::specs(&into.config);
    for (spec, (name, buffer)) in specs.iter().zip(into.tensors_mut()) {
        let full = format!("{prefix}{name}");
        let view = tensors.tensor(&full).map_err(|_| WeightsError::Missing {
            name: full.clone(),
            expected: spec.shape.clone(),
        })?;
        if view.shape() != spec.shape.as_slice() {
            return Err(WeightsError::Shape {
                name: full,
                expected: spec.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(WeightsError::Dtype {
                name: full,
                found: format!("{:?}", view.dtype()),
            });
        }
        convert_into(&full, Dtype::F32, view.data(), buffer)?;
    }
    Ok(())
}

/// `path` with a `.tmp-<pid>` suffix, in the same directory so the rename stays atomic.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Creates the temporary file for `path` (see [`temp_path_for`]; a stale one of this process is
/// replaced) readable by its owner only from its first byte, for [`finish_atomic`] to move into
/// place.
pub fn create_private_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_path_for(path);
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    Ok((tmp, file))
}

/// Makes the finished temporary file readable by its owner only (0600: unpublished weights,
/// optimizer state and keys must not be world-readable), syncs it, renames it over `path` and
/// syncs the directory.
pub fn finish_atomic(tmp: &Path, path: &Path) -> io::Result<()> {
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o600))?;
    }
    File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates `dir` (and missing parents) readable by its owner only (0700), and tightens it to
/// 0700 if it already existed: run directories hold weights before they are published.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}
