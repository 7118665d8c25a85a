//! Settings of `candlewick serve`, from command-line flags, `CANDLEWICK_*` environment
//! variables and a TOML file (see config/candlewick.example.toml), in that order of precedence,
//! over built-in defaults.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::routes::RouterOptions;
use crate::state::Pooling;
use candlewick_engine::QuantizeOptions;

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment variable does not parse.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    /// A CORS origin is not a valid header value.
    #[error("invalid CORS origin {0:?}")]
    InvalidOrigin(String),
    /// A limit is out of range.
    #[error("{0}")]
    InvalidLimit(String),
}

/// Flags of `candlewick serve`. Each flag can also be set with the environment variable
/// named in its help, or in the config file; flags win over the environment, which wins over
/// the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file [env: CANDLEWICK_CONFIG]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A model folder or a Hugging Face hub id; without it, the bundled tiny model
    /// [env: CANDLEWICK_MODEL]
    #[arg(long)]
    pub model: Option<String>,
    /// The name clients use as `model`; default: the folder or hub id's name, or
    /// "tiny-mistral" for the bundled model [env: CANDLEWICK_SERVED_MODEL_NAME]
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// cpu, or cuda[:N] when built with the `cuda` feature; default cpu [env: CANDLEWICK_DEVICE]
    #[arg(long)]
    pub device: Option<String>,
    /// f32, bf16 or f16; default f32 on CPU and bf16 on CUDA [env: CANDLEWICK_DTYPE]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize a generator's linear weights at load: q8_0 or q4k; default none (exact)
    /// [env: CANDLEWICK_QUANTIZE]
    #[arg(long)]
    pub quantize: Option<String>,
    /// With --quantize, whether the output head is quantized too; default true
    /// [env: CANDLEWICK_QUANTIZE_LM_HEAD]
    #[arg(long)]
    pub quantize_lm_head: Option<bool>,
    /// Address to listen on; default 127.0.0.1 [env: CANDLEWICK_HOST]
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; default 8080 [env: CANDLEWICK_PORT]
    #[arg(long)]
    pub port: Option<u16>,
    /// Require `Authorization: Bearer KEY` on /v1 routes [env: CANDLEWICK_API_KEY]
    #[arg(long)]
    pub api_key: Option<String>,
    /// Sequences generated at once; default 16 [env: CANDLEWICK_MAX_RUNNING]
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Requests that may wait for a free sequence; more get 429; default 64
    /// [env: CANDLEWICK_MAX_WAITING]
    #[arg(long)]
    pub max_waiting: Option<usize>,
    /// Tokens per engine step (decode rows plus prefill chunks); default 2048
    /// [env: CANDLEWICK_MAX_BATCH_TOKENS]
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Bytes of prefilled prompts' state kept for later prompts that start the same way
    /// (automatic prefix caching); 0 turns it off; default 268435456 (256 MiB)
    /// [env: CANDLEWICK_PREFIX_CACHE_BYTES]
    #[arg(long)]
    pub prefix_cache_bytes: Option<usize>,
    /// Longest prompt in tokens; default and maximum: the model's context
    /// [env: CANDLEWICK_MAX_INPUT_TOKENS]
    #[arg(long)]
    pub max_input_tokens: Option<usize>,
    /// Longest prompt plus max_tokens; default and maximum: the model's context
    /// [env: CANDLEWICK_MAX_TOTAL_TOKENS]
    #[arg(long)]
    pub max_total_tokens: Option<usize>,
    /// Encoders: tokens over all sequences of one request; default 65536
    /// [env: CANDLEWICK_MAX_REQUEST_TOKENS]
    #[arg(long)]
    pub max_request_tokens: Option<usize>,
    /// Encoders: how /v1/embeddings pools hidden states: mean, cls or pooler; default mean
    /// [env: CANDLEWICK_POOLING]
    #[arg(long)]
    pub pooling: Option<String>,
    /// Larger request bodies get 413; default 2097152 [env: CANDLEWICK_MAX_BODY_BYTES]
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Requests still generating after this long end with an error; 0 for no limit; default
    /// 600 [env: CANDLEWICK_REQUEST_TIMEOUT_SECS]
    #[arg(long)]
    pub request_timeout_secs: Option<u64>,
    /// Origins allowed by CORS, repeatable or comma-separated; `*` for any; default none
    /// [env: CANDLEWICK_CORS_ALLOW_ORIGINS, comma-separated]
    #[arg(long = "cors-allow-origin", value_delimiter = ',')]
    pub cors_allow_origins: Option<Vec<String>>,
}

/// Settings from one source; unset fields fall through to the next source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialSettings {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_key: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub cors_allow_origins: Option<Vec<String>>,
    pub model: Option<String>,
    pub served_model_name: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub quantize: Option<String>,
    pub quantize_lm_head: Option<bool>,
    pub max_running: Option<usize>,
    pub max_waiting: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub prefix_cache_bytes: Option<usize>,
    pub max_input_tokens: Option<usize>,
    pub max_total_tokens: Option<usize>,
    pub max_request_tokens: Option<usize>,
    pub pooling: Option<String>,
    /// The config file's `[[models]]`: each entry's own settings (the rest fall through to the
    /// shared ones).
    pub models: Option<Vec<PartialSettings>>,
}

/// The config file: the same settings in three tables, and optionally several models.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    #[serde(default)]
    server: ServerTable,
    #[serde(default)]
    model: ModelTable,
    #[serde(default)]
    limits: LimitsTable,
    /// Several models in one server, each with its own scheduler.
    #[serde(default)]
    models: Vec<ModelEntry>,
}

/// One `[[models]]` entry: a model and its own limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    model: String,
    served_model_name: Option<String>,
    device: Option<String>,
    dtype: Option<String>,
    quantize: Option<String>,
    quantize_lm_head: Option<bool>,
    pooling: Option<String>,
    max_running: Option<usize>,
    max_waiting: Option<usize>,
    max_batch_tokens: Option<usize>,
    prefix_cache_bytes: Option<usize>,
    max_input_tokens: Option<usize>,
    max_total_tokens: Option<usize>,
    max_request_tokens: Option<usize>,
}

impl ModelEntry {
    fn into_partial(self) -> PartialSettings {
        PartialSettings {
            model: Some(self.model),
            served_model_name: self.served_model_name,
            device: self.device,
            dtype: self.dtype,
            quantize: self.quantize,
            quantize_lm_head: self.quantize_lm_head,
            pooling: self.pooling,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            max_batch_tokens: self.max_batch_tokens,
            prefix_cache_bytes: self.prefix_cache_bytes,
            max_input_tokens: self.max_input_tokens,
            max_total_tokens: self.max_total_tokens,
            max_request_tokens: self.max_request_tokens,
            ..PartialSettings::default()
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerTable {
    host: Option<String>,
    port: Option<u16>,
    api_key: Option<String>,
    max_body_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    cors_allow_origins: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelTable {
    model: Option<String>,
    served_model_name: Option<String>,
    device: Option<String>,
    dtype: Option<String>,
    quantize: Option<String>,
    quantize_lm_head: Option<bool>,
    pooling: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    max_running: Option<usize>,
    max_waiting: Option<usize>,
    max_batch_tokens: Option<usize>,
    prefix_cache_bytes: Option<usize>,
    max_input_tokens: Option<usize>,
    max_total_tokens: Option<usize>,
    max_request_tokens: Option<usize>,
}

impl PartialSettings {
    /// The settings a TOML config file gives.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileSettings = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let (server, model, limits) = (file.server, file.model, file.limits);
        if model.model.is_some() && !file.models.is_empty() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "[model] names a model and [[models]] lists models: use one".into(),
            });
        }
        let models = (!file.models.is_empty()).then(|| {
            file.models
                .into_iter()
                .map(ModelEntry::into_partial)
                .collect()
        });
        Ok(Self {
            models,
            host: server.host,
            port: server.port,
            api_key: server.api_key,
            max_body_bytes: server.max_body_bytes,
            request_timeout_secs: server.request_timeout_secs,
            cors_allow_origins: server.cors_allow_origins,
            model: model.model,
            served_model_name: model.served_model_name,
            device: model.device,
            dtype: model.dtype,
            quantize: model.quantize,
            quantize_lm_head: model.quantize_lm_head,
            max_running: limits.max_running,
            max_waiting: limits.max_waiting,
            max_batch_tokens: limits.max_batch_tokens,
            prefix_cache_bytes: limits.prefix_cache_bytes,
            max_input_tokens: limits.max_input_tokens,
            max_total_tokens: limits.max_total_tokens,
            max_request_tokens: limits.max_request_tokens,
            pooling: model.pooling,
        })
    }

    /// The settings `CANDLEWICK_*` variables give; `lookup` reads one variable.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = |name: &'static str| lookup(name).filter(|value| !value.is_empty());
        Ok(Self {
            models: None,
            host: text("CANDLEWICK_HOST"),
            port: parse_env("CANDLEWICK_PORT", text("CANDLEWICK_PORT"))?,
            api_key: text("CANDLEWICK_API_KEY"),
            max_body_bytes: parse_env(
                "CANDLEWICK_MAX_BODY_BYTES",
                text("CANDLEWICK_MAX_BODY_BYTES"),
            )?,
            request_timeout_secs: parse_env(
                "CANDLEWICK_REQUEST_TIMEOUT_SECS",
                text("CANDLEWICK_REQUEST_TIMEOUT_SECS"),
            )?,
            cors_allow_origins: text("CANDLEWICK_CORS_ALLOW_ORIGINS")
                .map(|list| list.split(',').map(|s| s.trim().to_string()).collect()),
            model: text("CANDLEWICK_MODEL"),
            served_model_name: text("CANDLEWICK_SERVED_MODEL_NAME"),
            device: text("CANDLEWICK_DEVICE"),
            dtype: text("CANDLEWICK_DTYPE"),
            quantize: text("CANDLEWICK_QUANTIZE"),
            quantize_lm_head: parse_env(
                "CANDLEWICK_QUANTIZE_LM_HEAD",
                text("CANDLEWICK_QUANTIZE_LM_HEAD"),
            )?,
            max_running: parse_env("CANDLEWICK_MAX_RUNNING", text("CANDLEWICK_MAX_RUNNING"))?,
            max_waiting: parse_env("CANDLEWICK_MAX_WAITING", text("CANDLEWICK_MAX_WAITING"))?,
            max_batch_tokens: parse_env(
                "CANDLEWICK_MAX_BATCH_TOKENS",
                text("CANDLEWICK_MAX_BATCH_TOKENS"),
            )?,
            prefix_cache_bytes: parse_env(
                "CANDLEWICK_PREFIX_CACHE_BYTES",
                text("CANDLEWICK_PREFIX_CACHE_BYTES"),
            )?,
            max_input_tokens: parse_env(
                "CANDLEWICK_MAX_INPUT_TOKENS",
                text("CANDLEWICK_MAX_INPUT_TOKENS"),
            )?,
            max_total_tokens: parse_env(
                "CANDLEWICK_MAX_TOTAL_TOKENS",
                text("CANDLEWICK_MAX_TOTAL_TOKENS"),
            )?,
            max_request_tokens: parse_env(
                "CANDLEWICK_MAX_REQUEST_TOKENS",
                text("CANDLEWICK_MAX_REQUEST_TOKENS"),
            )?,
            pooling: text("CANDLEWICK_POOLING"),
        })
    }

    /// The settings the command line gives.
    pub fn from_args(args: &ServeArgs) -> Self {
        let args = args.clone();
        Self {
            models: None,
            host: args.host,
            port: args.port,
            api_key: args.api_key,
            max_body_bytes: args.max_body_bytes,
            request_timeout_secs: args.request_timeout_secs,
            cors_allow_origins: args.cors_allow_origins,
            model: args.model,
            served_model_name: args.served_model_name,
            device: args.device,
            dtype: args.dtype,
            quantize: args.quantize,
            quantize_lm_head: args.quantize_lm_head,
            max_running: args.max_running,
            max_waiting: args.max_waiting,
            max_batch_tokens: args.max_batch_tokens,
            prefix_cache_bytes: args.prefix_cache_bytes,
            max_input_tokens: args.max_input_tokens,
            max_total_tokens: args.max_total_tokens,
            max_request_tokens: args.max_request_tokens,
            pooling: args.pooling,
        }
    }

    /// These settings, with `lower`'s where these are unset.
    pub fn or(self, lower: Self) -> Self {
        Self {
            host: self.host.or(lower.host),
            port: self.port.or(lower.port),
            api_key: self.api_key.or(lower.api_key),
            max_body_bytes: self.max_body_bytes.or(lower.max_body_bytes),
            request_timeout_secs: self.request_timeout_secs.or(lower.request_timeout_secs),
            cors_allow_origins: self.cors_allow_origins.or(lower.cors_allow_origins),
            model: self.model.or(lower.model),
            served_model_name: self.served_model_name.or(lower.served_model_name),
            device: self.device.or(lower.device),
            dtype: self.dtype.or(lower.dtype),
            quantize: self.quantize.or(lower.quantize),
            quantize_lm_head: self.quantize_lm_head.or(lower.quantize_lm_head),
            max_running: self.max_running.or(lower.max_running),
            max_waiting: self.max_waiting.or(lower.max_waiting),
            max_batch_tokens: self.max_batch_tokens.or(lower.max_batch_tokens),
            prefix_cache_bytes: self.prefix_cache_bytes.or(lower.prefix_cache_bytes),
            max_input_tokens: self.max_input_tokens.or(lower.max_input_tokens),
            max_total_tokens: self.max_total_tokens.or(lower.max_total_tokens),
            max_request_tokens: self.max_request_tokens.or(lower.max_request_tokens),
            pooling: self.pooling.or(lower.pooling),
            models: self.models.or(lower.models),
        }
    }
}

fn parse_env<T: FromStr>(
    name: &'static str,
    value: Option<String>,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value
        .map(|value| {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                name,
                message: e.to_string(),
                value,
            })
        })
        .transpose()
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// None: no limit.
    pub request_timeout: Option<Duration>,
    pub cors_allow_origins: Vec<String>,
    pub model: Option<String>,
    pub served_model_name: Option<String>,
    pub device: String,
    pub dtype: Option<String>,
    /// Generators: in-situ quantization of the linear weights; None keeps them exact.
    pub quantize: Option<QuantizeOptions>,
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_batch_tokens: usize,
    /// Generators: bytes of the prefix cache; 0 turns it off.
    pub prefix_cache_bytes: usize,
    /// None: the model's context.
    pub max_input_tokens: Option<usize>,
    /// None: the model's context.
    pub max_total_tokens: Option<usize>,
    /// Encoders: tokens over all sequences of one request.
    pub max_request_tokens: usize,
    /// Encoders: how embeddings are pooled.
    pub pooling: Pooling,
    /// The config file's `[[models]]`, each resolved over the shared settings; empty when one
    /// model is served (these settings' own).
    pub models: Vec<Settings>,
}

impl Settings {
    /// Reads the config file named by `--config` or `CANDLEWICK_CONFIG` (if any) and the
    /// environment through `lookup`, and layers flags over environment over file over defaults.
    pub fn load(
        args: &ServeArgs,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let config_path = args.config.clone().or_else(|| {
            lookup("CANDLEWICK_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        });
        let mut file = match config_path {
            None => PartialSettings::default(),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                PartialSettings::from_toml(&text, &path)?
            }
        };
        let env = PartialSettings::from_env(lookup)?;
        let flags_and_env = PartialSettings::from_args(args).or(env);
        // `--model` (or CANDLEWICK_MODEL) serves exactly that model, whatever the file lists.
        let entries = file.models.take().filter(|_| flags_and_env.model.is_none());
        let shared = flags_and_env.or(file);
        let mut settings = Self::resolve(shared.clone())?;
        if let Some(entries) = entries {
            settings.models = entries
                .into_iter()
                .map(|entry| Self::resolve(entry.or(shared.clone())))
                .collect::<Result<_, _>>()?;
        }
        Ok(settings)
    }

    /// The settings of each model to serve: the `[[models]]` of the config file, each over the
    /// shared settings, or else the one model of these settings.
    pub fn served_models(&self) -> Vec<Settings> {
        if self.models.is_empty() {
            vec![self.clone()]
        } else {
            self.models.clone()
        }
    }

    /// Fills what `partial` leaves unset with the defaults, and checks the limits.
    pub fn resolve(partial: PartialSettings) -> Result<Self, ConfigError> {
        let settings = Self {
            host: partial.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: partial.port.unwrap_or(8080),
            api_key: partial.api_key.filter(|key| !key.is_empty()),
            max_body_bytes: partial.max_body_bytes.unwrap_or(2 * 1024 * 1024),
            request_timeout: match partial.request_timeout_secs.unwrap_or(600) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            cors_allow_origins: partial.cors_allow_origins.unwrap_or_default(),
            model: partial.model,
            served_model_name: partial.served_model_name,
            device: partial.device.unwrap_or_else(|| "cpu".into()),
            dtype: partial.dtype,
            quantize: match partial.quantize.as_deref() {
                None => None,
                Some(name) => {
                    QuantizeOptions::parse(name, partial.quantize_lm_head.unwrap_or(true))
                        .map_err(ConfigError::InvalidLimit)?
                }
            },
            max_running: partial.max_running.unwrap_or(16),
            max_waiting: partial.max_waiting.unwrap_or(64),
            max_batch_tokens: partial.max_batch_tokens.unwrap_or(2048),
            prefix_cache_bytes: partial.prefix_cache_bytes.unwrap_or(256 << 20),
            max_input_tokens: partial.max_input_tokens,
            max_total_tokens: partial.max_total_tokens,
            max_request_tokens: partial.max_request_tokens.unwrap_or(65536),
            pooling: match partial.pooling.as_deref() {
                None => Pooling::default(),
                Some(name) => Pooling::parse(name).ok_or_else(|| {
                    ConfigError::InvalidLimit(format!(
                        "pooling must be mean, cls or pooler, got {name:?}"
                    ))
                })?,
            },
            models: Vec::new(),
        };
        for (name, value) in [
            ("max_running", settings.max_running),
            ("max_waiting", settings.max_waiting),
            ("max_batch_tokens", settings.max_batch_tokens),
            ("max_body_bytes", settings.max_body_bytes),
            ("max_request_tokens", settings.max_request_tokens),
        ] {
            if value == 0 {
                return Err(ConfigError::InvalidLimit(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        Ok(settings)
    }

    /// `(max_input_tokens, max_total_tokens)` for a model whose context is `max_context`
    /// tokens: each defaults to the context, and neither may exceed it.
    pub fn token_limits(&self, max_context: usize) -> Result<(usize, usize), ConfigError> {
        for (name, value) in [
            ("max_input_tokens", self.max_input_tokens),
            ("max_total_tokens", self.max_total_tokens),
        ] {
            match value {
                Some(0) => {
                    return Err(ConfigError::InvalidLimit(format!("{name} must be at least 1")))
                }
                Some(value) if value > max_context => {
                    return Err(ConfigError::InvalidLimit(format!(
                        "{name} is {value}, more than the model's maximum context of {max_context} tokens"
                    )))
                }
                _ => {}
            }
        }
        let total = self.max_total_tokens.unwrap_or(max_context);
        let input = self.max_input_tokens.unwrap_or(total).min(max_context);
        if input > total {
            return Err(ConfigError::InvalidLimit(format!(
                "max_input_tokens ({input}) is more than max_total_tokens ({total})"
            )));
        }
        Ok((input, total))
    }

    /// The router's share of the settings.
    pub fn router_options(&self) -> RouterOptions {
        RouterOptions {
            api_key: self.api_key.clone(),
            max_body_bytes: self.max_body_bytes,
            cors_allow_origins: self.cors_allow_origins.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn args(flags: &[&str]) -> ServeArgs {
        Cli::parse_from(std::iter::once("serve").chain(flags.iter().copied())).args
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn write_config(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "candlewick-config-{}-{}.toml",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let settings = Settings::load(&args(&[]), env(&[])).unwrap();
        assert_eq!(settings.host, "127.0.0.1");
        assert_eq!(settings.port, 8080);
        assert_eq!(settings.max_running, 16);
        assert_eq!(settings.max_waiting, 64);
        assert_eq!(settings.max_batch_tokens, 2048);
        assert_eq!(settings.max_body_bytes, 2_097_152);
        assert_eq!(settings.request_timeout, Some(Duration::from_secs(600)));
        assert_eq!(settings.device, "cpu");
        assert!(settings.api_key.is_none() && settings.cors_allow_origins.is_empty());
    }

    #[test]
    fn flags_win_over_environment_which_wins_over_the_file() {
        let path = write_config(
            r#"
            [server]
            port = 1000
            host = "0.0.0.0"
            api_key = "from-file"
            [model]
            served_model_name = "file-name"
            [limits]
            max_running = 2
            max_waiting = 3
            "#,
        );
        let path_flag = path.to_string_lossy().into_owned();
        let settings = Settings::load(
            &args(&["--config", &path_flag, "--port", "3000"]),
            env(&[
                ("CANDLEWICK_PORT", "2000"),
                ("CANDLEWICK_MAX_RUNNING", "5"),
                ("CANDLEWICK_API_KEY", "from-env"),
            ]),
        )
        .unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(settings.port, 3000, "flag over env over file");
        assert_eq!(settings.max_running, 5, "env over file");
        assert_eq!(settings.api_key.as_deref(), Some("from-env"));
        assert_eq!(settings.host, "0.0.0.0", "file over default");
        assert_eq!(settings.max_waiting, 3);
        assert_eq!(settings.served_model_name.as_deref(), Some("file-name"));
    }

    #[test]
    fn models_entries_take_their_own_settings_over_the_shared_ones() {
        let path = write_config(
            r#"
            [limits]
            max_running = 2
            max_waiting = 9
            [[models]]
            model = "/models/writer"
            max_running = 5
            [[models]]
            model = "/models/tagger"
            served_model_name = "tagger"
            pooling = "cls"
            "#,
        );
        let config = path.to_string_lossy().to_string();
        let settings = Settings::load(
            &args(&["--config", &config, "--max-waiting", "4"]),
            env(&[]),
        )
        .unwrap();
        let models = settings.served_models();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].model.as_deref(), Some("/models/writer"));
        assert_eq!((models[0].max_running, models[0].max_waiting), (5, 4));
        assert_eq!(models[1].served_model_name.as_deref(), Some("tagger"));
        assert_eq!(
            (models[1].max_running, models[1].pooling),
            (2, Pooling::Cls)
        );
        // `--model` serves exactly one, whatever the file lists.
        let one = Settings::load(&args(&["--config", &config, "--model", "/m"]), env(&[])).unwrap();
        let served = one.served_models();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].model.as_deref(), Some("/m"));
        std::fs::remove_file(&path).ok();

        let both = write_config(
            "[model]
model = \"/a\"
[[models]]
model = \"/b\"
",
        );
        let error = Settings::load(&args(&["--config", &both.to_string_lossy()]), env(&[]));
        std::fs::remove_file(&both).ok();
        assert!(matches!(error, Err(ConfigError::Parse { .. })), "{error:?}");
        let unknown = write_config(
            "[[models]]
model = \"/b\"
max_runing = 3
",
        );
        let error = Settings::load(&args(&["--config", &unknown.to_string_lossy()]), env(&[]));
        std::fs::remove_file(&unknown).ok();
        assert!(matches!(error, Err(ConfigError::Parse { .. })), "{error:?}");
    }

    #[test]
    fn config_file_can_be_named_by_the_environment() {
        let path = write_config("[limits]\nmax_batch_tokens = 77\n");
        let settings = Settings::load(
            &args(&[]),
            env(&[("CANDLEWICK_CONFIG", &path.to_string_lossy())]),
        )
        .unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(settings.max_batch_tokens, 77);
    }

    #[test]
    fn example_config_documents_every_key_and_parses() {
        let text = include_str!("../../../config/candlewick.example.toml");
        let partial = PartialSettings::from_toml(text, Path::new("example")).unwrap();
        assert!(Settings::resolve(partial).is_ok());
        for key in [
            "host",
            "port",
            "api_key",
            "max_body_bytes",
            "request_timeout_secs",
            "cors_allow_origins",
            "model",
            "served_model_name",
            "device",
            "dtype",
            "quantize",
            "quantize_lm_head",
            "max_running",
            "max_waiting",
            "max_batch_tokens",
            "prefix_cache_bytes",
            "max_input_tokens",
            "max_total_tokens",
        ] {
            assert!(
                text.contains(&format!("{key} =")),
                "{key} is not documented"
            );
        }
    }

    #[test]
    fn unknown_file_keys_and_bad_environment_values_are_refused() {
        let error =
            PartialSettings::from_toml("[server]\nprot = 1\n", Path::new("x.toml")).unwrap_err();
        assert!(error.to_string().contains("prot"), "{error}");
        let error = PartialSettings::from_env(env(&[("CANDLEWICK_PORT", "http")])).unwrap_err();
        assert!(error.to_string().contains("CANDLEWICK_PORT"), "{error}");
    }

    #[test]
    fn cors_origins_come_from_repeated_or_comma_separated_flags_and_the_environment() {
        let settings = Settings::load(
            &args(&[
                "--cors-allow-origin",
                "http://a",
                "--cors-allow-origin",
                "http://b,http://c",
            ]),
            env(&[]),
        )
        .unwrap();
        assert_eq!(
            settings.cors_allow_origins,
            ["http://a", "http://b", "http://c"]
        );
        let settings = Settings::load(
            &args(&[]),
            env(&[("CANDLEWICK_CORS_ALLOW_ORIGINS", "http://a, http://b")]),
        )
        .unwrap();
        assert_eq!(settings.cors_allow_origins, ["http://a", "http://b"]);
    }

    #[test]
    fn token_limits_default_to_the_context_and_may_not_exceed_it() {
        let settings = Settings::load(&args(&[]), env(&[])).unwrap();
        assert_eq!(settings.token_limits(512).unwrap(), (512, 512));
        let settings = Settings::load(&args(&["--max-total-tokens", "100"]), env(&[])).unwrap();
        assert_eq!(settings.token_limits(512).unwrap(), (100, 100));
        let settings = Settings::load(&args(&["--max-input-tokens", "600"]), env(&[])).unwrap();
        let error = settings.token_limits(512).unwrap_err().to_string();
        assert!(error.contains("600") && error.contains("512"), "{error}");
        let settings = Settings::load(
            &args(&["--max-input-tokens", "300", "--max-total-tokens", "200"]),
            env(&[]),
        )
        .unwrap();
        assert!(settings.token_limits(512).is_err());
    }

    #[test]
    fn zero_timeout_means_no_limit_and_zero_sizes_are_refused() {
        let settings = Settings::load(&args(&["--request-timeout-secs", "0"]), env(&[])).unwrap();
        assert_eq!(settings.request_timeout, None);
        assert!(Settings::load(&args(&["--max-running", "0"]), env(&[])).is_err());
    }
}
