//! The padded encoder batch and the checks every input passes before it joins one.

use candle_core::{DType, Device, Tensor, D};

use crate::encoder::EncoderInput;
use crate::error::{EngineError, Result};

/// What a model accepts as input, to refuse a bad batch before any tensor work.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Segment ids must be below this.
    pub type_vocab_size: usize,
    /// Sequences may be at most this long.
    pub max_positions: usize,
    /// Whether a token sees only itself and earlier tokens (config.json's `is_decoder`), as
    /// transformers' extended attention mask makes it.
    pub causal: bool,
}

/// A batch of sequences padded on the right to the longest, as tensors on the model's device.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[batch, seq_len]` token ids, 0 in padding.
    pub input_ids: Tensor,
    /// `[batch, seq_len]` segment ids, 0 in padding.
    pub token_type_ids: Tensor,
    /// Additive f32 mask over the keys, `[batch, 1, 1, seq_len]` (`[batch, 1, seq_len,
    /// seq_len]` when causal): 0 where a query may see a key and f32::MIN elsewhere, as
    /// transformers' `(1 - mask) * finfo.min`. Broadcasts over heads.
    pub attention_mask: Tensor,
    /// `[batch, seq_len, 1]` in the model's dtype: 1 at real tokens, 0 in padding.
    pub token_mask: Tensor,
    /// `[real tokens]` u32 indexes of the real tokens in the flattened `[batch * seq_len]`.
    pub real_tokens: Tensor,
    /// Each sequence's length.
    pub lengths: Vec<usize>,
    /// Columns of the padded batch.
    pub seq_len: usize,
}

impl PaddedBatch {
    /// Pads `inputs` after checking them against `limits`.
    pub fn new(
        inputs: &[EncoderInput],
        limits: &InputLimits,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for input in inputs {
            validate(input, limits)?;
        }
        let batch = inputs.len();
        let lengths: Vec<usize> = inputs.iter().map(|input| input.ids.len()).collect();
        let seq_len = lengths.iter().copied().max().unwrap_or(0);
        let mut input_ids = vec![0u32; batch * seq_len];
        let mut type_ids = vec![0u32; batch * seq_len];
        let mut token_mask = vec![0f32; batch * seq_len];
        let mut real_tokens = Vec::with_capacity(lengths.iter().sum());
        for (row, input) in inputs.iter().enumerate() {
            let start = row * seq_len;
            let len = input.ids.len();
            input_ids[start..start + len].copy_from_slice(&input.ids);
            type_ids[start..start + len].copy_from_slice(&input.type_ids);
            token_mask[start..start + len].fill(1.0);
            real_tokens.extend((start..start + len).map(|i| i as u32));
        }
        let hidden = |visible: bool| if visible { 0.0 } else { f32::MIN };
        let attention_mask = if limits.causal {
            let mut mask = Vec::with_capacity(batch * seq_len * seq_len);
            for &len in &lengths {
                for query in 0..seq_len {
                    mask.extend((0..seq_len).map(|key| hidden(key < len && key <= query)));
                }
            }
            Tensor::from_vec(mask, (batch, 1, seq_len, seq_len), device)?
        } else {
            let mask = token_mask.iter().map(|&m| hidden(m == 1.0)).collect();
            Tensor::from_vec(mask, (batch, 1, 1, seq_len), device)?
        };
        let real_count = real_tokens.len();
        Ok(Self {
            input_ids: Tensor::from_vec(input_ids, (batch, seq_len), device)?,
            token_type_ids: Tensor::from_vec(type_ids, (batch, seq_len), device)?,
            attention_mask,
            token_mask: Tensor::from_vec(token_mask, (batch, seq_len, 1), device)?
                .to_dtype(dtype)?,
            real_tokens: Tensor::from_vec(real_tokens, real_count, device)?,
            lengths,
            seq_len,
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// The real tokens' rows of `x` (`[batch, seq_len, dim]`), all sequences one after the
    /// other: `[real tokens, dim]`.
    pub fn real_rows(&self, x: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let flat = x.reshape((self.batch_size() * self.seq_len, dim))?;
        Ok(flat.index_select(&self.real_tokens, 0)?)
    }

    /// Splits per-token rows (as [`PaddedBatch::real_rows`] orders them) into one list per
    /// sequence.
    pub fn split_by_sequence<T>(&self, rows: Vec<T>) -> Vec<Vec<T>> {
        let mut rows = rows.into_iter();
        self.lengths
            .iter()
            .map(|&len| rows.by_ref().take(len).collect())
            .collect()
    }
}

fn validate(input: &EncoderInput, limits: &InputLimits) -> Result<()> {
    let len = input.ids.len();
    if len == 0 {
        return Err(EngineError::InvalidRequest(
            "an encoder input needs at least one token".into(),
        ));
    }
    if len > limits.max_positions {
        return Err(EngineError::ContextOverflow {
            tokens: len,
            max_context: limits.max_positions,
        });
    }
    if input.type_ids.len() != len {
        return Err(EngineError::InvalidRequest(format!(
            "{} segment ids for {len} tokens",
            input.type_ids.len()
        )));
    }
    if let Some(&bad) = input
        .ids
        .iter()
        .find(|&&id| id as usize >= limits.vocab_size)
    {
        return Err(EngineError::InvalidRequest(format!(
            "token id {bad} is out of range for a vocabulary of {}",
            limits.vocab_size
        )));
    }
    if let Some(&bad) = input
        .type_ids
        .iter()
        .find(|&&id| id as usize >= limits.type_vocab_size)
    {
        return Err(EngineError::InvalidRequest(format!(
            "segment id {bad} is out of range for {} segment types",
            limits.type_vocab_size
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn input(ids: &[u32]) -> EncoderInput {
        EncoderInput {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
        }
    }

    pub(crate) const LIMITS: InputLimits = InputLimits {
        vocab_size: 10,
        type_vocab_size: 2,
        max_positions: 4,
        causal: false,
    };

    #[test]
    fn padding_is_masked_and_real_tokens_are_indexed() {
        let batch = PaddedBatch::new(
            &[input(&[1, 2, 3]), input(&[4])],
            &LIMITS,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mask: Vec<f32> = batch
            .attention_mask
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(mask, [0., 0., 0., 0., f32::MIN, f32::MIN]);
        let real: Vec<u32> = batch.real_tokens.to_vec1().unwrap();
        assert_eq!(real, [0, 1, 2, 3]);
        assert_eq!(batch.split_by_sequence(real), [vec![0, 1, 2], vec![3]]);

        let causal = InputLimits {
            causal: true,
            ..LIMITS
        };
        let batch = PaddedBatch::new(
            &[input(&[1, 2]), input(&[4])],
            &causal,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mask: Vec<Vec<f32>> = batch
            .attention_mask
            .get(1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(mask, [[0., f32::MIN], [0., f32::MIN]]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let refuse = |inputs: &[EncoderInput]| {
            PaddedBatch::new(inputs, &LIMITS, DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        assert!(refuse(&[input(&[])]).contains("at least one token"));
        assert!(refuse(&[input(&[1; 5])]).contains("maximum context of 4"));
        assert!(refuse(&[input(&[10])]).contains("token id 10"));
        let mut bad_types = input(&[1, 2]);
        bad_types.type_ids = vec![0, 2];
        assert!(refuse(&[bad_types.clone()]).contains("segment id 2"));
        bad_types.type_ids = vec![0];
        assert!(refuse(&[bad_types]).contains("1 segment ids for 2 tokens"));
    }
}
