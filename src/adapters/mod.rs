//! Transport adapters: each turns its protocol's message into Tollgate's
//! domain types in one place, calls the [`crate::engine::Engine`], and hands
//! the result to [`crate::respond`].

pub mod authzen;
pub mod decision_api;
pub mod ext_authz;
pub mod ext_proc;
pub mod forward_auth;
pub mod rls;
mod stream_cut;
pub mod tool_calls;
