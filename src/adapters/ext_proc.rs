//! Envoy `envoy.service.ext_proc.v3.ExternalProcessor/Process`: usage
//! settlement from the upstream's response.
//!
//! Tollgate watches the response only: the request id comes from the
//! request headers (`x-request-id`, the id ext_authz decided under), the
//! response's `content-type` picks JSON or server-sent events, and the body
//! chunks feed a [`UsageReader`]. When the body ends, the request's
//! reservation is settled from what the response reported (or, for a stream
//! without a usage block, from the generated text counted); a stream cut
//! short (the client went away, Envoy closed the gRPC stream) is settled from
//! what had been seen. A response that is not 2xx used nothing: its
//! reservation is refunded. Every message is answered CONTINUE unchanged:
//! this adapter never alters or blocks traffic. Settlement failures are
//! logged and counted; the reservation then stays charged (never free).
//!
//! Envoy configuration: `processing_mode` with `request_header_mode: SEND`,
//! `response_header_mode: SEND`, `response_body_mode: STREAMED`, everything
//! else `SKIP`/`NONE` (see `examples/envoy/envoy.yaml`).

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeadersResponse, ProcessingRequest, ProcessingResponse,
    TrailersResponse,
};
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

/// One HTTP stream's state.
#[derive(Default)]
struct Exchange {
    request_id: Option<String>,
    reader: Option<UsageReader>,
    /// The upstream answered with a status that is not 2xx.
    failed: bool,
    settled: bool,
}

impl Exchange {
    async fn settle(&mut self, engine: &Engine, observed: Observed, how: &'static str) {
        if self.settled {
            return;
        }
        self.settled = true;
        let Some(id) = self.request_id.as_deref() else {
            return;
        };
        match engine.settle_observed(id, observed).await {
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
                        if let Some(reader) = x.reader.take() {
                            let seen = reader.finish();
                            x.settle(&engine, seen, "cut_short").await;
                        }
                        return;
                    }
                };
                let reply = match message.request {
                    Some(In::RequestHeaders(h)) => {
                        x.request_id =
                            header(h.headers.as_ref(), "x-request-id").filter(|id| !id.is_empty());
                        Out::RequestHeaders(headers_ok())
                    }
                    Some(In::ResponseHeaders(h)) => {
                        let status = header(h.headers.as_ref(), ":status")
                            .and_then(|s| s.parse::<u16>().ok())
                            .unwrap_or(0);
                        x.failed = !(200..300).contains(&status);
                        x.reader = Some(UsageReader::new(
                            header(h.headers.as_ref(), "content-type").as_deref(),
                        ));
                        if h.end_of_stream || x.failed {
                            // No body, or an error: nothing was generated.
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
                        Out::ResponseHeaders(headers_ok())
                    }
                    Some(In::ResponseBody(b)) => {
                        if let Some(reader) = x.reader.as_mut() {
                            reader.feed(&b.body);
                        }
                        if b.end_of_stream
                            && let Some(reader) = x.reader.take()
                        {
                            let seen = reader.finish();
                            x.settle(&engine, seen, "response").await;
                        }
                        Out::ResponseBody(BodyResponse {
                            response: Some(CommonResponse::default()),
                        })
                    }
                    Some(In::RequestBody(_)) => Out::RequestBody(BodyResponse {
                        response: Some(CommonResponse::default()),
                    }),
                    Some(In::RequestTrailers(_)) => {
                        Out::RequestTrailers(TrailersResponse::default())
                    }
                    Some(In::ResponseTrailers(_)) => {
                        if let Some(reader) = x.reader.take() {
                            let seen = reader.finish();
                            x.settle(&engine, seen, "response").await;
                        }
                        Out::ResponseTrailers(TrailersResponse::default())
                    }
                    None => continue,
                };
                if tx.send(Ok(continue_as(reply))).await.is_err() {
                    if let Some(reader) = x.reader.take() {
                        let seen = reader.finish();
                        x.settle(&engine, seen, "cut_short").await;
                    }
                    return;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out) as OutStream))
    }
}
