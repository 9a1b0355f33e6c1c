//! OpenTelemetry tracing of decisions (`[tracing]` in the config).
//!
//! Each decision is one span tree — `tollgate.decision` with children
//! `tollgate.identity`, `tollgate.policy`, `tollgate.quota` and
//! `tollgate.store` (one per quota store round trip) — exported over OTLP
//! when `tracing.otlp_endpoint` is set: OTLP/gRPC by default, OTLP/HTTP with
//! protobuf bodies when `tracing.otlp_protocol = "http/protobuf"`
//! (<https://opentelemetry.io/docs/specs/otlp/#otlphttp>). A caller's W3C `traceparent`
//! (<https://www.w3.org/TR/trace-context/>) — an HTTP header for ext_authz
//! and forward-auth, gRPC metadata for `tollgate.v1` — becomes the parent of
//! the decision span, so Tollgate's spans join the gateway's trace.
//!
//! The spans are `tracing` spans with target [`TARGET`]. Only the OTLP layer
//! subscribes to that target (the log layer filters it out), so without
//! `[tracing]` no subscriber is interested in it, every span macro returns a
//! disabled span after one cached check, and tracing costs nothing
//! measurable.
//!
//! The trace id reaches the decision log and the audit record either way:
//! from the exported span when tracing is on, else straight from the
//! caller's `traceparent`.

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::Deserialize;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span exported over OTLP.
pub const TARGET: &str = "tollgate::otel";

/// How spans travel to the collector (`tracing.otlp_protocol`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`TraceService/Export`), usually port 4317.
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP, protobuf bodies POSTed to `/v1/traces`, usually port
    /// 4318.
    #[serde(rename = "http/protobuf", alias = "http")]
    HttpProtobuf,
}

/// `[tracing]`: OpenTelemetry export. Off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector: `http://host:4317` for gRPC; for HTTP the URL spans
    /// are POSTed to, `http://host:4318/v1/traces` (a URL without a path
    /// gets `/v1/traces`). Unset: no spans are made.
    pub otlp_endpoint: Option<String>,
    /// `grpc` (the default) or `http/protobuf`.
    pub otlp_protocol: OtlpProtocol,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Fraction of root traces (requests without a `traceparent`) sampled,
    /// 0.0 to 1.0; a caller's `traceparent` sampled flag is followed.
    pub sample_ratio: f64,
    /// How long finished spans wait before a batch is sent (milliseconds).
    pub export_delay_ms: u64,
    /// Deadline of one export call (milliseconds).
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            service_name: "tollgate".into(),
            sample_ratio: 1.0,
            export_delay_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

/// Why the OTLP exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("tracing.sample_ratio must be between 0.0 and 1.0, got {0}")]
    SampleRatio(f64),
    #[error(
        "tracing.otlp_endpoint {endpoint:?}: {message}; give an http:// or https:// URL such as http://127.0.0.1:4317"
    )]
    Endpoint { endpoint: String, message: String },
}

impl TracingConfig {
    /// Checks the values a config file gave (at load time).
    pub fn check(&self) -> Result<(), TracingError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(TracingError::SampleRatio(self.sample_ratio));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let ok = url::Url::parse(endpoint)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if ok.is_none() {
                return Err(TracingError::Endpoint {
                    endpoint: endpoint.clone(),
                    message: "not an http(s) URL with a host".into(),
                });
            }
        }
        Ok(())
    }
}

/// The running exporter; dropping it flushes the spans still queued.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts the OTLP exporter for `config`, or `None` when tracing is off.
    /// Must run inside the Tokio runtime (the gRPC channel lives on it).
    pub fn start(config: &TracingConfig) -> Result<Option<Self>, TracingError> {
        config.check()?;
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let exporter = match config.otlp_protocol {
            OtlpProtocol::Grpc => builder
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(timeout)
                .build(),
            // The blocking reqwest client: the batch processor exports from
            // its own thread, outside the Tokio runtime.
            OtlpProtocol::HttpProtobuf => builder
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(http_traces_url(endpoint))
                .with_timeout(timeout)
                .build(),
        }
        .map_err(|e| TracingError::Endpoint {
            endpoint: endpoint.clone(),
            message: e.to_string(),
        })?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(config.export_delay_ms.max(1)))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        Ok(Some(Self { provider }))
    }

    /// The `tracing` layer that turns [`TARGET`] spans into OTLP spans.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tollgate"))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Sends what is still queued; bounded by export_timeout_ms.
        if let Err(e) = self.provider.shutdown() {
            eprintln!("tollgate: flushing trace spans failed: {e}");
        }
    }
}

/// The OTLP/HTTP traces URL for `endpoint`: as given when it has a path,
/// else with the specification's default path `/v1/traces`.
fn http_traces_url(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(url) if url.path() == "/" && url.query().is_none() => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_string(),
    }
}

/// A W3C trace id (32 lowercase hex digits, not all zero) and parent span id
/// from a `traceparent` value `00-<trace id>-<span id>-<flags>`; `None` for
/// anything else (a malformed value is ignored, never an error).
pub fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2))
        .then_some(())
        .filter(|()| nonzero(trace) && nonzero(span))
        .map(|()| (trace, span))
}

/// Makes `span` (a decision's root span) a child of the caller's
/// `traceparent`, when tracing is on and the value is valid.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let Some(value) = traceparent.filter(|v| parse_traceparent(v).is_some()) else {
        return;
    };
    use opentelemetry::propagation::TextMapPropagator;
    let carrier = std::collections::HashMap::from([("traceparent".to_string(), value.to_string())]);
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    // Only fails for a span already started elsewhere; ours is new.
    let _ = span.set_parent(parent);
}

/// The trace id a decision belongs to: its exported span's when tracing is
/// on, else the caller's `traceparent`'s; `None` without either.
pub fn trace_id(span: &Span, traceparent: Option<&str>) -> Option<String> {
    if !span.is_disabled() {
        let context = span.context();
        let id = context.span().span_context().trace_id();
        if id != opentelemetry::trace::TraceId::INVALID {
            return Some(id.to_string());
        }
    }
    traceparent
        .and_then(parse_traceparent)
        .map(|(trace, _)| trace.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_forms() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(good),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(parse_traceparent(&format!("01{}-x", &good[2..])).is_some());
    }

    #[test]
    fn trace_id_without_tracing_comes_from_the_header() {
        let span = tracing::info_span!(target: TARGET, "tollgate.decision");
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(&span, Some(good)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(&span, Some("garbage")), None);
        assert_eq!(trace_id(&span, None), None);
    }

    #[test]
    fn http_endpoints_get_the_traces_path() {
        assert_eq!(
            http_traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("https://c/otlp/v1/traces"),
            "https://c/otlp/v1/traces"
        );
        let config: TracingConfig =
            toml::from_str("otlp_protocol = \"http/protobuf\"\n").expect("http/protobuf");
        assert_eq!(config.otlp_protocol, OtlpProtocol::HttpProtobuf);
        assert!(toml::from_str::<TracingConfig>("otlp_protocol = \"udp\"\n").is_err());
    }

    #[test]
    fn config_bounds() {
        let bad = TracingConfig {
            sample_ratio: 1.5,
            ..TracingConfig::default()
        };
        assert!(bad.check().is_err());
        let bad = TracingConfig {
            otlp_endpoint: Some("localhost:4317".into()),
            ..TracingConfig::default()
        };
        assert!(bad.check().unwrap_err().to_string().contains("http://"));
        assert!(TracingConfig::default().check().is_ok());
    }
}
