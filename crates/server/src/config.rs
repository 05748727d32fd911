//! Service configuration: `config/default.toml` (compiled in), then an optional file, then
//! `CNS_<SECTION>__<KEY>` environment variables, then command-line flags.
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub engine: EngineSection,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    pub adapters: AdapterSection,
    pub annotators: AnnotatorSection,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub max_body_bytes: usize,
    pub request_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub log_json: bool,
    /// Origins whose browser pages may call the API (CORS): exact origins such as
    /// `https://app.example.com`, or `*` for any. Empty: no CORS headers (same-origin only).
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Let cross-origin pages send credentials (cookies, HTTP auth). Not with `*`.
    #[serde(default)]
    pub cors_allow_credentials: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_pixels: usize,
    pub max_input_pixels: u64,
    pub max_steps: usize,
    pub max_images: usize,
    pub max_controls: usize,
    pub max_prompt_chars: usize,
}

/// Smallest width or height of a generated image.
pub const MIN_SIDE: usize = 64;
/// Largest width or height of a generated image, whatever `max_pixels` allows.
pub const MAX_SIDE: usize = 8192;
/// Default width and height when the limits allow them.
pub const DEFAULT_SIDE: usize = 512;
/// Default step count when the limits allow it.
pub const DEFAULT_STEPS: usize = 20;

impl Limits {
    /// The largest width (or height) a request may give: [`MAX_SIDE`], or less where
    /// `max_pixels` cannot hold it with the other side at [`MIN_SIDE`] (a multiple of 8).
    pub fn max_side(&self) -> usize {
        (self.max_pixels / MIN_SIDE).min(MAX_SIDE) / 8 * 8
    }

    /// The width and height used when a request gives none: [`DEFAULT_SIDE`], or the
    /// largest square the limits allow below it.
    pub fn default_side(&self) -> usize {
        let mut side = DEFAULT_SIDE;
        while side > MIN_SIDE && side * side > self.max_pixels {
            side -= 8;
        }
        side
    }

    /// The step count used when a request gives none: [`DEFAULT_STEPS`], or `max_steps`
    /// below it.
    pub fn default_steps(&self) -> usize {
        DEFAULT_STEPS.min(self.max_steps)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    pub device: String,
    pub dtype: String,
    /// The VAE's dtype when the models are in f16/bf16 (diffusion::pipeline::VaeUpcast).
    #[serde(default)]
    pub vae_upcast: VaeUpcastSetting,
    pub max_queue: usize,
    pub max_batch: usize,
    pub max_queue_delay_ms: u64,
    pub prompt_cache: usize,
}

/// `never`: the models' dtype, as diffusers' SD 1.x/2.x ControlNet pipelines; `config`: f32 when
/// the models are f16 and the VAE config says `force_upcast` (diffusers' SDXL rule); `always`: f32.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum VaeUpcastSetting {
    #[default]
    Never,
    Config,
    Always,
}

impl From<VaeUpcastSetting> for diffusion::pipeline::VaeUpcast {
    fn from(s: VaeUpcastSetting) -> Self {
        match s {
            VaeUpcastSetting::Never => Self::Never,
            VaeUpcastSetting::Config => Self::ForceUpcastConfig,
            VaeUpcastSetting::Always => Self::Always,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    pub roots: Vec<PathBuf>,
    pub budget_bytes: u64,
    #[serde(default)]
    pub preload: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub api_keys: Vec<String>,
    pub admin_keys: Vec<String>,
}

/// Preprocessor networks (`[annotators]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AnnotatorSection {
    /// The weight folder; empty = none.
    pub root: PathBuf,
    /// Bytes of annotator weights kept on the device (0 = no limit).
    pub budget_bytes: u64,
}

/// Command-line overrides (the most used settings; the rest through a file or environment).
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct Overrides {
    /// A TOML file layered over the defaults.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:7860 (port 0 picks a free one).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// A base model (diffusers folder or SD 1.x single file), named after the file; replaces
    /// the configured list.
    #[arg(long)]
    #[serde(skip)]
    pub model: Option<PathBuf>,
    /// An adapter root folder (repeatable; replaces the configured roots).
    #[arg(long)]
    #[serde(skip)]
    pub adapter_root: Vec<PathBuf>,
    /// The folder of annotator (preprocessor network) weights.
    #[arg(long)]
    #[serde(skip)]
    pub annotator_root: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip)]
    pub device: Option<String>,
    #[arg(long)]
    #[serde(skip)]
    pub dtype: Option<String>,
    #[arg(long)]
    #[serde(skip)]
    pub max_batch: Option<usize>,
    #[arg(long)]
    #[serde(skip)]
    pub max_queue: Option<usize>,
    /// A bearer key for generation (repeatable; replaces the configured keys).
    #[arg(long, env = "CNS_API_KEY")]
    #[serde(skip)]
    pub api_key: Vec<String>,
    /// A bearer key for adapter management (repeatable).
    #[arg(long, env = "CNS_ADMIN_KEY")]
    #[serde(skip)]
    pub admin_key: Vec<String>,
    /// An origin allowed to call the API from a browser (CORS; repeatable, `*` for any;
    /// replaces the configured list).
    #[arg(long)]
    #[serde(skip)]
    pub cors_origin: Vec<String>,
    /// Logs as JSON lines.
    #[arg(long)]
    #[serde(skip)]
    pub log_json: bool,
}

impl Config {
    /// `config/default.toml` alone (no file, environment or flags): what `openapi.yaml`
    /// describes.
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULT_TOML))
            .extract()
            .expect("config/default.toml parses")
    }

    /// The defaults, then `overrides.config`, then the environment, then the flags.
    pub fn load(overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = &overrides.config {
            if !path.is_file() {
                anyhow::bail!("config file {} not found", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed("CNS_")
                .split("__")
                .ignore(&["api_key", "admin_key"]),
        );
        if let Some(bind) = &overrides.bind {
            figment = figment.merge(Serialized::default("server.bind", bind));
        }
        let mut config: Config = figment.extract()?;
        if let Some(path) = &overrides.model {
            config.models = vec![ModelEntry {
                name: model_name(path),
                path: path.clone(),
            }];
        }
        if !overrides.adapter_root.is_empty() {
            config.adapters.roots = overrides.adapter_root.clone();
        }
        if let Some(root) = &overrides.annotator_root {
            config.annotators.root = root.clone();
        }
        if let Some(d) = &overrides.device {
            config.engine.device = d.clone();
        }
        if let Some(d) = &overrides.dtype {
            config.engine.dtype = d.clone();
        }
        if let Some(n) = overrides.max_batch {
            config.engine.max_batch = n;
        }
        if let Some(n) = overrides.max_queue {
            config.engine.max_queue = n;
        }
        if !overrides.api_key.is_empty() {
            config.auth.api_keys = overrides.api_key.clone();
        }
        if !overrides.admin_key.is_empty() {
            config.auth.admin_keys = overrides.admin_key.clone();
        }
        if !overrides.cors_origin.is_empty() {
            config.server.cors_origins = overrides.cors_origin.clone();
        }
        config.server.log_json |= overrides.log_json;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        if l.max_steps == 0 || l.max_images == 0 || l.max_pixels < 64 * 64 {
            anyhow::bail!("limits: max_steps and max_images must be ≥ 1, max_pixels ≥ 4096");
        }
        if self.engine.max_batch == 0 || self.engine.max_queue == 0 {
            anyhow::bail!("engine: max_batch and max_queue must be ≥ 1");
        }
        let cors = &self.server;
        if cors.cors_origins.iter().any(|o| o == "*") {
            if cors.cors_origins.len() > 1 {
                anyhow::bail!("server.cors_origins: `*` stands alone (it allows every origin)");
            }
            if cors.cors_allow_credentials {
                anyhow::bail!(
                    "server.cors_origins: `*` cannot go with cors_allow_credentials (browsers refuse it); list the origins"
                );
            }
        }
        for origin in cors.cors_origins.iter().filter(|o| *o != "*") {
            crate::cors::parse_origin(origin)
                .map_err(|e| anyhow::anyhow!("server.cors_origins: {e}"))?;
        }
        if self
            .auth
            .api_keys
            .iter()
            .chain(&self.auth.admin_keys)
            .any(|k| k.len() < 8)
        {
            anyhow::bail!("auth: keys must be at least 8 characters");
        }
        Ok(())
    }
}

/// A model's name from its path: the folder or file name without extension.
pub fn model_name(path: &Path) -> String {
    let p = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    p.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_layers_override() {
        let c = Config::load(&Overrides::default()).unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:7860");
        assert!(c.models.is_empty());
        assert_eq!(c.adapters.preload["canny"], "embedded:1");
        let c = Config::load(&Overrides {
            bind: Some("0.0.0.0:1".into()),
            max_batch: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.server.bind.as_str(), c.engine.max_batch),
            ("0.0.0.0:1", 3)
        );
    }

    #[test]
    fn cors_origins_are_checked() {
        let with = |origins: &[&str], credentials: bool| {
            let mut c = Config::defaults();
            c.server.cors_origins = origins.iter().map(|s| s.to_string()).collect();
            c.server.cors_allow_credentials = credentials;
            c.check().map_err(|e| e.to_string())
        };
        assert!(with(&[], false).is_ok());
        assert!(with(&["*"], false).is_ok());
        assert!(with(&["https://a.example", "http://b.example:8080"], true).is_ok());
        let err = with(&["*"], true).unwrap_err();
        assert!(err.contains("cors_allow_credentials"), "{err}");
        let err = with(&["*", "https://a.example"], false).unwrap_err();
        assert!(err.contains("stands alone"), "{err}");
        let err = with(&["https://a.example/app"], false).unwrap_err();
        assert!(err.contains("https://a.example/app"), "{err}");
    }

    #[test]
    fn a_file_layers_over_the_defaults_and_typos_are_errors() {
        let dir = std::env::temp_dir().join(format!("cns-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[engine]\nmax_queue = 5\n").unwrap();
        let c = Config::load(&Overrides {
            config: Some(good),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.engine.max_queue, 5);
        assert_eq!(c.engine.max_batch, 8, "the rest stays default");
        let typo = dir.join("typo.toml");
        std::fs::write(&typo, "[engine]\nmax_qeue = 5\n").unwrap();
        let err = Config::load(&Overrides {
            config: Some(typo),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("max_qeue"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
