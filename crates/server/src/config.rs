//! Configuration: one struct, read from a TOML file, then `SWITCHBOARD_*` environment variables,
//! then command-line flags (each layer overrides the one before).
//!
//! Environment variables name a key by its path: `SWITCHBOARD_CLIENT__PING_INTERVAL=10s` sets
//! `[client] ping_interval`. A few keys have fixed short names that external tools rely on:
//! `SWITCHBOARD_LISTEN`, `SWITCHBOARD_DATA_DIR`, `SWITCHBOARD_TOKEN_HMAC_SECRET`,
//! `SWITCHBOARD_TOKEN_RSA_PUBLIC_KEY`, `SWITCHBOARD_API_KEY`, `SWITCHBOARD_ALLOWED_ORIGINS`
//! (comma-separated) and `SWITCHBOARD_DATABASE_URL`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Durations in config are humantime strings ("25s", "5m", "300ms").
mod dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Where generated secrets (and later the SQLite database) live.
    pub data_dir: PathBuf,
    /// This node's name in `/api/info`.
    pub name: String,
    /// `sqlite:PATH` or `postgres://...`. Empty: SQLite at `DATA_DIR/switchboard.db`.
    pub database: String,
    /// Origins allowed to open WebSocket connections; empty allows any.
    pub allowed_origins: Vec<String>,
    pub token: TokenConfig,
    pub api: ApiConfig,
    pub client: ClientConfig,
    pub http: HttpConfig,
    pub chat: ChatConfig,
    /// The chat moderation pipeline and its checks.
    pub moderation: ModerationConfig,
    /// How long a graceful shutdown may take before remaining connections are dropped.
    #[serde(with = "dur")]
    pub shutdown_timeout: Duration,
    /// Options of the default namespace (channels without a `ns:` prefix).
    pub channel: NamespaceOptions,
    /// Named namespaces: channel `NAME:rest` uses `[namespaces.NAME]`.
    pub namespaces: BTreeMap<String, NamespaceOptions>,
    /// Accounts: token lifetimes, login rate limits, password hashing.
    pub accounts: AccountsConfig,
    /// Collaborative documents (`/docs/{id}`): persistence, limits, versions.
    pub docs: DocsConfig,
    /// The engine nodes share: in-process (one node), Redis or NATS.
    pub broker: BrokerConfig,
}

/// `[broker]`: how this node reaches the other nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Empty: in-process, one node. `redis://HOST:PORT[/DB]` or `nats://HOST:PORT`: one of N
    /// nodes sharing that engine (also `--broker`, `SWITCHBOARD_BROKER_URL`).
    pub url: String,
    /// Prefix of every key, subject, stream and bucket the engine uses, so several
    /// deployments can share one Redis or NATS.
    pub prefix: String,
    /// How long a crashed node's clients stay in presence (heartbeats every third of it),
    /// and how long a silent node stays in `/api/info`.
    #[serde(with = "dur")]
    pub presence_ttl: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: String::new(),
            prefix: "switchboard".into(),
            presence_ttl: Duration::from_secs(15),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8000".into(),
            data_dir: PathBuf::from("./data"),
            name: "switchboard".into(),
            database: String::new(),
            allowed_origins: Vec::new(),
            token: TokenConfig::default(),
            api: ApiConfig::default(),
            client: ClientConfig::default(),
            http: HttpConfig::default(),
            chat: ChatConfig::default(),
            moderation: ModerationConfig::default(),
            shutdown_timeout: Duration::from_secs(10),
            channel: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
            accounts: AccountsConfig::default(),
            docs: DocsConfig::default(),
            broker: BrokerConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// HS256 secret. Empty: generated once and kept in the data directory.
    pub hmac_secret: String,
    /// RS256 public key, PEM text or a path to a PEM file. When set, tokens must be RS256.
    pub rsa_public_key: String,
    /// Checked when set.
    pub audience: String,
    /// Checked when set.
    pub issuer: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Key for `/api`. Empty: generated once and kept in the data directory.
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Server pings (`{}`) are sent this often.
    #[serde(with = "dur")]
    pub ping_interval: Duration,
    /// A pong must arrive this long after a ping, or the connection closes with 3012.
    #[serde(with = "dur")]
    pub pong_timeout: Duration,
    /// A connection that has not sent `connect` by then is closed with 3502.
    #[serde(with = "dur")]
    pub stale_timeout: Duration,
    /// Grace after a connection token's expiry before closing with 3005, for the SDK to refresh.
    #[serde(with = "dur")]
    pub expired_close_delay: Duration,
    /// Largest incoming WebSocket message in bytes; larger closes with 1009.
    pub max_frame_size: usize,
    /// Subscriptions per connection (error 106 beyond).
    pub max_channels: usize,
    /// Connections per node; further upgrades get HTTP 503.
    pub max_connections: usize,
    /// New WebSocket connections (both endpoints) per second from one client address (IPv6:
    /// one /64), sustained; beyond, upgrades get HTTP 429. 0: no limit, the default, since
    /// behind a reverse proxy every client has the proxy's address.
    pub connection_rate_per_ip: u32,
    /// Connections one address may open at once, above `connection_rate_per_ip`.
    pub connection_burst_per_ip: u32,
    /// Sustained commands per second per connection.
    pub command_rate: u32,
    /// Commands a connection may send in a burst above the rate.
    pub command_burst: u32,
    /// Bytes a connection may have waiting to be written; beyond, it is closed with 3008.
    pub write_queue_max_bytes: usize,
    /// Most publications a subscription recovers on resubscribe; beyond, `recovered: false`.
    pub recovery_max_publications: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            stale_timeout: Duration::from_secs(10),
            expired_close_delay: Duration::from_secs(25),
            max_frame_size: 64 * 1024,
            max_channels: 128,
            max_connections: 100_000,
            connection_rate_per_ip: 0,
            connection_burst_per_ip: 100,
            command_rate: 100,
            command_burst: 200,
            write_queue_max_bytes: 1024 * 1024,
            recovery_max_publications: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Request headers must arrive within this time (slowloris guard).
    #[serde(with = "dur")]
    pub header_read_timeout: Duration,
    /// Largest accepted request body in bytes.
    pub max_body_size: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: Duration::from_secs(10),
            max_body_size: 1024 * 1024,
        }
    }
}

/// `[accounts]`: the `/v1/auth` endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsConfig {
    /// Lifetime of the access tokens `/v1/auth/login` and `/v1/auth/refresh` issue (they are
    /// also connection tokens).
    #[serde(with = "dur")]
    pub access_token_ttl: Duration,
    /// Lifetime of a refresh token (each use rotates it).
    #[serde(with = "dur")]
    pub refresh_token_ttl: Duration,
    /// Failed logins for one account within `login_lockout` before it is locked.
    pub login_max_failures: u32,
    /// Failed logins from one IP address (IPv6: one /64) within `login_lockout` before it is
    /// locked.
    pub login_max_failures_per_ip: u32,
    /// How long a locked account or address gets 429, even with the right password; also the
    /// window in which failures are counted.
    #[serde(with = "dur")]
    pub login_lockout: Duration,
    /// Argon2id parameters for new password hashes: `default` (19 MiB, 2 passes), or `test`
    /// (64 KiB, 1 pass) for test suites only: it makes stolen hashes cheap to crack.
    pub password_hash_cost: PasswordHashCost,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            login_max_failures: 5,
            login_max_failures_per_ip: 20,
            login_lockout: Duration::from_secs(5 * 60),
            password_hash_cost: PasswordHashCost::Default,
        }
    }
}

/// See [`AccountsConfig::password_hash_cost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PasswordHashCost {
    Default,
    /// Test suites only.
    Test,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Longest message text in characters; longer sends get error 107.
    pub max_message_chars: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_message_chars: 4000,
        }
    }
}

/// `[docs]`: collaborative documents (see `switchboard_collab`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DocsConfig {
    /// How often applied updates are written to the store, in one transaction: the
    /// durability window. At most 100 ms.
    #[serde(with = "dur")]
    pub persist_interval: Duration,
    /// Compact a document's update log into a snapshot past this many bytes...
    pub compact_bytes: usize,
    /// ...or this many log entries.
    pub compact_updates: usize,
    /// Unload a document nobody has had open for this long.
    #[serde(with = "dur")]
    pub unload_after: Duration,
    /// Largest update a client (or `POST .../updates`) may send; larger: close 4413 / 400.
    pub max_update_bytes: usize,
    /// Longest time updates are gathered into one broadcast (the tick grows with the
    /// number of connections up to this).
    #[serde(with = "dur")]
    pub max_tick: Duration,
    /// Awareness messages per second per connection, and the burst; above: close 4429.
    pub awareness_rate: u32,
    pub awareness_burst: u32,
    /// Awareness client ids one connection may introduce; more: close 4429.
    pub max_awareness_clients: usize,
    /// Largest awareness state (JSON) of one client; larger: close 4413.
    pub max_awareness_state_bytes: usize,
    /// Save an automatic version of a changed document this often; "0s": never.
    #[serde(with = "dur")]
    pub auto_version_interval: Duration,
    /// Automatic versions kept per document; named versions are always kept.
    pub auto_versions_kept: u32,
    /// Send a heartbeat to a document connection this often (y-websocket reconnects after
    /// 30 s of silence).
    #[serde(with = "dur")]
    pub heartbeat_interval: Duration,
    /// Close a document connection that sent nothing (not even a pong) for this long.
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
}

impl Default for DocsConfig {
    fn default() -> Self {
        let c = switchboard_collab::CollabConfig::default();
        DocsConfig {
            persist_interval: c.persist_interval,
            compact_bytes: c.compact_bytes,
            compact_updates: c.compact_updates,
            unload_after: c.unload_after,
            max_update_bytes: c.max_update_bytes,
            max_tick: c.max_tick,
            awareness_rate: c.awareness_rate,
            awareness_burst: c.awareness_burst,
            max_awareness_clients: c.max_awareness_clients,
            max_awareness_state_bytes: c.max_awareness_state_bytes,
            auto_version_interval: c.auto_version_interval,
            auto_versions_kept: c.auto_versions_kept,
            heartbeat_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl DocsConfig {
    pub fn to_collab(&self) -> switchboard_collab::CollabConfig {
        switchboard_collab::CollabConfig {
            persist_interval: self.persist_interval,
            compact_bytes: self.compact_bytes,
            compact_updates: self.compact_updates,
            unload_after: self.unload_after,
            max_update_bytes: self.max_update_bytes,
            max_tick: self.max_tick,
            awareness_rate: self.awareness_rate,
            awareness_burst: self.awareness_burst,
            max_awareness_clients: self.max_awareness_clients,
            max_awareness_state_bytes: self.max_awareness_state_bytes,
            auto_version_interval: self.auto_version_interval,
            auto_versions_kept: self.auto_versions_kept,
        }
    }
}

/// `[moderation]`: checks run on every committed chat message, off the delivery path (see
/// `switchboard_chat::moderation`). Each check's action is `off`, `flag` or `remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    /// Run the checks at all (moderator endpoints work either way).
    pub enabled: bool,
    /// Messages waiting to be checked; when full, checks are dropped (and counted), never
    /// delivery delayed.
    pub queue_size: usize,
    /// The profanity filter's action, and the least severe level it acts on: `mild`,
    /// `moderate` or `severe`.
    pub profanity: switchboard_chat::moderation::Action,
    pub profanity_level: switchboard_chat::moderation::Level,
    /// Extra words and phrases, matched as whole words in any case, and their action.
    pub words: Vec<String>,
    pub words_action: switchboard_chat::moderation::Action,
    /// The same text from one user more than `repeat_max` times within `repeat_window`.
    pub repeat: switchboard_chat::moderation::Action,
    pub repeat_max: u32,
    #[serde(with = "dur")]
    pub repeat_window: Duration,
    /// More than `links_max` links in one message.
    pub links: switchboard_chat::moderation::Action,
    pub links_max: u32,
    /// More than `burst_max` messages from one user within `burst_window`.
    pub burst: switchboard_chat::moderation::Action,
    pub burst_max: u32,
    #[serde(with = "dur")]
    pub burst_window: Duration,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        let d = switchboard_chat::ModerationConfig::default();
        ModerationConfig {
            enabled: d.enabled,
            queue_size: d.queue,
            profanity: d.profanity,
            profanity_level: d.profanity_level,
            words: d.words,
            words_action: d.words_action,
            repeat: d.repeat,
            repeat_max: d.repeat_max,
            repeat_window: d.repeat_window,
            links: d.links,
            links_max: d.links_max,
            burst: d.burst,
            burst_max: d.burst_max,
            burst_window: d.burst_window,
        }
    }
}

impl ModerationConfig {
    /// The chat service's settings, reporting to `metrics`.
    pub fn to_chat(
        &self,
        metrics: switchboard_chat::moderation::ModerationMetrics,
    ) -> switchboard_chat::ModerationConfig {
        switchboard_chat::ModerationConfig {
            enabled: self.enabled,
            queue: self.queue_size.max(1),
            profanity: self.profanity,
            profanity_level: self.profanity_level,
            words: self.words.clone(),
            words_action: self.words_action,
            repeat: self.repeat,
            repeat_max: self.repeat_max,
            repeat_window: self.repeat_window,
            links: self.links,
            links_max: self.links_max,
            burst: self.burst,
            burst_max: self.burst_max,
            burst_window: self.burst_window,
            metrics,
        }
    }
}

/// What clients may do in a namespace, and what the server keeps for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    pub presence: bool,
    pub join_leave: bool,
    /// Publications kept per channel; 0 disables history and recovery.
    pub history_size: usize,
    /// A channel's history lives this long after its last publication.
    #[serde(with = "dur")]
    pub history_ttl: Duration,
    /// Subscriptions are recoverable (offset/epoch) whenever the channel keeps history.
    pub allow_recovery: bool,
    /// Any connected client may subscribe; when false a subscription token is required.
    pub allow_subscribe_for_client: bool,
    /// Subscribers may publish.
    pub allow_publish_for_subscriber: bool,
    /// Any connected client may publish, subscribed or not.
    pub allow_publish_for_client: bool,
    /// Any connected client may read presence.
    pub allow_presence_for_client: bool,
    /// Subscribers may read presence.
    pub allow_presence_for_subscriber: bool,
    /// Any connected client may read history.
    pub allow_history_for_client: bool,
    /// Subscribers may read history.
    pub allow_history_for_subscriber: bool,
    /// A subscription token is required to subscribe.
    pub protected: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            presence: true,
            join_leave: true,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            allow_recovery: true,
            allow_subscribe_for_client: true,
            allow_publish_for_subscriber: true,
            allow_publish_for_client: true,
            allow_presence_for_client: true,
            allow_presence_for_subscriber: true,
            allow_history_for_client: true,
            allow_history_for_subscriber: true,
            protected: false,
        }
    }
}

impl Config {
    /// The database URL in effect: the configured one, or SQLite in the data directory.
    pub fn database_url(&self) -> String {
        if self.database.is_empty() {
            format!("sqlite:{}", self.data_dir.join("switchboard.db").display())
        } else {
            self.database.clone()
        }
    }

    /// The options of the namespace `channel` belongs to, or `None` for an unknown namespace.
    pub fn namespace(&self, channel: &str) -> Option<&NamespaceOptions> {
        match channel.split_once(':') {
            Some((ns, _)) => self.namespaces.get(ns),
            None => Some(&self.channel),
        }
    }

    /// Reads the layers. `file` is the TOML path (if any), `env` the process environment,
    /// `flags` the command-line overrides as (key path, value) pairs.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| ConfigError(format!("cannot read {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let source = file.map(|p| p.display().to_string());
        let file = source.as_deref().zip(text.as_deref());
        Config::from_layers(file, env, flags)
    }

    /// [`Config::load`] with the file already read: `file` is (its name for messages, its
    /// TOML text).
    pub fn from_layers(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some((name, text)) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError(format!("{name}: {e}")))?,
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("SWITCHBOARD_") else {
                continue;
            };
            let path = match rest {
                // Read elsewhere: the config file's path, the log filter, and the build
                // script's switch (exported by scripts/fuzz.sh for whole shells).
                "CONFIG" | "LOG" | "SKIP_WEB" => continue,
                "LISTEN" => "listen".to_string(),
                "DATA_DIR" => "data_dir".to_string(),
                "TOKEN_HMAC_SECRET" => "token.hmac_secret".to_string(),
                "TOKEN_RSA_PUBLIC_KEY" => "token.rsa_public_key".to_string(),
                "API_KEY" => "api.key".to_string(),
                "ALLOWED_ORIGINS" => "allowed_origins".to_string(),
                "DATABASE_URL" => "database".to_string(),
                "BROKER_URL" => "broker.url".to_string(),
                other => other.to_ascii_lowercase().replace("__", "."),
            };
            set_path(&mut table, &defaults, &path, &v)
                .map_err(|e| ConfigError(format!("environment variable {k}: {e}")))?;
        }
        for (path, v) in flags {
            set_path(&mut table, &defaults, path, v)
                .map_err(|e| ConfigError(format!("flag for {path}: {e}")))?;
        }
        let mut cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(e.to_string()))?;
        // The chat service owns `chat:`; its history lives in the store, not in a ring.
        cfg.namespaces
            .entry("chat".into())
            .or_insert_with(|| NamespaceOptions {
                history_size: 0,
                ..Default::default()
            });
        // Personal notification channels `notifications:#{user_id}` (only that user may
        // subscribe): pushed by the server only, ephemeral (the durable list is
        // `GET /v1/notifications`), no presence, no join/leave, no history.
        cfg.namespaces
            .entry("notifications".into())
            .or_insert_with(|| NamespaceOptions {
                presence: false,
                join_leave: false,
                history_size: 0,
                allow_recovery: false,
                allow_publish_for_subscriber: false,
                allow_publish_for_client: false,
                allow_presence_for_client: false,
                allow_presence_for_subscriber: false,
                allow_history_for_client: false,
                allow_history_for_subscriber: false,
                ..Default::default()
            });
        // The live dashboard's feed `system:dashboard` (see `crate::dashboard`): published
        // by every node each second; clients may subscribe and read the last minute of
        // samples, nobody may publish, no presence, no join/leave.
        cfg.namespaces
            .entry(crate::dashboard::NAMESPACE.into())
            .or_insert_with(|| NamespaceOptions {
                presence: false,
                join_leave: false,
                history_size: 60,
                history_ttl: Duration::from_secs(120),
                allow_publish_for_subscriber: false,
                allow_publish_for_client: false,
                allow_presence_for_client: false,
                allow_presence_for_subscriber: false,
                allow_history_for_client: false,
                allow_history_for_subscriber: true,
                ..Default::default()
            });
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for name in self.namespaces.keys() {
            if name.is_empty() || name.contains(':') {
                return Err(ConfigError(format!("invalid namespace name {name:?}")));
            }
        }
        let d = &self.docs;
        if d.persist_interval.is_zero() || d.persist_interval > Duration::from_millis(100) {
            return Err(ConfigError(
                "docs.persist_interval must be between 1ms and 100ms".into(),
            ));
        }
        if d.max_update_bytes < 1024 || d.awareness_rate == 0 || d.awareness_burst == 0 {
            return Err(ConfigError(
                "docs.max_update_bytes must be at least 1024, docs.awareness_rate and awareness_burst > 0".into(),
            ));
        }
        if d.heartbeat_interval.is_zero() || d.heartbeat_interval > Duration::from_secs(25) {
            return Err(ConfigError(
                "docs.heartbeat_interval must be between 1ms and 25s (y-websocket reconnects after 30s of silence)".into(),
            ));
        }
        if d.idle_timeout <= d.heartbeat_interval {
            return Err(ConfigError(
                "docs.idle_timeout must be longer than docs.heartbeat_interval".into(),
            ));
        }
        if self.client.max_frame_size < 64 {
            return Err(ConfigError(
                "client.max_frame_size must be at least 64".into(),
            ));
        }
        if self.client.connection_rate_per_ip > 0 && self.client.connection_burst_per_ip == 0 {
            return Err(ConfigError(
                "client.connection_burst_per_ip must be > 0 when connection_rate_per_ip is set"
                    .into(),
            ));
        }
        if self.client.command_rate == 0 || self.client.command_burst == 0 {
            return Err(ConfigError(
                "client.command_rate and command_burst must be > 0".into(),
            ));
        }
        let a = &self.accounts;
        if a.access_token_ttl.as_secs() == 0 || a.refresh_token_ttl.as_secs() == 0 {
            return Err(ConfigError(
                "accounts.access_token_ttl and refresh_token_ttl must be at least 1s".into(),
            ));
        }
        if a.login_max_failures == 0 || a.login_max_failures_per_ip == 0 {
            return Err(ConfigError(
                "accounts.login_max_failures and login_max_failures_per_ip must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Sets `path` (dot-separated) in `table` from a string, typed like the default at that path.
fn set_path(
    table: &mut toml::Table,
    defaults: &toml::Table,
    path: &str,
    raw: &str,
) -> Result<(), String> {
    let keys: Vec<&str> = path.split('.').collect();
    let mut default: Option<&toml::Value> = None;
    let mut dt = Some(defaults);
    for k in &keys {
        default = dt.and_then(|t| t.get(*k));
        dt = default.and_then(|v| v.as_table());
    }
    // Namespaces are not in the defaults; type their values like the default namespace's.
    if default.is_none() && keys.len() == 3 && keys[0] == "namespaces" {
        default = defaults.get("channel").and_then(|c| c.get(keys[2]));
    }
    let value = match default {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("not an integer: {raw}"))?,
        ),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(
            raw.trim()
                .parse()
                .map_err(|_| format!("not a boolean: {raw}"))?,
        ),
        _ => return Err(format!("unknown key {path}")),
    };
    let mut t = table;
    for k in &keys[..keys.len() - 1] {
        t = t
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{k} is not a table"))?;
    }
    t.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

/// Reads a secret from `data_dir/name`, or generates and stores one. Returns (secret, generated).
pub fn persistent_secret(data_dir: &Path, name: &str) -> std::io::Result<(String, bool)> {
    let path = data_dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    use std::io::Write;
    opts.open(&path)?.write_all(secret.as_bytes())?;
    Ok((secret, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\n[client]\nping_interval = \"5s\"\n[namespaces.chat]\nhistory_size = 7\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&file),
            env(&[
                ("SWITCHBOARD_LISTEN", "127.0.0.1:2"),
                ("SWITCHBOARD_TOKEN_HMAC_SECRET", "12345"),
                ("SWITCHBOARD_ALLOWED_ORIGINS", "http://a, http://b"),
                ("SWITCHBOARD_CLIENT__MAX_CHANNELS", "9"),
                ("SWITCHBOARD_NAMESPACES__CHAT__PRESENCE", "false"),
                ("OTHER", "x"),
            ]),
            &[("listen", "127.0.0.1:3".into())],
        )
        .unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:3");
        assert_eq!(cfg.token.hmac_secret, "12345");
        assert_eq!(cfg.allowed_origins, vec!["http://a", "http://b"]);
        assert_eq!(cfg.client.ping_interval, Duration::from_secs(5));
        assert_eq!(cfg.client.max_channels, 9);
        let chat = cfg.namespace("chat:1").unwrap();
        assert_eq!((chat.history_size, chat.presence), (7, false));
        let notes = cfg.namespace("notifications:#1").unwrap();
        assert_eq!(
            (notes.history_size, notes.presence, notes.join_leave),
            (0, false, false)
        );
        assert!(!notes.allow_publish_for_client && !notes.allow_publish_for_subscriber);
        let system = cfg.namespace("system:dashboard").unwrap();
        assert!(system.allow_subscribe_for_client && system.allow_history_for_subscriber);
        assert!(!system.allow_publish_for_client && !system.allow_publish_for_subscriber);
        assert!(!system.presence && !system.join_leave);
        assert!(cfg.namespace("nope:1").is_none());
        assert!(cfg.namespace("plain").is_some());
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load(
            None,
            env(&[("SWITCHBOARD_CLIENT__MAX_CHANNELS", "lots")]),
            &[],
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("SWITCHBOARD_CLIENT__MAX_CHANNELS"));
        let e = Config::load(None, env(&[("SWITCHBOARD_NOPE", "1")]), &[]);
        assert!(e.unwrap_err().to_string().contains("unknown key nope"));
        // Variables that are not config keys are left alone.
        let skip = env(&[("SWITCHBOARD_SKIP_WEB", "1"), ("SWITCHBOARD_LOG", "debug")]);
        assert!(Config::load(None, skip, &[]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[client]\nping_interval = \"soon\"\n").unwrap();
        assert!(Config::load(Some(&file), env(&[]), &[]).is_err());
    }

    #[test]
    fn accounts_section_layers_and_checks() {
        let cfg = Config::load(
            None,
            env(&[
                ("SWITCHBOARD_ACCOUNTS__LOGIN_LOCKOUT", "1m"),
                ("SWITCHBOARD_ACCOUNTS__LOGIN_MAX_FAILURES", "3"),
                ("SWITCHBOARD_ACCOUNTS__PASSWORD_HASH_COST", "test"),
            ]),
            &[],
        )
        .unwrap();
        let a = &cfg.accounts;
        assert_eq!(a.login_lockout, Duration::from_secs(60));
        assert_eq!(a.login_max_failures, 3);
        assert_eq!(a.password_hash_cost, PasswordHashCost::Test);
        assert_eq!(a.access_token_ttl, Duration::from_secs(900));
        assert_eq!(a.refresh_token_ttl, Duration::from_secs(30 * 86400));
        for bad in [
            ("SWITCHBOARD_ACCOUNTS__PASSWORD_HASH_COST", "cheap"),
            ("SWITCHBOARD_ACCOUNTS__LOGIN_MAX_FAILURES", "0"),
            ("SWITCHBOARD_ACCOUNTS__ACCESS_TOKEN_TTL", "0s"),
        ] {
            assert!(Config::load(None, env(&[bad]), &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_persist() {
        let dir = tempfile::tempdir().unwrap();
        let (a, gen_a) = persistent_secret(dir.path(), "k").unwrap();
        let (b, gen_b) = persistent_secret(dir.path(), "k").unwrap();
        assert_eq!((a.len(), gen_a, gen_b), (64, true, false));
        assert_eq!(a, b);
    }
}
