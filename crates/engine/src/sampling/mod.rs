//! Logits processing and token sampling for one sequence.
//!
//! A [`Sampler`] belongs to exactly one sequence: it owns that sequence's random number generator
//! and the token counts its penalties need, so what a sequence generates never depends on the
//! other sequences of a batch. [`Sampler::sample`] takes the sequence's row of logits, copied to
//! the host, and processes it in this order:
//!
//! 1. `logit_bias` is added to the logits of the tokens it names.
//! 2. `repetition_penalty` is applied once to every distinct token of the prompt and of the
//!    generation so far: a positive logit is divided by it, a negative one multiplied by it.
//! 3. `presence_penalty` and `frequency_penalty` are subtracted from the tokens generated so far
//!    (the prompt does not count): `logit -= presence + frequency * count`.
//! 4. Log-probabilities are taken here, as the log-softmax of the processed logits at temperature
//!    1, which is what OpenAI-compatible servers report whatever the temperature and filters.
//! 5. With `temperature == 0` or `top_k == Some(1)` the token is the argmax, ties going to the
//!    lowest id. Otherwise the logits are divided by `temperature`, then `top_k`, `top_p` and
//!    `min_p` each keep a set of the most probable tokens, and the token is drawn from what is left,
//!    renormalised, with the sequence's own generator.
//!
//! Every filter keeps a prefix of the vocabulary ranked by logit (ties ranked by id), so the kept
//! set does not depend on how the ranking was computed, and the draw walks the kept tokens in id
//! order: a seed and a sequence of logits always give the same tokens.

use std::cmp::Ordering;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The most alternatives [`SamplingParams::logprobs`] may ask for, as in OpenAI's API.
pub const MAX_LOGPROBS: usize = 20;

/// Bound on the magnitude of presence and frequency penalties, as in OpenAI's API.
const MAX_ABS_PENALTY: f32 = 2.0;

/// Bound on the magnitude of a logit bias, as in OpenAI's API; -100 effectively bans a token.
const MAX_ABS_LOGIT_BIAS: f32 = 100.0;

/// A cumulative probability this close below `top_p` counts as reaching it, so that the rounding
/// of logits to f32 does not pull an extra token into the nucleus.
const TOP_P_TOLERANCE: f64 = 1e-6;

/// Tokens whose probability is below one of these fractions of the most probable one's are left
/// out of ranking whenever the filters provably keep none of them (the highest such floor is
/// used): for the peaked distributions of language models that leaves tens or hundreds of tokens
/// to rank instead of the whole vocabulary.
const RANKING_FLOORS: [f32; 4] = [1e-1, 1e-2, 1e-3, 1e-4];

/// How many tokens `top_p` ranks at first; the count doubles until the nucleus is complete, so
/// that peaked distributions never pay for sorting the whole vocabulary.
const TOP_P_FIRST_CHUNK: usize = 64;

/// How one sequence's next token is chosen.
///
/// Deserialising fills every missing field with its default, which leaves the distribution of the
/// model untouched: temperature 1, no filtering, no penalties.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Divides the logits before sampling; 0 picks the most probable token (greedy decoding).
    pub temperature: f32,
    /// Keeps only the `k` most probable tokens; `None` or `Some(0)` keeps them all.
    pub top_k: Option<usize>,
    /// Keeps the smallest set of most probable tokens whose probability adds up to at least this;
    /// 1 keeps them all.
    pub top_p: f32,
    /// Keeps only the tokens at least this fraction as probable as the most probable one; 0 keeps
    /// them all.
    pub min_p: f32,
    /// Penalises every token already in the prompt or the generation (1 = no penalty, above 1
    /// discourages repetition).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token generated at least once.
    pub presence_penalty: f32,
    /// Subtracted from the logit of every generated token once per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of the given token ids before anything else.
    pub logit_bias: BTreeMap<u32, f32>,
    /// Seeds the sequence's random number generator; `None` seeds it from the operating system's
    /// randomness.
    pub seed: Option<u64>,
    /// How many of the most probable alternatives to report with each token; `None` reports none.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: BTreeMap::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks every parameter against its allowed range for a model with `vocab_size` tokens.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingError> {
        self.validate_ranges()?;
        match self
            .logit_bias
            .keys()
            .find(|&&id| id as usize >= vocab_size)
        {
            Some(&token) => Err(SamplingError::TokenOutOfVocabulary { token, vocab_size }),
            None => Ok(()),
        }
    }

    /// The checks of [`SamplingParams::validate`] that need no vocabulary.
    fn validate_ranges(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        check(
            t.is_finite() && t >= 0.0,
            "temperature",
            "a finite number >= 0",
            t,
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            "in (0, 1]",
            self.top_p,
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "min_p",
            "in [0, 1]",
            self.min_p,
        )?;
        let r = self.repetition_penalty;
        check(
            r.is_finite() && r > 0.0,
            "repetition_penalty",
            "a finite number > 0",
            r,
        )?;
        let penalties = -MAX_ABS_PENALTY..=MAX_ABS_PENALTY;
        let (p, f) = (self.presence_penalty, self.frequency_penalty);
        check(penalties.contains(&p), "presence_penalty", "in [-2, 2]", p)?;
        check(penalties.contains(&f), "frequency_penalty", "in [-2, 2]", f)?;
        let biases = -MAX_ABS_LOGIT_BIAS..=MAX_ABS_LOGIT_BIAS;
        for (&token, &bias) in &self.logit_bias {
            let value = format!("{bias} for token {token}");
            check(
                biases.contains(&bias),
                "logit_bias",
                "in [-100, 100]",
                value,
            )?;
        }
        if let Some(n) = self.logprobs {
            check(n <= MAX_LOGPROBS, "logprobs", "at most 20", n)?;
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// Returns an [`SamplingError::InvalidParameter`] unless `ok`.
fn check(
    ok: bool,
    name: &'static str,
    allowed: &'static str,
    value: impl ToString,
) -> Result<(), SamplingError> {
    if ok {
        Ok(())
    } else {
        Err(SamplingError::InvalidParameter {
            name,
            allowed,
            value: value.to_string(),
        })
    }
}

/// Why sampling parameters were refused or a token could not be sampled.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is outside its allowed range.
    #[error("{name} must be {allowed}, got {value}")]
    InvalidParameter {
        /// The parameter's name, as in the request.
        name: &'static str,
        /// The allowed values, in words.
        allowed: &'static str,
        /// The value that was given.
        value: String,
    },

    /// `logit_bias` names a token the model does not have.
    #[error("logit_bias names token {token}, but the vocabulary has {vocab_size} tokens")]
    TokenOutOfVocabulary {
        /// The token id that was given.
        token: u32,
        /// The number of tokens of the vocabulary.
        vocab_size: usize,
    },

    /// The row of logits is empty.
    #[error("cannot sample from an empty row of logits")]
    EmptyLogits,

    /// The model produced a NaN or +inf logit, which has no probability to sample from.
    #[error("logit of token {token} is {value}")]
    InvalidLogit {
        /// The first token whose logit is NaN or +inf.
        token: u32,
        /// Its logit.
        value: f32,
    },

    /// Every logit is -inf, so no token can be sampled.
    #[error("every token is masked out (all logits are -inf)")]
    AllTokensMasked,
}

impl SamplingError {
    /// Whether the request's parameters are at fault (a 4xx), not the model's logits (a 5xx).
    pub fn is_request_fault(&self) -> bool {
        match self {
            Self::InvalidParameter { .. } | Self::TokenOutOfVocabulary { .. } => true,
            Self::EmptyLogits | Self::InvalidLogit { .. } | Self::AllTokensMasked => false,
        }
    }
}

/// A sampled token, with the log-probabilities that were asked for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// The chosen token's log-probability (log-softmax of the logits after bias and penalties,
    /// before temperature and filtering).
    pub logprob: f32,
    /// The [`SamplingParams::logprobs`] most probable tokens and their log-probabilities, most
    /// probable first, ties by lowest id; tokens masked to -inf carry `f32::NEG_INFINITY`. Empty
    /// when no log-probabilities were asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples the tokens of one sequence and keeps the state its penalties need.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    /// Distinct tokens of the prompt and the generation; only tracked with a repetition penalty.
    seen: HashSet<u32>,
    /// How many times each token was generated.
    generated: HashMap<u32, u32>,
    /// The processed logits of the current step, kept to reuse the allocation.
    logits: Vec<f32>,
    /// Tempered weights of the current step, kept to reuse the allocation.
    weights: Vec<f32>,
    /// Candidate token ids of the current step, kept to reuse the allocation.
    candidates: Vec<u32>,
}

impl Sampler {
    /// Creates the sampler of a sequence whose prompt is `prompt`.
    ///
    /// Fails when a parameter is out of range; token ids are only checked against the vocabulary
    /// by [`SamplingParams::validate`] and [`Sampler::sample`].
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self, SamplingError> {
        params.validate_ranges()?;
        let seed = params.seed.unwrap_or_else(entropy_seed);
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Ok(Self {
            params,
            seed,
            rng: StdRng::seed_from_u64(seed),
            seen,
            generated: HashMap::new(),
            logits: Vec::new(),
            weights: Vec::new(),
            candidates: Vec::new(),
        })
    }

    /// The parameters this sampler was created with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed of this sampler's generator: the requested one, or the one drawn for it, which
    /// replays the sequence when passed as [`SamplingParams::seed`].
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Chooses the next token from the sequence's row of logits and records it for the penalties
    /// of later steps.
    ///
    /// Greedy steps draw nothing from the generator; every other step draws exactly one number.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled, SamplingError> {
        self.sample_allowed(logits, None)
    }

    /// [`Sampler::sample`] among the tokens `allowed` permits (bit `t % 32` of word `t / 32`
    /// for token `t`, as [`crate::grammar::Constraint::mask`] gives it): the others are masked
    /// to -inf after the bias and penalties, so log-probabilities are those of the constrained
    /// distribution. `None` allows every token.
    pub fn sample_allowed(
        &mut self,
        logits: &[f32],
        allowed: Option<&[u32]>,
    ) -> Result<Sampled, SamplingError> {
        self.process(logits)?;
        if let Some(allowed) = allowed {
            // Word by word: a word of 32 allowed tokens (most of a free-text state) costs one
            // comparison.
            for (at, chunk) in self.logits.chunks_mut(32).enumerate() {
                let word = allowed.get(at).copied().unwrap_or(0);
                if word == u32::MAX {
                    continue;
                }
                for (bit, logit) in chunk.iter_mut().enumerate() {
                    if word >> bit & 1 == 0 {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let logits = &self.logits;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SamplingError::AllTokensMasked);
        }
        let (token, log_normaliser) = if self.params.is_greedy() {
            (argmax(logits), log_sum_exp(logits, max))
        } else {
            let temperature = self.params.temperature;
            fill_weights(logits, max, temperature, &mut self.weights);
            let weights = &self.weights;
            let token = draw(
                logits,
                weights,
                &self.params,
                &mut self.candidates,
                &mut self.rng,
            );
            let log_normaliser = if temperature == 1.0 {
                max as f64 + weights.iter().map(|&w| w as f64).sum::<f64>().ln()
            } else {
                log_sum_exp(logits, max)
            };
            (token, log_normaliser)
        };
        let logprob = |logit: f32| (logit as f64 - log_normaliser) as f32;
        let top_logprobs = match self.params.logprobs {
            Some(n) => top_n(logits, n)
                .into_iter()
                .map(|(id, logit)| (id, logprob(logit)))
                .collect(),
            None => Vec::new(),
        };
        let sampled = Sampled {
            token,
            logprob: logprob(logits[token as usize]),
            top_logprobs,
        };
        self.record(token);
        Ok(sampled)
    }

    /// Records a token appended to the sequence without [`Sampler::sample`] (a forced or
    /// speculatively accepted token), so that later penalties count it.
    pub fn record(&mut self, token: u32) {
        *self.generated.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    /// Copies `logits` into `self.logits` and applies the bias and penalties to the copy.
    fn process(&mut self, logits: &[f32]) -> Result<(), SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        // -inf is a mask and stays one; NaN and +inf would turn the softmax into NaN.
        if let Some((token, &value)) = logits
            .iter()
            .enumerate()
            .find(|(_, l)| l.is_nan() || **l == f32::INFINITY)
        {
            return Err(SamplingError::InvalidLogit {
                token: token as u32,
                value,
            });
        }
        let vocab_size = logits.len();
        let processed = &mut self.logits;
        processed.clear();
        processed.extend_from_slice(logits);

        for (&token, &bias) in &self.params.logit_bias {
            let logit = processed
                .get_mut(token as usize)
                .ok_or(SamplingError::TokenOutOfVocabulary { token, vocab_size })?;
            *logit += bias;
        }

        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            // Tokens past the row (a tokenizer larger than the model's head) have no logit to
            // penalise.
            for &token in &self.seen {
                if let Some(logit) = processed.get_mut(token as usize) {
                    // A tiny penalty could push a large logit to +inf; saturate instead, since
                    // +inf would make the softmax NaN.
                    *logit = if *logit > 0.0 {
                        (*logit / penalty).min(f32::MAX)
                    } else {
                        *logit * penalty
                    };
                }
            }
        }

        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(logit) = processed.get_mut(token as usize) {
                    *logit -= presence + frequency * count as f32;
                }
            }
        }
        Ok(())
    }
}

/// A seed from the operating system's randomness.
///
/// rand is built without its `os_rng` feature, so this takes the randomness std already draws
/// from the operating system for `HashMap`'s keys: every `RandomState` gets distinct keys, and
/// SipHash spreads them over the whole `u64`.
fn entropy_seed() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// Ranks tokens by descending logit, ties by ascending id: `Less` means `a` is more probable.
fn rank(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// The id of the largest logit, the lowest one among equals.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(logits)))`, with `max` the largest (finite) logit.
fn log_sum_exp(logits: &[f32], max: f32) -> f64 {
    // f32 exponentials are accurate enough once shifted into [0, 1], and much faster over a whole
    // vocabulary; the sum is what loses precision, so it is kept in f64.
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    max as f64 + sum.ln()
}

/// Fills `weights` with each token's weight at `temperature`, relative to the most probable one,
/// whose logit is `max`: the unnormalised tempered probabilities.
fn fill_weights(logits: &[f32], max: f32, temperature: f32, weights: &mut Vec<f32>) {
    // Subtracting the maximum before dividing keeps every weight in [0, 1] however small the
    // temperature, and the most probable token's weight exactly 1; dividing first could overflow
    // to +inf.
    weights.clear();
    weights.extend(logits.iter().map(|&l| ((l - max) / temperature).exp()));
}

/// The `n` highest logits with their ids, highest first, ties by lowest id.
///
/// `n` is small (at most [`MAX_LOGPROBS`]), so keeping a sorted list beats ranking the vocabulary:
/// almost every logit is rejected by a single comparison with the current last.
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return top;
    }
    for (id, &logit) in logits.iter().enumerate() {
        if top.len() == n && top.last().is_some_and(|&(_, last)| logit <= last) {
            continue;
        }
        // Ids come in increasing order, so an equal logit already kept has the lower id and
        // stays in front.
        let at = top.partition_point(|&(_, kept)| kept >= logit);
        top.insert(at, (id as u32, logit));
        top.truncate(n);
    }
    top
}

/// Ranks `candidates[..end]`, given that `candidates[..ranked]` is already ranked and ahead of
/// all the rest, without ranking anything past `end`.
fn rank_prefix(logits: &[f32], candidates: &mut [u32], ranked: usize, end: usize) {
    let rest = &mut candidates[ranked..];
    let count = end - ranked;
    if count == 0 {
        return;
    }
    if count < rest.len() {
        rest.select_nth_unstable_by(count - 1, |&a, &b| rank(logits, a, b));
    }
    rest[..count].sort_unstable_by(|&a, &b| rank(logits, a, b));
}

/// Applies `top_k`, then `top_p`, then `min_p` to the tokens of `logits`, whose tempered weights
/// are `weights`, leaving the kept tokens in `candidates`.
///
/// Returns the least probable token kept, as (logit, id): every token ranked ahead of it is kept
/// too. Returns `None`, with `candidates` untouched, when no filter is enabled.
fn filter(
    logits: &[f32],
    weights: &[f32],
    params: &SamplingParams,
    candidates: &mut Vec<u32>,
) -> Option<(f32, u32)> {
    let top_k = params.top_k.filter(|&k| k > 0);
    if top_k.is_none() && params.top_p >= 1.0 && params.min_p <= 0.0 {
        return None;
    }
    let weight = |id: u32| weights[id as usize] as f64;
    let top_p = params.top_p as f64 - TOP_P_TOLERANCE;

    let (mut unmasked, mut total) = (0, 0.0);
    // How many tokens, and how much weight, lie between each floor and the one above it.
    let mut between_floors = [(0, 0.0); RANKING_FLOORS.len()];
    for (&logit, &w) in logits.iter().zip(weights) {
        if logit > f32::NEG_INFINITY {
            unmasked += 1;
            total += w as f64;
            if let Some(level) = RANKING_FLOORS.iter().position(|&floor| w >= floor) {
                between_floors[level].0 += 1;
                between_floors[level].1 += w as f64;
            }
        }
    }
    let top_k = top_k.filter(|&k| k < unmasked);
    // Each filter keeps a prefix of the ranking, and so does a floor: it only drops tokens the
    // filters would drop anyway when the tokens above it hold all of the top k, or (without
    // top_k) enough mass for top_p, or (with neither) all that min_p keeps.
    let (mut above, mut mass_above) = (0, 0.0);
    let mut floor = 0.0;
    for (&candidate, &(count, mass)) in RANKING_FLOORS.iter().zip(&between_floors) {
        above += count;
        mass_above += mass;
        let suffices = match top_k {
            Some(k) => above >= k,
            None if params.top_p < 1.0 => mass_above >= top_p * total,
            None => params.min_p >= candidate,
        };
        if suffices {
            floor = candidate;
            break;
        }
    }
    candidates.clear();
    candidates
        .extend((0..logits.len() as u32).filter(|&id| {
            logits[id as usize] > f32::NEG_INFINITY && weights[id as usize] >= floor
        }));

    if let Some(k) = top_k {
        candidates.select_nth_unstable_by(k - 1, |&a, &b| rank(logits, a, b));
        candidates.truncate(k);
        // top_p applies to the distribution renormalised over the top k.
        total = candidates.iter().map(|&id| weight(id)).sum();
    }

    if params.top_p < 1.0 {
        let target = top_p * total;
        let mut mass = 0.0;
        let mut ranked = 0;
        let mut chunk = TOP_P_FIRST_CHUNK;
        let mut keep = candidates.len();
        'nucleus: while ranked < candidates.len() {
            let end = (ranked + chunk).min(candidates.len());
            rank_prefix(logits, candidates, ranked, end);
            for (offset, &id) in candidates[ranked..end].iter().enumerate() {
                mass += weight(id);
                if mass >= target {
                    keep = ranked + offset + 1;
                    break 'nucleus;
                }
            }
            ranked = end;
            chunk *= 2;
        }
        candidates.truncate(keep);
    }

    if params.min_p > 0.0 {
        // The most probable token has weight exactly 1, so a weight is the ratio of a token's
        // probability to the largest one.
        candidates.retain(|&id| weights[id as usize] >= params.min_p);
    }

    candidates
        .iter()
        .copied()
        .max_by(|&a, &b| rank(logits, a, b))
        .map(|id| (logits[id as usize], id))
}

/// Draws a token from the distribution given by the tempered `weights` of the tokens of `logits`,
/// after filtering. `candidates` is scratch space.
fn draw(
    logits: &[f32],
    weights: &[f32],
    params: &SamplingParams,
    candidates: &mut Vec<u32>,
    rng: &mut StdRng,
) -> u32 {
    let cutoff = filter(logits, weights, params, candidates);
    let kept = |id: u32| {
        let logit = logits[id as usize];
        cutoff.is_none_or(|(last, last_id)| logit > last || (logit == last && id <= last_id))
    };
    // Masked tokens have weight 0, so they add nothing and are never chosen below.
    let total: f64 = match cutoff {
        Some(_) => candidates
            .iter()
            .map(|&id| weights[id as usize] as f64)
            .sum(),
        None => weights.iter().map(|&w| w as f64).sum(),
    };
    let threshold = rng.random::<f64>() * total;

    // Walk the kept tokens in id order, so that the token a draw maps to depends only on the kept
    // set, not on the order the filters left the candidates in.
    let mut cumulative = 0.0;
    let mut last = None;
    for (id, &w) in weights.iter().enumerate() {
        let id = id as u32;
        if w > 0.0 && kept(id) {
            cumulative += w as f64;
            last = Some(id);
            if cumulative > threshold {
                return id;
            }
        }
    }
    // Rounding can leave the cumulative sum a hair below a threshold drawn next to the total.
    // The most probable token always has weight 1, so `last` is set.
    last.unwrap_or_else(|| argmax(logits))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: usize = 10_000;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(42),
            ..SamplingParams::default()
        }
    }

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[]).unwrap()
    }

    /// Logits whose softmax is `probs`.
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    /// How often each token is drawn in [`DRAWS`] independent draws from `logits`.
    ///
    /// Each draw uses a fresh sampler, so that penalties from earlier draws play no part.
    fn frequencies(params: &SamplingParams, logits: &[f32]) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..DRAWS {
            let params = SamplingParams {
                seed: Some(rng.random()),
                ..params.clone()
            };
            let token = sampler(params).sample(logits).unwrap().token;
            counts[token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
    }

    /// Asserts that observed frequencies match `expected` within four standard deviations.
    fn assert_frequencies(observed: &[f64], expected: &[f64]) {
        for (token, (&o, &e)) in observed.iter().zip(expected).enumerate() {
            if e == 0.0 {
                assert_eq!(o, 0.0, "token {token} must never be drawn");
            } else {
                let tolerance = 4.0 * (e * (1.0 - e) / DRAWS as f64).sqrt() + 1e-3;
                assert!(
                    (o - e).abs() <= tolerance,
                    "token {token}: frequency {o}, expected {e} ± {tolerance}"
                );
            }
        }
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let sum: f64 = w.iter().sum();
        w.iter().map(|x| x / sum).collect()
    }

    fn processed(sampler: &mut Sampler, logits: &[f32]) -> Vec<f32> {
        sampler.process(logits).unwrap();
        sampler.logits.clone()
    }

    #[test]
    fn defaults_deserialise_from_an_empty_object() {
        let params: SamplingParams = serde_json::from_str("{}").unwrap();
        assert_eq!(params, SamplingParams::default());
        assert_eq!(params.temperature, 1.0);
        assert_eq!(params.top_p, 1.0);
        assert_eq!(params.repetition_penalty, 1.0);
        assert!(params.validate(10).is_ok());
    }

    #[test]
    fn logit_bias_deserialises_from_string_keys_like_openai() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"logit_bias": {"50256": -100, "7": 2.5}, "top_k": 5}"#)
                .unwrap();
        assert_eq!(params.logit_bias.get(&50256), Some(&-100.0));
        assert_eq!(params.logit_bias.get(&7), Some(&2.5));
        assert_eq!(params.top_k, Some(5));
        let json = serde_json::to_string(&params).unwrap();
        let back: SamplingParams = serde_json::from_str(&json).unwrap();
        assert_eq!(back, params);
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let logits = [0.1, 2.0, -1.0, 1.9, f32::NEG_INFINITY];
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&logits).unwrap().token, 1);
    }

    #[test]
    fn greedy_breaks_ties_by_lowest_id() {
        let logits = [1.0, 3.0, 0.0, 3.0, 3.0];
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&logits).unwrap().token, 1);
    }

    #[test]
    fn greedy_draws_nothing_from_the_generator() {
        let logits = logits_of(&[0.2, 0.3, 0.5]);
        let mut greedy = sampler(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        greedy.sample(&logits).unwrap();
        let mut untouched = sampler(params());
        assert_eq!(greedy.rng.random::<u64>(), untouched.rng.random::<u64>());
    }

    #[test]
    fn top_k_of_one_is_greedy_at_any_temperature() {
        let logits = [1.0, 1.5, 1.4, 0.0];
        let observed = frequencies(
            &SamplingParams {
                temperature: 100.0,
                top_k: Some(1),
                ..params()
            },
            &logits,
        );
        assert_eq!(observed, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn temperature_one_samples_the_softmax() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        let observed = frequencies(&params(), &logits_of(&probs));
        assert_frequencies(&observed, &probs);
    }

    #[test]
    fn temperature_sharpens_and_flattens_the_distribution() {
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
        for temperature in [0.5, 2.0] {
            let observed = frequencies(
                &SamplingParams {
                    temperature,
                    ..params()
                },
                &logits,
            );
            assert_frequencies(&observed, &softmax(&logits, temperature as f64));
        }
    }

    #[test]
    fn tiny_temperature_behaves_like_greedy_without_nan() {
        let logits = [3.0, 2.999, -50.0, f32::NEG_INFINITY];
        let mut s = sampler(SamplingParams {
            temperature: 1e-30,
            ..params()
        });
        for _ in 0..100 {
            let sampled = s.sample(&logits).unwrap();
            assert_eq!(sampled.token, 0);
            assert!(sampled.logprob.is_finite());
        }
    }

    #[test]
    fn top_k_never_samples_outside_the_k_most_probable() {
        let probs = [0.05, 0.3, 0.1, 0.25, 0.2, 0.1];
        let observed = frequencies(
            &SamplingParams {
                top_k: Some(3),
                ..params()
            },
            &logits_of(&probs),
        );
        // 0.3, 0.25 and 0.2 survive, renormalised by their sum 0.75.
        assert_frequencies(&observed, &[0.0, 0.4, 0.0, 1.0 / 3.0, 0.8 / 3.0, 0.0]);
    }

    #[test]
    fn top_k_of_zero_or_above_the_vocabulary_keeps_every_token() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        for top_k in [Some(0), Some(4), Some(1000)] {
            let observed = frequencies(&SamplingParams { top_k, ..params() }, &logits_of(&probs));
            assert_frequencies(&observed, &probs);
        }
    }

    #[test]
    fn top_k_breaks_ties_at_the_boundary_by_lowest_id() {
        let logits = [1.0, 2.0, 1.0, 1.0];
        let observed = frequencies(
            &SamplingParams {
                top_k: Some(2),
                ..params()
            },
            &logits,
        );
        let e = std::f64::consts::E;
        assert_frequencies(&observed, &[1.0 / (1.0 + e), e / (1.0 + e), 0.0, 0.0]);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_mass() {
        let probs = [0.15, 0.5, 0.05, 0.3];
        let logits = logits_of(&probs);
        // 0.5 + 0.3 reaches 0.8 exactly: the third token is not needed.
        let observed = frequencies(
            &SamplingParams {
                top_p: 0.8,
                ..params()
            },
            &logits,
        );
        assert_frequencies(&observed, &[0.0, 0.625, 0.0, 0.375]);
        // Just past 0.8 the third most probable token is needed.
        let observed = frequencies(
            &SamplingParams {
                top_p: 0.81,
                ..params()
            },
            &logits,
        );
        assert_frequencies(&observed, &[0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]);
    }

    #[test]
    fn top_p_always_keeps_the_most_probable_token() {
        let logits = logits_of(&[0.3, 0.4, 0.3]);
        let observed = frequencies(
            &SamplingParams {
                top_p: 1e-9,
                ..params()
            },
            &logits,
        );
        assert_eq!(observed, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn top_p_applies_to_the_distribution_renormalised_by_top_k() {
        // After top_k = 2 the probabilities are 4/7 and 3/7, so top_p = 0.5 keeps one token;
        // on the original distribution it would have kept two.
        let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
        let observed = frequencies(
            &SamplingParams {
                top_k: Some(2),
                top_p: 0.5,
                ..params()
            },
            &logits,
        );
        assert_eq!(observed, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn top_p_applies_after_temperature() {
        // At temperature 0.5 the probabilities become proportional to 0.36, 0.16, 0.04 (0.64,
        // 0.29, 0.07): 0.64 alone does not reach 0.9 but 0.93 does.
        let logits = logits_of(&[0.6, 0.4, 0.2]);
        let observed = frequencies(
            &SamplingParams {
                temperature: 0.5,
                top_p: 0.9,
                ..params()
            },
            &logits,
        );
        assert_frequencies(&observed, &[0.36 / 0.52, 0.16 / 0.52, 0.0]);
    }

    #[test]
    fn top_p_ranks_large_vocabularies_beyond_the_first_chunk() {
        // A nearly flat distribution over 1000 tokens needs several doubling rounds.
        let logits: Vec<f32> = (0..1000).map(|i| -(i as f32) * 1e-3).collect();
        let probs = softmax(&logits, 1.0);
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p;
                mass >= 0.5
            })
            .unwrap()
            + 1;
        assert!(keep > 4 * TOP_P_FIRST_CHUNK);
        let mut s = sampler(SamplingParams {
            top_p: 0.5,
            ..params()
        });
        let mut highest = 0;
        for _ in 0..DRAWS {
            let token = s.sample(&logits).unwrap().token as usize;
            assert!(
                token < keep,
                "token {token} is outside the nucleus of {keep}"
            );
            highest = highest.max(token);
        }
        assert!(
            highest > keep - 20,
            "the tail of the nucleus is never drawn"
        );
    }

    #[test]
    fn min_p_keeps_tokens_within_ratio_of_most_probable() {
        let probs = [0.4, 0.2, 0.19, 0.21];
        let observed = frequencies(
            &SamplingParams {
                min_p: 0.49,
                ..params()
            },
            &logits_of(&probs),
        );
        // 0.2 is half of 0.4 and stays; 0.19 is less than 0.49 of it.
        assert_frequencies(&observed, &[0.4 / 0.81, 0.2 / 0.81, 0.0, 0.21 / 0.81]);
    }

    #[test]
    fn min_p_applies_after_temperature() {
        // At temperature 2 the ratio 0.2 / 0.8 = 0.25 becomes sqrt(0.25) = 0.5.
        let logits = logits_of(&[0.8, 0.2]);
        let observed = frequencies(
            &SamplingParams {
                temperature: 2.0,
                min_p: 0.45,
                ..params()
            },
            &logits,
        );
        assert_frequencies(&observed, &[2.0 / 3.0, 1.0 / 3.0]);
    }

    #[test]
    fn masked_tokens_are_never_sampled() {
        let inf = f32::NEG_INFINITY;
        let logits = [inf, 0.0, inf, 0.0, inf];
        for p in [
            params(),
            SamplingParams {
                top_p: 0.9,
                min_p: 0.1,
                top_k: Some(4),
                ..params()
            },
        ] {
            let observed = frequencies(&p, &logits);
            assert_frequencies(&observed, &[0.0, 0.5, 0.0, 0.5, 0.0]);
        }
    }

    #[test]
    fn an_allowed_mask_restricts_draws_and_renormalises_logprobs() {
        // Tokens 1 and 34 allowed (word 0 bit 1, word 1 bit 2); 0 is the most likely overall.
        let mut logits = vec![-5.0f32; 40];
        logits[0] = 10.0;
        logits[1] = 1.0;
        logits[34] = 1.0f32 + 2.0f32.ln();
        let allowed = [1u32 << 1, 1u32 << 2];
        let mut greedy = sampler(SamplingParams {
            temperature: 0.0,
            logprobs: Some(3),
            ..params()
        });
        let chosen = greedy.sample_allowed(&logits, Some(&allowed)).unwrap();
        assert_eq!(chosen.token, 34);
        // p(34) = 2/3 of the allowed mass; masked tokens rank last at -inf.
        assert!(
            (chosen.logprob - (2.0f32 / 3.0).ln()).abs() < 1e-5,
            "{chosen:?}"
        );
        assert_eq!(chosen.top_logprobs[1].0, 1);
        assert_eq!(chosen.top_logprobs[2].1, f32::NEG_INFINITY);

        let mut random = sampler(SamplingParams {
            temperature: 1.0,
            ..params()
        });
        let mut counts = [0usize; 2];
        for _ in 0..3000 {
            match random
                .sample_allowed(&logits, Some(&allowed))
                .unwrap()
                .token
            {
                1 => counts[0] += 1,
                34 => counts[1] += 1,
                other => panic!("drew masked token {other}"),
            }
        }
        let share = counts[1] as f64 / 3000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.04, "{counts:?}");
        assert_eq!(
            random.sample_allowed(&logits, Some(&[0, 0])),
            Err(SamplingError::AllTokensMasked)
        );
    }

    #[test]
    fn all_masked_logits_are_an_error() {
        let logits = [f32::NEG_INFINITY; 3];
        for temperature in [0.0, 1.0] {
            let mut s = sampler(SamplingParams {
                temperature,
                ..params()
            });
            assert_eq!(s.sample(&logits), Err(SamplingError::AllTokensMasked));
        }
    }

    #[test]
    fn nan_and_positive_infinity_logits_are_errors() {
        let mut s = sampler(params());
        assert_eq!(
            s.sample(&[0.0, f32::INFINITY]),
            Err(SamplingError::InvalidLogit {
                token: 1,
                value: f32::INFINITY
            })
        );
        assert!(matches!(
            s.sample(&[f32::NAN, 0.0]),
            Err(SamplingError::InvalidLogit { token: 0, .. })
        ));
        assert_eq!(s.sample(&[]), Err(SamplingError::EmptyLogits));
    }

    #[test]
    fn logit_bias_of_minus_100_bans_and_plus_100_forces_a_token() {
        let logits = [5.0, 1.0, 0.0];
        let mut s = sampler(SamplingParams {
            logit_bias: BTreeMap::from([(0, -100.0), (2, 100.0)]),
            ..params()
        });
        assert_eq!(processed(&mut s, &logits), vec![-95.0, 1.0, 100.0]);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits).unwrap().token, 2);
        }
    }

    #[test]
    fn logit_bias_past_the_row_is_an_error_not_a_panic() {
        let mut s = sampler(SamplingParams {
            logit_bias: BTreeMap::from([(3, 1.0)]),
            ..params()
        });
        assert_eq!(
            s.sample(&[0.0; 3]),
            Err(SamplingError::TokenOutOfVocabulary {
                token: 3,
                vocab_size: 3
            })
        );
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params()
            },
            &[0, 1, 2, 4, 4, 4, 99],
        )
        .unwrap();
        let logits = [3.0, -3.0, 0.0, 5.0, 1.0, f32::NEG_INFINITY];
        // Token 4 appears three times in the prompt but is penalised once; token 99 has no logit.
        assert_eq!(
            processed(&mut s, &logits),
            vec![1.5, -6.0, 0.0, 5.0, 0.5, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn repetition_penalty_includes_generated_tokens() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.25,
                temperature: 0.0,
                ..params()
            },
            &[0],
        )
        .unwrap();
        let logits = [2.0, 1.0, -1.0];
        assert_eq!(s.sample(&logits).unwrap().token, 0);
        s.record(2);
        s.record(2);
        assert_eq!(processed(&mut s, &logits), vec![1.6, 1.0, -1.25]);
    }

    #[test]
    fn repetition_penalty_saturates_instead_of_overflowing() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1e-30,
                ..params()
            },
            &[0],
        )
        .unwrap();
        let sampled = s.sample(&[1e10, 0.0]).unwrap();
        assert_eq!(sampled.token, 0);
        assert!(sampled.logprob.is_finite());
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params()
            },
            &[0, 0, 1],
        )
        .unwrap();
        let logits = [1.0, 1.0, 1.0, 1.0];
        assert_eq!(processed(&mut s, &logits), logits.to_vec());
        for token in [2, 3, 3, 3] {
            s.record(token);
        }
        // Token 2: 1 - 0.5 - 0.25; token 3: 1 - 0.5 - 0.75.
        assert_eq!(processed(&mut s, &logits), vec![1.0, 1.0, 0.25, -0.25]);
    }

    #[test]
    fn negative_presence_penalty_encourages_generated_tokens() {
        let mut s = sampler(SamplingParams {
            presence_penalty: -2.0,
            temperature: 0.0,
            ..params()
        });
        s.record(1);
        assert_eq!(s.sample(&[1.0, 0.0, 1.5]).unwrap().token, 1);
    }

    #[test]
    fn sample_records_its_token_for_later_penalties() {
        let mut s = sampler(SamplingParams {
            frequency_penalty: 2.0,
            temperature: 0.0,
            ..params()
        });
        let logits = [3.0, 2.0, 0.5];
        let tokens: Vec<u32> = (0..4).map(|_| s.sample(&logits).unwrap().token).collect();
        // Each use of a token costs it 2: 3 -> 1 lets token 1 win, 2 -> 0 gives token 0 back
        // the lead with 1, and 3 -> -1 leaves token 2 ahead.
        assert_eq!(tokens, vec![0, 1, 0, 2]);
    }

    #[test]
    fn penalties_apply_in_documented_order() {
        // Bias first (2 -> 4), then the repetition penalty (4 -> 2), then presence (2 -> 1.5).
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: BTreeMap::from([(0, 2.0)]),
                repetition_penalty: 2.0,
                presence_penalty: 0.5,
                ..params()
            },
            &[],
        )
        .unwrap();
        s.record(0);
        assert_eq!(processed(&mut s, &[2.0, 0.0]), vec![1.5, 0.0]);
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.25, 0.15]);
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                seed: Some(seed),
                top_p: 0.9,
                ..params()
            });
            (0..200)
                .map(|_| s.sample(&logits).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn drawn_seed_replays_the_sequence() {
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
        let mut unseeded = sampler(SamplingParams {
            seed: None,
            ..params()
        });
        let mut replay = sampler(SamplingParams {
            seed: Some(unseeded.seed()),
            ..params()
        });
        for _ in 0..100 {
            assert_eq!(
                unseeded.sample(&logits).unwrap(),
                replay.sample(&logits).unwrap()
            );
        }
    }

    #[test]
    fn unseeded_samplers_get_different_seeds() {
        let a = sampler(SamplingParams::default());
        let b = sampler(SamplingParams::default());
        assert_ne!(a.seed(), b.seed());
    }

    #[test]
    fn sequences_do_not_influence_each_other() {
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
        let alone: Vec<u32> = {
            let mut s = sampler(params());
            (0..100).map(|_| s.sample(&logits).unwrap().token).collect()
        };
        let mut interleaved = Vec::new();
        let mut s = sampler(params());
        let mut other = sampler(SamplingParams {
            seed: Some(42),
            temperature: 3.0,
            ..params()
        });
        for _ in 0..100 {
            other.sample(&logits).unwrap();
            interleaved.push(s.sample(&logits).unwrap().token);
            other.sample(&logits).unwrap();
        }
        assert_eq!(alone, interleaved);
    }

    #[test]
    fn logprobs_equal_log_softmax_of_processed_logits_at_temperature_one() {
        let logits = [1.0, 2.0, 0.5, -1.0, f32::NEG_INFINITY];
        let mut s = sampler(SamplingParams {
            temperature: 0.3,
            top_k: Some(2),
            logit_bias: BTreeMap::from([(3, 4.0)]),
            logprobs: Some(5),
            ..params()
        });
        let sampled = s.sample(&logits).unwrap();
        let biased = [1.0, 2.0, 0.5, 3.0, f32::NEG_INFINITY];
        let expected: Vec<f64> = softmax(&biased, 1.0).iter().map(|p| p.ln()).collect();
        assert!((sampled.logprob as f64 - expected[sampled.token as usize]).abs() < 1e-6);
        let ids: Vec<u32> = sampled.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![3, 1, 0, 2, 4]);
        for &(id, logprob) in &sampled.top_logprobs {
            let e = expected[id as usize];
            assert!(
                logprob as f64 == e || (logprob as f64 - e).abs() < 1e-6,
                "token {id}: {logprob} != {e}"
            );
        }
        assert_eq!(sampled.top_logprobs[4].1, f32::NEG_INFINITY);
    }

    #[test]
    fn logprobs_do_not_depend_on_temperature_or_greedy_decoding() {
        let logits = [0.5, -1.0, 2.0, 1.0, 0.0];
        let report = |temperature| {
            let mut s = sampler(SamplingParams {
                temperature,
                logprobs: Some(5),
                ..params()
            });
            s.sample(&logits).unwrap().top_logprobs
        };
        let at_one = report(1.0);
        for temperature in [0.0, 0.5, 2.0] {
            for (&(id, a), &(other, b)) in at_one.iter().zip(&report(temperature)) {
                assert_eq!(id, other);
                assert!(
                    (a - b).abs() < 1e-6,
                    "token {id}: {a} at 1, {b} at {temperature}"
                );
            }
        }
    }

    #[test]
    fn top_logprobs_are_sorted_descending_with_ties_by_id() {
        let logits = [1.0, 3.0, 1.0, 3.0, 2.0, 1.0];
        let mut s = sampler(SamplingParams {
            logprobs: Some(4),
            ..params()
        });
        let sampled = s.sample(&logits).unwrap();
        let ids: Vec<u32> = sampled.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 4, 0]);
        let values: Vec<f32> = sampled.top_logprobs.iter().map(|&(_, lp)| lp).collect();
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn top_logprobs_length_follows_the_request_and_the_vocabulary() {
        let logits = [0.0, 1.0, 2.0];
        for (asked, expected) in [(None, 0), (Some(0), 0), (Some(2), 2), (Some(20), 3)] {
            let mut s = sampler(SamplingParams {
                logprobs: asked,
                ..params()
            });
            assert_eq!(s.sample(&logits).unwrap().top_logprobs.len(), expected);
        }
    }

    #[test]
    fn top_n_matches_a_full_sort() {
        let mut rng = StdRng::seed_from_u64(3);
        // Few distinct values, so that ties are everywhere.
        let logits: Vec<f32> = (0..5000).map(|_| rng.random_range(0..50) as f32).collect();
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| rank(&logits, a, b));
        let expected: Vec<(u32, f32)> = ids[..20]
            .iter()
            .map(|&id| (id, logits[id as usize]))
            .collect();
        assert_eq!(top_n(&logits, 20), expected);
    }

    #[test]
    fn large_vocabulary_with_small_top_k_samples_only_the_best() {
        let mut rng = StdRng::seed_from_u64(11);
        let logits: Vec<f32> = (0..50_000).map(|_| rng.random_range(-10.0..10.0)).collect();
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| rank(&logits, a, b));
        let best: HashSet<u32> = ids[..5].iter().copied().collect();
        let mut s = sampler(SamplingParams {
            top_k: Some(5),
            temperature: 5.0,
            ..params()
        });
        let drawn: HashSet<u32> = (0..500).map(|_| s.sample(&logits).unwrap().token).collect();
        assert_eq!(drawn, best);
    }

    /// The kept set by the definitions: rank every token, keep the first k, then the smallest
    /// prefix reaching top_p of the renormalised tempered distribution, then the tokens at least
    /// min_p as probable as the first.
    fn reference_kept(logits: &[f32], params: &SamplingParams) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..logits.len() as u32)
            .filter(|&id| logits[id as usize] > f32::NEG_INFINITY)
            .collect();
        ids.sort_by(|&a, &b| rank(logits, a, b));
        if let Some(k) = params.top_k.filter(|&k| k > 0) {
            ids.truncate(k);
        }
        let max = logits[ids[0] as usize] as f64;
        let t = params.temperature as f64;
        let w: Vec<f64> = ids
            .iter()
            .map(|&id| ((logits[id as usize] as f64 - max) / t).exp())
            .collect();
        if params.top_p < 1.0 {
            let total: f64 = w.iter().sum();
            let mut mass = 0.0;
            let nucleus = w
                .iter()
                .position(|&x| {
                    mass += x / total;
                    mass >= params.top_p as f64 - TOP_P_TOLERANCE
                })
                .map_or(ids.len(), |at| at + 1);
            ids.truncate(nucleus);
        }
        ids.retain(|&id| ((logits[id as usize] as f64 - max) / t).exp() >= params.min_p as f64);
        ids.sort_unstable();
        ids
    }

    #[test]
    fn filters_match_their_definitions_on_random_rows() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut candidates = Vec::new();
        for round in 0..2000 {
            let vocab = rng.random_range(1..400);
            // Few distinct values, so that ties and masks are everywhere.
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match rng.random_range(0..12) {
                    0 => f32::NEG_INFINITY,
                    v => v as f32 * 0.75,
                })
                .collect();
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let params = SamplingParams {
                temperature: rng.random_range(0.1..3.0),
                top_k: rng.random_bool(0.5).then(|| rng.random_range(0..vocab + 5)),
                top_p: if rng.random_bool(0.5) {
                    rng.random_range(0.01..1.0)
                } else {
                    1.0
                },
                min_p: if rng.random_bool(0.5) {
                    rng.random_range(0.0..0.9)
                } else {
                    0.0
                },
                ..params()
            };
            let expected = reference_kept(&logits, &params);
            let mut weights = Vec::new();
            fill_weights(&logits, max, params.temperature, &mut weights);
            let cutoff = filter(&logits, &weights, &params, &mut candidates);
            let kept: Vec<u32> = (0..vocab as u32)
                .filter(|&id| {
                    let l = logits[id as usize];
                    l > f32::NEG_INFINITY
                        && cutoff
                            .is_none_or(|(last, last_id)| l > last || (l == last && id <= last_id))
                })
                .collect();
            assert_eq!(kept, expected, "round {round}: {params:?} on {logits:?}");
            if cutoff.is_some() {
                // The cutoff stands for exactly the candidates left.
                candidates.sort_unstable();
                assert_eq!(candidates, expected, "round {round}");
            }
        }
    }

    #[test]
    fn validate_accepts_the_bounds_of_every_range() {
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.01,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: BTreeMap::from([(0, -100.0), (9, 100.0)]),
            logprobs: Some(20),
            ..SamplingParams::default()
        };
        assert_eq!(p.validate(10), Ok(()));
    }

    #[test]
    fn validate_names_the_parameter_and_its_range() {
        type Edit = fn(&mut SamplingParams);
        let cases: [(Edit, &str); 13] = [
            (
                |p| p.temperature = -0.1,
                "temperature must be a finite number >= 0, got -0.1",
            ),
            (
                |p| p.temperature = f32::INFINITY,
                "temperature must be a finite number >= 0, got inf",
            ),
            (
                |p| p.temperature = f32::NAN,
                "temperature must be a finite number >= 0, got NaN",
            ),
            (|p| p.top_p = 0.0, "top_p must be in (0, 1], got 0"),
            (|p| p.top_p = 1.5, "top_p must be in (0, 1], got 1.5"),
            (|p| p.min_p = -0.5, "min_p must be in [0, 1], got -0.5"),
            (|p| p.min_p = f32::NAN, "min_p must be in [0, 1], got NaN"),
            (
                |p| p.repetition_penalty = 0.0,
                "repetition_penalty must be a finite number > 0, got 0",
            ),
            (
                |p| p.presence_penalty = 2.5,
                "presence_penalty must be in [-2, 2], got 2.5",
            ),
            (
                |p| p.frequency_penalty = -3.0,
                "frequency_penalty must be in [-2, 2], got -3",
            ),
            (
                |p| p.logit_bias = BTreeMap::from([(5, 101.0)]),
                "logit_bias must be in [-100, 100], got 101 for token 5",
            ),
            (
                |p| p.logprobs = Some(21),
                "logprobs must be at most 20, got 21",
            ),
            (
                |p| p.logit_bias = BTreeMap::from([(10, 1.0)]),
                "logit_bias names token 10, but the vocabulary has 10 tokens",
            ),
        ];
        for (edit, message) in cases {
            let mut params = SamplingParams::default();
            edit(&mut params);
            assert_eq!(params.validate(10).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn sampler_refuses_out_of_range_parameters() {
        let params = SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(matches!(
            Sampler::new(params, &[]),
            Err(SamplingError::InvalidParameter { name: "top_p", .. })
        ));
    }
}
