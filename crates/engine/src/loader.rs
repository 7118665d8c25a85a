//! Resolve a model (a local folder, a hub id or the bundled default) to its files, and open its
//! weights as a [`VarBuilder`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{EngineError, Result};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder holding config.json, the safetensors weights and the tokenizer files.
    Dir(PathBuf),
    /// A Hugging Face hub repository, fetched through the local hub cache.
    Hub { repo: String, revision: String },
    /// The tiny random-weight Mistral compiled into the binary, so that Candlewick runs with
    /// nothing downloaded.
    Bundled,
}

impl ModelSource {
    /// Reads `DIR_OR_ID`: an existing folder is a folder, `owner/name[@revision]` is a hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, "main"),
        };
        let looks_like_hub_id = repo.split('/').count() <= 2
            && !repo.is_empty()
            && !repo.starts_with(['.', '/', '~'])
            && repo
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if looks_like_hub_id {
            Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            })
        } else {
            Err(EngineError::MissingFile {
                file: "model folder".into(),
                location: spec.into(),
            })
        }
    }

    /// A short name for logs and for the served model name.
    pub fn display_name(&self) -> String {
        match self {
            Self::Dir(path) => path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            Self::Hub { repo, .. } => repo.clone(),
            Self::Bundled => "tiny-mistral".into(),
        }
    }
}

/// The files of a model, read into memory (all but the weights, which stay memory-mapped).
pub struct ModelFiles {
    /// Where they came from, for error messages.
    pub source: ModelSource,
    /// config.json.
    pub config: String,
    /// tokenizer.json.
    pub tokenizer: Vec<u8>,
    /// tokenizer_config.json, when the model has one.
    pub tokenizer_config: Option<String>,
    /// generation_config.json, when the model has one.
    pub generation_config: Option<String>,
    weights: Weights,
}

enum Weights {
    Files(Vec<PathBuf>),
    Static(&'static [u8]),
}

mod bundled {
    pub const CONFIG: &str = include_str!("../assets/tiny-mistral/config.json");
    pub const TOKENIZER: &[u8] = include_bytes!("../assets/tiny-mistral/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str = include_str!("../assets/tiny-mistral/tokenizer_config.json");
    pub const GENERATION_CONFIG: &str =
        include_str!("../assets/tiny-mistral/generation_config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../assets/tiny-mistral/model.safetensors");
}

const SINGLE_WEIGHTS: &str = "model.safetensors";
const SHARDED_INDEX: &str = "model.safetensors.index.json";

impl ModelFiles {
    /// Finds and reads the files of `source`. Hub files come from the hub cache when they are
    /// there (HF_HOME is honoured); with HF_HUB_OFFLINE=1 only the cache is looked at.
    pub fn resolve(source: &ModelSource) -> Result<Self> {
        if *source == ModelSource::Bundled {
            return Ok(Self {
                source: source.clone(),
                config: bundled::CONFIG.to_string(),
                tokenizer: bundled::TOKENIZER.to_vec(),
                tokenizer_config: Some(bundled::TOKENIZER_CONFIG.to_string()),
                generation_config: Some(bundled::GENERATION_CONFIG.to_string()),
                weights: Weights::Static(bundled::WEIGHTS),
            });
        }
        let fetcher = Fetcher::new(source)?;
        let config = read_text(&fetcher.required("config.json")?)?;
        let tokenizer_config = fetcher
            .optional("tokenizer_config.json")?
            .map(|path| read_text(&path))
            .transpose()?;
        let tokenizer = match fetcher.optional("tokenizer.json")? {
            Some(path) => std::fs::read(&path).map_err(|e| bad_file(&path, e))?,
            // GPT-2- and BERT-style folders may have only the slow tokenizer's files.
            None => match (
                fetcher.optional("vocab.json")?,
                fetcher.optional("merges.txt")?,
            ) {
                (Some(vocab), Some(merges)) => {
                    byte_level_bpe_json(&vocab, &merges, tokenizer_config.as_deref())?
                }
                _ => match fetcher.optional("vocab.txt")? {
                    Some(vocab) => wordpiece_json(&vocab, lowercases(tokenizer_config.as_deref()))?,
                    None => {
                        return Err(EngineError::MissingFile {
                            file: "tokenizer.json (or vocab.json and merges.txt, or vocab.txt)"
                                .into(),
                            location: fetcher.location(),
                        })
                    }
                },
            },
        };
        let generation_config = fetcher
            .optional("generation_config.json")?
            .map(|path| read_text(&path))
            .transpose()?;

        let weights = if let Some(path) = fetcher.optional(SINGLE_WEIGHTS)? {
            vec![path]
        } else if let Some(index) = fetcher.optional(SHARDED_INDEX)? {
            let shards = shard_names(&index)?;
            shards
                .iter()
                .map(|shard| fetcher.required(shard))
                .collect::<Result<Vec<_>>>()?
        } else {
            return Err(EngineError::MissingFile {
                file: format!(
                    "{SINGLE_WEIGHTS} or {SHARDED_INDEX} (only safetensors weights are supported)"
                ),
                location: fetcher.location(),
            });
        };
        Ok(Self {
            source: source.clone(),
            config,
            tokenizer,
            tokenizer_config,
            generation_config,
            weights: Weights::Files(weights),
        })
    }

    /// Opens the weights as a [`VarBuilder`] converting to `dtype` on `device`, with a progress
    /// bar that advances as tensors are loaded (hidden when stderr is not a terminal).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let (backend, tensor_count): (Box<dyn SimpleBackend>, usize) = match &self.weights {
            Weights::Files(paths) => {
                // Safety: the files are memory-mapped read-only; like every mmap-based loader we
                // rely on them not being truncated while the server runs.
                let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths)? };
                let count = tensors.tensors().len();
                (Box::new(tensors), count)
            }
            Weights::Static(bytes) => {
                let tensors = candle_core::safetensors::SliceSafetensors::new(bytes)?;
                let count = tensors.tensors().len();
                (Box::new(tensors), count)
            }
        };
        let bar = ProgressBar::new(tensor_count as u64);
        bar.set_style(
            ProgressStyle::with_template("loading {msg} {bar:40} {pos}/{len} tensors")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(self.source.display_name());
        let backend = Box::new(ProgressBackend {
            inner: backend,
            bar,
        });
        Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
    }
}

impl ModelFiles {
    /// Name, shape and dtype of every weight tensor, read from the safetensors headers.
    pub fn tensor_inventory(&self) -> Result<Vec<(String, Vec<usize>, DType)>> {
        let mut inventory = Vec::new();
        match &self.weights {
            Weights::Files(paths) => {
                // Safety: as in `var_builder`.
                let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths)? };
                for (name, view) in tensors.tensors() {
                    let dtype = DType::try_from(view.dtype())?;
                    inventory.push((name, view.shape().to_vec(), dtype));
                }
            }
            Weights::Static(bytes) => {
                let tensors = candle_core::safetensors::SliceSafetensors::new(bytes)?;
                for (name, view) in tensors.tensors() {
                    let dtype = DType::try_from(view.dtype())?;
                    inventory.push((name, view.shape().to_vec(), dtype));
                }
            }
        }
        Ok(inventory)
    }
}

/// Advances a progress bar for every tensor read from the wrapped backend.
struct ProgressBackend {
    inner: Box<dyn SimpleBackend>,
    bar: ProgressBar,
}

impl SimpleBackend for ProgressBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get(shape, name, init, dtype, device)?;
        self.bar.inc(1);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, dtype, device)?;
        self.bar.inc(1);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

impl Drop for ProgressBackend {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Fetches named files of a folder or a hub repository.
// One lives for the length of a load: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Fetcher {
    Dir(PathBuf),
    Hub {
        repo: String,
        revision: String,
        cache: hf_hub::CacheRepo,
        cache_dir: PathBuf,
        /// None when HF_HUB_OFFLINE is set.
        api: Option<hf_hub::api::sync::ApiRepo>,
    },
}

impl Fetcher {
    fn new(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Dir(dir) => {
                if dir.is_dir() {
                    Ok(Self::Dir(dir.clone()))
                } else {
                    Err(EngineError::MissingFile {
                        file: "model folder".into(),
                        location: dir.display().to_string(),
                    })
                }
            }
            ModelSource::Hub { repo, revision } => {
                let hub_repo = hf_hub::Repo::with_revision(
                    repo.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone(),
                );
                let cache = hf_hub::Cache::from_env();
                let cache_dir = cache.path().clone();
                let offline = std::env::var("HF_HUB_OFFLINE")
                    .map(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
                    .unwrap_or(false);
                let api = if offline {
                    None
                } else {
                    let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true);
                    // `HF_TOKEN` wins over the token file in HF_HOME, as in the hub's own clients.
                    if let Some(token) = std::env::var("HF_TOKEN")
                        .ok()
                        .filter(|token| !token.trim().is_empty())
                    {
                        builder = builder.with_token(Some(token.trim().to_string()));
                    }
                    let api = builder.build().map_err(|e| EngineError::NotCached {
                        repo: repo.clone(),
                        file: "config.json".into(),
                        cache: cache_dir.clone(),
                        reason: e.to_string(),
                    })?;
                    Some(api.repo(hub_repo.clone()))
                };
                Ok(Self::Hub {
                    repo: repo.clone(),
                    revision: revision.clone(),
                    cache: cache.repo(hub_repo),
                    cache_dir,
                    api,
                })
            }
            ModelSource::Bundled => Err(EngineError::InvalidRequest(
                "the bundled model has no files to fetch".into(),
            )),
        }
    }

    fn location(&self) -> String {
        match self {
            Self::Dir(dir) => dir.display().to_string(),
            Self::Hub { repo, revision, .. } => format!("hub repository {repo}@{revision}"),
        }
    }

    /// The file's local path, or None when the model does not have it.
    fn optional(&self, file: &str) -> Result<Option<PathBuf>> {
        match self {
            Self::Dir(dir) => {
                let path = dir.join(file);
                Ok(path.is_file().then_some(path))
            }
            Self::Hub {
                repo,
                cache,
                cache_dir,
                api,
                ..
            } => {
                if let Some(path) = cache.get(file) {
                    return Ok(Some(path));
                }
                let Some(api) = api else {
                    return Ok(None);
                };
                match api.get(file) {
                    Ok(path) => Ok(Some(path)),
                    Err(hf_hub::api::sync::ApiError::RequestError(error))
                        if matches!(*error, ureq::Error::Status(404, _)) =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(EngineError::NotCached {
                        repo: repo.clone(),
                        file: file.into(),
                        cache: cache_dir.clone(),
                        reason: error.to_string(),
                    }),
                }
            }
        }
    }

    fn required(&self, file: &str) -> Result<PathBuf> {
        match self.optional(file)? {
            Some(path) => Ok(path),
            None => match self {
                Self::Hub {
                    repo,
                    cache_dir,
                    api: None,
                    ..
                } => Err(EngineError::NotCached {
                    repo: repo.clone(),
                    file: file.into(),
                    cache: cache_dir.clone(),
                    reason: "HF_HUB_OFFLINE is set".into(),
                }),
                _ => Err(EngineError::MissingFile {
                    file: file.into(),
                    location: self.location(),
                }),
            },
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| bad_file(path, e))
}

/// tokenizer.json of the byte-level BPE tokenizer (GPT-2's) that `vocab` and `merges` describe, as
/// transformers' `GPT2TokenizerFast` builds it from them: the BPE model, the byte-level
/// pre-tokenizer (`add_prefix_space` from tokenizer_config.json, default off), decoder and
/// post-processor, and `<|endoftext|>` as a special token when the vocabulary has it.
pub fn byte_level_bpe_json(
    vocab: &Path,
    merges: &Path,
    tokenizer_config: Option<&str>,
) -> Result<Vec<u8>> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    let config: Option<serde_json::Value> =
        tokenizer_config.and_then(|text| serde_json::from_str(text).ok());
    let add_prefix_space = config
        .as_ref()
        .and_then(|c| c.get("add_prefix_space"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let model = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| EngineError::BadFile {
            path: format!("{} and {}", vocab.display(), merges.display()),
            reason: e.to_string(),
        })?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::new(true, false, true)));
    if tokenizer.token_to_id("<|endoftext|>").is_some() {
        tokenizer
            .add_special_tokens([AddedToken::from("<|endoftext|>", true)])
            .map_err(|e| EngineError::Internal(format!("cannot add <|endoftext|>: {e}")))?;
    }
    tokenizer
        .to_string(false)
        .map(String::into_bytes)
        .map_err(|e| EngineError::Internal(format!("cannot serialize the tokenizer: {e}")))
}

/// The special tokens of a BERT WordPiece vocabulary, in the order `BertTokenizer` lists them.
pub const WORDPIECE_SPECIAL: [&str; 5] = ["[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"];

/// tokenizer.json of the WordPiece tokenizer that a BERT `vocab.txt` describes, as transformers'
/// `BertTokenizerFast` builds it: BERT's normalizer (lowercasing when `lowercase`) and
/// pre-tokenizer, WordPiece with `##` continuations and `[UNK]`, `[CLS] A [SEP] B [SEP]` around
/// the texts, and the special tokens kept whole.
pub fn wordpiece_json(vocab: &Path, lowercase: bool) -> Result<Vec<u8>> {
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    use tokenizers::{AddedToken, Model, Tokenizer};

    let model = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| bad_file(vocab, e))?;
    let id = |token: &str| {
        model
            .token_to_id(token)
            .ok_or_else(|| EngineError::BadFile {
                path: vocab.display().to_string(),
                reason: format!("the vocabulary has no {token}"),
            })
    };
    let (sep, cls) = (id("[SEP]")?, id("[CLS]")?);
    for token in WORDPIECE_SPECIAL {
        id(token)?;
    }
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .map_err(|e| EngineError::Internal(format!("cannot set the normalizer: {e}")))?
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )))
        .with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    let special: Vec<AddedToken> = WORDPIECE_SPECIAL
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| EngineError::Internal(format!("cannot add the special tokens: {e}")))?;
    tokenizer
        .to_string(false)
        .map(String::into_bytes)
        .map_err(|e| EngineError::Internal(format!("cannot serialize the tokenizer: {e}")))
}

/// `do_lower_case` of a BERT tokenizer_config.json; `BertTokenizer`'s default is true.
fn lowercases(tokenizer_config: Option<&str>) -> bool {
    tokenizer_config
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|config| config.get("do_lower_case").and_then(|v| v.as_bool()))
        .unwrap_or(true)
}

fn bad_file(path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::BadFile {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

/// The distinct shard file names listed by a model.safetensors.index.json, in order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index_text = read_text(index)?;
    let parsed: Index = serde_json::from_str(&index_text).map_err(|e| bad_file(index, e))?;
    let mut shards: Vec<String> = parsed.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The WordPiece tokenizer built from a vocab.txt behaves as the tokenizer.json transformers'
    /// `BertTokenizerFast` saved for the same vocabulary: ids, type ids and offsets, single texts
    /// and pairs, accents, Chinese characters, punctuation, unknown words and special tokens.
    #[test]
    fn wordpiece_from_vocab_txt_encodes_as_bert_tokenizer_fast() {
        use tokenizers::Tokenizer;
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let reference_file = fixtures.join("detokenize/wordpiece/tokenizer.json");
        let mut reference = Tokenizer::from_file(&reference_file).unwrap();
        reference.with_padding(None);
        let mut vocab: Vec<(String, u32)> = reference.get_vocab(false).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let dir = std::env::temp_dir().join(format!("candlewick-wordpiece-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vocab_txt = dir.join("vocab.txt");
        let lines: Vec<&str> = vocab.iter().map(|(token, _)| token.as_str()).collect();
        std::fs::write(&vocab_txt, lines.join("\n") + "\n").unwrap();

        let ours = Tokenizer::from_bytes(wordpiece_json(&vocab_txt, true).unwrap()).unwrap();
        let texts = [
            "Hello, World! It's a test.",
            "Caf\u{e9} NA\u{cf}VE r\u{e9}sum\u{e9} \u{4e2d}\u{6587}\u{5b57}",
            "the [MASK] sat on the [MASK].",
            "unaffable xyzzyq  \t tabs\nand lines",
            "",
        ];
        for (i, text) in texts.iter().enumerate() {
            let pair = texts[(i + 1) % texts.len()];
            for (a, b) in [
                (
                    ours.encode(*text, true).unwrap(),
                    reference.encode(*text, true).unwrap(),
                ),
                (
                    ours.encode((*text, pair), true).unwrap(),
                    reference.encode((*text, pair), true).unwrap(),
                ),
            ] {
                assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
                assert_eq!(a.get_type_ids(), b.get_type_ids(), "{text:?}");
                assert_eq!(a.get_offsets(), b.get_offsets(), "{text:?}");
                assert_eq!(
                    a.get_special_tokens_mask(),
                    b.get_special_tokens_mask(),
                    "{text:?}"
                );
            }
            let ids = reference.encode(*text, true).unwrap().get_ids().to_vec();
            assert_eq!(
                ours.decode(&ids, true).unwrap(),
                reference.decode(&ids, true).unwrap()
            );
        }

        // Cased: the same tokenizer without lowercasing or accent stripping.
        let cased: serde_json::Value =
            serde_json::from_slice(&wordpiece_json(&vocab_txt, false).unwrap()).unwrap();
        assert_eq!(cased["normalizer"]["lowercase"], false);
        assert!(cased["normalizer"]["strip_accents"].is_null());
        let missing = dir.join("no-mask.txt");
        std::fs::write(&missing, "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n").unwrap();
        let error = wordpiece_json(&missing, true).unwrap_err().to_string();
        assert!(
            error.contains("[MASK]") && error.contains("no-mask.txt"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn byte_level_bpe_is_built_from_vocab_and_merges_and_refuses_a_mismatch() {
        let dir = std::env::temp_dir().join(format!("candlewick-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        std::fs::write(
            &vocab,
            r#"{"H": 0, "i": 1, "Hi": 2, "\u0120": 3, "<|endoftext|>": 4}"#,
        )
        .unwrap();
        std::fs::write(&merges, "#version: 0.2\nH i\n").unwrap();
        let json = byte_level_bpe_json(&vocab, &merges, None).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_bytes(&json).unwrap();
        let ids = tokenizer.encode("Hi<|endoftext|>", true).unwrap();
        assert_eq!(ids.get_ids(), [2, 4]);
        assert_eq!(tokenizer.decode(&[2, 3, 2], false).unwrap(), "Hi Hi");

        std::fs::write(&merges, "#version: 0.2\nH x\n").unwrap();
        let error = byte_level_bpe_json(&vocab, &merges, None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("merges.txt") && error.contains('x'),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parse_distinguishes_folders_from_hub_ids() {
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(dir.to_str().unwrap()).unwrap(),
            ModelSource::Dir(dir.clone())
        );
        assert_eq!(
            ModelSource::parse("mistralai/Mistral-7B-v0.1").unwrap(),
            ModelSource::Hub {
                repo: "mistralai/Mistral-7B-v0.1".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSource::parse("org/model@refs/pr/1").unwrap(),
            ModelSource::Hub {
                repo: "org/model".into(),
                revision: "refs/pr/1".into()
            }
        );
        assert!(ModelSource::parse("./no/such/folder").is_err());
    }

    #[test]
    fn offline_and_not_cached_names_the_file_and_the_repo() {
        let empty_cache = std::env::temp_dir().join("candlewick-empty-hub-cache");
        std::env::set_var("HF_HOME", &empty_cache);
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let source = ModelSource::parse("someone/some-model").unwrap();
        let error = ModelFiles::resolve(&source).err().unwrap().to_string();
        assert!(error.contains("config.json"), "{error}");
        assert!(error.contains("someone/some-model"), "{error}");
        assert!(error.contains("HF_HUB_OFFLINE"), "{error}");
    }

    #[test]
    fn a_folder_without_weights_is_refused_with_what_was_looked_for() {
        let dir = std::env::temp_dir().join("candlewick-no-weights");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let error = ModelFiles::resolve(&ModelSource::Dir(dir.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("model.safetensors"), "{error}");
        assert!(error.contains(dir.to_str().unwrap()), "{error}");
    }
}
