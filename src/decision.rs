//! The typed result of deciding a request, raised deep in the engine and
//! mapped to each protocol once, in [`crate::respond`].

use crate::identity::Principal;

/// A stable, machine-readable reason. The string forms are part of the API:
/// clients see them in deny bodies and operators in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Allowed by policy.
    Allowed,
    /// No credential, and policy does not allow anonymous callers.
    MissingCredential,
    /// A credential was present but is not valid.
    InvalidCredential,
    /// A credential header carried several values (merged duplicates).
    AmbiguousCredential,
    /// A credential that is not even well-formed (refused unread).
    MalformedCredential,
    /// A credential past its expiry.
    ExpiredCredential,
    /// A credential that was revoked or disabled.
    RevokedCredential,
    /// Policy denied the request.
    PolicyDenied,
    /// Evaluating a policy raised an error, so the request is denied.
    PolicyError,
    /// No route matches the method and path.
    UnknownRoute,
    /// The path has an ambiguous form (`..`, `%2F`, `//`, `\`, …).
    AmbiguousPath,
    /// The body is not the JSON the route needs.
    MalformedBody,
    /// The resource the route names cannot be determined from the request
    /// (for example no `model` in the body).
    MissingResource,
    /// The request as the gateway sent it cannot be read.
    MalformedRequest,
    /// Tollgate cannot decide now (no policy loaded, internal fault).
    Unavailable,
    /// A quota rule has no room left.
    OverQuota,
    /// A token or dollar budget has no room for the request's estimated
    /// usage.
    OverBudget,
    /// A concurrency rule has no free slot: too many of the caller's
    /// requests are in flight.
    TooManyConcurrent,
    /// A budget applies but the request's usage cannot be estimated (no
    /// readable body, no `max_tokens`, or a model without a price), and the
    /// rule says to refuse such requests.
    UsageUnknown,
    /// The quota store could not answer in time.
    QuotaUnavailable,
    /// A bearer token whose `nbf` is still in the future (beyond the leeway).
    NotYetValid,
    /// A JWT that is not an access token: a `typ` the issuer does not accept,
    /// or an ID / refresh / logout token (RFC 8725 §3.11, RFC 9068).
    WrongTokenType,
    /// The request names its host more than once with different values
    /// (`Host: a,b`, or an absolute-form target disagreeing with `Host`).
    AmbiguousHost,
    /// A value from the credential (a claim, a key record field, a SPIFFE
    /// id) that Tollgate would pass on in a header is not a valid HTTP field
    /// value (RFC 9110 §5.5): CR, LF, NUL or another control character.
    InvalidClaim,
    /// The request names its model in several places (body, query, path,
    /// header) with different values.
    AmbiguousModel,
    /// A numeric request parameter (`max_tokens` and its aliases, `n`) is
    /// outside its documented range, not an integer, or given twice with
    /// different values.
    InvalidParameter,
    /// The request's estimated input tokens plus its `max_tokens` (or the
    /// model's default output) exceed the model's context window
    /// (`usage.models.*.context_window`).
    ContextWindowExceeded,
    /// The stored API key record has a field that does not parse; the key
    /// is refused until the record is fixed.
    InvalidKeyRecord,
    /// A forward-auth request carries a forwarded-request header
    /// (`X-Original-*`, `X-Forwarded-Method`/`-Uri`/`-Host`) that the
    /// listener does not trust (`server.forward_auth_trust`).
    UntrustedForwardedHeader,
    /// A forward-auth request lacks a forwarded-request header the trusted
    /// convention requires, or carries it twice.
    MissingForwardedHeader,
    /// The request's source (client address, key id from that address, or
    /// JWT subject from that address) failed authentication too often and
    /// is refused for a cool-down (`identity.lockout`).
    LockedOut,
    /// The credential is valid but may not be used from the client's
    /// address (the key record's `allowed_cidrs`).
    SourceNotAllowed,
    /// An MCP request that is not a well-formed JSON-RPC request (not an
    /// object, no `method`, a repeated key, a method differing from a known
    /// one only in case, a cut body).
    MalformedMcp,
    /// A JSON-RPC batch (an array) on an MCP endpoint.
    McpBatchRefused,
    /// The `Mcp-Method`, `Mcp-Name` or `Mcp-Param-*` headers disagree with
    /// the body, or one the protocol revision requires is missing.
    McpHeaderMismatch,
    /// A `tools/call` names a tool that is not a valid MCP tool name
    /// (control characters, `::`, `/`, empty, over 128 bytes).
    InvalidToolName,
    /// Tool arguments that are too large, too deep, or do not match the
    /// tool's declared input type.
    InvalidArguments,
    /// A tool or MCP method the server's Cedar schema does not declare.
    UnknownTool,
    /// The caller's token lacks a scope the MCP endpoint requires.
    InsufficientScope,
    /// The bearer token's `aud` does not name the MCP endpoint's resource
    /// (RFC 8707; MCP authorization: tokens are issued for one resource).
    WrongAudience,
    /// The request offers a tool (`tools` / `functions`) the caller may not
    /// offer (`offer_tool`); the deny names the tool.
    ToolForbidden,
    /// A caller-context header that does not verify: malformed, another
    /// algorithm, unknown or retired key, bad signature, expired, repeated.
    InvalidCallerContext,
    /// A caller context used more often than `max_uses`, or presented
    /// without the mTLS identity of an agent runtime.
    CallerContextRefused,
    /// A service presented a user's token but is not among
    /// `agents.token_carriers`.
    TokenCarrierNotAllowed,
}

impl Reason {
    /// The stable reason code.
    pub fn code(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::MissingCredential => "missing_credential",
            Self::InvalidCredential => "invalid_credential",
            Self::AmbiguousCredential => "ambiguous_credential",
            Self::MalformedCredential => "malformed_credential",
            Self::ExpiredCredential => "expired_credential",
            Self::RevokedCredential => "revoked_credential",
            Self::PolicyDenied => "policy_denied",
            Self::PolicyError => "policy_error",
            Self::UnknownRoute => "unknown_route",
            Self::AmbiguousPath => "ambiguous_path",
            Self::MalformedBody => "malformed_body",
            Self::MissingResource => "missing_resource",
            Self::MalformedRequest => "malformed_request",
            Self::Unavailable => "unavailable",
            Self::OverQuota => "over_quota",
            Self::OverBudget => "over_budget",
            Self::TooManyConcurrent => "too_many_concurrent",
            Self::UsageUnknown => "usage_unknown",
            Self::QuotaUnavailable => "quota_unavailable",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongTokenType => "wrong_token_type",
            Self::AmbiguousHost => "ambiguous_host",
            Self::InvalidClaim => "invalid_claim",
            Self::AmbiguousModel => "ambiguous_model",
            Self::InvalidParameter => "invalid_parameter",
            Self::ContextWindowExceeded => "context_window_exceeded",
            Self::InvalidKeyRecord => "invalid_key_record",
            Self::UntrustedForwardedHeader => "untrusted_forwarded_header",
            Self::MissingForwardedHeader => "missing_forwarded_header",
            Self::LockedOut => "locked_out",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::MalformedMcp => "malformed_mcp",
            Self::McpBatchRefused => "mcp_batch_refused",
            Self::McpHeaderMismatch => "mcp_header_mismatch",
            Self::InvalidToolName => "invalid_tool_name",
            Self::InvalidArguments => "invalid_arguments",
            Self::UnknownTool => "unknown_tool",
            Self::InsufficientScope => "insufficient_scope",
            Self::WrongAudience => "wrong_audience",
            Self::ToolForbidden => "tool_forbidden",
            Self::InvalidCallerContext => "invalid_caller_context",
            Self::CallerContextRefused => "caller_context_refused",
            Self::TokenCarrierNotAllowed => "token_carrier_not_allowed",
        }
    }
}

/// What was decided, by kind: each maps to one HTTP status and gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    /// No or bad credential: 401.
    Unauthenticated(Reason),
    /// Authenticated (or anonymous) but not allowed: 403.
    Forbidden(Reason),
    /// The request itself is malformed or ambiguous: 400.
    Invalid(Reason),
    /// Tollgate cannot decide: 503, and never an allow.
    Unavailable(Reason),
    /// Allowed by policy but over a quota: 429.
    OverQuota(Reason),
    /// Tollgate cannot decide and the operator chose to let the gateway's
    /// own failure setting apply: the RPC fails with UNAVAILABLE.
    Defer(Reason),
}

impl Outcome {
    /// Whether the request may proceed.
    pub fn is_allow(self) -> bool {
        matches!(self, Self::Allow)
    }

    /// The reason code behind the outcome.
    pub fn reason(self) -> Reason {
        match self {
            Self::Allow => Reason::Allowed,
            Self::Unauthenticated(r)
            | Self::Forbidden(r)
            | Self::Invalid(r)
            | Self::Unavailable(r)
            | Self::OverQuota(r)
            | Self::Defer(r) => r,
        }
    }

    /// `allow` or `deny`, for logs and metrics.
    pub fn verdict(self) -> &'static str {
        if self.is_allow() { "allow" } else { "deny" }
    }
}

/// A Cedar evaluation error, attributed to the policy that raised it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrorInfo {
    pub policy_id: String,
    pub message: String,
}

/// The quota counter a decision reports (the most restrictive one), for
/// `RateLimit` headers and `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaReport {
    /// Rule name (or limit path) of the counter.
    pub rule: String,
    pub limit: u64,
    pub remaining: u64,
    pub reset: std::time::Duration,
    pub unit_secs: u64,
}

/// Everything decided about one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub request_id: String,
    pub outcome: Outcome,
    /// Who the caller is, when authentication got that far.
    pub principal: Option<Principal>,
    /// Cedar action and resource UIDs, when the route resolved.
    pub action: Option<String>,
    pub resource: Option<String>,
    /// Ids of the policies that determined the decision.
    pub policies: Vec<String>,
    pub errors: Vec<PolicyErrorInfo>,
    /// Version of the policy snapshot that decided.
    pub policy_version: String,
    /// The quota counter to report, when quotas were charged or refused.
    pub quota: Option<QuotaReport>,
    /// Allowed only because the quota store failed and the limit's failure
    /// mode is `allow` (nothing was counted).
    pub quota_fail_open: bool,
    /// The model the request names, when the engine read one.
    pub model: Option<String>,
    /// The W3C trace id (32 hex digits) of the decision's span, or of the
    /// caller's `traceparent` when tracing is off; see [`crate::telemetry`].
    pub trace_id: Option<String>,
    /// What the shadow policy set would have decided, when it disagrees
    /// with the live set (see [`crate::policy::shadow`]).
    pub shadow: Option<crate::policy::shadow::ShadowVerdict>,
    /// The request's estimated usage, when the engine estimated it (a
    /// catalog or a budget needs it); computed once per request.
    pub estimate: Option<crate::usage::Estimate>,
    /// Set when the request went to an MCP endpoint: denials are then
    /// JSON-RPC errors.
    pub mcp: Option<crate::mcp::McpFacts>,
    /// Agent facts: the tool a deny names, the caller context to issue,
    /// the agent / via identities of a hop (see [`crate::agents`]).
    pub agent: crate::agents::AgentFacts,
}

impl Decision {
    /// A decision reached before any policy was consulted.
    pub fn early(request_id: String, outcome: Outcome, policy_version: String) -> Self {
        Self {
            request_id,
            outcome,
            principal: None,
            action: None,
            resource: None,
            policies: Vec::new(),
            errors: Vec::new(),
            policy_version,
            quota: None,
            quota_fail_open: false,
            model: None,
            trace_id: None,
            shadow: None,
            estimate: None,
            mcp: None,
            agent: Default::default(),
        }
    }
}
