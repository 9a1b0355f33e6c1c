//! The brute-force lockout around authentication ([`crate::identity::lockout`]).

use super::Engine;
use crate::decision::{Outcome, QuotaReport, Reason};
use crate::identity::Principal;
use crate::identity::lockout::Refusal;
use crate::request::HttpRequest;
use crate::routes::RouteMatch;

impl Engine {
    /// [`Self::authenticate`] behind the brute-force lockout, when one is
    /// attached: a locked source is refused before its credential is
    /// verified (429 `locked_out`, with the lock as the reported counter,
    /// `lockout:<kind>`), and a refused credential is counted.
    pub(super) async fn guarded_authenticate(
        &self,
        request: &HttpRequest,
        matched: Option<&RouteMatch<'_>>,
    ) -> Result<Principal, (Outcome, Option<QuotaReport>)> {
        let Some(lockout) = self.lockout.get().filter(|_| presents_credential(request)) else {
            return self
                .authenticate(request, matched)
                .await
                .map_err(|o| (o, None));
        };
        match lockout.check(request).await {
            Ok(()) => {}
            Err(Refusal::StoreFailed) => {
                return Err((Outcome::Unavailable(Reason::QuotaUnavailable), None));
            }
            Err(Refusal::Locked(lock)) => {
                let report = QuotaReport {
                    rule: format!("lockout:{}", lock.kind.label()),
                    limit: lock.limit,
                    remaining: 0,
                    reset: lock.retry_after,
                    unit_secs: lock.retry_after.as_secs().max(1),
                };
                return Err((Outcome::OverQuota(Reason::LockedOut), Some(report)));
            }
        }
        let result = self.authenticate(request, matched).await;
        if let Err(Outcome::Unauthenticated(reason)) = result {
            lockout.failed(request, reason).await;
        }
        result.map_err(|o| (o, None))
    }
}

/// Whether the request carries a credential header (the requests a
/// lockout guards; anonymous requests authenticate nothing).
fn presents_credential(request: &HttpRequest) -> bool {
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"]
        .iter()
        .any(|h| request.header(h).is_some())
}
