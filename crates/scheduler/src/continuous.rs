//! Continuous batching: one engine thread serves every request, admitting waiting requests into
//! free slots between two decode steps and prefilling long prompts in chunks within a per-step
//! token budget, so that running streams keep flowing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candlewick_engine::decoder::prefix_cache::common_prefix;
use candlewick_engine::{Generator, LogitsMode, StepRow, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::sequence::{GenerationRequest, Sequence, TokenEvent};
use crate::{Result, SchedulerError};

/// Limits of a [`Scheduler`]. The number of sequences running at once is the generator's number
/// of slots.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Requests that may wait for a slot; more are refused at once.
    pub max_waiting: usize,
    /// Tokens one step may process: one per running sequence plus prefill chunks.
    pub max_batch_tokens: usize,
    /// Longest prompt accepted.
    pub max_input_tokens: usize,
    /// Longest prompt plus `max_new_tokens` accepted.
    pub max_total_tokens: usize,
    /// A request still running after this long is ended with an error.
    pub request_timeout: Option<Duration>,
}

/// The fewest leading tokens a new prompt must share with one being prefilled to wait for its
/// state rather than compute them too.
const PREFIX_WAIT_MIN_TOKENS: usize = 64;

/// What a request's receiver gets.
#[derive(Debug)]
pub enum Event {
    /// A generated token; the last one carries the finish reason.
    Token(TokenEvent),
    /// The request failed after it was accepted (a timeout, an engine error). One step's
    /// failure reaches every request in it, so the error is shared.
    Failed(Arc<SchedulerError>),
}

/// Counts the engine thread publishes for health checks and tests.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    waiting: AtomicUsize,
    running: AtomicUsize,
    generated: AtomicUsize,
    prefix_hits: AtomicUsize,
    reused_tokens: AtomicUsize,
}

impl SchedulerStats {
    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Sequences holding a slot.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Tokens generated since the scheduler started, by all requests.
    pub fn generated_tokens(&self) -> usize {
        self.generated.load(Ordering::Relaxed)
    }

    /// Requests that started from a cached prefix.
    pub fn prefix_cache_hits(&self) -> usize {
        self.prefix_hits.load(Ordering::Relaxed)
    }

    /// Prompt tokens restored from the prefix cache instead of prefilled.
    pub fn prefix_cache_reused_tokens(&self) -> usize {
        self.reused_tokens.load(Ordering::Relaxed)
    }
}

struct Pending {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Pending>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: SchedulerStats,
    alive: AtomicBool,
}

/// The handle to the engine thread. Dropping it lets running requests finish, then stops the
/// thread.
pub struct Scheduler {
    shared: Arc<Shared>,
    config: SchedulerConfig,
    vocab_size: usize,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the engine thread over `generator`.
    pub fn start(
        generator: Generator,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> Result<Self> {
        if config.max_batch_tokens == 0 {
            return Err(SchedulerError::InvalidRequest(
                "max_batch_tokens must be at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            stats: SchedulerStats::default(),
            alive: AtomicBool::new(true),
        });
        let vocab_size = generator.vocab_size();
        let engine = EngineLoop {
            generator,
            tokenizer,
            config: config.clone(),
            shared: Arc::clone(&shared),
            active: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("candlewick-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| {
                SchedulerError::InvalidRequest(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Self {
            shared,
            config,
            vocab_size,
            thread: Some(thread),
        })
    }

    /// Queues `request`; its tokens arrive on the returned receiver. Dropping the receiver
    /// cancels the request at the next step. Refuses at once what cannot be served.
    pub fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<Event>> {
        let prompt = request.prompt.len();
        if prompt == 0 {
            return Err(SchedulerError::InvalidRequest("the prompt is empty".into()));
        }
        if request.stop.max_new_tokens == 0 {
            return Err(SchedulerError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if prompt > self.config.max_input_tokens {
            return Err(SchedulerError::PromptTooLong {
                tokens: prompt,
                max: self.config.max_input_tokens,
            });
        }
        if prompt + request.stop.max_new_tokens > self.config.max_total_tokens {
            return Err(SchedulerError::TotalTooLong {
                prompt,
                max_new_tokens: request.stop.max_new_tokens,
                max: self.config.max_total_tokens,
            });
        }
        if let Some(&bad) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(SchedulerError::InvalidRequest(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        request.sampling.validate(self.vocab_size)?;
        if !self.shared.alive.load(Ordering::Acquire) {
            return Err(SchedulerError::Stopped);
        }
        let (events, receiver) = unbounded_channel();
        let mut queue = self
            .shared
            .queue
            .lock()
            .map_err(|_| SchedulerError::Stopped)?;
        if queue.closing {
            return Err(SchedulerError::Stopped);
        }
        if queue.waiting.len() >= self.config.max_waiting {
            return Err(SchedulerError::QueueFull {
                max_waiting: self.config.max_waiting,
            });
        }
        queue.waiting.push_back(Pending {
            request,
            events,
            submitted: Instant::now(),
        });
        self.shared
            .stats
            .waiting
            .store(queue.waiting.len(), Ordering::Relaxed);
        metrics::gauge!("candlewick_queue_depth").set(queue.waiting.len() as f64);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// The width of the model's logits.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Live counts of waiting and running requests.
    pub fn stats(&self) -> &SchedulerStats {
        &self.shared.stats
    }

    /// The limits this scheduler enforces.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Whether the engine thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Stops accepting requests, lets every accepted one finish, and waits for the engine
    /// thread to end.
    pub fn shutdown(&mut self) {
        if let Ok(mut queue) = self.shared.queue.lock() {
            queue.closing = true;
        }
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A request that owns a slot.
struct Active {
    sequence: Sequence,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    events: UnboundedSender<Event>,
    submitted: Instant,
    last_token_at: Option<Instant>,
}

impl Active {
    fn decoding(&self) -> bool {
        self.prefilled == self.prompt.len()
    }
}

struct EngineLoop {
    generator: Generator,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    shared: Arc<Shared>,
    active: Vec<Active>,
}

impl EngineLoop {
    fn run(mut self) {
        while self.admit() {
            self.drop_cancelled();
            self.decode_step();
            self.prefill_step();
            self.publish_counts();
        }
        self.shared.alive.store(false, Ordering::Release);
    }

    /// Moves waiting requests into free slots; blocks while there is nothing to do. Returns
    /// false once closing with nothing left.
    fn admit(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        let Ok(mut queue) = shared.queue.lock() else {
            return false;
        };
        while self.active.is_empty() && queue.waiting.is_empty() {
            if queue.closing {
                return false;
            }
            queue = match shared.wake.wait(queue) {
                Ok(queue) => queue,
                Err(_) => return false,
            };
        }
        // Requests that wait for a running prompt's state (see `should_wait_for_prefix`) keep
        // their place at the front of the queue.
        let mut deferred = Vec::new();
        while self.generator.free_slots() > 0 {
            let Some(pending) = queue.waiting.pop_front() else {
                break;
            };
            if pending.events.is_closed() {
                continue;
            }
            if self.should_wait_for_prefix(&pending.request.prompt) {
                deferred.push(pending);
                continue;
            }
            match self.start(&pending) {
                Ok(active) => self.active.push(active),
                Err(error) => {
                    let _ = pending.events.send(Event::Failed(Arc::new(error)));
                }
            }
        }
        for pending in deferred.into_iter().rev() {
            queue.waiting.push_front(pending);
        }
        self.shared
            .stats
            .waiting
            .store(queue.waiting.len(), Ordering::Relaxed);
        metrics::gauge!("candlewick_queue_depth").set(queue.waiting.len() as f64);
        true
    }

    /// Whether `prompt` should wait for a prompt still being prefilled to finish: it shares at
    /// least [`PREFIX_WAIT_MIN_TOKENS`] leading tokens with it, more than the prefix cache holds
    /// for it now. Started together, both would compute the shared part; started after, it reuses
    /// it (a burst of chats with one system prompt). The wait lasts until that prefill ends.
    fn should_wait_for_prefix(&self, prompt: &[u32]) -> bool {
        if self.generator.prefix_cache_stats().is_none() {
            return false;
        }
        let shared = self
            .active
            .iter()
            .filter(|active| !active.decoding())
            .map(|active| common_prefix(&active.prompt, prompt))
            .max()
            .unwrap_or(0)
            .min(prompt.len().saturating_sub(1));
        shared >= PREFIX_WAIT_MIN_TOKENS && shared > self.generator.cached_prefix_len(prompt)
    }

    fn start(&mut self, pending: &Pending) -> Result<Active> {
        let slot = self.generator.allocate()?;
        let max_context = self.generator.max_context();
        match Sequence::new(
            slot,
            &pending.request,
            &self.tokenizer,
            self.generator.vocab_size(),
            max_context,
        ) {
            Ok(sequence) => {
                // A prompt that starts like a cached one starts from its state.
                let prompt = &pending.request.prompt;
                let prefilled = match self.generator.restore_prefix(slot, prompt) {
                    Ok(restored) => restored,
                    Err(error) => {
                        self.generator.release(slot);
                        return Err(error.into());
                    }
                };
                self.publish_prefix_cache();
                Ok(Active {
                    sequence,
                    prompt: prompt.clone(),
                    prefilled,
                    events: pending.events.clone(),
                    submitted: pending.submitted,
                    last_token_at: None,
                })
            }
            Err(error) => {
                self.generator.release(slot);
                Err(error)
            }
        }
    }

    /// Frees the slots of requests whose client went away or whose time is up.
    fn drop_cancelled(&mut self) {
        let timeout = self.config.request_timeout;
        let generator = &mut self.generator;
        self.active.retain(|active| {
            let timed_out = timeout.is_some_and(|limit| active.submitted.elapsed() > limit);
            if timed_out {
                let _ = active
                    .events
                    .send(Event::Failed(Arc::new(SchedulerError::Timeout {
                        limit: timeout.unwrap_or_default(),
                    })));
            }
            let keep = !timed_out && !active.events.is_closed();
            if !keep {
                generator.release(active.sequence.slot);
            }
            keep
        });
    }

    /// One decode step for every sequence past its prompt.
    fn decode_step(&mut self) {
        let rows: Vec<(usize, u32)> = self
            .active
            .iter()
            .filter(|active| active.decoding())
            .filter_map(|active| Some((active.sequence.slot, active.sequence.last_token()?)))
            .collect();
        if rows.is_empty() {
            return;
        }
        metrics::histogram!("candlewick_decode_batch_size").record(rows.len() as f64);
        let started = Instant::now();
        // Structured outputs' masks depend only on the tokens so far: they are computed on
        // another thread while the model runs the step. A grammar's failure is the request's
        // alone; `accept_all` meets it again and ends that request.
        let mut constrained: Vec<&mut Sequence> = self
            .active
            .iter_mut()
            .filter(|active| active.decoding() && active.sequence.is_constrained())
            .map(|active| &mut active.sequence)
            .collect();
        let generator = &mut self.generator;
        let result = if constrained.is_empty() {
            generator.decode(&rows)
        } else {
            std::thread::scope(|scope| {
                let masks = std::thread::Builder::new()
                    .name("candlewick-grammar".into())
                    .spawn_scoped(scope, move || {
                        let started = Instant::now();
                        for sequence in &mut constrained {
                            let _ = sequence.prepare_mask();
                        }
                        metrics::histogram!("candlewick_grammar_mask_seconds")
                            .record(started.elapsed().as_secs_f64());
                    });
                let result = generator.decode(&rows);
                if let Ok(masks) = masks {
                    let _ = masks.join();
                }
                result
            })
        };
        metrics::histogram!("candlewick_decode_step_seconds")
            .record(started.elapsed().as_secs_f64());
        let slots: Vec<usize> = rows.iter().map(|&(slot, _)| slot).collect();
        match result {
            Ok(logits) => self.accept_all(&slots, logits),
            Err(error) => self.fail(&slots, error.into()),
        }
    }

    /// Prefill chunks for sequences still reading their prompt, within the step's token budget.
    fn prefill_step(&mut self) {
        let decoding = self.active.iter().filter(|a| a.decoding()).count();
        let mut budget = self.config.max_batch_tokens.saturating_sub(decoding).max(1);
        let mut chunks: Vec<(usize, usize, usize)> = Vec::new(); // (active index, start, end)
        for (index, active) in self.active.iter().enumerate() {
            if active.decoding() || budget == 0 {
                continue;
            }
            let take = self
                .generator
                .next_chunk(active.prompt.len() - active.prefilled, budget);
            budget -= take;
            chunks.push((index, active.prefilled, active.prefilled + take));
        }
        if chunks.is_empty() {
            return;
        }
        let rows: Vec<StepRow> = chunks
            .iter()
            .map(|&(index, start, end)| StepRow {
                slot: self.active[index].sequence.slot,
                tokens: &self.active[index].prompt[start..end],
            })
            .collect();
        let started = Instant::now();
        let result = self
            .generator
            .step(&rows, LogitsMode::Last)
            .and_then(|logits| Ok(logits.to_vec2::<f32>()?));
        metrics::histogram!("candlewick_prefill_step_seconds")
            .record(started.elapsed().as_secs_f64());
        let slots: Vec<usize> = rows.iter().map(|row| row.slot).collect();
        let logits = match result {
            Ok(logits) => logits,
            Err(error) => return self.fail(&slots, error.into()),
        };
        let mut finished_slots = Vec::new();
        let mut finished_logits = Vec::new();
        for (&(index, _, end), row_logits) in chunks.iter().zip(logits) {
            let active = &mut self.active[index];
            active.prefilled = end;
            if active.decoding() {
                metrics::counter!("candlewick_prompt_tokens_total")
                    .increment(active.prompt.len() as u64);
                // Keep the prompt's state for later prompts that start the same way; a
                // failure to keep it costs only a later hit.
                if let Err(error) = self
                    .generator
                    .remember_prefix(active.sequence.slot, &active.prompt)
                {
                    tracing::warn!(%error, "the prompt's state was not kept for prefix caching");
                }
                finished_slots.push(active.sequence.slot);
                finished_logits.push(row_logits);
            }
        }
        self.publish_prefix_cache();
        self.accept_all(&finished_slots, finished_logits);
    }

    /// The prefix cache's counts, for /metrics.
    fn publish_prefix_cache(&self) {
        let Some(stats) = self.generator.prefix_cache_stats() else {
            return;
        };
        let shared = &self.shared.stats;
        shared
            .prefix_hits
            .store(stats.hits as usize, Ordering::Relaxed);
        shared
            .reused_tokens
            .store(stats.reused_tokens as usize, Ordering::Relaxed);
        metrics::counter!("candlewick_prefix_cache_hits_total").absolute(stats.hits);
        metrics::counter!("candlewick_prefix_cache_misses_total").absolute(stats.misses);
        metrics::counter!("candlewick_prefix_cache_reused_tokens_total")
            .absolute(stats.reused_tokens);
        metrics::gauge!("candlewick_prefix_cache_bytes").set(stats.bytes as f64);
        metrics::gauge!("candlewick_prefix_cache_entries").set(stats.entries as f64);
    }

    /// Samples a token for each slot's sequence from its logits and sends it; frees the slots
    /// of sequences that finish.
    fn accept_all(&mut self, slots: &[usize], logits: Vec<Vec<f32>>) {
        let now = Instant::now();
        for (&slot, row) in slots.iter().zip(logits) {
            let Some(index) = self.active.iter().position(|a| a.sequence.slot == slot) else {
                continue;
            };
            let active = &mut self.active[index];
            let event = match active.sequence.accept(&row) {
                Ok(event) => event,
                Err(error) => {
                    let _ = active.events.send(Event::Failed(Arc::new(error)));
                    self.generator.release(slot);
                    self.active.swap_remove(index);
                    continue;
                }
            };
            match active.last_token_at {
                None => metrics::histogram!("candlewick_time_to_first_token_seconds")
                    .record(now.duration_since(active.submitted).as_secs_f64()),
                Some(previous) => metrics::histogram!("candlewick_inter_token_latency_seconds")
                    .record(now.duration_since(previous).as_secs_f64()),
            }
            active.last_token_at = Some(now);
            metrics::counter!("candlewick_generated_tokens_total").increment(1);
            self.shared.stats.generated.fetch_add(1, Ordering::Relaxed);
            let finished = event.finish.is_some();
            let delivered = active.events.send(Event::Token(event)).is_ok();
            if finished || !delivered {
                self.generator.release(slot);
                self.active.swap_remove(index);
            }
        }
    }

    fn fail(&mut self, slots: &[usize], error: SchedulerError) {
        tracing::error!(%error, "engine step failed");
        let error = Arc::new(error);
        for &slot in slots {
            if let Some(index) = self.active.iter().position(|a| a.sequence.slot == slot) {
                let active = self.active.swap_remove(index);
                let _ = active.events.send(Event::Failed(Arc::clone(&error)));
                self.generator.release(slot);
            }
        }
    }

    fn publish_counts(&self) {
        self.shared
            .stats
            .running
            .store(self.active.len(), Ordering::Relaxed);
        metrics::gauge!("candlewick_running_sequences").set(self.active.len() as f64);
    }
}
