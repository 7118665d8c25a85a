//! Incremental detokenization of generated tokens into text deltas.
//!
//! Decoding tokens one at a time goes wrong in two ways: SentencePiece-style decoders strip the
//! leading space of whatever comes first in the text they are given, and byte-level or
//! byte-fallback tokens can end in the middle of a UTF-8 character. [`IncrementalDecoder`] decodes
//! a short window of tokens twice, without and with the new ones, and emits the difference once
//! it no longer ends in an unfinished character. The window starts at the tokens emitted last, so
//! each step decodes a few tokens however long the sequence grows.
//!
//! Tokenizers whose tokenizer_config.json asks for `clean_up_tokenization_spaces` (BERT, GPT-2,
//! RoBERTa and most others) have their decoded text cleaned as transformers does after decoding:
//! [`clean_up_tokenization`]. Cleaning a text piece by piece gives the same result only when each
//! piece ends where no replacement can straddle it, so [`StreamingCleanup`] holds back the
//! characters after the last such place.

use std::borrow::Borrow;

use tokenizers::Tokenizer;

/// What a decoder writes for bytes that are not (yet) valid UTF-8.
const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Prompt tokens decoded ahead of the first generated one: its leading space, and how bytes join
/// up, depend on what comes before it.
const PROMPT_CONTEXT_TOKENS: usize = 4;

/// When the prompt's context starts inside a character or has no text, it grows one token at a
/// time up to this many tokens (a character spans at most four byte tokens), then doubles, so that
/// even a long run of byte or special tokens costs decoding it about twice.
const STEPWISE_PROMPT_CONTEXT_TOKENS: usize = 8;

/// Why tokens could not be turned into text.
#[derive(Debug, thiserror::Error)]
pub enum DetokenizeError {
    /// The tokenizer's decoder failed.
    #[error("cannot decode tokens: {0}")]
    Decode(tokenizers::Error),
}

/// Turns one sequence's generated tokens into text, one delta at a time.
///
/// The deltas of [`IncrementalDecoder::push`] and the rest from [`IncrementalDecoder::flush`] add up
/// to the text of the generated tokens as decoding the whole sequence shows it (special tokens
/// skipped), after the prompt's text. No delta from [`IncrementalDecoder::push`] ends in the
/// middle of a character.
///
/// `T` is anything that lends a [`Tokenizer`]: `&Tokenizer`, `Arc<Tokenizer>`, or a tokenizer of
/// its own.
#[derive(Clone, Debug)]
pub struct IncrementalDecoder<T> {
    tokenizer: T,
    /// The tokens still needed: the last ones emitted (or the prompt's context), then the pending
    /// ones.
    window: Vec<u32>,
    /// How many tokens at the front of `window` are already emitted.
    emitted: usize,
    /// The text of `window[..emitted]`.
    emitted_text: String,
    /// Set when the tokenizer's text is cleaned after decoding.
    cleanup: Option<StreamingCleanup>,
}

impl<T: Borrow<Tokenizer>> IncrementalDecoder<T> {
    /// Starts decoding the tokens generated after `prompt`.
    ///
    /// Only the last few prompt tokens are kept, as context for the first generated ones.
    pub fn new(tokenizer: T, prompt: &[u32]) -> Result<Self, DetokenizeError> {
        // A context that starts inside a character makes byte-fallback decoders turn all the bytes
        // that follow into U+FFFD; one with no text lets the first generated token lose its
        // leading space as if it started the text. Either way, reach further back.
        let mut context = PROMPT_CONTEXT_TOKENS;
        let (start, text) = loop {
            let start = prompt.len().saturating_sub(context);
            let text = decode(tokenizer.borrow(), &prompt[start..])?;
            if start == 0 || !(text.is_empty() || text.starts_with(REPLACEMENT)) {
                break (start, text);
            }
            context = if context < STEPWISE_PROMPT_CONTEXT_TOKENS {
                context + 1
            } else {
                context * 2
            };
        };
        let window = prompt[start..].to_vec();
        Ok(Self {
            emitted: window.len(),
            window,
            emitted_text: text,
            tokenizer,
            cleanup: None,
        })
    }

    /// Cleans the text as transformers' `clean_up_tokenization_spaces` does, when `clean_up`.
    ///
    /// The deltas then add up to the cleaned text of the generated tokens. A delta never holds
    /// text that later tokens could still change: a few characters that a replacement might
    /// straddle wait for the next token (or [`IncrementalDecoder::flush`]).
    pub fn cleaning_up_spaces(mut self, clean_up: bool) -> Self {
        self.cleanup = clean_up.then(StreamingCleanup::default);
        self
    }

    /// Adds a generated token and returns the text it completes.
    ///
    /// Returns `None` while there is nothing new to show: the text ends in an unfinished UTF-8
    /// character (its remaining bytes come with later tokens) or the token has no text of its own
    /// (a skipped special token). That text is returned with a later token, or by
    /// [`IncrementalDecoder::flush`].
    pub fn push(&mut self, token: u32) -> Result<Option<String>, DetokenizeError> {
        let raw = self.push_raw(token)?;
        Ok(match (&mut self.cleanup, raw) {
            (Some(cleanup), Some(raw)) => Some(cleanup.push(&raw)).filter(|text| !text.is_empty()),
            (_, raw) => raw,
        })
    }

    /// Returns the text of the tokens still pending, even an unfinished character (as U+FFFD), at
    /// the end of the sequence.
    pub fn flush(&mut self) -> Result<String, DetokenizeError> {
        let raw = self.flush_raw()?;
        Ok(match &mut self.cleanup {
            Some(cleanup) => {
                let mut text = cleanup.push(&raw);
                text.push_str(&cleanup.flush());
                text
            }
            None => raw,
        })
    }

    /// [`IncrementalDecoder::push`] before any cleanup: the decoder's own text.
    fn push_raw(&mut self, token: u32) -> Result<Option<String>, DetokenizeError> {
        self.window.push(token);
        let text = decode(self.tokenizer.borrow(), &self.window)?;
        if text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let delta = new_suffix(&self.emitted_text, &text);
        if delta.is_empty() {
            // Keep the token pending rather than making it the context of the next step: a
            // context with no text would strip the next token's leading space.
            return Ok(None);
        }
        let delta = delta.to_owned();
        self.mark_emitted()?;
        Ok(Some(delta))
    }

    /// [`IncrementalDecoder::flush`] before any cleanup.
    fn flush_raw(&mut self) -> Result<String, DetokenizeError> {
        if self.emitted == self.window.len() {
            return Ok(String::new());
        }
        let text = decode(self.tokenizer.borrow(), &self.window)?;
        let delta = new_suffix(&self.emitted_text, &text).to_owned();
        self.mark_emitted()?;
        Ok(delta)
    }

    /// Marks the pending tokens emitted; they become the context of the next step.
    fn mark_emitted(&mut self) -> Result<(), DetokenizeError> {
        // The older tokens can go unless the text emitted before these ended inside a character
        // (a prompt cut mid-character, or a flush): a context starting inside a character would
        // turn the bytes that follow into U+FFFD.
        if !self.emitted_text.ends_with(REPLACEMENT) {
            self.window.drain(..self.emitted);
        }
        self.emitted = self.window.len();
        self.emitted_text = decode(self.tokenizer.borrow(), &self.window)?;
        Ok(())
    }
}

/// transformers' `clean_up_tokenization` (4.37.2): no space before `.`, `?`, `!`, `,` and English
/// contractions. Each replacement is one left-to-right pass over the whole text, in this order,
/// as Python's `str.replace` makes it.
pub fn clean_up_tokenization(text: &str) -> String {
    CLEANUP_REPLACEMENTS
        .iter()
        .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
}

/// The replacements of [`clean_up_tokenization`], in order.
const CLEANUP_REPLACEMENTS: [(&str, &str); 10] = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
];

/// The characters that end a proper prefix of some replaced pattern of [`CLEANUP_REPLACEMENTS`]
/// (" ", " '", " n", " n'", " 'v", " 'r").
///
/// Where a text `x` ends in none of them, `clean_up_tokenization(x + y)` equals
/// `clean_up_tokenization(x) + clean_up_tokenization(y)` for every `y`: a match that straddles the
/// join would start inside `x` with `x` ending in a proper prefix of its pattern, hence in one of
/// these characters. The replacements only delete spaces, and never the last character of `x`
/// (a deleted space is followed by the rest of its match), so the same holds before each pass.
/// Each pass then finds in `x + y` the matches it finds in `x` and in `y` alone.
const CLEANUP_UNSETTLED: [char; 5] = [' ', '\'', 'n', 'v', 'r'];

/// [`clean_up_tokenization`] of a text that arrives in pieces.
#[derive(Clone, Debug, Default)]
struct StreamingCleanup {
    /// Text received whose cleanup a later piece could still change.
    pending: String,
}

impl StreamingCleanup {
    /// Adds `piece` and returns the cleaned text that no later piece can change.
    fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        let settled = self
            .pending
            .char_indices()
            .rev()
            .find(|&(_, c)| !CLEANUP_UNSETTLED.contains(&c))
            .map_or(0, |(at, c)| at + c.len_utf8());
        let text = clean_up_tokenization(&self.pending[..settled]);
        self.pending.drain(..settled);
        text
    }

    /// The cleaned text of what is still pending, at the end of the text.
    fn flush(&mut self) -> String {
        let text = clean_up_tokenization(&self.pending);
        self.pending.clear();
        text
    }
}

/// Decodes `tokens` as users see them, without special tokens.
fn decode(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<String, DetokenizeError> {
    tokenizer
        .decode(tokens, true)
        .map_err(DetokenizeError::Decode)
}

/// The part of `text` that is new compared with `emitted`, the decoding of a prefix of its tokens.
///
/// A decoder may rewrite the end of what was emitted when more tokens follow (a character that
/// the prompt left unfinished is completed, a byte-fallback run that never becomes valid turns
/// into U+FFFD throughout). Emitted text cannot be taken back, so then the delta starts where the
/// two first differ.
fn new_suffix<'a>(emitted: &str, text: &'a str) -> &'a str {
    if let Some(rest) = text.strip_prefix(emitted) {
        return rest;
    }
    let common = emitted
        .char_indices()
        .zip(text.chars())
        .find(|&((_, a), b)| a != b)
        .map_or(text.len(), |((at, _), _)| at);
    &text[common..]
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::PathBuf;
    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::{
        AddedToken, DecoderWrapper, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    };

    use super::*;

    /// Builds a BPE tokenizer whose vocabulary has `pieces` and, for every word of `words`, the
    /// merges that join its pieces left to right into one token.
    fn bpe(pieces: Vec<String>, words: &[Vec<String>], byte_fallback: bool) -> Tokenizer {
        let mut vocab_order: Vec<String> = Vec::new();
        let mut known = HashSet::new();
        let mut add = |piece: String, order: &mut Vec<String>| {
            if known.insert(piece.clone()) {
                order.push(piece);
            }
        };
        for piece in pieces {
            add(piece, &mut vocab_order);
        }
        let mut merges = Vec::new();
        for word in words {
            for piece in word {
                add(piece.clone(), &mut vocab_order);
            }
            let mut left = word[0].clone();
            for right in &word[1..] {
                merges.push((left.clone(), right.clone()));
                left.push_str(right);
                add(left.clone(), &mut vocab_order);
            }
        }
        let vocab: Vocab = vocab_order
            .into_iter()
            .enumerate()
            .map(|(id, piece)| (piece, id as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token("<unk>".into())
            .byte_fallback(byte_fallback)
            .build()
            .unwrap();
        Tokenizer::new(model)
    }

    fn chars(word: &str) -> Vec<String> {
        word.chars().map(String::from).collect()
    }

    /// A vocabulary like Llama's and Mistral's: "▁" for spaces, `<0xNN>` tokens for characters it
    /// lacks, and the decoder chain of Mistral's tokenizer.json.
    fn sentencepiece_like() -> Tokenizer {
        let mut pieces: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        pieces.push("▁".into());
        pieces.extend(('!'..='~').map(String::from));
        pieces.push("é".into());
        let words: Vec<Vec<String>> = ["▁Hello", "▁world", "▁the", "▁quick", "ing", "▁fox"]
            .iter()
            .map(|w| chars(w))
            .collect();
        let mut tokenizer = bpe(pieces, &words, true);
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
        let decoders: Vec<DecoderWrapper> = vec![
            Replace::new("▁", " ").unwrap().into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
            Strip::new(' ', 1, 0).into(),
        ];
        tokenizer.with_decoder(Some(Sequence::new(decoders)));
        let _ = tokenizer.add_special_tokens([
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ]);
        tokenizer
    }

    /// The characters GPT-2's byte-level alphabet writes for the bytes of `text`.
    fn byte_level_chars(text: &str) -> Vec<String> {
        let mut pretokenized = PreTokenizedString::from(text);
        ByteLevel::new(false, false, false)
            .pre_tokenize(&mut pretokenized)
            .unwrap();
        pretokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .flat_map(|(split, _, _)| chars(split))
            .collect()
    }

    /// A byte-level vocabulary like GPT-2's, where "你好" is three tokens that each end inside a
    /// character: [E4 BD] [A0 E5] [A5 BD].
    fn byte_level() -> Tokenizer {
        let mut pieces: Vec<String> = vec!["<unk>".into(), "<|endoftext|>".into()];
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        pieces.extend(alphabet.into_iter().map(String::from));
        let mut words: Vec<Vec<String>> = [" world", "Hello", " quick"]
            .iter()
            .map(|w| byte_level_chars(w))
            .collect();
        let nihao = byte_level_chars("你好");
        words.extend(nihao.chunks(2).map(|pair| pair.to_vec()));
        let mut tokenizer = bpe(pieces, &words, false);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let _ = tokenizer.add_special_tokens([AddedToken::from("<|endoftext|>", true)]);
        tokenizer
    }

    fn encode(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    fn token(tokenizer: &Tokenizer, piece: &str) -> u32 {
        tokenizer.token_to_id(piece).unwrap()
    }

    /// Runs the decoder over `generated` after `prompt`: every push's result, then the flush.
    fn run(
        tokenizer: &Tokenizer,
        prompt: &[u32],
        generated: &[u32],
    ) -> (Vec<Option<String>>, String) {
        let mut decoder = IncrementalDecoder::new(tokenizer, prompt).unwrap();
        let pushed = generated
            .iter()
            .map(|&t| decoder.push(t).unwrap())
            .collect();
        (pushed, decoder.flush().unwrap())
    }

    /// The text the generated tokens add to the prompt's: decode(all) past the longest common
    /// prefix with decode(prompt) (the whole of it unless the prompt ends inside a character).
    fn continuation(tokenizer: &Tokenizer, prompt: &[u32], generated: &[u32]) -> String {
        let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        let prompt_text = tokenizer.decode(prompt, true).unwrap();
        let all_text = tokenizer.decode(&all, true).unwrap();
        let common: usize = prompt_text
            .chars()
            .zip(all_text.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        all_text[common..].to_owned()
    }

    /// Checks the decoder's promises for `generated` after `prompt`.
    fn check(tokenizer: &Tokenizer, prompt: &[u32], generated: &[u32]) {
        let (pushed, rest) = run(tokenizer, prompt, generated);
        let expected = continuation(tokenizer, prompt, generated);
        let deltas: Vec<&String> = pushed.iter().flatten().collect();
        let joined: String = deltas
            .iter()
            .map(|d| d.as_str())
            .chain([rest.as_str()])
            .collect();
        assert_eq!(
            joined, expected,
            "prompt {prompt:?}, generated {generated:?}, deltas {deltas:?} + {rest:?}"
        );
        for delta in deltas {
            assert!(!delta.is_empty(), "empty delta for {generated:?}");
            if !expected.contains(REPLACEMENT) {
                assert!(
                    !delta.contains(REPLACEMENT),
                    "delta {delta:?} has a replacement character (prompt {prompt:?}, generated {generated:?})"
                );
            }
        }
    }

    /// Checks the decoder with `ids` split into prompt and generation at every position.
    fn check_every_split(tokenizer: &Tokenizer, ids: &[u32]) {
        for split in 0..=ids.len() {
            check(tokenizer, &ids[..split], &ids[split..]);
        }
    }

    #[test]
    fn incomplete_character_is_held_back_until_complete() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello 🙂");
        let bytes = ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"].map(|b| token(&tokenizer, b));
        assert_eq!(ids[ids.len() - 4..], bytes);
        let (pushed, rest) = run(&tokenizer, &ids[..1], &ids[1..]);
        assert_eq!(
            pushed,
            [Some(" "), None, None, None, Some("🙂")].map(|d| d.map(String::from))
        );
        assert_eq!(rest, "");
    }

    #[test]
    fn byte_level_tokens_ending_inside_characters_are_joined() {
        let tokenizer = byte_level();
        let ids = encode(&tokenizer, "Hello 你好 world");
        assert_eq!(
            ids.len(),
            6,
            "expected Hello, Ġ, three tokens for 你好 and Ġworld: {ids:?}"
        );
        let (pushed, rest) = run(&tokenizer, &ids[..1], &ids[1..]);
        assert_eq!(
            pushed,
            [Some(" "), None, None, Some("你好"), Some(" world")].map(|d| d.map(String::from))
        );
        assert_eq!(rest, "");
    }

    #[test]
    fn leading_space_of_first_generated_token_survives() {
        let tokenizer = sentencepiece_like();
        let prompt = encode(&tokenizer, "Hello");
        let generated = [token(&tokenizer, "▁world")];
        // Decoded alone the token loses its space, as the start of a text would.
        assert_eq!(tokenizer.decode(&generated, true).unwrap(), "world");
        let (pushed, _) = run(&tokenizer, &prompt, &generated);
        assert_eq!(pushed, [Some(" world".to_string())]);
    }

    #[test]
    fn spaces_between_generated_words_survive() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello world the quick fox");
        let (pushed, rest) = run(&tokenizer, &[], &ids);
        let deltas: Vec<String> = pushed.into_iter().flatten().collect();
        assert_eq!(deltas, ["Hello", " world", " the", " quick", " fox"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn without_prompt_text_starts_like_decode() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello world");
        let (pushed, _) = run(&tokenizer, &[], &ids);
        assert_eq!(pushed[0].as_deref(), Some("Hello"));
        check(&tokenizer, &[], &ids);
    }

    #[test]
    fn special_tokens_are_skipped_without_losing_spaces() {
        let tokenizer = sentencepiece_like();
        let eos = token(&tokenizer, "</s>");
        let generated = [
            token(&tokenizer, "▁Hello"),
            eos,
            token(&tokenizer, "▁world"),
            eos,
        ];
        let (pushed, rest) = run(&tokenizer, &[], &generated);
        assert_eq!(
            pushed,
            [Some("Hello"), None, Some(" world"), None].map(|d| d.map(String::from))
        );
        assert_eq!(rest, "");
        assert_eq!(tokenizer.decode(&generated, true).unwrap(), "Hello world");
    }

    #[test]
    fn prompt_ending_in_special_tokens_keeps_the_leading_space() {
        let tokenizer = sentencepiece_like();
        let mut prompt = encode(&tokenizer, "Hello");
        prompt.extend([token(&tokenizer, "</s>"); 10]);
        let generated = [token(&tokenizer, "▁world")];
        let (pushed, _) = run(&tokenizer, &prompt, &generated);
        assert_eq!(pushed, [Some(" world".to_string())]);
    }

    #[test]
    fn prompt_context_starting_inside_a_character_does_not_garble_the_text() {
        // The last four prompt tokens start with the continuation bytes of 🙂; with the
        // byte-fallback decoder they would turn every byte after them into U+FFFD.
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello 🙂🙂 你好 world");
        check_every_split(&tokenizer, &ids);
    }

    #[test]
    fn prompt_cut_inside_a_long_byte_run_keeps_the_run_as_context() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello 你好你好🙂ü the");
        let split = ids.len() - 2;
        assert!(tokenizer
            .decode(&ids[..split], true)
            .unwrap()
            .ends_with(REPLACEMENT));
        let (pushed, rest) = run(&tokenizer, &ids[..split], &ids[split..]);
        // The byte-fallback decoder shows the whole unfinished run of the prompt as U+FFFD, so
        // its characters are new text once the run is complete.
        assert_eq!(
            pushed,
            [Some("你好你好🙂ü"), Some(" the")].map(|d| d.map(String::from))
        );
        assert_eq!(rest, "");
    }

    #[test]
    fn prompt_without_text_leaves_the_generation_at_the_start_of_the_text() {
        let tokenizer = sentencepiece_like();
        let bos = token(&tokenizer, "<s>");
        let ids = encode(&tokenizer, "Hello world");
        let (pushed, _) = run(&tokenizer, &[bos; 9], &ids);
        assert_eq!(pushed[0].as_deref(), Some("Hello"));
        // A lone "▁" has no text of its own once stripped, but it still precedes the first word.
        let space = token(&tokenizer, "▁");
        let (pushed, _) = run(&tokenizer, &[bos, space], &ids);
        assert_eq!(pushed[0].as_deref(), Some(" Hello"));
    }

    #[test]
    fn prompt_ending_inside_a_character_emits_the_completed_character() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello 你好");
        let split = ids.len() - 1;
        assert!(tokenizer
            .decode(&ids[..split], true)
            .unwrap()
            .ends_with(REPLACEMENT));
        let (pushed, rest) = run(&tokenizer, &ids[..split], &ids[split..]);
        assert_eq!(pushed, [Some("你好".to_string())]);
        assert_eq!(rest, "");
    }

    #[test]
    fn flush_returns_an_unfinished_character() {
        for tokenizer in [sentencepiece_like(), byte_level()] {
            let ids = encode(&tokenizer, "Hello 🙂");
            let generated = &ids[..ids.len() - 1];
            let mut decoder = IncrementalDecoder::new(&tokenizer, &[]).unwrap();
            let mut text = String::new();
            for &t in generated {
                text.extend(decoder.push(t).unwrap());
            }
            assert_eq!(text, "Hello ");
            let rest = decoder.flush().unwrap();
            assert!(
                !rest.is_empty() && rest.chars().all(|c| c == REPLACEMENT),
                "{rest:?}"
            );
            assert_eq!(text + &rest, tokenizer.decode(generated, true).unwrap());
            assert_eq!(decoder.flush().unwrap(), "");
        }
    }

    #[test]
    fn decoding_goes_on_after_flush() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello 🙂");
        let mut decoder = IncrementalDecoder::new(&tokenizer, &[]).unwrap();
        // "▁Hello", "▁" and the first two bytes of 🙂.
        for &t in &ids[..4] {
            decoder.push(t).unwrap();
        }
        assert_eq!(decoder.flush().unwrap(), "\u{FFFD}\u{FFFD}");
        let mut push = |piece| decoder.push(token(&tokenizer, piece)).unwrap();
        assert_eq!(push("▁world").as_deref(), Some(" world"));
        assert_eq!(push("!").as_deref(), Some("!"));
    }

    #[test]
    fn window_stays_bounded_over_long_generations() {
        let tokenizer = sentencepiece_like();
        let ids = encode(&tokenizer, "Hello world 🙂 你好 the quick fox!");
        let mut decoder = IncrementalDecoder::new(&tokenizer, &ids).unwrap();
        assert_eq!(decoder.window.len(), PROMPT_CONTEXT_TOKENS);
        let mut longest = 0;
        for &t in ids.iter().cycle().take(5_000) {
            decoder.push(t).unwrap();
            longest = longest.max(decoder.window.len());
        }
        // At most the byte tokens of one character as context and those of the next pending.
        assert!(longest <= 8, "window grew to {longest} tokens");
    }

    #[test]
    fn accepts_a_shared_tokenizer() {
        let tokenizer = Arc::new(byte_level());
        let ids = encode(&tokenizer, "Hello world");
        let mut decoder = IncrementalDecoder::new(Arc::clone(&tokenizer), &[]).unwrap();
        let text: String = ids
            .iter()
            .filter_map(|&t| decoder.push(t).unwrap())
            .collect();
        assert_eq!(text, "Hello world");
    }

    #[test]
    fn random_texts_reassemble_at_every_split() {
        const FRAGMENTS: [&str; 14] = [
            "Hello", " world", " ", "  ", "你好", "🙂", "é", "\n", "quick", "!", "ing", " the",
            " 🙂", "ü",
        ];
        let mut rng = StdRng::seed_from_u64(5);
        for tokenizer in [sentencepiece_like(), byte_level()] {
            for _ in 0..60 {
                let len = rng.random_range(1..10);
                let text: String = (0..len)
                    .map(|_| FRAGMENTS[rng.random_range(0..FRAGMENTS.len())])
                    .collect();
                check_every_split(&tokenizer, &encode(&tokenizer, &text));
            }
        }
    }

    #[test]
    fn cleanup_follows_transformers_pass_by_pass() {
        assert_eq!(
            clean_up_tokenization("it is n't here , is it ? yes . i 'm sure ! we 're ok"),
            "it isn't here, is it? yes. i'm sure! we're ok"
        );
        // One left-to-right pass per pattern, as Python's str.replace: a second space before a
        // stop survives, and " ' " runs collapse pairwise.
        assert_eq!(clean_up_tokenization("a  ."), "a .");
        assert_eq!(
            clean_up_tokenization("under ' ' ' ' band"),
            "under'''' band"
        );
        assert_eq!(clean_up_tokenization("don ' t"), "don't");
    }

    #[test]
    fn streamed_cleanup_equals_cleanup_of_the_whole_text() {
        // Texts made of the characters the patterns are built from, cut into random pieces.
        const ALPHABET: [&str; 14] = [
            " ", " ", "'", "n", "t", "v", "e", "r", "m", "s", ".", "?", ",", "a",
        ];
        let mut rng = StdRng::seed_from_u64(16);
        for _ in 0..5_000 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                .collect();
            let mut cleanup = StreamingCleanup::default();
            let mut streamed = String::new();
            let mut rest = text.as_str();
            while !rest.is_empty() {
                let cut = rng.random_range(1..=rest.len());
                streamed.push_str(&cleanup.push(&rest[..cut]));
                rest = &rest[cut..];
            }
            streamed.push_str(&cleanup.flush());
            assert_eq!(streamed, clean_up_tokenization(&text), "text {text:?}");
        }
    }

    #[test]
    fn cleaned_deltas_hold_back_only_what_may_change() {
        let tokenizer = byte_level();
        let ids = encode(&tokenizer, "Hello world . it ' s");
        let mut decoder = IncrementalDecoder::new(&tokenizer, &[])
            .unwrap()
            .cleaning_up_spaces(true);
        let mut deltas = Vec::new();
        for &t in &ids {
            deltas.extend(decoder.push(t).unwrap());
        }
        deltas.push(decoder.flush().unwrap());
        assert_eq!(deltas.concat(), "Hello world. it's");
        // "Hello" and " world" are final at once; " ." joins the word before it.
        assert_eq!(deltas[..2], ["Hello", " world"]);
    }

    #[test]
    fn new_suffix_starts_where_the_texts_differ() {
        assert_eq!(new_suffix("Hello", "Hello world"), " world");
        assert_eq!(new_suffix("ab\u{FFFD}", "ab🙂"), "🙂");
        assert_eq!(new_suffix("你\u{FFFD}", "你好"), "好");
        assert_eq!(new_suffix("Hello", "Help"), "p");
        assert_eq!(new_suffix("Hello", "Hell"), "");
    }

    /// GPT-2's own vocabulary, from the files in the project's shared folder.
    #[test]
    fn gpt2_vocabulary_reassembles_multilingual_text() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tokenizers");
        let (vocab, merges) = (dir.join("gpt2_vocab.json"), dir.join("gpt2_merges.txt"));
        assert!(
            vocab.is_file() && merges.is_file(),
            "the GPT-2 vocabulary is missing from {}: the tests need ../shared beside the checkout",
            dir.display()
        );
        let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        let text =
            "Hello world! 你好，世界 🙂👍🏽 Grüße, naïve café — ελληνικά and 日本語のテキスト.";
        let ids = encode(&tokenizer, text);
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), text);
        check_every_split(&tokenizer, &ids);
    }
}
