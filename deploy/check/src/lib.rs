#![forbid(unsafe_code)]
//! Checks for what users apply from `deploy/`: the mesh and gateway manifests, the KEDA example,
//! the `FlyballAutoscaler` examples and the Helm chart.
//!
//! YAML files -> [`manifest::load`] -> documents -> [`crd::Registry`] (upstream CRD schemas and
//! flyball's own) or [`builtin::check`] (Kubernetes' own kinds, typed by k8s-openapi) -> errors
//! named by file, document and field. The chart goes through [`helm::Chart::render`] first: no `helm`
//! binary is needed, only the few template constructs the chart uses.
//!
//! The tests in `tests/` are the point of the crate; the library holds what they share. It never
//! touches the network or a cluster. Upstream schemas come from `../shared/schemas` beside the
//! repository root ([`paths::shared_schemas`]); checks that need them skip, saying so, when that
//! folder is absent.

pub mod builtin;
pub mod crd;
pub mod helm;
pub mod manifest;
pub mod paths;
