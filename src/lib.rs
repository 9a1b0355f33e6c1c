//! Tollgate: the policy decision point an API gateway asks "may this caller do
//! this, and can they afford it?".
//!
//! Requests arrive through thin transport adapters ([`adapters`]) that turn
//! protocol messages into plain domain types ([`request`]), are decided by one
//! [`engine::Engine`] (identity, then Cedar policy), and the typed
//! [`decision::Decision`] is mapped back to each protocol in one place
//! ([`respond`]).
#![forbid(unsafe_code)]

pub mod adapters;
pub mod admin;
pub mod agents;
pub mod audit;
pub mod cli;
pub mod config;
pub mod decision;
pub mod engine;
pub mod identity;
pub mod invalidate;
pub mod listener;
pub mod mcp;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod quota;
pub mod redis_conn;
pub mod request;
pub mod respond;
pub mod routes;
pub mod server;
pub mod telemetry;
pub mod usage;

/// Generated types of Tollgate's own `tollgate.v1` gRPC API.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptor set of `tollgate.v1`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));
    /// Encoded descriptors of Envoy's ext_authz and rate limit services (and
    /// their imports), taken from the `envoy-types` crate at build time.
    pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
}
