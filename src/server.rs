//! Building Tollgate from its config and serving it: the gRPC listener
//! (ext_authz, tollgate.v1, health, reflection), the admin listener, and the
//! hot-reload watcher.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding::Gzip;
use tonic_health::ServingStatus;

use crate::adapters::decision_api::DecisionApi;
use crate::adapters::ext_authz::ExtAuthz;
use crate::adapters::rls::Rls;
use crate::config::Config;
use crate::config::StoreKind;
use crate::engine::{self, Engine};
use crate::identity::api_key::ApiKeyAuthenticator;
use crate::identity::jwt::{Issuer, JwtAuthenticator};
use crate::identity::keys::{FileKeys, KeySource, KeysFileError, RedisKeys};
use crate::identity::mtls::MtlsAuthenticator;
use crate::identity::{Authenticator, IdentityChain, SourceKind};
use crate::metrics::Metrics;
use crate::policy::{LoadError, PolicyStore, Reload, reload};
use crate::proto;
use crate::proto::decision_service_server::DecisionServiceServer;
use crate::quota::limits::{LimitsError, LimitsStore};
use crate::quota::memory::{MemoryStore, SystemClock};
use crate::quota::redis::{RedisStore, Target};
use crate::quota::{QuotaEngine, QuotaStore, StoreError};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;

/// Why Tollgate cannot start; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("policies are invalid:\n{0}")]
    Policies(#[from] LoadError),
    #[error("api keys file is invalid: {0}")]
    Keys(#[from] KeysFileError),
    #[error("limits file is invalid: {0}")]
    Limits(#[from] LimitsError),
    #[error("quota store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Identity(String),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot watch {what} for changes: {source}")]
    Watch { what: String, source: notify::Error },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("tls: {0}")]
    Tls(#[from] crate::listener::TlsError),
    #[error("cannot listen on unix socket {}: {source}", path.display())]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("policy.shadow_dir: the shadow policy set is invalid:\n{0}")]
    Shadow(String),
}

/// Tollgate's assembled parts, before anything listens.
pub struct App {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    keys: Option<KeysReload>,
    issuers: Vec<Arc<Issuer>>,
    api_keys: Option<Arc<ApiKeyAuthenticator>>,
    introspection: Option<Arc<crate::identity::introspection::Introspector>>,
    config: Config,
    grpc_tls: Option<Arc<crate::listener::LiveTls>>,
    admin_tls: Option<Arc<crate::listener::LiveTls>>,
}

impl App {
    /// Loads policies and identity sources and assembles the engine.
    pub fn build(config: Config) -> Result<Self, StartError> {
        let routes = config
            .route_table()
            .map_err(|e| crate::config::ConfigError::Invalid {
                path: config.source.clone(),
                message: e.to_string(),
            })?;
        let expect = engine::expectations(&config, &routes);
        let shadow_expect = config
            .policy
            .shadow_dir
            .is_some()
            .then(|| engine::expectations(&config, &routes));
        let policies = Arc::new(PolicyStore::load(
            &config.resolve(&config.policy.dir),
            expect,
        )?);
        let (sources, keys, issuers, api_keys, introspection) = build_identity(&config)?;
        let metrics = Arc::new(Metrics::new());
        metrics.policy_version(&policies.snapshot().version);
        for issuer in &issuers {
            issuer.report_to(metrics.clone());
        }
        if let Some(i) = &introspection {
            i.report_to(metrics.clone());
        }
        let quota = engine::QuotaParts {
            engine: Arc::new(QuotaEngine::new(
                build_store(&config, metrics.store())?,
                Duration::from_millis(config.quota.deadline_ms),
                config.quota.max_inflight,
            )),
            limits: Arc::new(LimitsStore::load(
                config
                    .quota
                    .limits_file
                    .as_ref()
                    .map(|p| config.resolve(p))
                    .as_deref(),
            )?),
        };
        let engine = Arc::new(Engine::new(
            &config,
            routes,
            policies,
            IdentityChain::new(sources),
            metrics.clone(),
            quota,
        ));
        Engine::spawn_sweeper(
            &engine,
            Duration::from_secs(config.quota.sweep_interval_secs),
        );
        if let (Some(dir), Some(expect)) = (&config.policy.shadow_dir, shadow_expect) {
            let shadow = PolicyStore::load(&config.resolve(dir), expect)
                .map_err(|e| StartError::Shadow(e.to_string()))?;
            engine.attach_shadow(Arc::new(shadow));
        }
        if config.identity.lockout.enabled {
            let lockout = crate::identity::lockout::Lockout::new(
                config.identity.lockout.clone(),
                engine.quota().store().clone(),
                Duration::from_millis(config.quota.deadline_ms),
            )
            .with_metrics(metrics.clone());
            engine.attach_lockout(Arc::new(lockout));
        }
        if let Some(path) = &config.agents.caller_context.keys_file {
            engine
                .attach_caller_context_file(&config.resolve(path))
                .map_err(|e| StartError::Identity(e.to_string()))?;
        }
        if config.audit.enabled {
            let mut audit = config.audit.clone();
            audit.signing_key = audit.signing_key.map(|k| config.resolve(&k));
            audit.hash_key = audit.hash_key.map(|k| config.resolve(&k));
            let trail = crate::audit::AuditTrail::start(
                &audit,
                &config.resolve(&config.audit.path),
                Some(metrics.clone()),
            )?;
            engine.attach_audit(Arc::new(trail));
        }
        let load_tls = |name, tls: &Option<crate::listener::TlsConfig>, alpn: &[u8]| {
            tls.as_ref()
                .map(|t| {
                    crate::listener::LiveTls::load(
                        name,
                        t.resolved(|p| config.resolve(p)),
                        vec![alpn.to_vec()],
                    )
                    .map(Arc::new)
                })
                .transpose()
        };
        let grpc_tls = load_tls("grpc", &config.server.grpc_tls, b"h2")?;
        let admin_tls = load_tls("admin", &config.server.admin_tls, b"http/1.1")?;
        Ok(Self {
            engine,
            metrics,
            keys,
            issuers,
            api_keys,
            introspection,
            config,
            grpc_tls,
            admin_tls,
        })
    }

    /// Reloads policies and keys, logging and counting the result. A limits
    /// or keys file that fails again with the same error is the same broken
    /// save, counted once.
    fn reload_all(
        engine: &Engine,
        keys: Option<&KeysReload>,
        metrics: &Metrics,
        seen: &RejectedOnce,
    ) {
        match engine.policies().reload() {
            Reload::Unchanged => metrics.reload("policies", "unchanged"),
            Reload::Swapped { version } => {
                tracing::info!(%version, "policies reloaded");
                metrics.reload("policies", "swapped");
                metrics.policy_version(&version);
            }
            Reload::Rejected(e) => {
                tracing::error!(error = %e, "policy reload rejected; still serving the last good set");
                metrics.reload("policies", "rejected");
            }
            // Reported and counted when it was first seen.
            Reload::StillRejected => metrics.reload("policies", "unchanged"),
        }
        if let Some(shadow) = engine.shadow() {
            match shadow.reload() {
                Reload::Swapped { version } => {
                    tracing::info!(%version, "shadow policies reloaded");
                    metrics.reload("shadow_policies", "swapped");
                }
                Reload::Rejected(e) => {
                    tracing::error!(error = %e, "shadow policy reload rejected; still comparing with the last good set");
                    metrics.reload("shadow_policies", "rejected");
                }
                Reload::Unchanged | Reload::StillRejected => {
                    metrics.reload("shadow_policies", "unchanged");
                }
            }
        }
        let limits = engine.limits().reload();
        let new_failure = seen.record("limits", limits.as_ref().err().map(ToString::to_string));
        match limits {
            Ok(false) => metrics.reload("limits", "unchanged"),
            Ok(true) => {
                tracing::info!("rate limits reloaded");
                metrics.reload("limits", "swapped");
                // Answers cached under the old limits may be wrong now.
                engine.quota().forget_known_over();
            }
            Err(e) if new_failure => {
                tracing::error!(error = %e, "limits reload rejected; still serving the last good set");
                metrics.reload("limits", "rejected");
            }
            Err(_) => metrics.reload("limits", "unchanged"),
        }
        let result = engine
            .caller_context_keys_file()
            .map(|_| engine.reload_caller_context());
        let new_failure = seen.record(
            "caller_context_keys",
            result
                .as_ref()
                .and_then(|r| r.as_ref().err())
                .map(ToString::to_string),
        );
        match result.unwrap_or(Ok(false)) {
            Ok(false) => metrics.reload("caller_context_keys", "unchanged"),
            Ok(true) => {
                tracing::info!("caller-context keys reloaded");
                metrics.reload("caller_context_keys", "swapped");
            }
            Err(e) if new_failure => {
                tracing::error!(error = %e, "caller-context keys reload rejected; still signing and verifying with the last good keys");
                metrics.reload("caller_context_keys", "rejected");
            }
            Err(_) => metrics.reload("caller_context_keys", "unchanged"),
        }
        if let Some(keys) = keys {
            let result = keys.file.reload();
            let new_failure = seen.record("keys", result.as_ref().err().map(ToString::to_string));
            match result {
                Ok(false) => metrics.reload("keys", "unchanged"),
                Ok(true) => {
                    keys.auth.invalidate();
                    tracing::info!(file = %keys.file.path().display(), "api keys reloaded");
                    metrics.reload("keys", "swapped");
                }
                Err(e) if new_failure => {
                    tracing::error!(error = %e, "api keys reload rejected; still serving the last good set");
                    metrics.reload("keys", "rejected");
                }
                Err(_) => metrics.reload("keys", "unchanged"),
            }
        }
    }

    /// Applies invalidations from other replicas and the CLI (see
    /// [`crate::invalidate`]).
    fn subscribe_invalidations(&self) -> Option<crate::invalidate::Subscription> {
        use crate::invalidate::Invalidation;
        let (target, channel) = crate::invalidate::target(&self.config)?;
        let (quota, api_keys, metrics) = (
            self.engine.quota().clone(),
            self.api_keys.clone(),
            self.metrics.clone(),
        );
        Some(crate::invalidate::subscribe(target, channel, move |what| {
            metrics.invalidation(what.kind());
            match &what {
                Invalidation::QuotaReset | Invalidation::Limits => quota.forget_known_over(),
                // A key's tier may have changed: its cached over-limit answers
                // were computed under its old limits.
                Invalidation::Key(id) => {
                    tracing::info!(key_id = %id.escape_debug(), "api key changed elsewhere; cache dropped");
                    quota.forget_known_over();
                    if let Some(auth) = &api_keys {
                        auth.invalidate();
                    }
                }
                Invalidation::All => {
                    quota.forget_known_over();
                    if let Some(auth) = &api_keys {
                        auth.invalidate();
                    }
                }
            }
        }))
    }

    /// Binds and serves the AuthZEN listener until `stop` turns true.
    async fn start_authzen(
        &self,
        addr: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>), StartError> {
        let adapter = crate::adapters::authzen::Authzen::new(
            self.engine.clone(),
            self.config.authzen.clone(),
        )
        .map_err(|e| {
            StartError::Config(crate::config::ConfigError::Invalid {
                path: self.config.source.clone(),
                message: e.to_string(),
            })
        })?;
        let listener = bind("authzen", addr).await?;
        let local = local_addr(&listener, "authzen")?;
        tracing::info!(authzen_addr = %local, "authzen serving");
        let router = Arc::new(adapter).router();
        let handle = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await
        });
        Ok((local, handle))
    }

    /// Binds both listeners and starts serving.
    pub async fn start(self) -> Result<Running, StartError> {
        let grpc_listener = bind("grpc", self.config.server.grpc_listen).await?;
        let admin_listener = bind("admin", self.config.server.admin_listen).await?;
        let grpc_addr = local_addr(&grpc_listener, "grpc")?;
        let admin_addr = local_addr(&admin_listener, "admin")?;
        let forward_auth_listener = match self.config.server.forward_auth_listen {
            Some(addr) => Some(bind("forward_auth", addr).await?),
            None => None,
        };
        let forward_auth_addr = match &forward_auth_listener {
            Some(l) => Some(local_addr(l, "forward_auth")?),
            None => None,
        };
        let unix_socket = match &self.config.server.grpc_unix_socket {
            Some(path) => {
                let path = self.config.resolve(path);
                let listener =
                    crate::listener::bind_unix(&path, self.config.server.grpc_unix_socket_mode)
                        .map_err(|source| StartError::BindUnix {
                            path: path.clone(),
                            source,
                        })?;
                Some((path, listener))
            }
            None => None,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(true));
        let tls_watcher = crate::listener::watch_tls(
            self.grpc_tls
                .iter()
                .chain(&self.admin_tls)
                .cloned()
                .collect(),
            Duration::from_secs(self.config.policy.reload_poll_secs),
            self.metrics.clone(),
        )
        .map_err(|source| StartError::Watch {
            what: "tls certificate files".into(),
            source,
        })?;

        let watcher = if self.config.policy.watch {
            let mut dirs = vec![self.engine.policies().dir().to_path_buf()];
            if let Some(shadow) = self.engine.shadow() {
                dirs.push(shadow.dir().to_path_buf());
            }
            let keys_dir = self
                .keys
                .as_ref()
                .and_then(|k| k.file.path().parent())
                .map(Path::to_path_buf);
            let limits_dir = self.engine.limits().path().map(|p| {
                if p.is_dir() {
                    p.to_path_buf()
                } else {
                    p.parent().map(Path::to_path_buf).unwrap_or_default()
                }
            });
            let caller_context_dir = self
                .engine
                .caller_context_keys_file()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            for dir in [keys_dir, limits_dir, caller_context_dir]
                .into_iter()
                .flatten()
            {
                let dir = if dir.as_os_str().is_empty() {
                    ".".into()
                } else {
                    dir
                };
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
            let (engine, keys, metrics) =
                (self.engine.clone(), self.keys.clone(), self.metrics.clone());
            let seen = RejectedOnce::default();
            let handle = reload::watch(
                dirs.clone(),
                Duration::from_millis(self.config.policy.reload_debounce_ms),
                Duration::from_secs(self.config.policy.reload_poll_secs),
                move || Self::reload_all(&engine, keys.as_ref(), &metrics, &seen),
            )
            .map_err(|source| StartError::Watch {
                what: format!("{dirs:?}"),
                source,
            })?;
            Some(handle)
        } else {
            None
        };

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AuthorizationServer<ExtAuthz>>().await;
        health
            .set_serving::<DecisionServiceServer<DecisionApi>>()
            .await;
        health.set_serving::<RateLimitServiceServer<Rls>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        // gRPC health follows /readyz (JWKS down at boot, draining): set now,
        // before the listener serves, then kept in step.
        let health_names = vec![
            <AuthorizationServer<ExtAuthz> as tonic::server::NamedService>::NAME,
            <RateLimitServiceServer<Rls> as tonic::server::NamedService>::NAME,
            <DecisionServiceServer<DecisionApi> as tonic::server::NamedService>::NAME,
        ];
        if !self.issuers.iter().all(|i| i.ready())
            || self.introspection.as_ref().is_some_and(|i| !i.ready())
        {
            for name in std::iter::once("").chain(health_names.iter().copied()) {
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(proto::ENVOY_FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // List exactly the services this listener serves.
                .with_service_name("envoy.service.auth.v3.Authorization")
                .with_service_name("envoy.service.ratelimit.v3.RateLimitService")
                .with_service_name("tollgate.v1.DecisionService")
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        };
        // grpcurl speaks v1alpha, newer clients v1: serve both.
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let ext_authz = ExtAuthz::new(
            self.engine.clone(),
            self.config.response.clone(),
            self.config.quota.headers,
        )
        .with_trusted_hops(self.config.context.trusted_hops);
        let rls = Rls::new(
            self.engine.clone(),
            self.config.quota.headers,
            self.config.quota.on_invalid_request,
            self.config.response.quota_fail_open_header.clone(),
        );
        let decision_api = DecisionApi::new(self.engine.clone());
        let limits = &self.config.server.limits;
        let max_message = limits.max_message_bytes;
        let grpc_accept = crate::listener::Acceptor::new(
            "grpc",
            self.grpc_tls.clone(),
            limits,
            self.metrics.listener(),
        );
        let (grpc_queue, grpc_incoming) = crate::listener::queue(grpc_addr);
        let mut accept_loops =
            vec![grpc_accept.serve_tcp(grpc_listener, grpc_queue.clone(), stop_rx.clone())];
        let grpc_unix_socket = unix_socket.map(|(path, listener)| {
            accept_loops.push(grpc_accept.serve_unix(
                listener,
                grpc_queue.clone(),
                stop_rx.clone(),
            ));
            path
        });
        drop(grpc_queue);
        let mut grpc_stop = stop_rx.clone();
        let grpc = tokio::spawn(
            limits
                .grpc_server()
                // Envoy never compresses, but other gRPC clients may send
                // gzip; without this tonic answers them UNIMPLEMENTED.
                .add_service(
                    AuthorizationServer::new(ext_authz)
                        .accept_compressed(Gzip)
                        .max_decoding_message_size(max_message),
                )
                .add_service(
                    RateLimitServiceServer::new(rls)
                        .accept_compressed(Gzip)
                        .max_decoding_message_size(max_message),
                )
                .add_service(
                    DecisionServiceServer::new(decision_api)
                        .accept_compressed(Gzip)
                        .max_decoding_message_size(max_message),
                )
                // Usage settlement from responses (Envoy ext_proc).
                .add_service(
                    ExternalProcessorServer::new(crate::adapters::ext_proc::ExtProc::new(
                        self.engine.clone(),
                    ))
                    .max_decoding_message_size(max_message),
                )
                .add_service(health_service.max_decoding_message_size(max_message))
                .add_service(reflection_v1.max_decoding_message_size(max_message))
                .add_service(reflection_v1alpha.max_decoding_message_size(max_message))
                .serve_with_incoming_shutdown(grpc_incoming, async move {
                    let _ = grpc_stop.wait_for(|stop| *stop).await;
                }),
        );
        let admin_state = crate::admin::AdminState {
            policies: self.engine.policies().clone(),
            metrics: self.metrics.clone(),
            quota: self.engine.quota().clone(),
            issuers: self.issuers.clone(),
            introspection: self.introspection.clone(),
            ready: ready.clone(),
            store_required: self.config.quota.ready_requires_store,
            mcp: Arc::new(self.config.mcp.clone()),
            caller_context: self.engine.caller_context_keys_handle(),
            audit: self.engine.audit().cloned(),
        };
        let health_follower = tokio::spawn(crate::admin::follow_readiness(
            admin_state.clone(),
            health.clone(),
            health_names,
        ));
        let authzen = match self.config.server.authzen_listen {
            None => None,
            Some(addr) => Some(self.start_authzen(addr, stop_rx.clone()).await?),
        };
        let forward_auth = forward_auth_listener.map(|listener| {
            let service = Arc::new(crate::adapters::forward_auth::ForwardAuth::new(
                self.engine.clone(),
                self.config.response.clone(),
                self.config.quota.headers,
                self.config.server.forward_auth_trust,
                self.config.context.max_body_bytes,
            ));
            let mut stop = stop_rx.clone();
            let app = service
                .router()
                .into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    })
                    .await
            })
        });
        let admin_accept = crate::listener::Acceptor::new(
            "admin",
            self.admin_tls.clone(),
            &self.config.server.limits,
            self.metrics.listener(),
        );
        let (admin_queue, admin_incoming) = crate::listener::queue(admin_addr);
        accept_loops.push(admin_accept.serve_tcp(admin_listener, admin_queue, stop_rx.clone()));
        let admin_router =
            crate::admin::router_exposing(admin_state, &self.config.server.admin_endpoints);
        let mut admin_stop = stop_rx;
        let admin = tokio::spawn(async move {
            axum::serve(admin_incoming, admin_router)
                .with_graceful_shutdown(async move {
                    let _ = admin_stop.wait_for(|stop| *stop).await;
                })
                .await
        });
        // Each issuer's keys: fetched now (retried with a capped backoff
        // while that fails), then refreshed periodically.
        let mut refreshers: Vec<JoinHandle<()>> = self
            .issuers
            .iter()
            .map(|issuer| tokio::spawn(issuer.clone().keep_fresh()))
            .collect();
        if let Some(i) = &self.introspection {
            refreshers.push(tokio::spawn(i.clone().keep_probing()));
        }
        refreshers.push(health_follower);
        tracing::info!(%grpc_addr, %admin_addr, policy_version = %self.engine.policies().snapshot().version, "tollgate serving");
        Ok(Running {
            grpc_addr,
            admin_addr,
            authzen_addr: authzen.as_ref().map(|(a, _)| *a),
            authzen: authzen.map(|(_, h)| h),
            forward_auth_addr,
            forward_auth,
            audit: self.engine.audit().cloned(),
            stop: stop_tx,
            ready,
            health,
            grpc,
            admin,
            _watcher: watcher,
            _tls_watcher: tls_watcher,
            accept_loops,
            grpc_unix_socket,
            refreshers,
            _invalidations: self.subscribe_invalidations(),
            grace: Duration::from_millis(self.config.server.shutdown_grace_ms),
        })
    }
}

/// The last reload error of each file source, so that the same broken save
/// seen again on the next file event or poll is not counted as a new failure.
#[derive(Default)]
struct RejectedOnce(std::sync::Mutex<std::collections::HashMap<&'static str, String>>);

impl RejectedOnce {
    /// Records the outcome of one reload of `source`; true when `error` is a
    /// failure not seen last time.
    fn record(&self, source: &'static str, error: Option<String>) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match error {
            None => {
                last.remove(source);
                false
            }
            Some(e) => last.insert(source, e.clone()).as_ref() != Some(&e),
        }
    }
}

/// What a keys file reload touches.
#[derive(Clone)]
struct KeysReload {
    file: Arc<FileKeys>,
    auth: Arc<ApiKeyAuthenticator>,
}

type Identity = (
    Vec<Arc<dyn Authenticator>>,
    Option<KeysReload>,
    Vec<Arc<Issuer>>,
    Option<Arc<ApiKeyAuthenticator>>,
    Option<Arc<crate::identity::introspection::Introspector>>,
);

/// The identity sources, in the configured order.
fn build_identity(config: &Config) -> Result<Identity, StartError> {
    let id = &config.identity;
    let mut sources: Vec<Arc<dyn Authenticator>> = Vec::new();
    let mut keys = None;
    let mut issuers = Vec::new();
    let mut api_keys = None;
    let mut introspection = None;
    for kind in &id.sources {
        match kind {
            SourceKind::ApiKey => {
                let mut stores: Vec<Arc<dyn KeySource>> = Vec::new();
                let file = match &id.api_keys_file {
                    Some(f) => {
                        let file = Arc::new(FileKeys::load(&config.resolve(f))?);
                        stores.push(file.clone());
                        Some(file)
                    }
                    None => None,
                };
                if let Some(url) = &id.api_keys_redis_url {
                    let redis = RedisKeys::connect(
                        url,
                        &id.api_keys_redis_prefix,
                        Duration::from_millis(config.quota.deadline_ms.max(200)),
                    )
                    .map_err(|e| {
                        StartError::Identity(format!("identity.api_keys_redis_url: {e}"))
                    })?;
                    stores.push(Arc::new(redis));
                }
                if stores.is_empty() {
                    continue;
                }
                let auth = Arc::new(ApiKeyAuthenticator::new(
                    stores,
                    Duration::from_millis(id.api_keys_cache_ms),
                    id.max_credential_bytes,
                ));
                api_keys = Some(auth.clone());
                if let Some(file) = file {
                    keys = Some(KeysReload {
                        file,
                        auth: auth.clone(),
                    });
                }
                sources.push(auth);
            }
            SourceKind::Jwt => {
                if id.jwt_issuers.is_empty() {
                    continue;
                }
                for issuer in &id.jwt_issuers {
                    let mut issuer = issuer.clone();
                    issuer.jwks_file = issuer.jwks_file.map(|f| config.resolve(&f));
                    issuer.hs256_secret_file = issuer.hs256_secret_file.map(|f| config.resolve(&f));
                    issuers.push(Arc::new(Issuer::new(issuer).map_err(StartError::Identity)?));
                }
                sources.push(Arc::new(JwtAuthenticator::new(issuers.clone())));
            }
            SourceKind::Introspection => {
                if let Some(c) = &id.introspection {
                    let mut c = c.clone();
                    c.client_secret_file = config.resolve(&c.client_secret_file);
                    let i = Arc::new(
                        crate::identity::introspection::Introspector::new(c)
                            .map_err(StartError::Identity)?,
                    );
                    introspection = Some(i.clone());
                    sources.push(i);
                }
            }
            SourceKind::Mtls => {
                if id.mtls {
                    sources.push(Arc::new(
                        MtlsAuthenticator::new(id.mtls_trust_domains.clone())
                            .with_subject_names(id.mtls_subject_names),
                    ));
                }
            }
        }
    }
    Ok((sources, keys, issuers, api_keys, introspection))
}

/// The configured quota store. Redis stores connect in the background, so
/// this must run inside a Tokio runtime.
pub fn build_store(
    config: &Config,
    metrics: Arc<crate::metrics::StoreMetrics>,
) -> Result<Arc<dyn QuotaStore>, StartError> {
    let q = &config.quota;
    let timeout = Duration::from_millis(q.deadline_ms);
    Ok(match q.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(q.memory_max_keys, Arc::new(SystemClock))),
        StoreKind::Redis => Arc::new(RedisStore::connect(
            Target::Standalone(q.redis_url.clone()),
            &q.key_prefix,
            timeout,
            metrics.clone(),
        )?),
        StoreKind::RedisCluster => Arc::new(RedisStore::connect(
            Target::Cluster(q.redis_cluster_nodes.clone()),
            &q.key_prefix,
            timeout,
            metrics,
        )?),
        StoreKind::RedisSentinel => Arc::new(RedisStore::connect(
            Target::Sentinel {
                sentinels: q.redis_sentinel_nodes.clone(),
                master: q.redis_sentinel_master.clone(),
                master_url: Some(q.redis_url.clone()),
            },
            &q.key_prefix,
            timeout,
            metrics,
        )?),
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener, what: &'static str) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

/// A serving Tollgate.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The AuthZEN listener, when `server.authzen_listen` is set.
    pub authzen_addr: Option<SocketAddr>,
    authzen: Option<JoinHandle<std::io::Result<()>>>,
    /// The forward-auth listener's address, when `server.forward_auth_listen` is set.
    pub forward_auth_addr: Option<SocketAddr>,
    forward_auth: Option<JoinHandle<std::io::Result<()>>>,
    audit: Option<Arc<crate::audit::AuditTrail>>,
    stop: watch::Sender<bool>,
    ready: Arc<AtomicBool>,
    health: tonic_health::server::HealthReporter,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<std::io::Result<()>>,
    _watcher: Option<reload::WatchHandle>,
    _tls_watcher: Option<reload::WatchHandle>,
    /// The listeners' accept loops; they end on the stop signal.
    accept_loops: Vec<JoinHandle<()>>,
    /// The gRPC Unix socket, when `server.grpc_unix_socket` is set; removed
    /// on shutdown.
    pub grpc_unix_socket: Option<std::path::PathBuf>,
    refreshers: Vec<JoinHandle<()>>,
    _invalidations: Option<crate::invalidate::Subscription>,
    grace: Duration,
}

impl Running {
    /// Stops taking new work, lets in-flight requests finish, and returns
    /// within `server.shutdown_grace_ms`: every registered gRPC service turns
    /// NOT_SERVING first (so health watchers and load balancers see it), and
    /// connections still open when the grace ends (a `Health/Watch` stream
    /// never ends by itself) are closed.
    pub async fn shutdown(self) {
        for r in &self.refreshers {
            r.abort();
        }
        self.ready.store(false, Ordering::Relaxed);
        self.health
            .set_not_serving::<AuthorizationServer<ExtAuthz>>()
            .await;
        self.health
            .set_not_serving::<DecisionServiceServer<DecisionApi>>()
            .await;
        self.health
            .set_not_serving::<RateLimitServiceServer<Rls>>()
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut grpc = self.grpc;
        match tokio::time::timeout_at(deadline, &mut grpc).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "grpc server ended with an error"),
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.grace.as_millis() as u64,
                    "grpc clients still connected after the shutdown grace; closing them"
                );
                grpc.abort();
            }
            Ok(_) => {}
        }
        let mut admin = self.admin;
        match tokio::time::timeout_at(deadline, &mut admin).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin server ended with an error"),
            Err(_) => {
                tracing::warn!(
                    "admin clients still connected after the shutdown grace; closing them"
                );
                admin.abort();
            }
            Ok(_) => {}
        }
        if let Some(mut authzen) = self.authzen {
            match tokio::time::timeout_at(deadline, &mut authzen).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "authzen server ended with an error"),
                Err(_) => {
                    tracing::warn!(
                        "authzen clients still connected after the shutdown grace; closing them"
                    );
                    authzen.abort();
                }
                Ok(_) => {}
            }
        }
        if let Some(mut forward_auth) = self.forward_auth {
            match tokio::time::timeout_at(deadline, &mut forward_auth).await {
                Ok(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "forward-auth server ended with an error")
                }
                Err(_) => {
                    tracing::warn!(
                        "forward-auth clients still connected after the shutdown grace; closing them"
                    );
                    forward_auth.abort();
                }
                Ok(_) => {}
            }
        }
        for accept in &self.accept_loops {
            accept.abort();
        }
        if let Some(path) = &self.grpc_unix_socket {
            let _ = std::fs::remove_file(path);
        }
        // After the listeners: every decision made is in the queue now.
        if let Some(trail) = self.audit {
            let _ = tokio::task::spawn_blocking(move || trail.close()).await;
        }
    }
}

/// Loads `config`, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let running = App::build(config)?.start().await?;
    shutdown.await;
    tracing::info!("draining");
    running.shutdown().await;
    Ok(())
}
