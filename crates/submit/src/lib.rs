//! The data submitter's side of the network: find which of a target's models explains some data
//! best, check that model's embedding of the data lands within the target's threshold, upload
//! the data and submit it with its bond; later, claim the rewards.
//!
//! Owns the weights cache (encrypted downloads kept by checksum, verified on every use, models
//! kept in memory across targets) and the choice of hits. It uses the model crate's scorer, the
//! storage crate's uploads and the client's transactions: it reaches the chain only through the
//! client crate's `ChainClient`, never over a protocol of its own.

#![forbid(unsafe_code)]

use somatrain_protocol::transaction::{ClaimRewards, SubmitData};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use somatrain_client::chain::{ChainClient, ChainError, Executed};
use somatrain_client::view::{ModelState, ModelView, TargetView};
use somatrain_model::Weights;
use somatrain_model::cpu::CpuModel;
use somatrain_model::score::{BatchScorer, Score, ScoreOptions, cosine_distance, score_data};
use somatrain_protocol::crypto::{Commitment, EncryptionKey, decrypt_stream};
use somatrain_protocol::{Keypair, ObjectId, SomaTensor, TransactionKind};
use somatrain_storage::{Storage, StorageError, download_verified};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Network(#[from] ChainError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("model {0} has no revealed weights (it is {1})")]
    NotRevealed(ObjectId, &'static str),
    #[error("weights of model {model}: {reason}")]
    Weights { model: ObjectId, reason: String },
    #[error("scoring: {0}")]
    Score(String),
    #[error("target {0} is not open ({1})")]
    TargetNotOpen(ObjectId, String),
    #[error("the data is {size} bytes; submissions hold at most {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("{0}")]
    Io(String),
}

/// Makes the scorer of loaded weights on a device (the CPU kernels, or libtorch's devices in the
/// binary's `torch` build).
pub type ScorerFactory =
    std::sync::Arc<dyn Fn(Weights) -> Result<Box<dyn BatchScorer + Send>, String> + Send + Sync>;

/// The hand-written CPU kernels as a [`ScorerFactory`].
pub fn cpu_scorers() -> ScorerFactory {
    std::sync::Arc::new(|weights| {
        Ok(Box::new(CpuModel::new(weights)) as Box<dyn BatchScorer + Send>)
    })
}

/// Revealed models, downloaded once (the encrypted file is cached on disk under its checksum and
/// re-verified on every load) and kept in memory across targets.
pub struct ModelCache {
    dir: PathBuf,
    http: reqwest::Client,
    scorers: ScorerFactory,
    loaded: HashMap<ObjectId, (Commitment, Box<dyn BatchScorer + Send>)>,
    /// Encrypted files on disk are evicted, least recently used first, above this many bytes.
    disk_limit: Option<u64>,
    downloads: u64,
}

impl ModelCache {
    /// Scores on the CPU kernels.
    pub fn new(dir: &Path) -> Self {
        Self::with_scorers(dir, cpu_scorers())
    }

    /// Scores with what `scorers` makes (a device's scorer).
    pub fn with_scorers(dir: &Path, scorers: ScorerFactory) -> Self {
        ModelCache {
            dir: dir.to_path_buf(),
            http: somatrain_client::http_client(),
            scorers,
            loaded: HashMap::new(),
            disk_limit: None,
            downloads: 0,
        }
    }

    /// Keeps the encrypted files on disk within `bytes` (the files of models in memory are
    /// never evicted, so the limit may be exceeded by those).
    pub fn with_disk_limit(mut self, bytes: u64) -> Self {
        self.disk_limit = Some(bytes);
        self
    }

    /// Weights downloaded by this cache (not found, or found corrupted, on disk).
    pub fn downloads(&self) -> u64 {
        self.downloads
    }

    /// Drops the models in memory that are not in `keep` (their files stay on disk).
    pub fn retain(&mut self, keep: &std::collections::HashSet<ObjectId>) {
        self.loaded.retain(|id, _| keep.contains(id));
    }

    fn evict(&self) {
        let Some(limit) = self.disk_limit else {
            return;
        };
        let in_use: std::collections::HashSet<String> = self
            .loaded
            .values()
            .map(|(checksum, _)| format!("{checksum}.safetensors.enc"))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(".safetensors.enc")
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                let used = meta.modified().ok()?;
                Some((used, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, size, _)| size).sum();
        files.sort();
        for (_, size, path) in files {
            if total <= limit {
                break;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if in_use.contains(name.as_ref()) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(
                    "weights cache over {limit} bytes: evicted {}",
                    path.display()
                );
                total -= size;
            }
        }
    }

    /// The scorer of a revealed model (its current weights).
    pub async fn model(
        &mut self,
        model: &ModelView,
    ) -> Result<&mut (dyn BatchScorer + Send), SubmitError> {
        let (Some(manifest), Some(key)) = (&model.manifest, &model.decryption_key) else {
            return Err(SubmitError::NotRevealed(model.id, model.state.name()));
        };
        let fresh = self
            .loaded
            .get(&model.id)
            .is_some_and(|(checksum, _)| *checksum == manifest.checksum);
        if !fresh {
            let encrypted = self
                .dir
                .join(format!("{}.safetensors.enc", manifest.checksum));
            let cached_ok = match std::fs::File::open(&encrypted) {
                Ok(file) => Commitment::of_reader(std::io::BufReader::new(file))
                    .is_ok_and(|(c, size)| c == manifest.checksum && size == manifest.size),
                Err(_) => false,
            };
            if !cached_ok {
                tracing::info!(
                    "downloading the weights of model {} ({} bytes)",
                    model.id,
                    manifest.size
                );
                download_verified(&self.http, manifest, &encrypted).await?;
                self.downloads += 1;
            } else {
                // Eviction goes by modification time: access times are often not kept.
                if let Ok(file) = std::fs::File::options().append(true).open(&encrypted) {
                    let _ = file.set_modified(std::time::SystemTime::now());
                }
            }
            let key = EncryptionKey::from_bytes(key.0);
            let (id, enc, scorers) = (model.id, encrypted.clone(), self.scorers.clone());
            let loaded = tokio::task::spawn_blocking(move || {
                let weights = decrypt_and_load(id, &key, &enc)?;
                scorers(weights).map_err(|reason| SubmitError::Weights { model: id, reason })
            })
            .await
            .map_err(|e| SubmitError::Io(e.to_string()))??;
            self.loaded.insert(model.id, (manifest.checksum, loaded));
            self.evict();
        }
        Ok(self
            .loaded
            .get_mut(&model.id)
            .expect("just loaded")
            .1
            .as_mut())
    }
}

fn decrypt_and_load(
    model: ObjectId,
    key: &EncryptionKey,
    encrypted: &Path,
) -> Result<Weights, SubmitError> {
    let fail = |reason: String| SubmitError::Weights { model, reason };
    let plain = encrypted.with_extension(format!("plain-{}", std::process::id()));
    let result = (|| {
        let input = std::fs::File::open(encrypted).map_err(|e| fail(e.to_string()))?;
        let output = std::fs::File::create(&plain).map_err(|e| fail(e.to_string()))?;
        decrypt_stream(
            key,
            std::io::BufReader::new(input),
            std::io::BufWriter::new(output),
        )
        .map_err(|e| fail(e.to_string()))?;
        somatrain_model::io::load_file_any_width(&plain)
            .map_err(|e| fail(format!("the decrypted weights do not load: {e}")))
    })();
    let _ = std::fs::remove_file(&plain);
    result
}

/// One model's score of the data: the network's loss and embedding.
pub fn score(model: &mut dyn BatchScorer, data: &[u8]) -> Result<Score, SubmitError> {
    score_data(model, data, ScoreOptions::default(), &mut |_, _| {})
        .map_err(|e| SubmitError::Score(e.to_string()))
}

/// The outcome of some data against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub target_id: ObjectId,
    /// The assigned model with the lowest loss: the one the data is submitted with.
    pub model_id: ObjectId,
    pub loss: f32,
    pub embedding: Vec<f32>,
    pub distance: f32,
    pub threshold: f32,
    pub hit: bool,
    /// Loss of every assigned model that was scored.
    pub losses: Vec<(ObjectId, f32)>,
}

/// Picks the lowest-loss model among the target's and measures its embedding's distance.
/// `scores` holds each model's score of the same data.
pub fn evaluate(target: &TargetView, scores: &HashMap<ObjectId, Score>) -> Option<Evaluation> {
    let losses: Vec<(ObjectId, f32)> = target
        .model_ids
        .iter()
        .filter_map(|id| scores.get(id).map(|s| (*id, s.loss)))
        .collect();
    // Ties go to the earlier (better-assigned) model, as the order of model_ids says.
    let (model_id, loss) =
        losses
            .iter()
            .copied()
            .fold(None::<(ObjectId, f32)>, |best, (id, loss)| match best {
                Some((_, l)) if l <= loss => best,
                _ => Some((id, loss)),
            })?;
    let embedding = scores[&model_id].embedding.clone();
    let distance = cosine_distance(&embedding, &target.embedding);
    Some(Evaluation {
        target_id: target.id,
        model_id,
        loss,
        hit: distance.is_finite() && distance <= target.distance_threshold,
        distance,
        threshold: target.distance_threshold,
        embedding,
        losses,
    })
}

/// Scores `data` with every active model among `model_ids` (one pass per model).
pub async fn score_with_models(
    chain: &ChainClient,
    cache: &mut ModelCache,
    model_ids: &[ObjectId],
    data: &[u8],
) -> Result<HashMap<ObjectId, Score>, SubmitError> {
    let epoch = chain.epoch_view().await?;
    let mut scores = HashMap::new();
    for id in model_ids {
        if scores.contains_key(id) {
            continue;
        }
        let Some(model) = epoch.model(id) else {
            tracing::warn!("model {id} is not in the registry; skipped");
            continue;
        };
        if model.state != ModelState::Active {
            tracing::warn!("model {id} is {}; skipped", model.state.name());
            continue;
        }
        let scorer = cache.model(model).await?;
        let started = std::time::Instant::now();
        let score = score(scorer, data)?;
        tracing::info!(
            "model {id}: loss {:.4} on {} bytes ({:.0} tokens/s)",
            score.loss,
            data.len(),
            score.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
        );
        scores.insert(*id, score);
    }
    Ok(scores)
}

/// Refuses what the chain would refuse before anything is uploaded.
pub fn precheck(target: &TargetView, size: u64, max_bytes: u64) -> Result<(), SubmitError> {
    if target.status != "open" {
        let when = match (target.status.as_str(), target.fill_epoch) {
            ("filled" | "claimed", Some(e)) => format!("{} in epoch {e}", target.status),
            ("expired", _) => format!("expired with epoch {}", target.generation_epoch),
            (other, _) => other.to_string(),
        };
        return Err(SubmitError::TargetNotOpen(target.id, when));
    }
    if size > max_bytes {
        return Err(SubmitError::TooLarge {
            size,
            max: max_bytes,
        });
    }
    Ok(())
}

/// Uploads the data (checked by reading it back) and submits it with the evaluation's model,
/// embedding, distance and loss. The bond (size x bond per byte) is taken from the gas coin.
/// An executed submission that failed (its fee paid) is returned as executed: see its status.
pub async fn submit_hit(
    chain: &ChainClient,
    keypair: &Keypair,
    storage: &Storage,
    evaluation: &Evaluation,
    data: &[u8],
) -> Result<Executed, SubmitError> {
    let checksum = Commitment::of_bytes(data);
    let name = format!("data-{}.bin", &checksum.to_base58()[..16]);
    let manifest = storage.upload_bytes(&name, data).await?;
    let embedding = SomaTensor::vector(&evaluation.embedding);
    let executed = chain
        .sign_and_execute(keypair, |gas| {
            TransactionKind::SubmitData(SubmitData {
                target_id: evaluation.target_id,
                data_manifest: manifest.clone(),
                model_id: evaluation.model_id,
                embedding: embedding.clone(),
                distance_score: SomaTensor::scalar(evaluation.distance),
                loss_score: SomaTensor::vector(&[evaluation.loss]),
                bond_coin: gas[0],
            })
        })
        .await?;
    Ok(executed)
}

/// What `claim` settled (or failed to).
#[derive(Debug)]
pub struct ClaimOutcome {
    pub target_id: ObjectId,
    pub reward_pool: u64,
    pub expired: bool,
    pub result: Result<Executed, ChainError>,
}

/// Claims every claimable target in which the wallet is the submitter or owns the winning
/// model, and (with `expired`) every expired target, for the claimer's share.
pub async fn claim_all(
    chain: &ChainClient,
    keypair: &Keypair,
    expired: bool,
) -> Result<Vec<ClaimOutcome>, SubmitError> {
    let me = keypair.address();
    let epoch = chain.epoch_view().await?;
    let mut outcomes = Vec::new();
    for target in chain.target_views("claimable").await? {
        let is_expired = target.status == "expired";
        let owns_winner = target
            .winning_model_id
            .and_then(|m| epoch.model(&m))
            .is_some_and(|m| m.owner == me);
        let mine = target.submitter == Some(me) || owns_winner;
        if !(mine || (expired && is_expired)) {
            continue;
        }
        let result = chain
            .sign_and_execute(keypair, |_| {
                TransactionKind::ClaimRewards(ClaimRewards {
                    target_id: target.id,
                })
            })
            .await;
        outcomes.push(ClaimOutcome {
            target_id: target.id,
            reward_pool: target.reward_pool,
            expired: is_expired,
            result,
        });
    }
    Ok(outcomes)
}

/// Targets filled by `me` (or won by my model) that are not claimable yet, with the first
/// epoch they will be.
pub async fn pending_claims(
    chain: &ChainClient,
    keypair: &Keypair,
) -> Result<Vec<(ObjectId, u64)>, SubmitError> {
    let me = keypair.address();
    let epoch = chain.epoch_view().await?;
    Ok(chain
        .target_views("filled")
        .await?
        .into_iter()
        .filter(|t| {
            t.submitter == Some(me)
                || t.winning_model_id
                    .and_then(|m| epoch.model(&m))
                    .is_some_and(|m| m.owner == me)
        })
        .filter_map(|t| t.fill_epoch.map(|e| (t.id, e + 2)))
        .collect())
}

/// A piece of a corpus file, at most the chain's submission size.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub source: PathBuf,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Splits every regular file under `dir` (sorted, so runs are repeatable) into chunks of at most
/// `chunk_bytes`, stopping after `max_chunks`. Empty and unreadable files are skipped.
pub fn corpus_chunks(
    dir: &Path,
    chunk_bytes: usize,
    max_chunks: usize,
) -> Result<Vec<Chunk>, SubmitError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| SubmitError::Io(format!("{}: {e}", d.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files.sort();
    let mut chunks = Vec::new();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            tracing::warn!("{} cannot be read; skipped", path.display());
            continue;
        };
        for (i, piece) in bytes.chunks(chunk_bytes.max(1)).enumerate() {
            if chunks.len() == max_chunks {
                return Ok(chunks);
            }
            chunks.push(Chunk {
                source: path.clone(),
                offset: (i * chunk_bytes) as u64,
                data: piece.to_vec(),
            });
        }
    }
    Ok(chunks)
}

/// A chosen submission of `--auto`.
#[derive(Debug, Clone)]
pub struct Hit {
    pub chunk: usize,
    pub evaluation: Evaluation,
}

/// Chooses hits: the closest first, each target and each chunk at most once, within
/// `max_submissions` and a total bond of `max_bond` shannons.
pub fn choose_hits(
    mut candidates: Vec<Hit>,
    sizes: &[u64],
    bond_per_byte: u64,
    max_submissions: usize,
    max_bond: u64,
) -> Vec<Hit> {
    candidates.sort_by(|a, b| a.evaluation.distance.total_cmp(&b.evaluation.distance));
    let mut used_targets = std::collections::HashSet::new();
    let mut used_chunks = std::collections::HashSet::new();
    let mut bond = 0u64;
    let mut chosen = Vec::new();
    for hit in candidates {
        if chosen.len() == max_submissions {
            break;
        }
        let cost = sizes[hit.chunk] * bond_per_byte;
        if used_targets.contains(&hit.evaluation.target_id)
            || used_chunks.contains(&hit.chunk)
            || bond + cost > max_bond
        {
            continue;
        }
        used_targets.insert(hit.evaluation.target_id);
        used_chunks.insert(hit.chunk);
        bond += cost;
        chosen.push(hit);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: u8, embedding: Vec<f32>, models: &[u8], threshold: f32) -> TargetView {
        TargetView {
            id: ObjectId([id; 32]),
            embedding,
            model_ids: models.iter().map(|m| ObjectId([*m; 32])).collect(),
            distance_threshold: threshold,
            reward_pool: 0,
            generation_epoch: 0,
            status: "open".into(),
            fill_epoch: None,
            submitter: None,
            winning_model_id: None,
            winning_model_owner: None,
            bond_amount: 0,
            data_url: None,
        }
    }

    fn scored(loss: f32, embedding: Vec<f32>) -> Score {
        Score {
            loss,
            embedding,
            batches: 1,
            tokens: 1,
        }
    }

    #[test]
    fn the_lowest_loss_model_decides_the_distance() {
        let mut scores = HashMap::new();
        scores.insert(ObjectId([1; 32]), scored(2.0, vec![1.0, 0.0]));
        scores.insert(ObjectId([2; 32]), scored(1.5, vec![0.0, 1.0]));
        scores.insert(ObjectId([9; 32]), scored(0.1, vec![1.0, 0.0])); // not assigned
        // Model 2 wins (1.5 < 2.0); its embedding is orthogonal to the target: distance 1.
        let t = target(7, vec![1.0, 0.0], &[1, 2], 0.5);
        let e = evaluate(&t, &scores).unwrap();
        assert_eq!(e.model_id, ObjectId([2; 32]));
        assert_eq!(e.loss, 1.5);
        assert!((e.distance - 1.0).abs() < 1e-6);
        assert!(!e.hit);
        // Against a target along (0, 1), the same data is a hit at distance 0.
        let t = target(8, vec![0.0, 3.0], &[1, 2], 0.5);
        let e = evaluate(&t, &scores).unwrap();
        assert!(e.distance.abs() < 1e-6 && e.hit);
        // No assigned model scored: nothing to evaluate.
        assert!(evaluate(&target(9, vec![1.0, 0.0], &[5], 1.0), &scores).is_none());
    }

    #[test]
    fn equal_losses_go_to_the_better_assigned_model() {
        let mut scores = HashMap::new();
        scores.insert(ObjectId([1; 32]), scored(1.0, vec![1.0, 0.0]));
        scores.insert(ObjectId([2; 32]), scored(1.0, vec![0.0, 1.0]));
        let e = evaluate(&target(7, vec![1.0, 0.0], &[2, 1], 0.5), &scores).unwrap();
        assert_eq!(e.model_id, ObjectId([2; 32]));
    }

    fn hit(chunk: usize, target: u8, distance: f32) -> Hit {
        Hit {
            chunk,
            evaluation: Evaluation {
                target_id: ObjectId([target; 32]),
                model_id: ObjectId([1; 32]),
                loss: 1.0,
                embedding: vec![],
                distance,
                threshold: 1.0,
                hit: true,
                losses: vec![],
            },
        }
    }

    #[test]
    fn hits_are_chosen_closest_first_once_per_target_and_chunk_within_budget() {
        let candidates = vec![
            hit(0, 1, 0.9),
            hit(1, 1, 0.5),
            hit(1, 2, 0.6),
            hit(2, 2, 0.7),
            hit(3, 3, 0.8),
        ];
        let sizes = [10, 10, 10, 1000];
        // Budget of 100 shannons at 1 per byte: chunk 3 (1000 bytes) does not fit.
        let chosen = choose_hits(candidates, &sizes, 1, 10, 100);
        let picked: Vec<(usize, u8)> = chosen
            .iter()
            .map(|h| (h.chunk, h.evaluation.target_id.0[0]))
            .collect();
        // (1, t1) at 0.5; (1, t2) skipped (chunk 1 used); (2, t2) at 0.7; (0, t1) skipped (t1 used).
        assert_eq!(picked, vec![(1, 1), (2, 2)]);
        let chosen = choose_hits(vec![hit(0, 1, 0.1), hit(1, 2, 0.2)], &[1, 1], 1, 1, 100);
        assert_eq!(chosen.len(), 1, "at most max_submissions");
    }

    #[test]
    fn a_corpus_is_cut_into_bounded_chunks_in_a_stable_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), vec![b'b'; 25]).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), vec![b'a'; 5]).unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let chunks = corpus_chunks(dir.path(), 10, 100).unwrap();
        let shape: Vec<(String, u64, usize)> = chunks
            .iter()
            .map(|c| {
                (
                    c.source.file_name().unwrap().to_string_lossy().into(),
                    c.offset,
                    c.data.len(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("b.txt".into(), 0, 10),
                ("b.txt".into(), 10, 10),
                ("b.txt".into(), 20, 5),
                ("a.txt".into(), 0, 5)
            ]
        );
        assert_eq!(corpus_chunks(dir.path(), 10, 2).unwrap().len(), 2);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// Above the limit, the least recently used encrypted files go first; other files stay.
    #[test]
    fn the_disk_cache_evicts_the_least_recently_used_above_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        for (name, age_s) in [("old", 300), ("middle", 200), ("new", 100)] {
            let path = dir.path().join(format!("{name}.safetensors.enc"));
            std::fs::write(&path, [0u8; 100]).unwrap();
            let file = std::fs::File::options().append(true).open(&path).unwrap();
            file.set_modified(now - std::time::Duration::from_secs(age_s))
                .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), [0u8; 1000]).unwrap();
        let cache = ModelCache::new(dir.path()).with_disk_limit(250);
        cache.evict();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["middle.safetensors.enc", "new.safetensors.enc", "notes.txt"]
        );
        ModelCache::new(dir.path()).with_disk_limit(0).evict();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
