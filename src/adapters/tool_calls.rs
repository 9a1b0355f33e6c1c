//! The ext_proc side of the tool-call check (`[agents.tools]`): the answer
//! to a request ext_authz allowed is checked for tool calls the original
//! caller may not make, before the agent runtime sees it.
//!
//! - JSON answers: at the response headers Tollgate asks Envoy for the
//!   whole body (`mode_override` to `BUFFERED`, so the headers wait too),
//!   and a refused answer is replaced by Tollgate's own 403
//!   (`ImmediateResponse`, `{"error":{"code":"tool_call_refused","tool":…}}`).
//! - Event streams stay `STREAMED`: complete events pass on, the first
//!   event calling a refused tool is replaced by an `event: error` and
//!   every later chunk is dropped (the status, already sent, stays 200).
//!
//! Either way the refusal is logged with the tool's name, never its
//! arguments. A non-2xx answer is not checked (it calls no tool).

use std::collections::HashSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;

use crate::agents::tools::{self, SseGuard};
use crate::engine::Engine;

/// One response's check.
pub enum ToolCalls {
    /// Waiting for the response headers.
    Pending {
        callable: Arc<HashSet<String>>,
        max: usize,
    },
    /// A JSON answer, buffered whole.
    Json {
        callable: Arc<HashSet<String>>,
        max: usize,
    },
    /// An event stream, checked event by event.
    Sse(SseGuard),
}

impl ToolCalls {
    /// The check for allowed request `request_id`, if it needs one.
    pub async fn start(engine: &Engine, request_id: Option<&str>) -> Option<Self> {
        let (callable, max) = engine.tool_call_check(request_id?).await?;
        Some(Self::Pending { callable, max })
    }

    /// At the response headers: the reply and the mode to switch to; `None`
    /// when the answer is not checked (`check` is then cleared).
    pub fn on_headers(
        check: &mut Option<Self>,
        status: u16,
        content_type: Option<&str>,
        end_of_stream: bool,
        request_id: &str,
    ) -> Option<(HeadersResponse, Option<ProcessingMode>)> {
        let Some(Self::Pending { callable, max }) = check.take() else {
            return None;
        };
        if !(200..300).contains(&status) || end_of_stream {
            return None;
        }
        let sse =
            content_type.is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
        let mode = if sse {
            *check = Some(Self::Sse(SseGuard::new(
                callable,
                request_id.to_string(),
                max,
            )));
            None
        } else {
            *check = Some(Self::Json { callable, max });
            Some(ProcessingMode {
                response_body_mode: BodySendMode::Buffered as i32,
                ..Default::default()
            })
        };
        // The body may change length.
        let reply = HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    remove_headers: vec!["content-length".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        Some((reply, mode))
    }

    /// For one body message: the reply, when this check decides it.
    pub fn on_body(&mut self, body: &[u8], end_of_stream: bool, request_id: &str) -> Option<Out> {
        match self {
            Self::Pending { .. } => None,
            Self::Json { callable, max } => match tools::check_json(body, callable, *max) {
                Ok(()) => None,
                Err(refusal) => {
                    log(request_id, refusal.tool.as_deref());
                    Some(refused_json(refusal.error_json(request_id).to_string()))
                }
            },
            Self::Sse(guard) => {
                let before = guard.refused().is_some();
                let out = guard.feed(body, end_of_stream);
                if !before && let Some(r) = guard.refused() {
                    log(request_id, r.tool.as_deref());
                }
                Some(Out::ResponseBody(BodyResponse {
                    response: Some(CommonResponse {
                        body_mutation: Some(BodyMutation {
                            mutation: Some(if out.is_empty() {
                                Mutation::ClearBody(true)
                            } else {
                                Mutation::Body(out)
                            }),
                        }),
                        ..Default::default()
                    }),
                }))
            }
        }
    }
}

fn log(request_id: &str, tool: Option<&str>) {
    tracing::warn!(
        request_id,
        tool = tool.unwrap_or("<unreadable response>"),
        "tool call refused in the model's response"
    );
}

/// Tollgate's 403 in place of the upstream's answer.
fn refused_json(body: String) -> Out {
    Out::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus { code: 403 }),
        headers: Some(HeaderMutation {
            set_headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "content-type".into(),
                    raw_value: b"application/json".to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        body: body.into_bytes(),
        details: "tool_call_refused".into(),
        ..Default::default()
    })
}
