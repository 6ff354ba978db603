//! `metav1.Status` failure bodies, worded as the real API server words them.
//!
//! Messages follow `k8s.io/apimachinery/pkg/api/errors` (`NewNotFound`, `NewConflict`,
//! `NewForbidden`, ...), so code that matches on `reason`, `code` or `details` behaves the same
//! against the fake and against a cluster.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// A failed request: status code plus the `Status` body sent with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

// === impl ApiError ===

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String, details: Option<Value>) -> Self {
        Self {
            code,
            reason,
            message,
            details,
        }
    }

    fn details(rt: &ResourceType, name: &str) -> Value {
        let mut d = json!({"group": rt.group, "kind": rt.plural});
        if !name.is_empty() {
            d["name"] = json!(name);
        }
        d
    }

    /// `deployments.apps "x" not found`
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", rt.qualified()),
            Some(Self::details(rt, name)),
        )
    }

    /// `namespaces "x" not found`, for writes into a namespace that does not exist.
    pub fn namespace_not_found(ns: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("namespaces {ns:?} not found"),
            Some(json!({"name": ns, "kind": "namespaces"})),
        )
    }

    /// A path nothing is served at.
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(json!({})),
        )
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", rt.qualified()),
            Some(Self::details(rt, name)),
        )
    }

    /// Optimistic-concurrency failure (stale `resourceVersion`).
    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again",
                rt.qualified()
            ),
            Some(Self::details(rt, name)),
        )
    }

    /// Server-side apply field conflict.
    pub fn apply_conflict(message: String, fields: &[(String, String)]) -> Self {
        let causes: Vec<Value> = fields
            .iter()
            .map(|(manager, field)| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with {manager:?}"),
                    "field": field,
                })
            })
            .collect();
        Self::new(409, "Conflict", message, Some(json!({"causes": causes})))
    }

    /// RBAC denial, as the authorizer phrases it.
    pub fn forbidden(
        user: &str,
        verb: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: &str,
    ) -> Self {
        let resource = match subresource {
            Some(sub) => format!("{}/{sub}", rt.plural),
            None => rt.plural.clone(),
        };
        let subject = if name.is_empty() {
            rt.qualified()
        } else {
            format!("{} {name:?}", rt.qualified())
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_string(),
        };
        Self::new(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User {user:?} cannot {verb} resource {resource:?} \
                 in API group {:?} {scope}",
                rt.group
            ),
            Some(Self::details(rt, name)),
        )
    }

    /// 422 for a field that fails validation.
    /// `kind` is the qualified kind (`Scale.autoscaling`, `Deployment.apps`).
    pub fn invalid(kind: &str, group: &str, name: &str, field: &str, detail: String) -> Self {
        let short_kind = kind.split('.').next().unwrap_or(kind);
        Self::new(
            422,
            "Invalid",
            format!("{kind} {name:?} is invalid: {field}: {detail}"),
            Some(json!({
                "name": name,
                "group": group,
                "kind": short_kind,
                "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}],
            })),
        )
    }

    /// 422 that is not about one field (a failed JSON patch `test`, ...).
    pub fn unprocessable(message: String) -> Self {
        Self::new(422, "Invalid", message, None)
    }

    /// 410 for a watch from a resourceVersion whose history is gone
    /// (`too old resource version: N (M)`).
    pub fn expired(message: String) -> Self {
        Self::new(410, "Expired", message, None)
    }

    pub fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message, None)
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
            Some(
                json!({"causes": [{"reason": "UnexpectedServerResponse", "message": content_type}]}),
            ),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            Some(json!({})),
        )
    }

    /// 500 as `apierrors.NewInternalError`.
    pub fn internal(message: &str) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
            Some(json!({"causes": [{"message": message}]})),
        )
    }

    /// The answer for an injected fault with this status code.
    pub fn injected(code: u16) -> Self {
        match code {
            429 => Self::new(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later"
                    .into(),
                Some(json!({"retryAfterSeconds": 1})),
            ),
            503 => Self::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request".into(),
                Some(json!({})),
            ),
            504 => Self::new(
                504,
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still \
                 be processing the request"
                    .into(),
                Some(json!({})),
            ),
            500 => Self::internal("injected fault"),
            other => Self::new(
                other,
                "InternalError",
                format!("injected fault with status {other}"),
                Some(json!({})),
            ),
        }
    }

    /// The JSON `Status` body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            body["details"] = d.clone();
        }
        body
    }
}
