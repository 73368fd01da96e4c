//! The network's data contract: how bytes become sequences and batches.
//!
//! Owns the exact cutting rules the scorer applies (see `shared/reference/model-v1.md`, "Data
//! contract"): fixed-length chunks, EOS only in a short final chunk, PAD after it, targets shifted
//! left with PAD last, and *global* position ids with PAD/EOS clamped to one past the last data
//! byte. Training uses the same functions so that it sees what scoring sees.
//!
//! Pure and deterministic: no IO, no randomness, no model code.
//!
//! - [`sequences`]: the chunks of one document, in order.
//! - [`Batch`] and [`batches`]: consecutive sequences stacked `batch_size` at a time.

#![forbid(unsafe_code)]

/// Token ids 0..=255 are bytes.
pub const PAD: u32 = 256;
pub const EOS: u32 = 257;
pub const VOCAB_SIZE: usize = 264;

/// One chunk of a document: `len` token ids with their targets and global positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub positions: Vec<u32>,
}

/// Number of chunks the data cuts into: `ceil(len / max_seq_len)`, zero for empty data.
pub fn sequence_count(data_len: usize, max_seq_len: usize) -> usize {
    data_len.div_ceil(max_seq_len)
}

/// Chunk `index` of `data` (0-based), built exactly as the scorer builds it.
///
/// # Panics
/// When `index` is not below [`sequence_count`] or `max_seq_len` is zero.
pub fn sequence(data: &[u8], max_seq_len: usize, index: usize) -> Sequence {
    assert!(max_seq_len > 0, "max_seq_len must be positive");
    assert!(
        index < sequence_count(data.len(), max_seq_len),
        "chunk {index} out of range"
    );
    let start = index * max_seq_len;
    let data_len = (data.len() - start).min(max_seq_len);
    let mut tokens = Vec::with_capacity(max_seq_len);
    tokens.extend(data[start..start + data_len].iter().map(|&b| b as u32));
    if data_len < max_seq_len {
        // Only a short chunk can be the last one, so this is "EOS only in the final chunk".
        tokens.push(EOS);
        tokens.resize(max_seq_len, PAD);
    }
    let mut targets = Vec::with_capacity(max_seq_len);
    targets.extend_from_slice(&tokens[1..]);
    targets.push(PAD);
    let clamped = (start + data_len) as u32;
    let positions = (0..max_seq_len)
        .map(|i| {
            if i < data_len {
                (start + i) as u32
            } else {
                clamped
            }
        })
        .collect();
    Sequence {
        tokens,
        targets,
        positions,
    }
}

/// All chunks of `data`, in order.
pub fn sequences(data: &[u8], max_seq_len: usize) -> impl Iterator<Item = Sequence> + '_ {
    (0..sequence_count(data.len(), max_seq_len)).map(move |i| sequence(data, max_seq_len, i))
}

/// Sequences stacked row-major: `[batch, seq_len]` for each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub positions: Vec<u32>,
}

impl Batch {
    pub fn from_sequences(seqs: &[Sequence]) -> Batch {
        assert!(!seqs.is_empty(), "a batch holds at least one sequence");
        let seq_len = seqs[0].tokens.len();
        let mut batch = Batch {
            batch: seqs.len(),
            seq_len,
            tokens: Vec::with_capacity(seqs.len() * seq_len),
            targets: Vec::with_capacity(seqs.len() * seq_len),
            positions: Vec::with_capacity(seqs.len() * seq_len),
        };
        for s in seqs {
            assert_eq!(
                s.tokens.len(),
                seq_len,
                "sequences in a batch share one length"
            );
            batch.tokens.extend_from_slice(&s.tokens);
            batch.targets.extend_from_slice(&s.targets);
            batch.positions.extend_from_slice(&s.positions);
        }
        batch
    }

    pub fn token_count(&self) -> usize {
        self.batch * self.seq_len
    }

    /// Targets that are real bytes or EOS, not PAD: what a per-byte loss divides by.
    pub fn real_target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != PAD).count()
    }
}

/// Number of batches the scorer makes of `data_len` bytes.
pub fn batch_count(data_len: usize, max_seq_len: usize, batch_size: usize) -> usize {
    sequence_count(data_len, max_seq_len).div_ceil(batch_size)
}

/// Consecutive chunks of `data`, `batch_size` at a time; the last batch may be smaller.
pub fn batches(
    data: &[u8],
    max_seq_len: usize,
    batch_size: usize,
) -> impl Iterator<Item = Batch> + '_ {
    assert!(batch_size > 0, "batch_size must be positive");
    let total = sequence_count(data.len(), max_seq_len);
    (0..total).step_by(batch_size).map(move |first| {
        let seqs: Vec<Sequence> = (first..(first + batch_size).min(total))
            .map(|i| sequence(data, max_seq_len, i))
            .collect();
        Batch::from_sequences(&seqs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_gets_eos_and_clamped_positions() {
        let s = sequence(&[0], 4, 0);
        assert_eq!(s.tokens, vec![0, EOS, PAD, PAD]);
        assert_eq!(s.positions, vec![0, 1, 1, 1]);
        assert_eq!(s.targets, vec![EOS, PAD, PAD, PAD]);
    }

    #[test]
    fn second_chunk_uses_global_offsets() {
        let data: Vec<u8> = (0..10).collect();
        let s = sequence(&data, 6, 1);
        assert_eq!(s.tokens, vec![6, 7, 8, 9, EOS, PAD]);
        assert_eq!(s.positions, vec![6, 7, 8, 9, 10, 10]);
        assert_eq!(s.targets, vec![7, 8, 9, EOS, PAD, PAD]);
    }

    #[test]
    fn exact_multiple_has_no_eos_and_never_targets_next_chunk() {
        let data: Vec<u8> = (0..10).collect();
        let all: Vec<Sequence> = sequences(&data, 5).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].tokens, vec![0, 1, 2, 3, 4]);
        assert_eq!(all[1].tokens, vec![5, 6, 7, 8, 9]);
        assert_eq!(all[0].targets, vec![1, 2, 3, 4, PAD]);
        assert_eq!(all[1].targets, vec![6, 7, 8, 9, PAD]);
        assert_eq!(all[1].positions, vec![5, 6, 7, 8, 9]);
        assert!(all.iter().all(|s| !s.tokens.contains(&EOS)));
    }

    #[test]
    fn chunk_counts() {
        for (size, expected) in [(0, 0), (1, 1), (9, 1), (10, 1), (11, 2), (20, 2), (21, 3)] {
            assert_eq!(sequence_count(size, 10), expected, "size {size}");
        }
    }

    /// The edge lengths around the real sequence length of 1024.
    #[test]
    fn edge_lengths_at_1024() {
        let seq = 1024;
        for len in [0usize, 1, 1023, 1024, 1025] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let all: Vec<Sequence> = sequences(&data, seq).collect();
            assert_eq!(all.len(), len.div_ceil(seq), "len {len}");
            let eos_count: usize = all
                .iter()
                .map(|s| s.tokens.iter().filter(|&&t| t == EOS).count())
                .sum();
            assert_eq!(
                eos_count,
                usize::from(len % seq != 0),
                "len {len}: EOS count"
            );
            for (k, s) in all.iter().enumerate() {
                assert_eq!(s.tokens.len(), seq);
                assert_eq!(*s.targets.last().unwrap(), PAD);
                let start = k * seq;
                let data_len = (len - start).min(seq);
                for i in 0..seq {
                    if i < data_len {
                        assert_eq!(s.tokens[i], data[start + i] as u32);
                        assert_eq!(s.positions[i] as usize, start + i);
                    } else {
                        assert_eq!(s.positions[i] as usize, start + data_len);
                    }
                }
                for i in 0..seq - 1 {
                    assert_eq!(s.targets[i], s.tokens[i + 1]);
                }
            }
        }
        // 1025 bytes: the second chunk holds one byte, then EOS at index 1.
        let data = vec![9u8; 1025];
        let last = sequence(&data, seq, 1);
        assert_eq!(&last.tokens[..3], &[9, EOS, PAD]);
        assert_eq!(&last.positions[..3], &[1024, 1025, 1025]);
    }

    #[test]
    fn batches_in_order_with_short_last() {
        let data: Vec<u8> = (0..24).collect();
        let all: Vec<Batch> = batches(&data, 4, 4).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].batch, 4);
        assert_eq!(all[1].batch, 2);
        assert_eq!(&all[1].tokens[..4], &[16, 17, 18, 19]);
        assert_eq!(batch_count(24, 4, 4), 2);
        assert_eq!(batches(&[], 4, 4).count(), 0);
    }
}
