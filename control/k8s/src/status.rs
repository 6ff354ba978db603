//! Writing the FlyballAutoscaler's status through its `/status` subresource.

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::crd::{FlyballAutoscaler, FlyballAutoscalerStatus};
use crate::error::{self, Error};
use crate::scale::FIELD_MANAGER;

/// Replace `status` of `namespace/name` with a merge patch on `/status`. The whole status is
/// sent, so lists (conditions, pools) are replaced, never merged with stale entries.
pub async fn patch_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    status: &FlyballAutoscalerStatus,
) -> Result<FlyballAutoscaler, Error> {
    let api: Api<FlyballAutoscaler> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch_status(name, &params, &Patch::Merge(json!({ "status": status })))
        .await
        .map_err(|e| error::from_kube(&format!("FlyballAutoscaler {namespace}/{name}"), 1, e))
}

/// The status of `namespace/name` as the API server has it; `None` if it has none yet.
pub async fn get_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<FlyballAutoscalerStatus>, Error> {
    let api: Api<FlyballAutoscaler> = Api::namespaced(client.clone(), namespace);
    api.get(name)
        .await
        .map(|autoscaler| autoscaler.status)
        .map_err(|e| error::from_kube(&format!("FlyballAutoscaler {namespace}/{name}"), 1, e))
}
