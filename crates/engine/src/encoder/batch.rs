//! The padded encoder batch and the checks every input passes before it joins one.

use candle_core::{DType, Device, Tensor, D};

use crate::encoder::{EncoderInput, EntityInput, Requested};
use crate::error::{EngineError, Result};

/// What a model accepts as input, to refuse a bad request before it joins a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Segment ids must be below this.
    pub type_vocab_size: usize,
    /// Position ids must be below this (the rows of the position embeddings).
    pub max_positions: usize,
    /// The position id of a sequence's first token when the input gives none: 0 for BERT,
    /// `padding_idx + 1` for RoBERTa-style numbering.
    pub first_position: usize,
    /// Whether a token sees only itself and earlier tokens (config.json's `is_decoder`), as
    /// transformers' extended attention mask makes it.
    pub causal: bool,
    /// The entity inputs the model takes; `None` for a model without entities.
    pub entities: Option<EntityLimits>,
}

impl InputLimits {
    /// The longest sequence numbered from [`InputLimits::first_position`].
    pub fn max_tokens(&self) -> usize {
        self.max_positions.saturating_sub(self.first_position)
    }
}

/// What an entity-aware model accepts as entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityLimits {
    /// Entity ids must be below this.
    pub vocab_size: usize,
    /// A mention covers at most this many tokens.
    pub max_mention_length: usize,
}

/// The entities of a padded batch, padded to the most entities of a row and to the model's
/// longest mention, as tensors on the model's device.
#[derive(Debug)]
pub struct EntityBatch {
    /// `[batch, entities]` entity ids, 0 in padding.
    pub ids: Tensor,
    /// `[batch, entities]` segment ids, 0 in padding.
    pub type_ids: Tensor,
    /// `[batch, entities, max_mention_length]` position ids of each mention's tokens, 0 past
    /// its end (transformers pads with -1 and clamps to 0 before the lookup).
    pub position_ids: Tensor,
    /// `[batch, entities, max_mention_length, 1]` in the model's dtype: 1 at a mention's
    /// tokens, 0 past its end.
    pub position_mask: Tensor,
    /// `[batch, entities]` in the model's dtype: 1 at real entities, 0 in padding.
    pub mask: Tensor,
    /// Each row's number of entities.
    pub counts: Vec<usize>,
    /// Columns of the padded entities.
    pub width: usize,
}

/// A batch of sequences padded on the right to the longest, as tensors on the model's device.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[batch, seq_len]` token ids, 0 in padding.
    pub input_ids: Tensor,
    /// `[batch, seq_len]` segment ids, 0 in padding.
    pub token_type_ids: Tensor,
    /// `[batch, seq_len]` position ids, the input's own or the model's numbering; 0 in padding.
    pub position_ids: Tensor,
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
    /// The entities, when any input has some.
    pub entities: Option<EntityBatch>,
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
        let mut position_ids = vec![0u32; batch * seq_len];
        let mut token_mask = vec![0f32; batch * seq_len];
        let mut real_tokens = Vec::with_capacity(lengths.iter().sum());
        for (row, input) in inputs.iter().enumerate() {
            let start = row * seq_len;
            let len = input.ids.len();
            input_ids[start..start + len].copy_from_slice(&input.ids);
            type_ids[start..start + len].copy_from_slice(&input.type_ids);
            let positions = &mut position_ids[start..start + len];
            match &input.position_ids {
                Some(given) => positions.copy_from_slice(given),
                None => {
                    let first = limits.first_position as u32;
                    for (offset, position) in (0u32..).zip(positions.iter_mut()) {
                        *position = first + offset;
                    }
                }
            }
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
            position_ids: Tensor::from_vec(position_ids, (batch, seq_len), device)?,
            attention_mask,
            token_mask: Tensor::from_vec(token_mask, (batch, seq_len, 1), device)?
                .to_dtype(dtype)?,
            real_tokens: Tensor::from_vec(real_tokens, real_count, device)?,
            lengths,
            seq_len,
            entities: EntityBatch::new(inputs, limits, dtype, device)?,
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// The real tokens' rows of `x` (`[batch, seq_len, dim]`), all sequences one after the
    /// other: `[real tokens, dim]`.
    pub fn real_rows(&self, x: &Tensor) -> Result<Tensor> {
        self.rows_at(x, &self.real_tokens)
    }

    /// The rows of `x` (`[batch, seq_len, dim]`) at `index` (u32 indexes into the flattened
    /// `[batch * seq_len]`): `[index len, dim]`.
    pub fn rows_at(&self, x: &Tensor, index: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let flat = x.reshape((self.batch_size() * self.seq_len, dim))?;
        Ok(flat.index_select(index, 0)?)
    }

    /// The tokens whose rows `inputs` (this batch's) ask of a per-token output: every real token
    /// for [`Requested::All`], the named ones for [`Requested::Tokens`], none for a pooled
    /// request. Returns the flattened indexes, on the device, and how many belong to each input;
    /// `None` when no input asks for any.
    pub fn requested_tokens(
        &self,
        inputs: &[EncoderInput],
    ) -> Result<Option<(Tensor, Vec<usize>)>> {
        let mut index = Vec::new();
        let mut counts = Vec::with_capacity(inputs.len());
        for (row, (input, &len)) in inputs.iter().zip(&self.lengths).enumerate() {
            let start = (row * self.seq_len) as u32;
            let before = index.len();
            match &input.output {
                Requested::All => index.extend(start..start + len as u32),
                Requested::Tokens(tokens) => index.extend(tokens.iter().map(|&t| start + t)),
                Requested::Pooled(_) => {}
            }
            counts.push(index.len() - before);
        }
        if index.is_empty() {
            return Ok(None);
        }
        let device = self.input_ids.device();
        Ok(Some((
            Tensor::from_vec(index, counts.iter().sum::<usize>(), device)?,
            counts,
        )))
    }

    /// Splits per-token rows (as [`PaddedBatch::real_rows`] orders them) into one list per
    /// sequence.
    pub fn split_by_sequence<T>(&self, rows: Vec<T>) -> Vec<Vec<T>> {
        split(rows, &self.lengths)
    }
}

/// Splits `rows` into consecutive runs of `counts`.
pub fn split<T>(rows: Vec<T>, counts: &[usize]) -> Vec<Vec<T>> {
    let mut rows = rows.into_iter();
    counts
        .iter()
        .map(|&count| rows.by_ref().take(count).collect())
        .collect()
}

impl EntityBatch {
    /// The entities of `inputs`, or `None` when no input has any.
    fn new(
        inputs: &[EncoderInput],
        limits: &InputLimits,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(entity_limits) = limits.entities else {
            return Ok(None);
        };
        let none = EntityInput::default();
        let rows: Vec<&EntityInput> = inputs
            .iter()
            .map(|input| input.entities.as_ref().unwrap_or(&none))
            .collect();
        let counts: Vec<usize> = rows.iter().map(|entities| entities.ids.len()).collect();
        let width = counts.iter().copied().max().unwrap_or(0);
        if width == 0 {
            return Ok(None);
        }
        let (batch, mention) = (inputs.len(), entity_limits.max_mention_length);
        let mut ids = vec![0u32; batch * width];
        let mut type_ids = vec![0u32; batch * width];
        let mut mask = vec![0f32; batch * width];
        let mut position_ids = vec![0u32; batch * width * mention];
        let mut position_mask = vec![0f32; batch * width * mention];
        for (row, entities) in rows.iter().enumerate() {
            let start = row * width;
            let count = entities.ids.len();
            ids[start..start + count].copy_from_slice(&entities.ids);
            type_ids[start..start + count].copy_from_slice(&entities.type_ids);
            mask[start..start + count].fill(1.0);
            for (entity, positions) in entities.mentions.iter().enumerate() {
                let at = (start + entity) * mention;
                position_ids[at..at + positions.len()].copy_from_slice(positions);
                position_mask[at..at + positions.len()].fill(1.0);
            }
        }
        Ok(Some(Self {
            ids: Tensor::from_vec(ids, (batch, width), device)?,
            type_ids: Tensor::from_vec(type_ids, (batch, width), device)?,
            position_ids: Tensor::from_vec(position_ids, (batch, width, mention), device)?,
            position_mask: Tensor::from_vec(position_mask, (batch, width, mention, 1), device)?
                .to_dtype(dtype)?,
            mask: Tensor::from_vec(mask, (batch, width), device)?.to_dtype(dtype)?,
            counts,
            width,
        }))
    }
}

/// The first of `values` that is not below `limit`.
fn first_out_of_range(values: &[u32], limit: usize) -> Option<u32> {
    values.iter().copied().find(|&v| v as usize >= limit)
}

/// Checks one input against a model's limits: every id in range, the lengths consistent, the
/// requested tokens inside the sequence. Every error is the request's fault.
pub fn validate(input: &EncoderInput, limits: &InputLimits) -> Result<()> {
    let len = input.ids.len();
    if len == 0 {
        return Err(EngineError::InvalidRequest(
            "an encoder input needs at least one token".into(),
        ));
    }
    let invalid = |message: String| Err(EngineError::InvalidRequest(message));
    match &input.position_ids {
        None if len > limits.max_tokens() => {
            return Err(EngineError::ContextOverflow {
                tokens: len,
                max_context: limits.max_tokens(),
            })
        }
        None => {}
        Some(positions) if positions.len() != len => {
            return invalid(format!("{} position ids for {len} tokens", positions.len()))
        }
        Some(positions) => {
            if let Some(bad) = first_out_of_range(positions, limits.max_positions) {
                return invalid(format!(
                    "position id {bad} is out of range for {} positions",
                    limits.max_positions
                ));
            }
        }
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
    if let Requested::Tokens(tokens) = &input.output {
        if let Some(bad) = first_out_of_range(tokens, len) {
            return invalid(format!(
                "token index {bad} is out of range for a sequence of {len} tokens"
            ));
        }
    }
    match (&input.entities, &limits.entities) {
        (None, _) => Ok(()),
        (Some(_), None) => invalid("this model takes no entities".into()),
        (Some(entities), Some(entity_limits)) => validate_entities(entities, entity_limits, limits),
    }
}

fn validate_entities(
    entities: &EntityInput,
    entity_limits: &EntityLimits,
    limits: &InputLimits,
) -> Result<()> {
    let invalid = |message: String| Err(EngineError::InvalidRequest(message));
    let count = entities.ids.len();
    if entities.mentions.len() != count || entities.type_ids.len() != count {
        return invalid(format!(
            "{count} entities with {} mentions and {} segment ids",
            entities.mentions.len(),
            entities.type_ids.len()
        ));
    }
    if let Some(bad) = first_out_of_range(&entities.ids, entity_limits.vocab_size) {
        return invalid(format!(
            "entity id {bad} is out of range for an entity vocabulary of {}",
            entity_limits.vocab_size
        ));
    }
    if let Some(bad) = first_out_of_range(&entities.type_ids, limits.type_vocab_size) {
        return invalid(format!(
            "entity segment id {bad} is out of range for {} segment types",
            limits.type_vocab_size
        ));
    }
    for mention in &entities.mentions {
        if mention.is_empty() || mention.len() > entity_limits.max_mention_length {
            return invalid(format!(
                "a mention covers {} tokens; this model takes 1 to {}",
                mention.len(),
                entity_limits.max_mention_length
            ));
        }
        if let Some(bad) = first_out_of_range(mention, limits.max_positions) {
            return invalid(format!(
                "mention position id {bad} is out of range for {} positions",
                limits.max_positions
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn input(ids: &[u32]) -> EncoderInput {
        EncoderInput::single(ids.to_vec())
    }

    pub(crate) const LIMITS: InputLimits = InputLimits {
        vocab_size: 10,
        type_vocab_size: 2,
        max_positions: 4,
        first_position: 0,
        causal: false,
        entities: None,
    };

    /// Two sequences of 3 and 1 tokens, padded under [`LIMITS`].
    pub(crate) fn three_and_one() -> PaddedBatch {
        PaddedBatch::new(
            &[input(&[1, 2, 3]), input(&[4])],
            &LIMITS,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn padding_is_masked_and_real_tokens_are_indexed() {
        let batch = three_and_one();
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

    #[test]
    fn positions_are_the_inputs_or_the_models_numbering() {
        let roberta = InputLimits {
            first_position: 2,
            max_positions: 6,
            ..LIMITS
        };
        let mut given = input(&[1, 2]);
        given.position_ids = Some(vec![5, 3]);
        let batch = PaddedBatch::new(
            &[input(&[1, 2, 3]), given],
            &roberta,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let positions: Vec<Vec<u32>> = batch.position_ids.to_vec2().unwrap();
        assert_eq!(positions, [[2, 3, 4], [5, 3, 0]]);
        assert!(batch.entities.is_none());

        let refuse = |input: EncoderInput| validate(&input, &roberta).unwrap_err().to_string();
        // Numbered from 2, five tokens need position 6: one more than the table has.
        assert!(refuse(input(&[1; 5])).contains("maximum context of 4"));
        let mut bad = input(&[1, 2]);
        bad.position_ids = Some(vec![0, 6]);
        assert!(refuse(bad.clone()).contains("position id 6"));
        bad.position_ids = Some(vec![0]);
        assert!(refuse(bad).contains("1 position ids for 2 tokens"));
        let asks_past_the_end = input(&[1, 2]).requesting(Requested::Tokens(vec![1, 2]));
        assert!(refuse(asks_past_the_end).contains("token index 2"));
    }

    #[test]
    fn entities_are_padded_and_checked() {
        let luke = InputLimits {
            entities: Some(EntityLimits {
                vocab_size: 5,
                max_mention_length: 3,
            }),
            ..LIMITS
        };
        let mut with_entities = input(&[1, 2, 3]);
        with_entities.entities = Some(EntityInput {
            ids: vec![4, 1],
            mentions: vec![vec![1, 2], vec![0]],
            type_ids: vec![0, 1],
        });
        assert_eq!(with_entities.width(), 5);
        let batch = PaddedBatch::new(
            &[input(&[1]), with_entities.clone()],
            &luke,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let entities = batch.entities.as_ref().unwrap();
        assert_eq!((entities.counts.clone(), entities.width), (vec![0, 2], 2));
        let ids: Vec<Vec<u32>> = entities.ids.to_vec2().unwrap();
        assert_eq!(ids, [[0, 0], [4, 1]]);
        let types: Vec<Vec<u32>> = entities.type_ids.to_vec2().unwrap();
        assert_eq!(types, [[0, 0], [0, 1]]);
        let mask: Vec<Vec<f32>> = entities.mask.to_vec2().unwrap();
        assert_eq!(mask, [[0., 0.], [1., 1.]]);
        let positions: Vec<Vec<u32>> = entities.position_ids.get(1).unwrap().to_vec2().unwrap();
        assert_eq!(positions, [[1, 2, 0], [0, 0, 0]]);
        let used: Vec<f32> = entities
            .position_mask
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(used, [1., 1., 0., 1., 0., 0.]);

        let refuse = |input: EncoderInput, limits: &InputLimits| {
            validate(&input, limits).unwrap_err().to_string()
        };
        assert!(refuse(with_entities.clone(), &LIMITS).contains("takes no entities"));
        let mut bad = with_entities;
        bad.entities.as_mut().unwrap().ids[0] = 5;
        assert!(refuse(bad.clone(), &luke).contains("entity id 5"));
        bad.entities.as_mut().unwrap().ids[0] = 4;
        bad.entities.as_mut().unwrap().mentions[0] = vec![0, 1, 2, 3];
        assert!(refuse(bad.clone(), &luke).contains("covers 4 tokens"));
        bad.entities.as_mut().unwrap().mentions[0] = vec![4];
        assert!(refuse(bad.clone(), &luke).contains("mention position id 4"));
        bad.entities.as_mut().unwrap().mentions.pop();
        assert!(refuse(bad, &luke).contains("2 entities with 1 mentions"));
    }
}
