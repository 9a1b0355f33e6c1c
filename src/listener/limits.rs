//! Resource limits of Tollgate's own listeners (`[server.limits]`): what one
//! peer may hold open, send and leave idle.
//!
//! The HTTP/2 settings are enforced by `h2` 0.4.20 under `hyper` 1.12 and
//! tonic 0.14.9 (as pinned in `Cargo.lock`): `h2` limits pending-accept
//! resets (rapid reset, CVE-2023-44487) since 0.3.22/0.4.0, locally raised
//! error resets since 0.4.2, and CONTINUATION frames per header block
//! (derived from the header list size) since 0.4.4. Tollgate sets each
//! explicitly, so a dependency default never silently widens them.

use std::time::Duration;

use serde::Deserialize;

/// `[server.limits]`: bounds on each listener's connections and on what a
/// connection may send. Defaults are safe for a gateway sidecar; every value
/// must be at least 1.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// Largest gRPC message Tollgate decodes, in bytes (tonic's default is
    /// 4 MiB). A larger message is refused with `RESOURCE_EXHAUSTED`. Must
    /// hold a Check carrying `context.max_body_bytes` of body.
    pub max_message_bytes: usize,
    /// Largest HTTP/2 header list (SETTINGS_MAX_HEADER_LIST_SIZE), in bytes.
    /// It also bounds a HEADERS + CONTINUATION sequence: a flood of
    /// CONTINUATION frames ends the connection once it passes this size.
    pub max_header_list_bytes: u32,
    /// HTTP/2 streams one connection may have open at once
    /// (SETTINGS_MAX_CONCURRENT_STREAMS). Envoy opens another connection
    /// when it needs more.
    pub max_concurrent_streams: u32,
    /// Connections each listener holds at once (gRPC TCP and Unix socket
    /// together; the admin listener has its own count). One more is
    /// accepted and closed at once, counted in
    /// `tollgate_listener_refused_total{reason="max_connections"}`.
    pub max_connections: usize,
    /// A connection from which nothing has been read for this long is closed,
    /// in milliseconds. HTTP/2 peers answer Tollgate's keep-alive pings, so a
    /// healthy idle gateway connection stays open; a peer that never speaks
    /// (or stopped answering) does not.
    pub idle_timeout_ms: u64,
    /// Longest TLS handshake, in milliseconds; slower peers are dropped.
    pub handshake_timeout_ms: u64,
    /// Interval of HTTP/2 keep-alive pings on a quiet connection, in
    /// milliseconds. Keep it below `idle_timeout_ms`.
    pub keepalive_interval_ms: u64,
    /// How long a keep-alive ping waits for its answer before the connection
    /// is closed, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// HTTP/2 rapid reset (CVE-2023-44487): streams a peer opened and reset
    /// before Tollgate accepted them; more ends the connection with
    /// GOAWAY (ENHANCE_YOUR_CALM).
    pub max_pending_accept_reset_streams: usize,
    /// Streams Tollgate itself resets because the peer sent something invalid
    /// on them (provoked resets, the "MadeYouReset" pattern); more ends the
    /// connection.
    pub max_local_error_reset_streams: usize,
    /// Close every connection after this long (with GOAWAY, letting
    /// in-flight requests finish), in milliseconds; 0 (the default): never.
    pub max_connection_age_ms: u64,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024 + 256 * 1024,
            max_header_list_bytes: 16 * 1024,
            max_concurrent_streams: 1024,
            max_connections: 10_000,
            idle_timeout_ms: 120_000,
            handshake_timeout_ms: 10_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
            max_connection_age_ms: 0,
        }
    }
}

impl ListenerLimits {
    /// Checks each bound; the message names the key and what to set.
    pub fn validate(&self, max_body_bytes: usize) -> Result<(), String> {
        for (key, value) in [
            ("max_message_bytes", self.max_message_bytes as u64),
            (
                "max_header_list_bytes",
                u64::from(self.max_header_list_bytes),
            ),
            (
                "max_concurrent_streams",
                u64::from(self.max_concurrent_streams),
            ),
            ("max_connections", self.max_connections as u64),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            (
                "max_pending_accept_reset_streams",
                self.max_pending_accept_reset_streams as u64,
            ),
            (
                "max_local_error_reset_streams",
                self.max_local_error_reset_streams as u64,
            ),
        ] {
            if value == 0 {
                return Err(format!("server.limits.{key} must be at least 1"));
            }
        }
        if self.max_message_bytes <= max_body_bytes {
            return Err(format!(
                "server.limits.max_message_bytes = {} must exceed context.max_body_bytes = {max_body_bytes}: a Check carrying a whole body would be refused; raise it or lower context.max_body_bytes",
                self.max_message_bytes
            ));
        }
        if self.keepalive_interval_ms >= self.idle_timeout_ms {
            return Err(format!(
                "server.limits.keepalive_interval_ms = {} must be below idle_timeout_ms = {}, or idle gateway connections are closed between requests",
                self.keepalive_interval_ms, self.idle_timeout_ms
            ));
        }
        Ok(())
    }

    /// `idle_timeout_ms` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The gRPC server builder with every HTTP/2 bound of these limits set.
    pub fn grpc_server(&self) -> tonic::transport::Server {
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(self.max_header_list_bytes)
            .http2_keepalive_interval(Some(Duration::from_millis(self.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(self.keepalive_timeout_ms)))
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_reset_streams))
            .http2_max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
            // Only HTTP/2 (gRPC) here: an HTTP/1 request is refused, not parsed.
            .accept_http1(false);
        if self.max_connection_age_ms > 0 {
            server.max_connection_age(Duration::from_millis(self.max_connection_age_ms))
        } else {
            server
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_below_tonics_default() {
        let limits = ListenerLimits::default();
        limits.validate(1024 * 1024).expect("defaults");
        assert!(limits.max_message_bytes < 4 * 1024 * 1024);
    }

    #[test]
    fn bad_bounds_name_their_key() {
        let zero = ListenerLimits {
            max_connections: 0,
            ..Default::default()
        };
        assert!(zero.validate(1).unwrap_err().contains("max_connections"));
        let small = ListenerLimits {
            max_message_bytes: 1000,
            ..Default::default()
        };
        assert!(small.validate(1000).unwrap_err().contains("max_body_bytes"));
        let pings = ListenerLimits {
            keepalive_interval_ms: 5000,
            idle_timeout_ms: 5000,
            ..Default::default()
        };
        assert!(
            pings
                .validate(1)
                .unwrap_err()
                .contains("keepalive_interval_ms")
        );
    }
}
