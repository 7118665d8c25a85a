//! Automatic prefix caching: the state of prefilled prompts, kept in a bounded LRU pool keyed by
//! their tokens, so that a new prompt that starts the same way starts from a copy of that state
//! and prefills only the rest.
//!
//! An entry is a [`Snapshot`] of a sequence right after its whole prompt. A new prompt can start
//! from the first `n` positions of an entry when its first `n` tokens are the entry's (a shared
//! system prompt, the earlier turns of a conversation): any `n` when every ring still holds
//! position 0 and no layer is recurrent, only the whole entry otherwise (see
//! [`Snapshot::usable`]). At least the prompt's last token is always computed, since its logits
//! are what the request needs. The result is that of a full prefill: the restored entries are
//! the keys and values (and recurrent state) the same tokens produced.

use crate::decoder::state::Snapshot;

/// Counts a prefix cache publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Lookups that restored at least one position.
    pub hits: u64,
    /// Lookups that found nothing to start from.
    pub misses: u64,
    /// Positions restored instead of prefilled.
    pub reused_tokens: u64,
    /// Bytes of state held.
    pub bytes: usize,
    /// Entries held.
    pub entries: usize,
}

struct Entry {
    tokens: Vec<u32>,
    snapshot: Snapshot,
    last_used: u64,
}

/// The pool of prefix snapshots, bounded by bytes, least recently used evicted first.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
    stats: PrefixCacheStats,
}

impl PrefixCache {
    /// A pool holding at most `budget` bytes of state.
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            clock: 0,
            stats: PrefixCacheStats::default(),
        }
    }

    /// What the pool has done and holds.
    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    /// The entry to start `prompt` from and how many of its positions to restore: the longest
    /// usable prefix over every entry, at most `prompt.len() - 1`, the most recently used entry
    /// among equals.
    fn best(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let common = common_prefix(&entry.tokens, prompt).min(limit);
                (index, entry.snapshot.usable(common))
            })
            .filter(|&(_, usable)| usable > 0)
            .max_by_key(|&(index, usable)| (usable, self.entries[index].last_used))
    }

    /// The snapshot to start `prompt` from and how many of its positions to restore (see
    /// [`PrefixCache::peek`]). Counts a hit or a miss.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(&Snapshot, usize)> {
        match self.best(prompt) {
            Some((index, usable)) => {
                self.clock += 1;
                self.stats.hits += 1;
                self.stats.reused_tokens += usable as u64;
                let entry = &mut self.entries[index];
                entry.last_used = self.clock;
                Some((&entry.snapshot, usable))
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// How many of `prompt`'s positions a lookup would restore now: the longest usable prefix
    /// over every entry, at most `prompt.len() - 1`. Counts nothing.
    pub fn peek(&self, prompt: &[u32]) -> usize {
        self.best(prompt).map_or(0, |(_, usable)| usable)
    }

    /// Whether a snapshot after `prompt` would add anything: false when an entry already
    /// serves every prefix of it.
    pub fn wants(&self, prompt: &[u32]) -> bool {
        if prompt.is_empty() || self.budget == 0 {
            return false;
        }
        !self.entries.iter().any(|entry| {
            common_prefix(&entry.tokens, prompt) == prompt.len()
                && entry.snapshot.usable(prompt.len()) == prompt.len()
        })
    }

    /// Keeps `snapshot`, the state after `prompt`, evicting the least recently used entries to
    /// stay within the budget; entries it serves entirely (prefixes of `prompt` that it can
    /// stand for) go first. A snapshot larger than the whole budget is not kept.
    pub fn insert(&mut self, prompt: Vec<u32>, snapshot: Snapshot) {
        if snapshot.bytes() > self.budget || snapshot.len() != prompt.len() {
            return;
        }
        self.entries.retain(|entry| {
            let served = common_prefix(&entry.tokens, &prompt) == entry.tokens.len()
                && snapshot.usable(entry.tokens.len()) == entry.tokens.len();
            !served
        });
        self.clock += 1;
        self.entries.push(Entry {
            tokens: prompt,
            snapshot,
            last_used: self.clock,
        });
        while self.held() > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(index, _)| index)
                .expect("over budget with no entry");
            self.entries.swap_remove(oldest);
        }
        self.stats.bytes = self.held();
        self.stats.entries = self.entries.len();
    }

    fn held(&self) -> usize {
        self.entries
            .iter()
            .map(|entry| entry.snapshot.bytes())
            .sum()
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
