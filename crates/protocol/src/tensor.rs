//! `SomaTensor`: how embeddings, distances and losses travel in transactions and objects.
//!
//! BCS: `u8 dtype` (0 = f32) ‖ `Vec<u8>` of little-endian f32 bytes ‖ `Vec<u64>` shape. The
//! network hashes exactly these bytes for the embedding commitment.

use serde::{Deserialize, Serialize};

/// The only element type the network uses.
pub const DTYPE_F32: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SomaTensor {
    dtype: u8,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    shape: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor dtype {0} is not f32 (0)")]
    Dtype(u8),
    #[error("tensor holds {bytes} bytes but its shape {shape:?} needs {expected}")]
    Size {
        bytes: usize,
        shape: Vec<u64>,
        expected: u128,
    },
    #[error("expected a tensor of shape {expected:?}, got {got:?}")]
    Shape { expected: Vec<u64>, got: Vec<u64> },
}

impl SomaTensor {
    /// A 1-D tensor of shape `[len]` (embeddings, loss scores).
    pub fn vector(values: &[f32]) -> Self {
        Self::with_shape(values, vec![values.len() as u64])
    }

    /// Shape `[1]`, as the network signs a distance score.
    pub fn scalar(value: f32) -> Self {
        Self::vector(&[value])
    }

    fn with_shape(values: &[f32], shape: Vec<u64>) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        SomaTensor {
            dtype: DTYPE_F32,
            data,
            shape,
        }
    }

    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Checks dtype and that the bytes match the shape, then returns the values in order.
    pub fn values(&self) -> Result<Vec<f32>, TensorError> {
        if self.dtype != DTYPE_F32 {
            return Err(TensorError::Dtype(self.dtype));
        }
        let expected = self
            .shape
            .iter()
            .try_fold(4u128, |acc, &d| acc.checked_mul(d as u128))
            .unwrap_or(u128::MAX);
        if self.data.len() as u128 != expected {
            return Err(TensorError::Size {
                bytes: self.data.len(),
                shape: self.shape.clone(),
                expected,
            });
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The values of a tensor that must be 1-D (of any length).
    pub fn vector_values(&self) -> Result<Vec<f32>, TensorError> {
        if self.shape.len() != 1 {
            return Err(TensorError::Shape {
                expected: vec![self.data.len() as u64 / 4],
                got: self.shape.clone(),
            });
        }
        self.values()
    }

    /// The value of a tensor that must have shape `[1]`.
    pub fn scalar_value(&self) -> Result<f32, TensorError> {
        if self.shape != [1] {
            return Err(TensorError::Shape {
                expected: vec![1],
                got: self.shape.clone(),
            });
        }
        Ok(self.values()?[0])
    }

    pub fn to_bcs(&self) -> Vec<u8> {
        bcs::to_bytes(self).expect("tensors encode")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_round_trips_and_refuses_inconsistent_bytes() {
        let t = SomaTensor::vector(&[0.5, -1.0]);
        let back: SomaTensor = bcs::from_bytes(&t.to_bcs()).unwrap();
        assert_eq!(back.vector_values().unwrap(), vec![0.5, -1.0]);
        assert!(matches!(
            back.scalar_value(),
            Err(TensorError::Shape { .. })
        ));
        let lying = SomaTensor {
            dtype: 0,
            data: vec![0; 4],
            shape: vec![2],
        };
        assert!(matches!(lying.values(), Err(TensorError::Size { .. })));
        let huge = SomaTensor {
            dtype: 0,
            data: vec![],
            shape: vec![u64::MAX, u64::MAX, 2],
        };
        assert!(matches!(huge.values(), Err(TensorError::Size { .. })));
        let f16 = SomaTensor {
            dtype: 1,
            ..SomaTensor::scalar(1.0)
        };
        assert_eq!(f16.values(), Err(TensorError::Dtype(1)));
        assert_eq!(SomaTensor::scalar(0.9).scalar_value().unwrap(), 0.9);
    }
}
