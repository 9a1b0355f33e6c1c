//! A real OTLP trace receiver on a free loopback port, over gRPC (the
//! collector side of `opentelemetry.proto.collector.trace.v1.TraceService`)
//! or HTTP (`POST /v1/traces`, protobuf), keeping every span it is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

/// A span as received: ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// The exporting resource's `service.name`.
    pub service: String,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// OTLP/HTTP export requests taken.
    posts: Arc<Mutex<u64>>,
}

impl Collector {
    /// Keeps the spans of one export request.
    fn keep(&self, request: ExportTraceServiceRequest) {
        let mut received = Vec::new();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                received.extend(scope.spans.into_iter().map(|s: Span| ReceivedSpan {
                    name: s.name,
                    trace_id: hex::encode(s.trace_id),
                    span_id: hex::encode(s.span_id),
                    parent_span_id: hex::encode(s.parent_span_id),
                    service: service.clone(),
                }));
            }
        }
        self.spans.lock().expect("spans").extend(received);
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.keep(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// OTLP/HTTP: `POST /v1/traces` with an `application/x-protobuf`
/// `ExportTraceServiceRequest`, answered with an encoded
/// `ExportTraceServiceResponse`.
async fn http_export(
    axum::extract::State(collector): axum::extract::State<Collector>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    Vec<u8>,
) {
    use prost::Message;
    let protobuf = headers
        .get("content-type")
        .is_some_and(|c| c.as_bytes().starts_with(b"application/x-protobuf"));
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            [("content-type", "text/plain")],
            b"not an ExportTraceServiceRequest".to_vec(),
        );
    };
    if !protobuf {
        return (
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [("content-type", "text/plain")],
            b"want application/x-protobuf".to_vec(),
        );
    }
    collector.keep(request);
    *collector.posts.lock().expect("posts") += 1;
    let answer = ExportTraceServiceResponse {
        partial_success: None,
    };
    (
        axum::http::StatusCode::OK,
        [("content-type", "application/x-protobuf")],
        answer.encode_to_vec(),
    )
}

/// The running receiver; stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    collector: Collector,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], super::free_port()));
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve(addr)
                .await;
        });
        assert!(
            super::wait_listening(addr).await,
            "otlp receiver did not listen"
        );
        Self {
            addr,
            collector,
            task,
        }
    }

    /// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) instead.
    pub async fn start_http() -> Self {
        let collector = Collector::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .with_state(collector.clone());
        let (addr, task) = super::serve_axum(app).await;
        Self {
            addr,
            collector,
            task,
        }
    }

    /// OTLP/HTTP export requests the receiver took.
    pub fn http_posts(&self) -> u64 {
        *self.collector.posts.lock().expect("posts")
    }

    /// `http://127.0.0.1:PORT`, for `tracing.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector.spans.lock().expect("spans").clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
