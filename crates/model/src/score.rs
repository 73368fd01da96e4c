//! The network's scoring procedure: batches in order, batch `b` seeded `seed + b`, the loss and
//! embedding averaged over batches with equal weight (a running mean in f32), lowest loss wins.

use somatrain_data::{Batch, batch_count, batches};

use crate::config::{EVAL_BATCH_SIZE, MAX_SEQ_LEN};

/// Knobs of the procedure; the defaults are the network's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreOptions {
    pub max_seq_len: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            max_seq_len: MAX_SEQ_LEN,
            batch_size: EVAL_BATCH_SIZE,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("no data to score (0 bytes)")]
    EmptyData,
    #[error("invalid scoring options: {0}")]
    Options(String),
    #[error("backend failure: {0}")]
    Backend(String),
}

/// What one batch contributes.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// `cross_entropy + 0.02 * sigreg`.
    pub loss: f32,
    pub cross_entropy: f32,
    pub sigreg: f32,
    pub embedding: Vec<f32>,
}

/// Anything that can run the model on one batch and compute its loss terms.
pub trait BatchScorer {
    fn score_batch(&mut self, batch: &Batch, noise_seed: u64) -> Result<BatchOutput, ScoreError>;
}

/// The score of one model on one piece of data.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub loss: f32,
    pub embedding: Vec<f32>,
    pub batches: usize,
    pub tokens: usize,
}

/// `m += (x - m) / k` in f32, the first value stored as is: the scorer's running mean.
#[derive(Debug, Clone, Default)]
pub struct RunningMean {
    count: usize,
    value: Vec<f32>,
}

impl RunningMean {
    pub fn add(&mut self, x: &[f32]) {
        self.count += 1;
        if self.count == 1 {
            self.value = x.to_vec();
            return;
        }
        let k = self.count as f32;
        for (m, v) in self.value.iter_mut().zip(x) {
            *m += (v - *m) / k;
        }
    }

    pub fn value(&self) -> Option<&[f32]> {
        (self.count > 0).then_some(self.value.as_slice())
    }
}

/// Scores `data` the way the network does. `progress(done, total)` is called after each batch.
pub fn score_data(
    scorer: &mut dyn BatchScorer,
    data: &[u8],
    options: ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Score, ScoreError> {
    if options.max_seq_len == 0 || options.batch_size == 0 {
        return Err(ScoreError::Options(
            "max_seq_len and batch_size must be positive".into(),
        ));
    }
    if data.is_empty() {
        return Err(ScoreError::EmptyData);
    }
    let total = batch_count(data.len(), options.max_seq_len, options.batch_size);
    let mut loss = RunningMean::default();
    let mut embedding = RunningMean::default();
    let mut tokens = 0;
    for (index, batch) in batches(data, options.max_seq_len, options.batch_size).enumerate() {
        let out = scorer.score_batch(&batch, options.seed.wrapping_add(index as u64))?;
        loss.add(&[out.loss]);
        embedding.add(&out.embedding);
        tokens += batch.token_count();
        progress(index + 1, total);
    }
    Ok(Score {
        loss: loss.value().expect("non-empty data has a batch")[0],
        embedding: embedding
            .value()
            .expect("non-empty data has a batch")
            .to_vec(),
        batches: total,
        tokens,
    })
}

/// Index of the lowest loss; ties go to the first. As in the scorer, NaN never compares lower,
/// so a NaN wins only from index 0.
pub fn select_best(losses: &[f32]) -> Option<usize> {
    let mut best = 0;
    for (i, &l) in losses.iter().enumerate().skip(1) {
        if l < losses[best] {
            best = i;
        }
    }
    (!losses.is_empty()).then_some(best)
}

/// `1 - cos(a, b)`, in [0, 2]; NaN when either vector is zero (as the network computes it).
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    let norm = |v: &[f32]| {
        v.iter()
            .map(|x| (*x as f64) * (*x as f64))
            .sum::<f64>()
            .sqrt()
    };
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    (1.0 - dot / (norm(a) * norm(b))) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_mean_weights_every_value_equally() {
        let mut m = RunningMean::default();
        assert!(m.value().is_none());
        for x in [1.0f32, 2.0, 6.0] {
            m.add(&[x]);
        }
        assert_eq!(m.value().unwrap(), &[3.0]);
    }

    #[test]
    fn best_is_first_lowest() {
        assert_eq!(select_best(&[3.0, 1.0, 1.0]), Some(1));
        assert_eq!(select_best(&[2.0, f32::NAN, 1.5]), Some(2));
        assert_eq!(select_best(&[f32::NAN, 1.0]), Some(0));
        assert_eq!(select_best(&[]), None);
    }

    #[test]
    fn cosine_distance_basics() {
        assert!(cosine_distance(&[1.0, 0.0], &[1.0, 0.0]).abs() < 1e-7);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 2.0]) - 1.0).abs() < 1e-7);
        assert!((cosine_distance(&[1.0, 0.0], &[-3.0, 0.0]) - 2.0).abs() < 1e-7);
        assert!(cosine_distance(&[0.0, 0.0], &[1.0, 0.0]).is_nan());
    }
}
