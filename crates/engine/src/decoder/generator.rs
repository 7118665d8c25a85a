//! The generation API: prefill new sequences, decode one token per sequence, release.

use candle_core::{DType, Device, Tensor};

use crate::decoder::prefix_cache::{PrefixCache, PrefixCacheStats};
use crate::decoder::state::SequenceState;
use crate::decoder::step::{Step, StepBatch, StepRow};
use crate::decoder::{CausalLm, LogitsMode};
use crate::error::{EngineError, Result};

/// How a [`Generator`] sizes its state and steps.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Sequences that can be in flight at once (state slots).
    pub max_sequences: usize,
    /// Longest sequence, prompt and generated tokens together; None for the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Most tokens of one sequence in one prefill step. Longer prompts are prefilled in chunks
    /// of at most this many tokens (and at most what the model's attention pattern spans and
    /// what it accepts per cached step), so that the per-step attention scores stay small.
    pub prefill_chunk: usize,
    /// Bytes of prefilled prompts' state kept for later prompts that start the same way
    /// ([`PrefixCache`]); 0 turns prefix caching off.
    pub prefix_cache_bytes: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            max_sequences: 16,
            max_context: None,
            prefill_chunk: 512,
            prefix_cache_bytes: 0,
        }
    }
}

/// A causal LM with the state of its sequences: the engine's generator seam.
pub struct Generator {
    model: Box<dyn CausalLm>,
    state: SequenceState,
    prefill_chunk: usize,
    prefix_cache: Option<PrefixCache>,
    device: Device,
}

impl Generator {
    /// Allocates the state of `config.max_sequences` sequences for `model` on `device`.
    pub fn new(
        model: Box<dyn CausalLm>,
        config: &GeneratorConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let max_context = config
            .max_context
            .unwrap_or_else(|| model.max_position_embeddings());
        let spec = model.state_spec();
        let narrowest_span = spec
            .layers
            .iter()
            .filter_map(|layer| layer.attention?.pattern.span())
            .min();
        let prefill_chunk = [
            Some(config.prefill_chunk.max(1)),
            narrowest_span,
            model.max_step_tokens(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(1)
        .max(1);
        let state = SequenceState::new(spec, config.max_sequences, max_context, dtype, device)?;
        Ok(Self {
            model,
            state,
            prefill_chunk,
            prefix_cache: (config.prefix_cache_bytes > 0)
                .then(|| PrefixCache::new(config.prefix_cache_bytes)),
            device: device.clone(),
        })
    }

    /// The sequences' state, for its sizes and per-slot lengths.
    pub fn state(&self) -> &SequenceState {
        &self.state
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> usize {
        self.state.free_slots()
    }

    /// The longest sequence, prompt and generated tokens together, in positions.
    pub fn max_context(&self) -> usize {
        self.state.max_context()
    }

    /// Most tokens of one sequence in one prefill step.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// How many of a prompt's `remaining` tokens the next prefill step takes when the step has
    /// room for `budget` more tokens: the one rule for chunking prompts, which [`Self::prefill`]
    /// and the scheduler's steps both follow.
    pub fn next_chunk(&self, remaining: usize, budget: usize) -> usize {
        remaining.min(self.prefill_chunk).min(budget)
    }

    /// Size of the model's output vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// What the prefix cache has done and holds; None when prefix caching is off.
    pub fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        self.prefix_cache.as_ref().map(PrefixCache::stats)
    }

    /// How many of `prompt`'s positions the prefix cache would restore now (0 with it off).
    pub fn cached_prefix_len(&self, prompt: &[u32]) -> usize {
        self.prefix_cache
            .as_ref()
            .map_or(0, |cache| cache.peek(prompt))
    }

    /// Starts the freshly allocated sequence in `slot` from the longest cached prefix of
    /// `prompt`: returns how many of its positions were restored (at most `prompt.len() - 1`;
    /// 0 without a hit, or with prefix caching off). The caller prefills the rest.
    pub fn restore_prefix(&mut self, slot: usize, prompt: &[u32]) -> Result<usize> {
        let Some(cache) = self.prefix_cache.as_mut() else {
            return Ok(0);
        };
        if self.state.len(slot)? != 0 {
            return Ok(0);
        }
        match cache.lookup(prompt) {
            Some((snapshot, len)) => {
                self.state.restore(slot, snapshot, len)?;
                Ok(len)
            }
            None => Ok(0),
        }
    }

    /// Keeps the state of the sequence in `slot`, which has processed exactly `prompt`, for
    /// later prompts that start the same way. A no-op with prefix caching off, or when the
    /// cache already serves `prompt`.
    pub fn remember_prefix(&mut self, slot: usize, prompt: &[u32]) -> Result<()> {
        let Some(cache) = self.prefix_cache.as_mut() else {
            return Ok(());
        };
        if self.state.len(slot)? != prompt.len() || !cache.wants(prompt) {
            return Ok(());
        }
        let snapshot = self.state.snapshot(slot)?;
        cache.insert(prompt.to_vec(), snapshot);
        Ok(())
    }

    /// Takes a free slot for a new sequence, its recurrent state zeroed.
    pub fn allocate(&mut self) -> Result<usize> {
        self.state.allocate()
    }

    /// Frees a sequence's slot.
    pub fn release(&mut self, slot: usize) {
        self.state.release(slot)
    }

    /// One forward step appending each row's tokens to its slot; returns f32 logits
    /// (`[batch, vocab]` for [`LogitsMode::Last`], `[batch, seq, vocab]` for
    /// [`LogitsMode::All`], rows left-padded) in the order of `rows`. The step's state is stored
    /// only when the forward pass succeeds: after an error every sequence is as it was.
    pub fn step(&mut self, rows: &[StepRow], logits: LogitsMode) -> Result<Tensor> {
        // The model sees the rows in slot order, so that the device-generic attention reads
        // consecutive slots as one view of the ring.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].slot);
        let sorted: Vec<StepRow> = order.iter().map(|&i| rows[i]).collect();
        let batch = StepBatch::new(&sorted, &self.state, self.model.vocab_size(), &self.device)?;
        let step = Step::new(&batch, &self.state);
        let output = self.model.forward(&step, logits)?;
        let writes = step.into_writes();
        self.state.commit(&batch, writes)?;
        if order.iter().enumerate().all(|(i, &j)| i == j) {
            return Ok(output);
        }
        let mut back = vec![0u32; rows.len()];
        for (sorted_index, &row) in order.iter().enumerate() {
            back[row] = sorted_index as u32;
        }
        let back = Tensor::from_vec(back, rows.len(), output.device())?;
        Ok(output.index_select(&back, 0)?)
    }

    /// Prefills new prompts together, in chunks of [`Self::next_chunk`] tokens per row, and
    /// returns the logits after each prompt's last token.
    pub fn prefill(&mut self, rows: &[StepRow]) -> Result<Vec<Vec<f32>>> {
        // Check everything first, so that a bad row fails the call before any slot changes.
        for row in rows {
            if row.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a prompt needs at least one token".into(),
                ));
            }
            let end = self.state.len(row.slot)? + row.tokens.len();
            if end > self.state.max_context() {
                return Err(EngineError::ContextOverflow {
                    tokens: end,
                    max_context: self.state.max_context(),
                });
            }
        }
        let mut last_logits = vec![Vec::new(); rows.len()];
        // New sequences start from the longest cached prefix of their prompt.
        let fresh: Vec<bool> = rows
            .iter()
            .map(|row| Ok(self.state.len(row.slot)? == 0))
            .collect::<Result<_>>()?;
        let mut offsets = Vec::with_capacity(rows.len());
        for (row, &fresh) in rows.iter().zip(&fresh) {
            offsets.push(if fresh {
                self.restore_prefix(row.slot, row.tokens)?
            } else {
                0
            });
        }
        loop {
            let mut chunk_rows = Vec::new();
            let mut chunk_index = Vec::new();
            for (index, row) in rows.iter().enumerate() {
                let take = self.next_chunk(row.tokens.len() - offsets[index], usize::MAX);
                if take > 0 {
                    chunk_rows.push(StepRow {
                        slot: row.slot,
                        tokens: &row.tokens[offsets[index]..offsets[index] + take],
                    });
                    chunk_index.push(index);
                    offsets[index] += take;
                }
            }
            if chunk_rows.is_empty() {
                break;
            }
            let logits: Vec<Vec<f32>> = self.step(&chunk_rows, LogitsMode::Last)?.to_vec2()?;
            for (index, row_logits) in chunk_index.into_iter().zip(logits) {
                last_logits[index] = row_logits;
            }
        }
        for (row, _) in rows.iter().zip(&fresh).filter(|(_, &fresh)| fresh) {
            self.remember_prefix(row.slot, row.tokens)?;
        }
        Ok(last_logits)
    }

    /// Appends one token to each `(slot, token)` sequence and returns the next-token logits.
    pub fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<[u32; 1]> = rows.iter().map(|&(_, token)| [token]).collect();
        let step_rows: Vec<StepRow> = rows
            .iter()
            .zip(&tokens)
            .map(|(&(slot, _), token)| StepRow {
                slot,
                tokens: token,
            })
            .collect();
        Ok(self.step(&step_rows, LogitsMode::Last)?.to_vec2()?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::decoder::state::{LayerState, StateSpec};
    use crate::loader::{ModelFiles, ModelSource};

    /// A toy recurrent model: per layer `h = h / 2 + x`, `x` the layer's input (the token's
    /// embedding for the first layer), logits `W h` of the last layer. It reads one token per
    /// cached step and can be told to fail a step after handing back its writes.
    struct ToyRecurrent {
        layers: usize,
        dim: usize,
        vocab: usize,
        fail: Arc<AtomicBool>,
    }

    impl ToyRecurrent {
        fn new() -> Self {
            Self {
                layers: 2,
                dim: 3,
                vocab: 7,
                fail: Arc::default(),
            }
        }
    }

    impl CausalLm for ToyRecurrent {
        fn state_spec(&self) -> StateSpec {
            let layer = LayerState {
                attention: None,
                recurrent: Some(vec![self.dim]),
            };
            StateSpec {
                layers: vec![layer; self.layers],
            }
        }

        fn vocab_size(&self) -> usize {
            self.vocab
        }

        fn max_position_embeddings(&self) -> usize {
            64
        }

        fn max_step_tokens(&self) -> Option<usize> {
            Some(1)
        }

        fn forward(&self, step: &Step, _logits: LogitsMode) -> Result<Tensor> {
            let batch = step.batch();
            assert_eq!(batch.seq_len, 1, "one token per cached step");
            let device = batch.input_ids.device();
            let scale = Tensor::arange(1f32, self.dim as f32 + 1., device)?;
            let tokens = batch.input_ids.to_dtype(DType::F32)?; // [rows, 1]
            let mut x = tokens.broadcast_mul(&scale.unsqueeze(0)?)?; // [rows, dim]
            for layer in 0..self.layers {
                let h = step.recurrent(layer)?.rows(batch)?;
                let new = ((h * 0.5)? + &x)?;
                step.write_recurrent(layer, new.clone())?;
                x = new;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(EngineError::Internal("injected failure".into()));
            }
            let weights = Tensor::arange(0f32, (self.vocab * self.dim) as f32, device)?
                .reshape((self.vocab, self.dim))?
                .sin()?;
            Ok(x.matmul(&weights.t()?)?)
        }
    }

    fn make_generator(model: Box<dyn CausalLm>) -> Generator {
        let config = GeneratorConfig {
            max_sequences: 3,
            ..GeneratorConfig::default()
        };
        Generator::new(model, &config, &Device::Cpu, DType::F32).unwrap()
    }

    fn toy_generator(model: ToyRecurrent) -> Generator {
        make_generator(Box::new(model))
    }

    #[test]
    fn a_recurrent_state_is_reused_only_from_the_whole_cached_prompt() {
        let config = GeneratorConfig {
            max_sequences: 2,
            prefix_cache_bytes: 1 << 20,
            ..GeneratorConfig::default()
        };
        let mut cached = Generator::new(
            Box::new(ToyRecurrent::new()),
            &config,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let mut fresh = toy_generator(ToyRecurrent::new());
        let first: &[u32] = &[1, 4, 2, 5];
        let slot = cached.allocate().unwrap();
        run(&mut cached, &[slot], &[first], 2);
        cached.release(slot);
        // A prompt that shares only part of the first one: a recurrent state exists at the
        // first prompt's end only, so nothing is reused.
        let partial: &[u32] = &[1, 4, 3, 3];
        // One that extends it: the first prompt's state is restored, and one token prefilled.
        let extended: &[u32] = &[1, 4, 2, 5, 6];
        for (prompt, reused) in [(partial, 0), (extended, 4)] {
            let before = cached.prefix_cache_stats().unwrap().reused_tokens;
            let slot = cached.allocate().unwrap();
            let with_cache = run(&mut cached, &[slot], &[prompt], 3);
            cached.release(slot);
            let after = cached.prefix_cache_stats().unwrap().reused_tokens;
            assert_eq!(after - before, reused, "{prompt:?}");
            let slot = fresh.allocate().unwrap();
            let without = run(&mut fresh, &[slot], &[prompt], 3);
            fresh.release(slot);
            assert_eq!(with_cache, without, "{prompt:?}");
        }
        let stats = cached.prefix_cache_stats().unwrap();
        assert_eq!((stats.hits, stats.misses), (1, 2));
        assert!(fresh.prefix_cache_stats().is_none());
    }

    fn argmax(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Greedy decoding of `steps` tokens after each prompt, all sequences in the same steps;
    /// returns every sequence's logits after its prompt and after each generated token.
    fn run(
        generator: &mut Generator,
        slots: &[usize],
        prompts: &[&[u32]],
        steps: usize,
    ) -> Vec<Vec<Vec<f32>>> {
        let rows: Vec<StepRow> = slots
            .iter()
            .zip(prompts)
            .map(|(&slot, &tokens)| StepRow { slot, tokens })
            .collect();
        let mut logits: Vec<Vec<Vec<f32>>> = generator
            .prefill(&rows)
            .unwrap()
            .into_iter()
            .map(|row| vec![row])
            .collect();
        for _ in 0..steps {
            let next: Vec<(usize, u32)> = slots
                .iter()
                .zip(&logits)
                .map(|(&slot, seen)| (slot, argmax(seen.last().unwrap())))
                .collect();
            for (seen, row) in logits.iter_mut().zip(generator.decode(&next).unwrap()) {
                seen.push(row);
            }
        }
        logits
    }

    fn recurrent_values(generator: &Generator) -> Vec<Vec<Vec<f32>>> {
        (0..2)
            .map(|layer| {
                generator
                    .state()
                    .recurrent(layer)
                    .unwrap()
                    .all()
                    .to_vec2()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn recurrent_state_decodes_alone_and_batched_and_a_reused_slot_starts_from_zero() {
        let prompt: &[u32] = &[1, 4, 2];
        let mut generator = toy_generator(ToyRecurrent::new());
        assert_eq!(
            generator.prefill_chunk(),
            1,
            "the model reads one token per step"
        );
        let slot = generator.allocate().unwrap();
        let alone = run(&mut generator, &[slot], &[prompt], 4).remove(0);
        assert_eq!(generator.state().len(slot).unwrap(), prompt.len() + 4);
        generator.release(slot);

        // The same prompt beside two others, in the slot the first run left a non-zero state in.
        let slots: Vec<usize> = (0..3).map(|_| generator.allocate().unwrap()).collect();
        assert_eq!(slots[0], slot, "the lowest free slot is reused");
        let batched = run(&mut generator, &slots, &[prompt, &[3], &[6, 6, 5, 1, 2]], 4);
        assert_eq!(
            batched[0], alone,
            "a reused slot starts from zero; batching changes nothing"
        );
        assert_ne!(batched[1], alone);
    }

    /// The bundled tiny Mistral, failing its steps on demand after the whole forward pass
    /// (every layer has handed back its keys and values by then).
    struct FailingAfterForward {
        inner: Box<dyn CausalLm>,
        fail: Arc<AtomicBool>,
    }

    impl CausalLm for FailingAfterForward {
        fn state_spec(&self) -> StateSpec {
            self.inner.state_spec()
        }
        fn vocab_size(&self) -> usize {
            self.inner.vocab_size()
        }
        fn max_position_embeddings(&self) -> usize {
            self.inner.max_position_embeddings()
        }
        fn forward(&self, step: &Step, logits: LogitsMode) -> Result<Tensor> {
            let output = self.inner.forward(step, logits)?;
            if self.fail.load(Ordering::SeqCst) {
                return Err(EngineError::Internal("injected failure".into()));
            }
            Ok(output)
        }
    }

    fn bundled_mistral() -> Box<dyn CausalLm> {
        let files = ModelFiles::resolve(&ModelSource::Bundled).unwrap();
        let vb = files.var_builder(DType::F32, &Device::Cpu).unwrap();
        crate::registry::load_causal_lm(&files.config, vb).unwrap()
    }

    /// Every layer's ring, keys then values, and every slot's length.
    fn snapshot(generator: &Generator, slots: &[usize]) -> (Vec<Vec<f32>>, Vec<usize>) {
        let layers = generator.state().spec().layers.len();
        let rings = (0..layers)
            .flat_map(|layer| {
                let ring = generator.state().ring(layer).unwrap();
                [&ring.keys, &ring.values].map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            })
            .collect();
        let lengths = slots
            .iter()
            .map(|&s| generator.state().len(s).unwrap())
            .collect();
        (rings, lengths)
    }

    #[test]
    fn a_failed_attention_step_changes_no_ring_and_no_length() {
        let fail = Arc::new(AtomicBool::new(false));
        let mut generator = make_generator(Box::new(FailingAfterForward {
            inner: bundled_mistral(),
            fail: fail.clone(),
        }));
        let mut reference = make_generator(bundled_mistral());
        let prompts: [&[u32]; 2] = [&[1, 20, 30, 40, 50], &[1, 7]];
        let mut slots = Vec::new();
        for g in [&mut generator, &mut reference] {
            slots = (0..2).map(|_| g.allocate().unwrap()).collect();
            run(g, &slots, &prompts, 2);
        }
        let before = snapshot(&generator, &slots);
        fail.store(true, Ordering::SeqCst);
        assert!(generator.decode(&[(slots[0], 3), (slots[1], 4)]).is_err());
        assert!(generator
            .prefill(&[StepRow {
                slot: slots[1],
                tokens: &[9, 10, 11],
            }])
            .is_err());
        assert!(
            snapshot(&generator, &slots) == before,
            "a failed step changed the state"
        );
        fail.store(false, Ordering::SeqCst);
        assert_eq!(
            generator.decode(&[(slots[0], 3), (slots[1], 4)]).unwrap(),
            reference.decode(&[(slots[0], 3), (slots[1], 4)]).unwrap()
        );
    }

    #[test]
    fn a_failed_step_changes_no_sequence() {
        let toy = ToyRecurrent::new();
        let fail = toy.fail.clone();
        let mut generator = toy_generator(toy);
        let slots: Vec<usize> = (0..2).map(|_| generator.allocate().unwrap()).collect();
        run(&mut generator, &slots, &[&[1, 2], &[5]], 1);
        let lengths: Vec<usize> = slots
            .iter()
            .map(|&s| generator.state().len(s).unwrap())
            .collect();
        let before = recurrent_values(&generator);
        let mut reference = toy_generator(ToyRecurrent::new());
        for &slot in &slots {
            assert_eq!(reference.allocate().unwrap(), slot);
        }
        run(&mut reference, &slots, &[&[1, 2], &[5]], 1);

        fail.store(true, Ordering::SeqCst);
        assert!(generator.decode(&[(slots[0], 3), (slots[1], 4)]).is_err());
        assert!(generator
            .prefill(&[StepRow {
                slot: slots[1],
                tokens: &[1, 2]
            }])
            .is_err());
        fail.store(false, Ordering::SeqCst);
        let after: Vec<usize> = slots
            .iter()
            .map(|&s| generator.state().len(s).unwrap())
            .collect();
        assert_eq!(after, lengths, "lengths unchanged");
        assert_eq!(recurrent_values(&generator), before, "state unchanged");
        // The step then succeeds exactly as if the failure had never happened.
        assert_eq!(
            generator.decode(&[(slots[0], 3), (slots[1], 4)]).unwrap(),
            reference.decode(&[(slots[0], 3), (slots[1], 4)]).unwrap()
        );
    }
}
