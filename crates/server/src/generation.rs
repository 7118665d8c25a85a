//! What completions and chat share once a request is checked and its prompts are token ids:
//! submitting `n` choices per prompt, collecting them for a JSON response, and driving an SSE
//! stream whose chunks each route formats in its own shape.
//!
//! Nothing here outlives the response: the receivers live in the handler's future or in the
//! SSE stream, so a client that goes away drops them, and the scheduler cancels the choices.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use candlewick_engine::grammar::Constraint;
use candlewick_engine::sampling::Sampled;
use candlewick_engine::Tokenizer;
use candlewick_scheduler::{
    Event, FinishReason, GenerationRequest, Scheduler, StopConditions, TokenEvent,
};
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::common::{GenerationParams, Usage};
use crate::error::ApiError;

/// A new response id: `prefix-` and 24 random hex digits.
pub fn request_id(prefix: &str) -> String {
    let bits: u128 = rand::random();
    format!("{prefix}-{:024x}", bits >> 32)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The text of one token for log-probability listings, special tokens spelled out.
pub fn token_text(tokenizer: &Tokenizer, token: u32) -> String {
    tokenizer.decode(&[token], false).unwrap_or_default()
}

/// JSON text of a chunk. Our response types always serialize; should one not, the stream
/// carries an error object instead of breaking.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|error| {
        let envelope = ApiError::Internal(format!("cannot serialize a chunk: {error}")).envelope();
        serde_json::to_string(&envelope).unwrap_or_default()
    })
}

/// The choices of an accepted request, each with the channel its events arrive on.
pub struct Submitted {
    choices: Vec<(usize, UnboundedReceiver<Event>)>,
    prompt_tokens: usize,
}

/// Submits `params.n` choices for each prompt; choice `i` of prompt `p` has index
/// `p * n + i` and, when a seed is given, seed `seed + i`; with a `constraint`, each choice
/// starts from a copy of it. When one submission is refused, the ones before it are cancelled
/// (their receivers are dropped) and the refusal is returned; `prompt_param` names the request
/// field of the prompt in that error.
pub fn submit(
    scheduler: &Scheduler,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    constraint: Option<&Constraint>,
    prompt_param: &'static str,
) -> Result<Submitted, ApiError> {
    let max_total_tokens = scheduler.config().max_total_tokens;
    let mut choices = Vec::with_capacity(prompts.len() * params.n);
    for (prompt_index, prompt) in prompts.iter().enumerate() {
        // Without max_tokens a choice may run to the end of the context.
        let max_new_tokens = params
            .max_tokens
            .unwrap_or_else(|| max_total_tokens.saturating_sub(prompt.len()).max(1));
        for i in 0..params.n {
            let mut sampling = params.sampling.clone();
            sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(i as u64));
            let request = GenerationRequest {
                prompt: prompt.clone(),
                sampling,
                stop: StopConditions {
                    max_new_tokens,
                    stop_token_ids: Vec::new(),
                    ignore_eos: params.ignore_eos,
                    stop_strings: params.stop_strings.clone(),
                },
                constraint: constraint.cloned(),
            };
            let events = scheduler
                .submit(request)
                .map_err(|source| ApiError::scheduler(source, prompt_param))?;
            choices.push((prompt_index * params.n + i, events));
        }
    }
    Ok(Submitted {
        choices,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
    })
}

/// One finished choice.
#[derive(Debug, Clone)]
pub struct ChoiceOutput {
    /// The choice's index in the response.
    pub index: usize,
    /// The generated text (stop strings and stop tokens excluded).
    pub text: String,
    /// Every generated token, the one that ended the choice included.
    pub tokens: Vec<Sampled>,
    /// For each token, how many characters of `text` came before its text.
    pub text_offsets: Vec<usize>,
    /// Why it ended.
    pub finish: FinishReason,
}

impl Submitted {
    /// Waits for every choice to finish, in index order, with the usage of the request.
    pub async fn collect(self) -> Result<(Vec<ChoiceOutput>, Usage), ApiError> {
        let mut outputs = Vec::with_capacity(self.choices.len());
        let mut choices = self.choices;
        choices.sort_by_key(|(index, _)| *index);
        for (index, mut events) in choices {
            let mut text = String::new();
            let mut chars = 0;
            let mut tokens = Vec::new();
            let mut text_offsets = Vec::new();
            let finish = loop {
                match events.recv().await {
                    Some(Event::Token(token)) => {
                        text_offsets.push(chars);
                        chars += token.text.chars().count();
                        text.push_str(&token.text);
                        tokens.push(token.sampled);
                        if let Some(finish) = token.finish {
                            break finish;
                        }
                    }
                    Some(Event::Failed(error)) => return Err(error.into()),
                    None => return Err(engine_went_away()),
                }
            };
            outputs.push(ChoiceOutput {
                index,
                text,
                tokens,
                text_offsets,
                finish,
            });
        }
        let completion_tokens = outputs.iter().map(|o| o.tokens.len()).sum();
        Ok((outputs, Usage::new(self.prompt_tokens, completion_tokens)))
    }

    /// The server-sent event stream: `writer`'s chunks as `data:` lines, a usage chunk when
    /// `include_usage`, then `data: [DONE]`. A failure mid-stream is sent as an error object
    /// (OpenAI's envelope) followed by `[DONE]`.
    pub fn into_sse<W: ChunkWriter>(self, writer: W, include_usage: bool) -> Response {
        let choices = self.choices.len();
        let mut events = SelectAll::new();
        for (index, mut receiver) in self.choices {
            let choice: BoxStream<'static, (usize, Event)> =
                stream::poll_fn(move |cx| receiver.poll_recv(cx))
                    .map(move |event| (index, event))
                    .boxed();
            events.push(choice);
        }
        let state = StreamState {
            events,
            writer,
            pending: VecDeque::new(),
            chars: vec![0; choices],
            finished: vec![false; choices],
            prompt_tokens: self.prompt_tokens,
            completion_tokens: 0,
            include_usage,
            opened: false,
            done: false,
        };
        Sse::new(stream::unfold(state, StreamState::next)).into_response()
    }
}

/// The error for a channel that closed before its choice finished.
fn engine_went_away() -> ApiError {
    ApiError::GenerationFailed("the engine stopped before the request finished".into())
}

/// Formats one route's stream chunks (JSON text, one chunk per `data:` line).
pub trait ChunkWriter: Send + 'static {
    /// Chunks before any token: chat's role deltas, completions' echoed prompts.
    fn opening(&mut self) -> Vec<String>;
    /// Chunks for one token of choice `index`, whose text so far has `chars` characters.
    /// Empty for a token that shows nothing (no text, no log-probabilities, no finish).
    fn token(&mut self, index: usize, token: &TokenEvent, chars: usize) -> Vec<String>;
    /// The last chunk when usage is streamed.
    fn usage(&self, usage: Usage) -> String;
}

struct StreamState<W> {
    events: SelectAll<BoxStream<'static, (usize, Event)>>,
    writer: W,
    pending: VecDeque<String>,
    /// Characters of text sent so far, per choice.
    chars: Vec<usize>,
    finished: Vec<bool>,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
    opened: bool,
    done: bool,
}

impl<W: ChunkWriter> StreamState<W> {
    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        if !self.opened {
            self.opened = true;
            let opening = self.writer.opening();
            self.pending.extend(opening);
        }
        loop {
            if let Some(data) = self.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), self));
            }
            if self.done {
                return None;
            }
            match self.events.next().await {
                Some((index, Event::Token(token))) => self.on_token(index, &token),
                Some((_, Event::Failed(error))) => self.fail(error.into()),
                None if self.finished.iter().all(|&f| f) => self.finish(),
                None => self.fail(engine_went_away()),
            }
        }
    }

    fn on_token(&mut self, index: usize, token: &TokenEvent) {
        self.completion_tokens += 1;
        let chars = self.chars.get(index).copied().unwrap_or(0);
        let chunks = self.writer.token(index, token, chars);
        self.pending.extend(chunks);
        if let Some(sent) = self.chars.get_mut(index) {
            *sent += token.text.chars().count();
        }
        if token.finish.is_some() {
            if let Some(finished) = self.finished.get_mut(index) {
                *finished = true;
            }
        }
    }

    fn finish(&mut self) {
        if self.include_usage {
            let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
            self.pending.push_back(self.writer.usage(usage));
        }
        self.pending.push_back("[DONE]".into());
        self.done = true;
    }

    /// Ends the stream with an error; dropping the other receivers cancels their choices.
    fn fail(&mut self, error: ApiError) {
        tracing::error!(%error, "stream failed");
        self.events = SelectAll::new();
        self.pending.push_back(to_json(&error.envelope()));
        self.pending.push_back("[DONE]".into());
        self.done = true;
    }
}

/// Runs `work` (tokenizing, template rendering) off the async workers.
pub async fn blocking<T, F>(work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))?
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;
    use futures_util::StreamExt;
    use std::sync::Arc;

    use candlewick_scheduler::SchedulerError;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

    use super::*;

    /// Chunks that are just the token's text, to look at the framing alone.
    struct PlainText;

    impl ChunkWriter for PlainText {
        fn opening(&mut self) -> Vec<String> {
            vec!["open".into()]
        }
        fn token(&mut self, index: usize, token: &TokenEvent, chars: usize) -> Vec<String> {
            vec![format!("{index}:{chars}:{}", token.text)]
        }
        fn usage(&self, usage: Usage) -> String {
            format!("usage:{}", usage.total_tokens)
        }
    }

    fn token(text: &str, finish: Option<FinishReason>) -> Event {
        Event::Token(TokenEvent {
            sampled: Sampled {
                token: 7,
                logprob: -0.5,
                top_logprobs: Vec::new(),
            },
            text: text.into(),
            finish,
        })
    }

    fn channels(choices: usize) -> (Vec<UnboundedSender<Event>>, Submitted) {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..choices).map(|_| unbounded_channel()).unzip();
        let submitted = Submitted {
            choices: receivers.into_iter().enumerate().collect(),
            prompt_tokens: 3,
        };
        (senders, submitted)
    }

    async fn sse_body(response: Response) -> String {
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn stream_frames_chunks_then_usage_then_done() {
        let (senders, submitted) = channels(2);
        senders[1]
            .send(token("b", Some(FinishReason::Length)))
            .unwrap();
        senders[0].send(token("a", None)).unwrap();
        senders[0]
            .send(token("é", Some(FinishReason::Stop)))
            .unwrap();
        drop(senders);
        let body = sse_body(submitted.into_sse(PlainText, true)).await;
        let lines: Vec<&str> = body.split("\n\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0], "data: open");
        let mut tokens = lines[1..4].to_vec();
        tokens.sort();
        assert_eq!(tokens, ["data: 0:0:a", "data: 0:1:é", "data: 1:0:b"]);
        assert_eq!(lines[4..], ["data: usage:6", "data: [DONE]"]);
    }

    #[tokio::test]
    async fn failure_mid_stream_sends_the_error_envelope_then_done() {
        let (senders, submitted) = channels(1);
        senders[0].send(token("a", None)).unwrap();
        senders[0]
            .send(Event::Failed(Arc::new(SchedulerError::Timeout {
                limit: std::time::Duration::from_secs(1),
            })))
            .unwrap();
        let body = sse_body(submitted.into_sse(PlainText, true)).await;
        let lines: Vec<&str> = body.split("\n\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 4, "{body}");
        let error: serde_json::Value =
            serde_json::from_str(lines[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(error["error"]["type"], "server_error");
        assert_eq!(error["error"]["code"], "timeout");
        assert_eq!(lines[3], "data: [DONE]");
    }

    #[tokio::test]
    async fn channel_closed_before_the_finish_is_an_error() {
        let (senders, submitted) = channels(1);
        senders[0].send(token("a", None)).unwrap();
        drop(senders);
        let body = sse_body(submitted.into_sse(PlainText, false)).await;
        assert!(body.contains("the engine stopped"), "{body}");
        let (senders, submitted) = channels(1);
        drop(senders);
        let error = submitted.collect().await.unwrap_err();
        assert_eq!(error.status().as_u16(), 500);
    }

    #[tokio::test]
    async fn dropping_the_stream_closes_every_choice_so_the_scheduler_cancels_them() {
        let (senders, submitted) = channels(3);
        let mut body = submitted
            .into_sse(PlainText, false)
            .into_body()
            .into_data_stream();
        senders[0].send(token("a", None)).unwrap();
        assert!(body.next().await.is_some());
        assert!(senders.iter().all(|s| !s.is_closed()));
        drop(body);
        assert!(senders.iter().all(UnboundedSender::is_closed));
    }

    #[tokio::test]
    async fn collected_choices_come_in_index_order_with_text_offsets_and_usage() {
        let (senders, submitted) = channels(2);
        senders[1]
            .send(token("x", Some(FinishReason::Stop)))
            .unwrap();
        senders[0].send(token("hé", None)).unwrap();
        senders[0].send(token("", None)).unwrap();
        senders[0]
            .send(token("!", Some(FinishReason::Length)))
            .unwrap();
        let (outputs, usage) = submitted.collect().await.unwrap();
        assert_eq!(outputs[0].text, "hé!");
        assert_eq!(outputs[0].text_offsets, [0, 2, 2]);
        assert_eq!(outputs[0].finish, FinishReason::Length);
        assert_eq!(outputs[1].index, 1);
        assert_eq!(usage, Usage::new(3, 4));
    }

    #[test]
    fn request_ids_have_24_hex_digits() {
        let id = request_id("cmpl");
        let hex = id.strip_prefix("cmpl-").unwrap();
        assert_eq!(hex.len(), 24);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(request_id("cmpl"), id);
    }
}
