//! What a test controls and observes: verbs, the RBAC table, injected faults, the request log.

use std::time::Duration;

use serde_json::Value;

/// A Kubernetes authorization verb, as RBAC rules name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

// === impl Verb ===

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }

    /// Parse an RBAC verb (`"patch"`); `None` for verbs the fake never sees.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "get" => Verb::Get,
            "list" => Verb::List,
            "watch" => Verb::Watch,
            "create" => Verb::Create,
            "update" => Verb::Update,
            "patch" => Verb::Patch,
            "delete" => Verb::Delete,
            "deletecollection" => Verb::DeleteCollection,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One allow rule, shaped like an RBAC `PolicyRule` with a single group.
/// `resource` may name a subresource (`deployments/scale`); `"*"` matches anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbacRule {
    pub group: String,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    /// `resourceNames`: empty for any object. As the real authorizer applies them, a rule that
    /// names objects matches only requests for one of them by name, so never a `create` (its
    /// object has no name in the path yet) nor a `list` or collection `watch`.
    pub resource_names: Vec<String>,
}

// === impl RbacRule ===

impl RbacRule {
    pub fn new(group: &str, resources: &[&str], verbs: &[&str]) -> Self {
        Self {
            group: group.to_string(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            resource_names: Vec::new(),
        }
    }

    /// The same rule, for these objects only.
    pub fn named(mut self, names: &[&str]) -> Self {
        self.resource_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `name`: the object the request names in its path, if any.
    pub(crate) fn allows(
        &self,
        verb: Verb,
        group: &str,
        resource: &str,
        name: Option<&str>,
    ) -> bool {
        (self.group == "*" || self.group == group)
            && self.resources.iter().any(|r| r == "*" || r == resource)
            && self.verbs.iter().any(|v| v == "*" || v == verb.as_str())
            && (self.resource_names.is_empty()
                || name.is_some_and(|n| self.resource_names.iter().any(|r| r == n)))
    }
}

/// Who may do what. Starts as allow-all (a cluster-admin client), narrowed by
/// [`crate::ApiServer::deny`] and [`crate::ApiServer::allow_only`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Rbac {
    pub allow_only: Option<Vec<RbacRule>>,
    pub denied: Vec<(Verb, String, String)>,
}

impl Rbac {
    /// `resource` includes the subresource (`deployments/scale`); `name` is the object the
    /// request names in its path, if any.
    pub fn allows(&self, verb: Verb, group: &str, resource: &str, name: Option<&str>) -> bool {
        if self
            .denied
            .iter()
            .any(|(v, g, r)| *v == verb && g == group && r == resource)
        {
            return false;
        }
        match &self.allow_only {
            None => true,
            Some(rules) => rules.iter().any(|r| r.allows(verb, group, resource, name)),
        }
    }
}

/// What an injected fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FaultAction {
    /// Answer with this status code and a `Status` body (500 InternalError, 503, 504, 429).
    Status(u16),
    /// Answer 409 Conflict ("the object has been modified").
    Conflict,
    /// Hold the request this long, then answer 504 Timeout without touching any object.
    Stall(Duration),
}

#[derive(Clone, Debug)]
pub(crate) struct Fault {
    pub verb: Option<Verb>,
    pub path_prefix: String,
    pub remaining: usize,
    pub action: FaultAction,
}

impl Fault {
    pub fn matches(&self, verb: Verb, path: &str) -> bool {
        self.remaining > 0
            && self.verb.is_none_or(|v| v == verb)
            && path.starts_with(&self.path_prefix)
    }
}

/// One request as the server received it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// `GET`, `PATCH`, ...
    pub method: String,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body parsed as JSON (or YAML, for apply patches); `None` when empty or unparseable.
    pub body: Option<Value>,
    /// The status code answered; `None` while the request is still being served.
    pub status: Option<u16>,
    /// The authorization verb the request was checked against.
    pub verb: Verb,
    /// When the server got it: how long after a cause (a load step, say) its effect arrived.
    pub received_at: std::time::Instant,
}

// === impl RecordedRequest ===

impl RecordedRequest {
    /// The decoded value of query parameter `key`.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
    }

    /// True for `method` at exactly `path`.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// [`crate::ApiServer::wait_for`] gave up.
#[derive(Debug, thiserror::Error)]
#[error("waited {waited:?} for {what}; {seen} requests recorded: {log}")]
pub struct WaitTimeout {
    pub what: String,
    pub waited: Duration,
    pub seen: usize,
    /// One line per recorded request, to show what happened instead.
    pub log: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn req(query: &str) -> RecordedRequest {
        RecordedRequest {
            method: "PATCH".into(),
            path: "/x".into(),
            query: Some(query.into()),
            content_type: None,
            body: None,
            status: None,
            verb: Verb::Patch,
            received_at: std::time::Instant::now(),
        }
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let r = req("fieldManager=kube%2Dlease&force=true");
        assert_eq!(r.query_param("fieldManager").as_deref(), Some("kube-lease"));
        assert_eq!(r.query_param("force").as_deref(), Some("true"));
        assert_eq!(r.query_param("dryRun"), None);
    }

    #[test]
    fn a_trailing_percent_is_kept_literally() {
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
    }

    #[test]
    fn deny_wins_over_allow_only() {
        let rbac = Rbac {
            allow_only: Some(vec![RbacRule::new("apps", &["deployments/scale"], &["*"])]),
            denied: vec![(Verb::Patch, "apps".into(), "deployments/scale".into())],
        };
        assert!(rbac.allows(Verb::Get, "apps", "deployments/scale", Some("a")));
        assert!(!rbac.allows(Verb::Patch, "apps", "deployments/scale", Some("a")));
        assert!(!rbac.allows(Verb::Get, "apps", "deployments", Some("a")));
    }

    #[test]
    fn a_rule_with_resource_names_reaches_only_those_objects_by_name() {
        let rbac = Rbac {
            allow_only: Some(vec![
                RbacRule::new(
                    "coordination.k8s.io",
                    &["leases"],
                    &["get", "patch", "create"],
                )
                .named(&["mine"]),
            ]),
            denied: Vec::new(),
        };
        let group = "coordination.k8s.io";
        assert!(rbac.allows(Verb::Get, group, "leases", Some("mine")));
        assert!(rbac.allows(Verb::Patch, group, "leases", Some("mine")));
        assert!(!rbac.allows(Verb::Patch, group, "leases", Some("theirs")));
        // A create names no object in its path, a list none either.
        assert!(!rbac.allows(Verb::Create, group, "leases", None));
        assert!(!rbac.allows(Verb::List, group, "leases", None));
    }
}
