#![forbid(unsafe_code)]
//! flyball's Kubernetes side: the only code that writes to the cluster.
//!
//! Input: scaling decisions and status from the control service. Output: API calls through a
//! `kube::Client`.
//!
//! decision -> [`ScaleClient::set_replicas`] (PATCH `/scale`) -> [`ScaleEvents`] + [`patch_status`]
//!
//! Also here: reading replicas ([`ScaleClient::get_scale`]), spotting HPAs on the same target,
//! leader election on a Lease ([`LeaderElection`]), the `FlyballAutoscaler` CRD and its YAML,
//! and the RBAC rules all of this needs ([`rbac::RULES`]).
//!
//! It never writes anything but `spec.replicas` through `/scale` to a workload, never retries
//! a Forbidden, NotFound or Invalid answer, and never panics on what the API server returns.

pub mod crd;
mod error;
pub mod events;
pub mod lease;
pub mod rbac;
mod retry;
mod scale;
pub mod status;
mod target;

pub use crd::{
    FlyballAutoscaler, FlyballAutoscalerSpec, FlyballAutoscalerStatus, LastDecisionStatus,
    PoolStatus, crd_yaml,
};
pub use error::{Error, TransientCause};
pub use events::ScaleEvents;
pub use lease::{LeaderElection, LeaseConfig};
pub use retry::{RetryPolicy, SleepFn, backoff};
pub use scale::{
    FIELD_MANAGER, HpaConflict, ScaleClient, ScaleObservation, ScaleWrite, hpa_targets,
};
pub use status::{get_status, patch_status};
pub use target::ScaleTargetRef;
