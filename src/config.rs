//! Tollgate's configuration: a TOML file, validated when loaded.
//!
//! Every section has defaults, so an absent file runs Tollgate on embedded
//! defaults: the example `policies/`, the example keys file, in-memory state
//! and an OpenAI-style route table. Relative paths are resolved against the
//! directory of the config file (or the working directory without one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routes::{RouteSpec, RouteTable, RouteTableError};

/// A configuration that could not be loaded; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `message` starts with `:line:col: ` when the position is known.
    #[error("{path}{message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// The whole configuration, as loaded from TOML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub policy: PolicyConfig,
    pub identity: IdentityConfig,
    pub context: ContextConfig,
    pub response: ResponseConfig,
    pub quota: QuotaConfig,
    pub log: LogConfig,
    /// The OpenID AuthZEN Authorization API (served on `server.authzen_listen`).
    pub authzen: crate::adapters::authzen::AuthzenConfig,
    /// The audit trail (`[audit]`).
    pub audit: crate::audit::AuditConfig,
    /// OpenTelemetry span export (`[tracing]`); off unless an endpoint is set.
    pub tracing: crate::telemetry::TracingConfig,
    /// The model catalog: families, tokenizers, context windows (`[usage]`).
    pub usage: crate::usage::catalog::UsageConfig,
    /// MCP endpoints (`[mcp]`, `[[mcp.servers]]`).
    pub mcp: crate::mcp::McpConfig,
    /// Agents on LLM routes: offered tools, tool calls, signed caller
    /// context, token carriers (`[agents]`).
    pub agents: crate::agents::AgentsConfig,
    /// Method + path pattern → Cedar action and resource. Empty means the
    /// built-in OpenAI-style table (see [`RouteSpec::openai_defaults`]).
    pub routes: Vec<RouteSpec>,
    /// Directory relative paths are resolved against; set by the loader.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where this config came from, for messages; set by the loader.
    #[serde(skip)]
    pub source: String,
}

/// Listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listener: ext_authz, tollgate.v1, health, reflection.
    pub grpc_listen: SocketAddr,
    /// Admin HTTP listener: /healthz, /readyz, /metrics, /policy.
    pub admin_listen: SocketAddr,
    /// AuthZEN Authorization API HTTP listener; off when unset.
    pub authzen_listen: Option<SocketAddr>,
    /// Longest drain on shutdown, in milliseconds: in-flight requests get
    /// this long, then connections still open (health watch streams) are
    /// closed.
    pub shutdown_grace_ms: u64,
    /// HTTP forward-auth listener (nginx `auth_request`, Traefik
    /// `forwardAuth`, Caddy `forward_auth`); off when unset.
    pub forward_auth_listen: Option<SocketAddr>,
    /// Which forwarded-request headers the forward-auth listener believes.
    pub forward_auth_trust: ForwardAuthTrust,
    /// TLS on the gRPC listener (`[server.grpc_tls]`); with `client_ca_file`
    /// every client needs a certificate (mTLS). Unset: plaintext.
    pub grpc_tls: Option<crate::listener::TlsConfig>,
    /// TLS on the admin listener (`[server.admin_tls]`). Unset: plaintext.
    pub admin_tls: Option<crate::listener::TlsConfig>,
    /// Also serve the gRPC services on this Unix socket (plaintext: the
    /// file's permissions decide who connects), for sidecars.
    pub grpc_unix_socket: Option<PathBuf>,
    /// Permissions of `grpc_unix_socket` (default `0o660`).
    pub grpc_unix_socket_mode: u32,
    /// Admin endpoints served beside `/healthz` and `/readyz` (always open):
    /// `"metrics"`, `"policy"` (default both).
    pub admin_endpoints: Vec<crate::admin::AdminEndpoint>,
    /// Connection and HTTP/2 bounds of the listeners (`[server.limits]`).
    pub limits: crate::listener::ListenerLimits,
}

/// The forwarded-request headers a forward-auth listener trusts: the hop in
/// front of it sets them and a client cannot. Bound to the listener, off by
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardAuthTrust {
    /// None: the request is decided on the auth request's own method, path
    /// and `Host`, and any forwarded-request header refuses it (400).
    #[default]
    None,
    /// nginx `auth_request`: `X-Original-Method`, `X-Original-URI` (both
    /// required), `Host`, `X-Real-IP`.
    Original,
    /// Traefik `forwardAuth` / Caddy `forward_auth`: `X-Forwarded-Method`,
    /// `-Uri`, `-Host` (required), `-Proto`, `-For` (rightmost entry).
    Forwarded,
}

/// What to do when evaluating a policy raises an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnEvaluationError {
    /// Any evaluation error denies the request (the safe default: Cedar skips
    /// a `forbid` whose condition errors, which could otherwise allow).
    Deny,
    /// Keep Cedar's own answer and only report the errors.
    Ignore,
}

/// Where policies live and how they are reloaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Directory with `*.cedar`, one `*.cedarschema`, optional `entities.json`
    /// and `tests/*.json`.
    pub dir: PathBuf,
    /// Watch the directory and hot-reload on change.
    pub watch: bool,
    /// Quiet period after the last change before reloading.
    pub reload_debounce_ms: u64,
    /// Re-read the directory this often even without change events (a safety
    /// net for file systems that do not report changes). 0 disables.
    pub reload_poll_secs: u64,
    pub on_evaluation_error: OnEvaluationError,
    /// A second policy directory evaluated beside the live one on every
    /// request, never changing the answer; disagreements are counted and
    /// audited. `tollgate policy promote` makes it live. Off when unset.
    pub shadow_dir: Option<PathBuf>,
    /// Where `tollgate policy promote` keeps the set it replaced (and
    /// `tollgate policy rollback` swaps back); default: `DIR.previous`
    /// beside `policy.dir`.
    pub previous_dir: Option<PathBuf>,
    /// Reuse policy verdicts for repeated inputs (see
    /// [`crate::engine::decision_cache`]). Off when unset.
    pub decision_cache: Option<DecisionCacheConfig>,
}

/// `[policy] decision_cache = { max_entries = 10000, ttl_secs = 60 }`: how
/// many verdicts are kept per policy version, and for how long at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionCacheConfig {
    /// Most verdicts kept (least recently used go first); at least 1.
    pub max_entries: u64,
    /// Longest a verdict is reused, in seconds; at least 1.
    pub ttl_secs: u64,
}

/// Identity sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Sources in the order they are asked; routes may narrow the list.
    pub sources: Vec<crate::identity::SourceKind>,
    /// TOML file of API key records (hashes only).
    pub api_keys_file: Option<PathBuf>,
    /// Redis holding API key records (`tollgate keys create` writes there).
    pub api_keys_redis_url: Option<String>,
    /// Prefix of API key records in Redis.
    pub api_keys_redis_prefix: String,
    /// How long a looked-up key record is reused: the bound on how long a
    /// revocation takes to reach every replica.
    pub api_keys_cache_ms: u64,
    /// Accept the peer identity Envoy reports for TLS connections.
    pub mtls: bool,
    /// SPIFFE trust domains accepted over mTLS (exact); empty accepts any.
    pub mtls_trust_domains: Vec<String>,
    /// Accept a peer without a SPIFFE id (a certificate subject such as
    /// `CN=…`) as a `Service`. Off by default: only a valid SPIFFE id
    /// identifies a workload.
    pub mtls_subject_names: bool,
    /// Trusted JWT / OAuth 2.0 issuers.
    pub jwt_issuers: Vec<crate::identity::jwt::IssuerConfig>,
    /// Longest API key accepted; longer ones are rejected unread.
    pub max_credential_bytes: usize,
    /// OAuth 2.0 token introspection for opaque bearer tokens
    /// (`[identity.introspection]`); none by default.
    pub introspection: Option<crate::identity::introspection::IntrospectionConfig>,
    /// Brute-force lockout (`[identity.lockout]`); off by default.
    pub lockout: crate::identity::lockout::LockoutConfig,
}

/// What of the HTTP request goes into the Cedar context.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Request headers copied into `context.http.headers` (lowercase names).
    /// The schema must declare each as an optional String attribute.
    pub headers: Vec<String>,
    /// Query parameters copied into `context.http.query`.
    pub query_params: Vec<String>,
    /// Largest body Tollgate parses for `model`, `max_tokens`, ….
    pub max_body_bytes: usize,
    /// Request headers that name a model (lowercase). Like the body's
    /// `model`, `?model=` and a model in the path, each is compared with
    /// the others: different values are refused (`ambiguous_model`).
    pub model_headers: Vec<String>,
    /// Proxies in front of the gateway whose `X-Forwarded-For` entries are
    /// trusted (ext_authz only). 0 (the default): the client address is
    /// the peer address the gateway reports, and `X-Forwarded-For` is never
    /// read. N: the client address is the N-th entry from the right of
    /// `X-Forwarded-For` (the one the outermost trusted proxy appended);
    /// with fewer entries, the reported peer address.
    pub trusted_hops: usize,
}

/// Headers Tollgate sets on allowed requests for the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponseConfig {
    pub principal_header: String,
    pub tenant_header: String,
    pub tier_header: String,
    /// Every client-sent header starting with this prefix is removed before
    /// the request reaches the upstream, so none can be forged.
    pub strip_prefix: String,
    /// Realm for `WWW-Authenticate` on 401.
    pub realm: String,
    /// Remove the caller's credential (`authorization`, `x-api-key`) before
    /// the request reaches the upstream.
    pub strip_credentials: bool,
    /// When set, an answer allowed only because the quota store failed (a
    /// limit's `failure_mode = "allow"`) carries this response header with
    /// the value `store_unavailable`, on ext_authz and rate limit answers.
    /// Empty (the default): no header; the metric
    /// `tollgate_quota_fail_open_total` counts them either way.
    pub quota_fail_open_header: String,
}

/// Where quota counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process: exact, but not shared between replicas.
    Memory,
    /// One Redis server shared by every replica.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
    /// A Redis master found through Redis Sentinel (`redis_sentinel_nodes`,
    /// `redis_sentinel_master`); failovers are followed.
    RedisSentinel,
}

/// Which rate limit response headers to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`.
    Draft03,
    /// The IETF `RateLimit` and `RateLimit-Policy` fields.
    Ietf,
    None,
}

/// What to answer a rate limit request that is malformed (empty domain,
/// oversized or control characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalidRequest {
    /// OVER_LIMIT: the safe answer, since Envoy allows on RLS errors by
    /// default.
    OverLimit,
    /// gRPC INVALID_ARGUMENT.
    Error,
}

/// Quotas: the store, the rate limit service's limits file and the rules
/// charged inside ext_authz.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub store: StoreKind,
    /// `redis://127.0.0.1:6379/0` for `store = "redis"`.
    pub redis_url: String,
    /// Seed nodes for `store = "redis_cluster"`.
    pub redis_cluster_nodes: Vec<String>,
    /// Sentinels (`redis://host:26379`) for `store = "redis_sentinel"`; the
    /// master connection takes its database and credentials from
    /// `redis_url` (whose host is then ignored).
    pub redis_sentinel_nodes: Vec<String>,
    /// The master name the sentinels monitor (`sentinel monitor <name> …`).
    pub redis_sentinel_master: String,
    /// `/readyz` and gRPC health report not ready while a Redis store has no
    /// writable connection (default true). Set false to stay ready and let
    /// each limit's failure mode answer during an outage.
    pub ready_requires_store: bool,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Longest wait for the store per decision; past it the limits'
    /// failure modes decide.
    pub deadline_ms: u64,
    /// Charges waiting on the store at once; more fail by failure mode.
    pub max_inflight: usize,
    /// Counters the memory store keeps at most.
    pub memory_max_keys: usize,
    /// Limits of the rate limit service (a YAML file or a directory of them,
    /// Envoy's reference format). None: every descriptor is unlimited.
    pub limits_file: Option<PathBuf>,
    pub headers: HeaderStyle,
    pub on_invalid_request: OnInvalidRequest,
    /// Rules charged inside ext_authz after the policy allowed.
    pub rules: Vec<crate::quota::rules::QuotaRule>,
    /// Model prices in US dollars per million tokens, for `usd` budgets:
    /// `[quota.prices."llama-3-70b"] input = 0.59, output = 0.79`.
    pub prices: std::collections::BTreeMap<String, crate::usage::Price>,
    /// A model without a price: `"deny"` (the default: refused, never free)
    /// or the name of a listed model to price it like.
    pub unknown_model_price: crate::usage::UnknownModel,
    /// How long a reservation waits for its usage report. One never settled
    /// (a gateway crash, a lost stream) then meets `on_expiry`; its
    /// concurrency slots are released.
    pub reservation_ttl_secs: u64,
    /// What a budget reservation never settled costs when its TTL passes:
    /// `charge` (the default: the reserved amount stays, budgets never
    /// leak) or `release` (refunded). A rule's own `on_expiry` wins.
    pub on_expiry: crate::quota::reserve::Fate,
    /// What a client that disconnects mid-stream is charged (ext_proc):
    /// `reservation` (the default: the provider may keep generating, and
    /// billing, after the client left) or `generated` (what was streamed).
    pub on_disconnect: crate::quota::reserve::DisconnectFate,
    /// What an upstream error without a usage block (a status that is not
    /// 2xx) costs (ext_proc): `release` (the default: nothing was generated)
    /// or `charge` (the reservation stays).
    pub on_upstream_error: crate::quota::reserve::Fate,
    /// How often each replica sweeps reservations past their TTL, on top of
    /// the sweeping every reserve and settle does (seconds, at least 1).
    pub sweep_interval_secs: u64,
}

impl QuotaConfig {
    /// The price table of `prices` and `unknown_model_price`.
    pub fn price_table(&self) -> crate::usage::Prices {
        crate::usage::Prices {
            models: self.prices.clone(),
            unknown: self.unknown_model_price.clone(),
        }
    }
}

impl Config {
    /// The price table, with the catalog's `usage.models.*.price` links.
    pub fn prices(&self) -> crate::usage::Prices {
        let mut prices = self.quota.price_table();
        crate::usage::catalog::Catalog::link_prices(&self.usage, &mut prices);
        prices
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_cluster_nodes: Vec::new(),
            redis_sentinel_nodes: Vec::new(),
            redis_sentinel_master: "mymaster".into(),
            ready_requires_store: true,
            key_prefix: "tg:".into(),
            deadline_ms: 50,
            max_inflight: 1024,
            memory_max_keys: 1_000_000,
            limits_file: Some(PathBuf::from("examples/limits.yaml")),
            headers: HeaderStyle::Draft03,
            on_invalid_request: OnInvalidRequest::OverLimit,
            rules: Vec::new(),
            prices: Default::default(),
            unknown_model_price: Default::default(),
            reservation_ttl_secs: 600,
            on_expiry: crate::quota::reserve::Fate::Charge,
            on_disconnect: crate::quota::reserve::DisconnectFate::Reservation,
            on_upstream_error: crate::quota::reserve::Fate::Release,
            sweep_interval_secs: 5,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `tollgate=debug`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            policy: PolicyConfig::default(),
            identity: IdentityConfig::default(),
            context: ContextConfig::default(),
            response: ResponseConfig::default(),
            quota: QuotaConfig::default(),
            log: LogConfig::default(),
            authzen: Default::default(),
            audit: crate::audit::AuditConfig::default(),
            tracing: crate::telemetry::TracingConfig::default(),
            usage: Default::default(),
            mcp: crate::mcp::McpConfig::default(),
            agents: crate::agents::AgentsConfig::default(),
            routes: Vec::new(),
            base_dir: PathBuf::from("."),
            source: "embedded defaults".to_string(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            authzen_listen: None,
            shutdown_grace_ms: 5000,
            forward_auth_listen: None,
            forward_auth_trust: ForwardAuthTrust::None,
            grpc_tls: None,
            admin_tls: None,
            grpc_unix_socket: None,
            grpc_unix_socket_mode: 0o660,
            admin_endpoints: vec![
                crate::admin::AdminEndpoint::Metrics,
                crate::admin::AdminEndpoint::Policy,
            ],
            limits: crate::listener::ListenerLimits::default(),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("policies"),
            watch: true,
            reload_debounce_ms: 200,
            reload_poll_secs: 30,
            on_evaluation_error: OnEvaluationError::Deny,
            shadow_dir: None,
            previous_dir: None,
            decision_cache: None,
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        use crate::identity::SourceKind;
        Self {
            sources: vec![
                SourceKind::ApiKey,
                SourceKind::Jwt,
                SourceKind::Mtls,
                SourceKind::Introspection,
            ],
            api_keys_file: Some(PathBuf::from("examples/keys.toml")),
            api_keys_redis_url: None,
            api_keys_redis_prefix: "tg:".into(),
            api_keys_cache_ms: 2000,
            mtls: true,
            mtls_trust_domains: Vec::new(),
            mtls_subject_names: false,
            jwt_issuers: Vec::new(),
            max_credential_bytes: 4096,
            lockout: Default::default(),
            introspection: None,
        }
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            headers: vec!["content-type".into(), "x-team".into()],
            query_params: vec!["api-version".into()],
            max_body_bytes: 1024 * 1024,
            model_headers: vec!["x-model".into()],
            trusted_hops: 0,
        }
    }
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            principal_header: "x-tollgate-principal".into(),
            tenant_header: "x-tollgate-tenant".into(),
            tier_header: "x-tollgate-tier".into(),
            strip_prefix: "x-tollgate-".into(),
            realm: "tollgate".into(),
            strip_credentials: false,
            quota_fail_open_header: String::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads and validates a config file; `None` gives the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            let config = Self::default();
            config.validate()?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        config.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: toml_message(text, &e),
        })?;
        config.source = origin.to_string();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: self.source.clone(),
            message,
        };
        self.route_table().map_err(|e| invalid(e.to_string()))?;
        self.authzen.check().map_err(|e| invalid(e.to_string()))?;
        self.tracing.check().map_err(|e| invalid(e.to_string()))?;
        self.mcp.check().map_err(invalid)?;
        self.agents.check().map_err(invalid)?;
        if let Some(cache) = self.policy.decision_cache
            && (cache.max_entries == 0 || cache.ttl_secs == 0)
        {
            return Err(invalid(
                "policy.decision_cache: max_entries and ttl_secs must be at least 1 (remove the key to turn the cache off)".into(),
            ));
        }
        for (key, name) in [
            ("response.principal_header", &self.response.principal_header),
            ("response.tenant_header", &self.response.tenant_header),
            ("response.tier_header", &self.response.tier_header),
        ] {
            if name.is_empty() || !is_header_name(name) {
                return Err(invalid(format!(
                    "{key} = {name:?} is not a lowercase HTTP header name"
                )));
            }
            if !self.response.strip_prefix.is_empty()
                && !name.starts_with(&self.response.strip_prefix)
            {
                return Err(invalid(format!(
                    "{key} = {name:?} must start with response.strip_prefix = {:?}, or clients could forge it",
                    self.response.strip_prefix
                )));
            }
        }
        for name in &self.context.headers {
            if !is_header_name(name) {
                return Err(invalid(format!(
                    "context.headers: {name:?} is not a lowercase HTTP header name"
                )));
            }
        }
        for issuer in &self.identity.jwt_issuers {
            issuer.validate().map_err(invalid)?;
        }
        self.identity.lockout.validate().map_err(invalid)?;
        if let Some(i) = &self.identity.introspection {
            i.validate().map_err(invalid)?;
        }
        for rule in &self.quota.rules {
            rule.validate().map_err(invalid)?;
        }
        let mut names: Vec<&str> = self.quota.rules.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "quota.rules: duplicate rule name {:?}",
                w[0]
            )));
        }
        if self.quota.store == StoreKind::RedisCluster && self.quota.redis_cluster_nodes.is_empty()
        {
            return Err(invalid("quota.redis_cluster_nodes is empty; list at least one node for store = \"redis_cluster\"".into()));
        }
        if self.quota.store == StoreKind::RedisSentinel
            && (self.quota.redis_sentinel_nodes.is_empty()
                || self.quota.redis_sentinel_master.is_empty())
        {
            return Err(invalid("quota.redis_sentinel_nodes and quota.redis_sentinel_master must be set for store = \"redis_sentinel\"".into()));
        }
        if !self.response.quota_fail_open_header.is_empty()
            && axum::http::HeaderName::from_bytes(self.response.quota_fail_open_header.as_bytes())
                .is_err()
        {
            return Err(invalid(format!(
                "response.quota_fail_open_header {:?} is not a valid header name",
                self.response.quota_fail_open_header
            )));
        }
        self.quota.price_table().validate().map_err(invalid)?;
        self.usage
            .validate(&self.quota.price_table())
            .map_err(invalid)?;
        if self.quota.reservation_ttl_secs == 0 {
            return Err(invalid(
                "quota.reservation_ttl_secs must be at least 1".into(),
            ));
        }
        if self.quota.sweep_interval_secs == 0 {
            return Err(invalid(
                "quota.sweep_interval_secs must be at least 1".into(),
            ));
        }
        if self.quota.deadline_ms == 0 {
            return Err(invalid("quota.deadline_ms must be at least 1".into()));
        }
        if self.identity.max_credential_bytes == 0 {
            return Err(invalid(
                "identity.max_credential_bytes must be at least 1".into(),
            ));
        }
        for domain in &self.identity.mtls_trust_domains {
            let id = format!("spiffe://{domain}");
            if domain.contains('/') || !crate::identity::mtls::valid_spiffe_id(&id) {
                return Err(invalid(format!(
                    "identity.mtls_trust_domains: {domain:?} is not a SPIFFE trust domain; use lowercase letters, digits, '.', '-', '_' (e.g. \"acme.example\")"
                )));
            }
        }
        self.server
            .limits
            .validate(self.context.max_body_bytes)
            .map_err(invalid)?;
        for (key, tls) in [
            ("server.grpc_tls", &self.server.grpc_tls),
            ("server.admin_tls", &self.server.admin_tls),
        ] {
            if let Some(tls) = tls {
                tls.validate(key).map_err(invalid)?;
            }
        }
        if self.server.grpc_unix_socket_mode > 0o777 {
            return Err(invalid(format!(
                "server.grpc_unix_socket_mode = {:#o} is not a permission mode; use e.g. 0o660",
                self.server.grpc_unix_socket_mode
            )));
        }
        for name in &self.context.model_headers {
            if !is_header_name(name) {
                return Err(invalid(format!(
                    "context.model_headers: {name:?} is not a lowercase HTTP header name"
                )));
            }
        }
        Ok(())
    }

    /// The compiled route table (the configured routes, or the defaults).
    pub fn route_table(&self) -> Result<RouteTable, RouteTableError> {
        if self.routes.is_empty() {
            RouteTable::compile(&RouteSpec::openai_defaults())
        } else {
            RouteTable::compile(&self.routes)
        }
    }

    /// Resolves a configured path against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Renders a TOML error as `:line:col: message`.
fn toml_message(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().to_string();
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            format!(":{line}:{col}: {message}")
        }
        None => format!(": {message}"),
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None).expect("defaults load");
        assert_eq!(config.server.grpc_listen.to_string(), "127.0.0.1:50051");
        assert!(config.route_table().expect("routes").len() >= 4);
    }

    #[test]
    fn the_documented_example_config_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tollgate.toml");
        let config = Config::load(Some(&path)).expect("example config loads");
        let defaults = Config::default();
        assert_eq!(config.routes, RouteSpec::openai_defaults());
        assert_eq!(config.server.grpc_listen, defaults.server.grpc_listen);
        assert_eq!(config.server.limits, defaults.server.limits);
        assert_eq!(
            config.server.admin_endpoints,
            defaults.server.admin_endpoints
        );
        assert_eq!(
            config.server.grpc_unix_socket_mode,
            defaults.server.grpc_unix_socket_mode
        );
        assert_eq!(config.context.headers, defaults.context.headers);
        assert_eq!(
            config.resolve(Path::new("keys.toml")),
            path.with_file_name("keys.toml")
        );
    }

    #[test]
    fn trust_domains_and_model_headers_are_checked() {
        for (text, key) in [
            (
                "[identity]\nmtls_trust_domains = [\"Acme.example\"]\n",
                "mtls_trust_domains",
            ),
            (
                "[identity]\nmtls_trust_domains = [\"acme.example/ns\"]\n",
                "mtls_trust_domains",
            ),
            (
                "[context]\nmodel_headers = [\"X Model\"]\n",
                "model_headers",
            ),
        ] {
            let err = Config::from_toml(text, "t.toml").expect_err(text);
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_toml("[server]\ngrpc_listn = \"127.0.0.1:1\"\n", "t.toml")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            msg.starts_with("t.toml:2:1: unknown field `grpc_listn`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_address_is_reported() {
        let err = Config::from_toml("[server]\ngrpc_listen = \"nowhere\"\n", "t.toml")
            .expect_err("bad addr");
        assert!(err.to_string().contains("t.toml:2:"), "{err}");
    }

    #[test]
    fn identity_header_outside_strip_prefix_is_refused() {
        let err = Config::from_toml("[response]\nprincipal_header = \"x-user\"\n", "t.toml")
            .expect_err("forgeable header");
        assert!(err.to_string().contains("strip_prefix"), "{err}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
