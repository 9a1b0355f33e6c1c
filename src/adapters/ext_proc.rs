//! Envoy `envoy.service.ext_proc.v3.ExternalProcessor/Process`: usage
//! settlement from the upstream's response.
//!
//! Tollgate watches the response only: the request id comes from the
//! request headers (`x-request-id`, the id ext_authz decided under), the
//! response's `content-type` picks JSON or server-sent events, and the body
//! chunks feed a [`UsageReader`]. When the body ends, the request's
//! reservation is settled from what the response reported (or, for a stream
//! without a usage block, from the generated text counted); a stream cut
//! short (the client went away, Envoy closed the gRPC stream) is settled as
//! `quota.on_disconnect` says: the whole reservation (the default) or what
//! had been generated. A response that is not 2xx is settled as
//! `quota.on_upstream_error` says: refunded (the default) or kept charged.
//! Either way the request's concurrency slots are released. Every message is answered CONTINUE unchanged:
//! this adapter never alters or blocks traffic. Settlement failures are
//! logged and counted; the reservation then stays charged (never free).
//!
//! Envoy configuration: `processing_mode` with `request_header_mode: SEND`,
//! `response_header_mode: SEND`, `response_body_mode: STREAMED`, everything
//! else `SKIP`/`NONE` (see `examples/envoy/envoy.yaml`).
//!
//! On MCP endpoints (`[[mcp.servers]]`) nothing is settled. The answer to a
//! `tools/list` ext_authz allowed is filtered to the tools the caller may
//! call: at its response headers Tollgate asks Envoy for the whole body
//! (`mode_override` to `BUFFERED`, which needs `allow_mode_override: true`)
//! and removes `content-length`, then replaces the body with the filtered
//! JSON or event stream ([`crate::mcp::tools_list`]). The adapter also
//! alters a stream under a budget with `on_exceed = "end_stream"`: it is
//! passed on event by event and ended with an `over_budget` error event when
//! it crosses its cutoff ([`super::stream_cut`]).
//!
//! With the audit trail on, every response the adapter sees leaves one
//! `api = "response"` record ([`crate::audit::ResponseFacts`]): the
//! upstream's status and the SHA-256 and size of the body as the upstream
//! sent it — never the body — joined to the request's decision and
//! settlement records by `request_id`.

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::body_mutation::Mutation;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, TrailersResponse,
};
use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::usage::response::{Observed, UsageReader};

/// The ext_proc gRPC service.
pub struct ExtProc {
    engine: Arc<Engine>,
}

impl ExtProc {
    /// Settles usage through `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The value of header `name` (lowercase) in Envoy's header map.
fn header(map: Option<&HeaderMap>, name: &str) -> Option<String> {
    map?.headers.iter().find(|h| h.key == name).map(|h| {
        if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        }
    })
}

/// Which listed tools to keep.
type ToolFilter = Box<dyn Fn(&serde_json::Value) -> bool + Send>;

/// One HTTP stream's state.
#[derive(Default)]
struct Exchange {
    request_id: Option<String>,
    reader: Option<UsageReader>,
    /// The upstream answered with a status that is not 2xx.
    failed: bool,
    settled: bool,
    /// A request to an MCP endpoint: no usage to settle.
    mcp: bool,
    /// An allowed `tools/list` whose answer is filtered.
    filter: Option<ToolFilter>,
    /// The answer being filtered is an event stream.
    sse: bool,
    /// The tool-call check of an allowed LLM request (`[agents.tools]`).
    tools: Option<super::tool_calls::ToolCalls>,
    /// The response body's running hash, while the audit trail is on.
    response: Option<ResponseDigest>,
    /// Where a watched stream is ended (`on_exceed = "end_stream"`).
    cut: Option<super::stream_cut::StreamCut>,
}

/// What the audit record of a response needs, gathered chunk by chunk.
struct ResponseDigest {
    status: u16,
    hasher: Sha256,
    bytes: u64,
}

impl Exchange {
    /// The exchange ended before the response did (the client went away,
    /// the upstream never answered, Envoy gave up): settled by
    /// `quota.on_disconnect`, so its concurrency slot is released now rather
    /// than at its TTL.
    async fn cut_short(&mut self, engine: &Engine) {
        if self.mcp || self.settled {
            return;
        }
        let seen = self
            .reader
            .take()
            .map(UsageReader::finish)
            .unwrap_or_default();
        self.settle(engine, seen, "cut_short").await;
    }

    /// The response's headers arrived: starts hashing its body when the
    /// audit trail is on (and records it now if it has no body).
    fn response_started(&mut self, engine: &Engine, status: u16, end_of_stream: bool) {
        if engine.audit().is_none() {
            return;
        }
        self.response = Some(ResponseDigest {
            status,
            hasher: Sha256::new(),
            bytes: 0,
        });
        if end_of_stream {
            self.response_ended(engine, true);
        }
    }

    /// A body chunk, as the upstream sent it.
    fn response_chunk(&mut self, engine: &Engine, chunk: &[u8], end_of_stream: bool) {
        if let Some(digest) = self.response.as_mut() {
            digest.hasher.update(chunk);
            digest.bytes += chunk.len() as u64;
        }
        if end_of_stream {
            self.response_ended(engine, true);
        }
    }

    /// Sends the response's audit record (once).
    fn response_ended(&mut self, engine: &Engine, complete: bool) {
        let (Some(digest), Some(trail)) = (self.response.take(), engine.audit()) else {
            return;
        };
        let Some(id) = self.request_id.as_deref() else {
            return;
        };
        let facts = crate::audit::ResponseFacts {
            status: digest.status,
            body_sha256: (digest.bytes > 0).then(|| hex::encode(digest.hasher.finalize())),
            body_bytes: digest.bytes,
            complete,
        };
        let version = engine.policies().snapshot().version.clone();
        trail.submit(crate::audit::AuditRecord::response(id, version, facts));
    }

    /// A body chunk of a stream that ends at its budget: the chunk is
    /// replaced by the complete events that fit (and, at the cut, the error
    /// event); the request is settled at the cut or at the body's end.
    async fn cut_chunk(&mut self, engine: &Engine, chunk: &[u8], end_of_stream: bool) -> Out {
        let passed = match (self.cut.as_mut(), self.reader.as_mut()) {
            (Some(cut), Some(reader)) => cut.chunk(reader, chunk, end_of_stream),
            // Already cut and settled: nothing more reaches the client.
            _ => super::stream_cut::Passed {
                body: Vec::new(),
                crossed: false,
            },
        };
        if (passed.crossed || end_of_stream)
            && let Some(reader) = self.reader.take()
        {
            // Everything generated up to the cut, the withheld event too,
            // even when a usage block reported less so far.
            let generated = reader.output_so_far();
            let mut seen = reader.finish();
            seen.output = seen.output.max(generated);
            if passed.crossed {
                let rule = self.cut.as_ref().map(|c| c.rule()).unwrap_or_default();
                tracing::info!(request_id = ?self.request_id, rule, output_tokens = seen.output, "stream ended at its token budget");
            }
            self.settle(engine, seen, "response").await;
        }
        Out::ResponseBody(BodyResponse {
            response: Some(CommonResponse {
                body_mutation: Some(BodyMutation {
                    mutation: Some(Mutation::Body(passed.body)),
                }),
                ..Default::default()
            }),
        })
    }

    async fn settle(&mut self, engine: &Engine, observed: Observed, how: &'static str) {
        if self.settled {
            return;
        }
        self.settled = true;
        let Some(id) = self.request_id.as_deref() else {
            return;
        };
        let settled = match how {
            "cut_short" => engine.settle_unfinished(id, false, observed).await,
            "upstream_error" => engine.settle_unfinished(id, true, observed).await,
            _ => engine.settle_observed(id, observed).await,
        };
        match settled {
            Ok(result) => {
                tracing::debug!(request_id = %id, result = result.label(), how, "usage settled from the response")
            }
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, how, "usage could not be settled from the response; the reservation stays charged")
            }
        }
    }
}

fn continue_as(out: Out) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(out),
        ..Default::default()
    }
}

fn headers_ok() -> HeadersResponse {
    HeadersResponse {
        response: Some(CommonResponse::default()),
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = OutStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let engine = self.engine.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ProcessingResponse, Status>>(16);
        tokio::spawn(async move {
            let mut x = Exchange::default();
            loop {
                let message = match inbound.next().await {
                    Some(Ok(m)) => m,
                    // The stream ended or broke before the body did: the
                    // client went away or Envoy gave up. Settle what was seen.
                    Some(Err(_)) | None => {
                        x.response_ended(&engine, false);
                        x.cut_short(&engine).await;
                        return;
                    }
                };
                let mut mode_override = None;
                let reply = match message.request {
                    Some(In::RequestHeaders(h)) => {
                        x.request_id =
                            header(h.headers.as_ref(), "x-request-id").filter(|id| !id.is_empty());
                        x.mcp = header(h.headers.as_ref(), ":path")
                            .is_some_and(|p| engine.is_mcp_path(&p));
                        let marked = header(h.headers.as_ref(), crate::mcp::LIST_MARK_HEADER)
                            .is_some_and(|v| v == "1");
                        if x.mcp {
                            x.filter = x.request_id.as_deref().and_then(|id| {
                                engine
                                    .tools_list_filter(id)
                                    .map(|f| Box::new(f) as ToolFilter)
                            });
                            if marked && x.filter.is_none() {
                                // ext_authz allowed a tools/list this
                                // replica does not remember: list nothing
                                // rather than everything.
                                tracing::warn!(request_id = ?x.request_id, "tools/list answer without its decision; no tools listed");
                                x.filter = Some(Box::new(|_: &serde_json::Value| false));
                            }
                        }
                        if !x.mcp {
                            x.tools = super::tool_calls::ToolCalls::start(
                                &engine,
                                x.request_id.as_deref(),
                            )
                            .await;
                        }
                        Out::RequestHeaders(headers_ok())
                    }
                    Some(In::ResponseHeaders(h)) if x.mcp => {
                        let status = header(h.headers.as_ref(), ":status")
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(0);
                        x.response_started(&engine, status, h.end_of_stream);
                        if !(200..300).contains(&status) || h.end_of_stream {
                            // An error or an empty answer lists no tools.
                            x.filter = None;
                        }
                        if x.filter.is_some() {
                            x.sse = header(h.headers.as_ref(), "content-type").is_some_and(|c| {
                                c.to_ascii_lowercase().starts_with("text/event-stream")
                            });
                            mode_override = Some(ProcessingMode {
                                response_body_mode: BodySendMode::Buffered as i32,
                                ..Default::default()
                            });
                            Out::ResponseHeaders(HeadersResponse {
                                response: Some(CommonResponse {
                                    header_mutation: Some(HeaderMutation {
                                        remove_headers: vec!["content-length".into()],
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                }),
                            })
                        } else {
                            Out::ResponseHeaders(headers_ok())
                        }
                    }
                    Some(In::ResponseBody(b)) if x.mcp => {
                        x.response_chunk(&engine, &b.body, b.end_of_stream);
                        let body_mutation = match x.filter.take() {
                            Some(keep) => {
                                let filtered = if x.sse {
                                    crate::mcp::tools_list::filter_sse(&b.body, &keep)
                                } else {
                                    crate::mcp::tools_list::filter_json(&b.body, &keep)
                                };
                                tracing::debug!(request_id = ?x.request_id, hidden = filtered.hidden, "tools/list answer filtered");
                                Some(BodyMutation {
                                    mutation: Some(Mutation::Body(filtered.body)),
                                })
                            }
                            None => None,
                        };
                        Out::ResponseBody(BodyResponse {
                            response: Some(CommonResponse {
                                body_mutation,
                                ..Default::default()
                            }),
                        })
                    }
                    Some(In::ResponseHeaders(h)) => {
                        let status = header(h.headers.as_ref(), ":status")
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(0);
                        x.response_started(&engine, status, h.end_of_stream);
                        x.failed = !(200..300).contains(&status);
                        x.reader = Some(UsageReader::new(
                            header(h.headers.as_ref(), "content-type").as_deref(),
                        ));
                        if x.failed {
                            // An upstream error: its fate is configured
                            // (`quota.on_upstream_error`).
                            x.reader = None;
                            x.settle(&engine, Observed::default(), "upstream_error")
                                .await;
                        } else if h.end_of_stream {
                            // No body: nothing was generated.
                            x.reader = None;
                            x.settle(
                                &engine,
                                Observed {
                                    input: Some(0),
                                    ..Observed::default()
                                },
                                "no_usage",
                            )
                            .await;
                        }
                        let sse = x.reader.as_ref().is_some_and(UsageReader::is_sse);
                        if sse && !h.end_of_stream {
                            let cutoff = x
                                .request_id
                                .as_deref()
                                .and_then(|id| engine.stream_cutoff(id));
                            // The tool-call check replaces bodies of its own;
                            // the two are not combined yet, and the check wins.
                            if x.tools.is_none() {
                                x.cut = cutoff.map(super::stream_cut::StreamCut::new);
                            }
                        }
                        match super::tool_calls::ToolCalls::on_headers(
                            &mut x.tools,
                            status,
                            header(h.headers.as_ref(), "content-type").as_deref(),
                            h.end_of_stream,
                            x.request_id.as_deref().unwrap_or_default(),
                        ) {
                            Some((reply, mode)) => {
                                mode_override = mode;
                                Out::ResponseHeaders(reply)
                            }
                            None => Out::ResponseHeaders(headers_ok()),
                        }
                    }
                    Some(In::ResponseBody(b)) if x.cut.is_some() => {
                        x.response_chunk(&engine, &b.body, b.end_of_stream);
                        x.cut_chunk(&engine, &b.body, b.end_of_stream).await
                    }
                    Some(In::ResponseBody(b)) => {
                        x.response_chunk(&engine, &b.body, b.end_of_stream);
                        if let Some(reader) = x.reader.as_mut() {
                            reader.feed(&b.body);
                        }
                        if b.end_of_stream
                            && let Some(reader) = x.reader.take()
                        {
                            let seen = reader.finish();
                            x.settle(&engine, seen, "response").await;
                        }
                        let rid = x.request_id.as_deref().unwrap_or_default();
                        match x
                            .tools
                            .as_mut()
                            .and_then(|t| t.on_body(&b.body, b.end_of_stream, rid))
                        {
                            Some(checked) => checked,
                            None => Out::ResponseBody(BodyResponse {
                                response: Some(CommonResponse::default()),
                            }),
                        }
                    }
                    Some(In::RequestBody(_)) => Out::RequestBody(BodyResponse {
                        response: Some(CommonResponse::default()),
                    }),
                    Some(In::RequestTrailers(_)) => {
                        Out::RequestTrailers(TrailersResponse::default())
                    }
                    Some(In::ResponseTrailers(_)) => {
                        x.response_ended(&engine, true);
                        if let Some(reader) = x.reader.take() {
                            let seen = reader.finish();
                            x.settle(&engine, seen, "response").await;
                        }
                        Out::ResponseTrailers(TrailersResponse::default())
                    }
                    None => continue,
                };
                let mut answer = continue_as(reply);
                answer.mode_override = mode_override;
                if tx.send(Ok(answer)).await.is_err() {
                    x.response_ended(&engine, false);
                    x.cut_short(&engine).await;
                    return;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out) as OutStream))
    }
}
