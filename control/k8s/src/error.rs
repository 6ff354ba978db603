//! The one error type of this crate. Variant names double as metric labels
//! ([`Error::metric_label`]), so a dashboard can tell "RBAC is missing" from "the API server
//! is flaky" without parsing messages.

use std::time::Duration;

/// Why a call to the Kubernetes API failed, after any retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server does not serve this `apiVersion`/`kind` (CRD not installed, typo).
    #[error("{target}: the API server does not serve this kind: {source}")]
    KindNotServed {
        target: String,
        #[source]
        source: kube::Error,
    },

    /// The kind is served but has no `/scale` subresource, so flyball cannot size it.
    #[error("{target}: the kind has no /scale subresource")]
    NoScaleSubresource { target: String },

    /// The object does not exist. Not retried.
    #[error("{target}: not found")]
    NotFound {
        target: String,
        #[source]
        source: kube::Error,
    },

    /// RBAC refused the call. Not retried: only a changed Role can fix it.
    #[error("{target}: forbidden: {message}")]
    Forbidden {
        target: String,
        message: String,
        #[source]
        source: kube::Error,
    },

    /// 409 Conflict on every one of `attempts` tries: someone else keeps writing.
    #[error("{target}: conflict on each of {attempts} attempts")]
    Conflict {
        target: String,
        attempts: u32,
        #[source]
        source: kube::Error,
    },

    /// The API server rejected the request as invalid (400, 415, 422). Not retried.
    #[error("{target}: rejected as invalid: {message}")]
    Invalid {
        target: String,
        message: String,
        #[source]
        source: kube::Error,
    },

    /// 429, 5xx, transport failures or no answer in time, on each of `attempts` tries.
    #[error("{target}: transient failure on each of {attempts} attempts, last: {source}")]
    Transient {
        target: String,
        attempts: u32,
        #[source]
        source: TransientCause,
    },

    /// Any other answer (an unexpected status code, an undecodable body).
    #[error("{target}: {source}")]
    Api {
        target: String,
        #[source]
        source: kube::Error,
    },

    /// The leader-election lease could not be set up or released.
    #[error("lease {lease}: {source}")]
    Lease {
        lease: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },

    /// The election's background task panicked or was cancelled.
    #[error("lease {lease}: the election task ended abnormally: {message}")]
    ElectionTask { lease: String, message: String },

    /// A configuration value this crate checks itself (lease timings, ...).
    #[error("{field} = {value}: {rule}")]
    Config {
        field: &'static str,
        value: String,
        rule: &'static str,
    },

    /// Rendering the CRD to YAML failed.
    #[error("rendering the CRD: {0}")]
    CrdRender(#[source] serde_yaml_ng::Error),
}

/// The last failure behind [`Error::Transient`].
#[derive(Debug, thiserror::Error)]
pub enum TransientCause {
    #[error(transparent)]
    Kube(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

// === impl Error ===

impl Error {
    /// A stable snake_case label for metrics (`flyball_k8s_errors_total{error="forbidden"}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::KindNotServed { .. } => "kind_not_served",
            Error::NoScaleSubresource { .. } => "no_scale_subresource",
            Error::NotFound { .. } => "not_found",
            Error::Forbidden { .. } => "forbidden",
            Error::Conflict { .. } => "conflict",
            Error::Invalid { .. } => "invalid",
            Error::Transient { .. } => "transient",
            Error::Api { .. } => "api",
            Error::Lease { .. } => "lease",
            Error::ElectionTask { .. } => "election_task",
            Error::Config { .. } => "config",
            Error::CrdRender(_) => "crd_render",
        }
    }

    /// Worth trying again later (the next evaluation), as opposed to needing a human.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient { .. } | Error::Conflict { .. })
    }
}

/// How the retry loop treats a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Conflict,
    Transient,
    NotFound,
    Forbidden,
    Invalid,
    Other,
}

pub(crate) fn classify(e: &kube::Error) -> Class {
    match e {
        kube::Error::Api(s) => match s.code {
            409 if s.reason == "Conflict" => Class::Conflict,
            // 409 AlreadyExists and friends are not races to retry.
            409 => Class::Other,
            404 => Class::NotFound,
            403 => Class::Forbidden,
            400 | 415 | 422 => Class::Invalid,
            429 | 500 | 502 | 503 | 504 => Class::Transient,
            _ => Class::Other,
        },
        // The connection failed or broke: the request may not have arrived.
        kube::Error::HyperError(_) | kube::Error::Service(_) => Class::Transient,
        _ => Class::Other,
    }
}

/// Turn a final failure into the variant its class names.
pub(crate) fn from_kube(target: &str, attempts: u32, e: kube::Error) -> Error {
    let target = target.to_string();
    let message = match &e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    };
    match classify(&e) {
        Class::Conflict => Error::Conflict {
            target,
            attempts,
            source: e,
        },
        Class::Transient => Error::Transient {
            target,
            attempts,
            source: TransientCause::Kube(e),
        },
        Class::NotFound => Error::NotFound { target, source: e },
        Class::Forbidden => Error::Forbidden {
            target,
            message,
            source: e,
        },
        Class::Invalid => Error::Invalid {
            target,
            message,
            source: e,
        },
        Class::Other => Error::Api { target, source: e },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("m", reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn already_exists_is_not_a_retryable_conflict() {
        assert_eq!(classify(&api(409, "AlreadyExists")), Class::Other);
        assert_eq!(classify(&api(409, "Conflict")), Class::Conflict);
    }

    #[test]
    fn server_side_failures_are_transient_and_client_mistakes_are_not() {
        for code in [429, 500, 502, 503, 504] {
            assert_eq!(classify(&api(code, "x")), Class::Transient, "{code}");
        }
        for code in [400, 415, 422] {
            assert_eq!(classify(&api(code, "x")), Class::Invalid, "{code}");
        }
    }

    #[test]
    fn metric_labels_name_the_variant() {
        let e = from_kube("Deployment default/x", 1, api(403, "Forbidden"));
        assert_eq!(e.metric_label(), "forbidden");
        assert!(!e.is_transient());
        let e = from_kube("Deployment default/x", 3, api(503, "ServiceUnavailable"));
        assert_eq!(e.metric_label(), "transient");
        assert!(e.is_transient());
    }
}
