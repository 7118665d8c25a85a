//! Dynamic batching for encoders: requests wait in a bounded queue; the encoder thread takes as
//! many as fit one padded batch of `max_batch_tokens` (longest sequence x sequences), runs them in
//! one forward pass, and hands each request its own outputs.
//!
//! A request may hold several sequences (a list of texts, the windows of a long question-answering
//! context, the choices of a multiple-choice question); they always run together, in as few
//! batches as the token budget allows.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candlewick_engine::encoder::labels::Labels;
use candlewick_engine::encoder::{
    EncoderContract, EncoderInput, EncoderModel, EncoderOutput, EncoderTask,
};
use tokio::sync::oneshot;

use crate::{Result, SchedulerError};

/// The limits of the encoder scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Requests that may wait; more are refused with [`SchedulerError::QueueFull`].
    pub max_waiting: usize,
    /// Padded tokens (longest sequence x sequences) in one forward pass.
    pub max_batch_tokens: usize,
    /// Tokens in one sequence (also bounded by the model's position embeddings).
    pub max_input_tokens: usize,
    /// Tokens over all sequences of one request.
    pub max_request_tokens: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            max_waiting: 256,
            max_batch_tokens: 8192,
            max_input_tokens: 512,
            max_request_tokens: 65536,
        }
    }
}

/// What a request gets back: one output per submitted sequence, in order, or the failure of
/// its batch (shared by every request in it).
pub type EncodeResult = std::result::Result<Vec<EncoderOutput>, Arc<SchedulerError>>;

struct Pending {
    inputs: Vec<EncoderInput>,
    reply: oneshot::Sender<EncodeResult>,
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
    alive: AtomicBool,
    waiting: AtomicUsize,
}

/// What the served encoder is, for the routes to check requests against.
#[derive(Debug, Clone)]
pub struct EncoderInfo {
    /// The labels of a classification head.
    pub labels: Option<Labels>,
    /// The longest sequence a request may send: the smaller of the model's position
    /// embeddings and `max_input_tokens`.
    pub max_sequence_tokens: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// What the model accepts; every request is checked against it before it is queued.
    pub contract: EncoderContract,
}

impl EncoderInfo {
    /// What `model` is, with requests' sequences limited to `max_input_tokens`.
    pub fn of(model: &dyn EncoderModel, max_input_tokens: usize) -> Self {
        Self {
            labels: model.labels().cloned(),
            max_sequence_tokens: model.max_positions().min(max_input_tokens),
            hidden_size: model.hidden_size(),
            contract: model.contract(),
        }
    }

    /// The head's task.
    pub fn task(&self) -> EncoderTask {
        self.contract.task
    }
}

/// The handle to the encoder thread. Dropping it lets queued requests finish, then stops it.
pub struct EncoderScheduler {
    shared: Arc<Shared>,
    config: EncoderConfig,
    info: EncoderInfo,
    thread: Option<JoinHandle<()>>,
}

impl EncoderScheduler {
    /// Starts the encoder thread over `model`.
    pub fn start(model: Box<dyn EncoderModel>, config: EncoderConfig) -> Result<Self> {
        if config.max_batch_tokens == 0 || config.max_input_tokens == 0 {
            return Err(SchedulerError::InvalidRequest(
                "max_batch_tokens and max_input_tokens must be at least 1".into(),
            ));
        }
        let info = EncoderInfo::of(model.as_ref(), config.max_input_tokens);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            alive: AtomicBool::new(true),
            waiting: AtomicUsize::new(0),
        });
        let worker = Worker {
            model,
            max_batch_tokens: config.max_batch_tokens,
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("candlewick-encoder".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                SchedulerError::InvalidRequest(format!("cannot start the encoder thread: {e}"))
            })?;
        Ok(Self {
            shared,
            config,
            info,
            thread: Some(thread),
        })
    }

    /// What the served encoder computes.
    pub fn info(&self) -> &EncoderInfo {
        &self.info
    }

    /// The limits this scheduler enforces.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Requests waiting for the encoder thread.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// Whether the encoder thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Queues `inputs` as one request; the outputs arrive on the returned receiver. A request
    /// whose receiver is dropped before its batch runs is skipped. Refuses at once what cannot
    /// be served: every input is checked against the model's contract here, on the caller's
    /// thread, so that a batch only ever holds inputs the model takes and one bad request never
    /// fails the requests batched beside it.
    pub fn submit(&self, inputs: Vec<EncoderInput>) -> Result<oneshot::Receiver<EncodeResult>> {
        if inputs.is_empty() {
            return Err(SchedulerError::InvalidRequest("no input to encode".into()));
        }
        let mut total = 0;
        for input in &inputs {
            if input.ids.is_empty() {
                return Err(SchedulerError::InvalidRequest(
                    "an input has no tokens".into(),
                ));
            }
            if input.ids.len() > self.info.max_sequence_tokens {
                return Err(SchedulerError::PromptTooLong {
                    tokens: input.ids.len(),
                    max: self.info.max_sequence_tokens,
                });
            }
            self.info.contract.check(input)?;
            total += input.width();
        }
        if total > self.config.max_request_tokens {
            return Err(SchedulerError::InvalidRequest(format!(
                "the request has {total} tokens in all, more than the maximum of {} per request",
                self.config.max_request_tokens
            )));
        }
        if !self.is_alive() {
            return Err(SchedulerError::Stopped);
        }
        let (reply, receiver) = oneshot::channel();
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
            inputs,
            reply,
            submitted: Instant::now(),
        });
        publish_depth(&self.shared, queue.waiting.len());
        drop(queue);
        self.shared.wake.notify_one();
        Ok(receiver)
    }

    /// Stops accepting requests, lets queued ones finish, and waits for the encoder thread.
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

impl Drop for EncoderScheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn publish_depth(shared: &Shared, depth: usize) {
    shared.waiting.store(depth, Ordering::Relaxed);
    metrics::gauge!("candlewick_encoder_queue_depth").set(depth as f64);
}

struct Worker {
    model: Box<dyn EncoderModel>,
    max_batch_tokens: usize,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(self) {
        while let Some(taken) = self.next_requests() {
            self.serve(taken);
        }
        self.shared.alive.store(false, Ordering::Release);
    }

    /// Blocks until requests wait, then takes every waiting request that still fits one padded
    /// batch beside the first. None once closing with nothing left.
    fn next_requests(&self) -> Option<Vec<Pending>> {
        let mut queue = self.shared.queue.lock().ok()?;
        loop {
            // Requests whose client has gone are dropped before they cost a forward pass.
            queue.waiting.retain(|pending| !pending.reply.is_closed());
            if !queue.waiting.is_empty() {
                break;
            }
            publish_depth(&self.shared, 0);
            if queue.closing {
                return None;
            }
            queue = self.shared.wake.wait(queue).ok()?;
        }
        let mut taken = Vec::new();
        let (mut longest, mut sequences) = (0, 0);
        while let Some(next) = queue.waiting.front() {
            let next_longest = next
                .inputs
                .iter()
                .map(EncoderInput::width)
                .max()
                .unwrap_or(0);
            let longest_after = longest.max(next_longest);
            let cost = longest_after * (sequences + next.inputs.len());
            if !taken.is_empty() && cost > self.max_batch_tokens {
                break;
            }
            longest = longest_after;
            sequences += next.inputs.len();
            taken.extend(queue.waiting.pop_front());
        }
        publish_depth(&self.shared, queue.waiting.len());
        Some(taken)
    }

    /// Runs the taken requests' sequences in batches within the budget and replies to each.
    fn serve(&self, taken: Vec<Pending>) {
        for pending in &taken {
            metrics::histogram!("candlewick_encoder_queue_seconds")
                .record(pending.submitted.elapsed().as_secs_f64());
        }
        let inputs: Vec<&EncoderInput> = taken.iter().flat_map(|p| &p.inputs).collect();
        let mut outputs = Vec::with_capacity(inputs.len());
        let mut failure = None;
        for batch in budgeted_batches(&inputs, self.max_batch_tokens) {
            let started = Instant::now();
            let owned: Vec<EncoderInput> = batch.iter().map(|&input| input.clone()).collect();
            match self.model.forward(&owned) {
                Ok(output) => outputs.extend(output),
                Err(error) => {
                    // Every input passed the contract at submission: what fails now is the
                    // server's fault, and all the batch's requests share it.
                    tracing::error!(%error, "encoder batch failed");
                    failure = Some(Arc::new(SchedulerError::Engine(error)));
                    break;
                }
            }
            metrics::histogram!("candlewick_encoder_batch_size").record(batch.len() as f64);
            metrics::histogram!("candlewick_encoder_batch_seconds")
                .record(started.elapsed().as_secs_f64());
            let tokens: usize = batch.iter().map(|i| i.ids.len()).sum();
            metrics::counter!("candlewick_prompt_tokens_total").increment(tokens as u64);
        }
        let mut outputs = outputs.into_iter();
        for pending in taken {
            let reply = match &failure {
                Some(error) => Err(Arc::clone(error)),
                None => Ok(outputs.by_ref().take(pending.inputs.len()).collect()),
            };
            // A client that has gone no longer wants its reply.
            let _ = pending.reply.send(reply);
        }
    }
}

/// Cuts `inputs` (in order) into batches whose padded size (longest width x inputs) stays within
/// `budget`; a sequence longer than the budget runs alone. The cost is the padded size because
/// every model here runs its batch padded: an unpadded (varlen) model would count real tokens.
fn budgeted_batches<'a>(inputs: &[&'a EncoderInput], budget: usize) -> Vec<Vec<&'a EncoderInput>> {
    let mut batches: Vec<Vec<&EncoderInput>> = Vec::new();
    let mut current: Vec<&EncoderInput> = Vec::new();
    let mut longest = 0;
    for &input in inputs {
        let longest_after = longest.max(input.width());
        if !current.is_empty() && longest_after * (current.len() + 1) > budget {
            batches.push(std::mem::take(&mut current));
            longest = input.width();
        } else {
            longest = longest_after;
        }
        current.push(input);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use candlewick_engine::encoder::InputLimits;

    use super::*;

    /// Sums each sequence's ids into one score, and records the batch sizes it saw.
    struct Summer {
        batches: Arc<Mutex<Vec<usize>>>,
    }

    impl EncoderModel for Summer {
        fn labels(&self) -> Option<&Labels> {
            None
        }
        fn contract(&self) -> EncoderContract {
            EncoderContract {
                limits: InputLimits {
                    vocab_size: 100,
                    type_vocab_size: 1,
                    max_positions: 16,
                    first_position: 0,
                    causal: false,
                    entities: None,
                },
                task: EncoderTask::SequenceClassification,
                has_pooler: false,
            }
        }
        fn hidden_size(&self) -> usize {
            1
        }
        fn forward(
            &self,
            inputs: &[EncoderInput],
        ) -> candlewick_engine::Result<Vec<EncoderOutput>> {
            let contract = self.contract();
            for input in inputs {
                contract.check(input)?;
            }
            self.batches.lock().unwrap().push(inputs.len());
            Ok(inputs
                .iter()
                .map(|i| EncoderOutput::Sequence(vec![i.ids.iter().sum::<u32>() as f32]))
                .collect())
        }
    }

    fn input(ids: &[u32]) -> EncoderInput {
        EncoderInput::single(ids.to_vec())
    }

    fn start(max_batch_tokens: usize) -> (EncoderScheduler, Arc<Mutex<Vec<usize>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let model = Summer {
            batches: Arc::clone(&batches),
        };
        let config = EncoderConfig {
            max_batch_tokens,
            max_input_tokens: 12,
            max_request_tokens: 40,
            ..EncoderConfig::default()
        };
        (
            EncoderScheduler::start(Box::new(model), config).unwrap(),
            batches,
        )
    }

    #[test]
    fn batches_stay_within_the_token_budget() {
        let inputs: Vec<EncoderInput> = (1..=7).map(|n| input(&vec![1; n])).collect();
        let refs: Vec<&EncoderInput> = inputs.iter().collect();
        let batches = budgeted_batches(&refs, 12);
        for batch in &batches {
            let longest = batch.iter().map(|i| i.ids.len()).max().unwrap();
            assert!(longest * batch.len() <= 12 || batch.len() == 1, "{batch:?}");
        }
        let flattened: Vec<&EncoderInput> = batches.into_iter().flatten().collect();
        assert_eq!(flattened, refs, "order is kept");
    }

    #[test]
    fn each_request_gets_its_own_outputs_in_order() {
        let (scheduler, batches) = start(64);
        let receivers: Vec<_> = (0..5u32)
            .map(|r| {
                let inputs = (0..=r).map(|k| input(&[r * 10 + k, 1])).collect();
                scheduler.submit(inputs).unwrap()
            })
            .collect();
        for (r, receiver) in receivers.into_iter().enumerate() {
            let outputs = receiver.blocking_recv().unwrap().unwrap();
            let expected: Vec<EncoderOutput> = (0..=r as u32)
                .map(|k| EncoderOutput::Sequence(vec![(r as u32 * 10 + k + 1) as f32]))
                .collect();
            assert_eq!(outputs, expected);
        }
        let seen = batches.lock().unwrap().clone();
        assert_eq!(
            seen.iter().sum::<usize>(),
            15,
            "every sequence ran once: {seen:?}"
        );
        assert!(seen.iter().all(|&n| n * 2 <= 64));
    }

    #[test]
    fn limits_are_enforced_at_submission() {
        let (scheduler, _) = start(64);
        assert!(matches!(
            scheduler.submit(vec![]),
            Err(SchedulerError::InvalidRequest(_))
        ));
        assert!(matches!(
            scheduler.submit(vec![input(&[])]),
            Err(SchedulerError::InvalidRequest(_))
        ));
        assert!(matches!(
            scheduler.submit(vec![input(&[1; 13])]),
            Err(SchedulerError::PromptTooLong {
                tokens: 13,
                max: 12
            })
        ));
        let many = (0..5).map(|_| input(&[1; 10])).collect();
        let refused = scheduler.submit(many).unwrap_err().to_string();
        assert!(
            refused.contains("50 tokens") && refused.contains("40"),
            "{refused}"
        );
        let out_of_vocabulary = scheduler.submit(vec![input(&[1]), input(&[2, 100])]);
        match out_of_vocabulary {
            Err(error @ SchedulerError::Engine(_)) => {
                assert!(error.is_request_fault());
                assert!(error.to_string().contains("token id 100"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_request_never_joins_a_batch() {
        let (scheduler, batches) = start(64);
        let good: Vec<_> = (0..15u32)
            .map(|r| scheduler.submit(vec![input(&[r, 1])]).unwrap())
            .collect();
        assert!(scheduler.submit(vec![input(&[3, 999])]).is_err());
        for (r, receiver) in good.into_iter().enumerate() {
            assert_eq!(
                receiver.blocking_recv().unwrap().unwrap(),
                vec![EncoderOutput::Sequence(vec![r as f32 + 1.0])]
            );
        }
        assert_eq!(batches.lock().unwrap().iter().sum::<usize>(), 15);
    }

    #[test]
    fn shutdown_answers_what_was_queued() {
        let (mut scheduler, _) = start(64);
        let receiver = scheduler.submit(vec![input(&[2, 3])]).unwrap();
        scheduler.shutdown();
        assert_eq!(
            receiver.blocking_recv().unwrap().unwrap(),
            vec![EncoderOutput::Sequence(vec![5.0])]
        );
        assert!(!scheduler.is_alive());
        assert!(matches!(
            scheduler.submit(vec![input(&[1])]),
            Err(SchedulerError::Stopped)
        ));
    }
}
