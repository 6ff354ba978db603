//! Kubernetes Events for each replica change and each refusal, on the FlyballAutoscaler (so
//! `kubectl describe fba` shows them) with the scaled workload as the related object.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::error::{self, Error};
use crate::scale::HpaConflict;
use crate::target::ScaleTargetRef;

/// `reportingController` of every event flyball writes.
pub const REPORTING_CONTROLLER: &str = "flyball.dev/control";

/// Reasons, CamelCase as Kubernetes events use them.
pub const REASON_SCALED_UP: &str = "ScaledUp";
pub const REASON_SCALED_DOWN: &str = "ScaledDown";
pub const REASON_SCALE_REFUSED: &str = "ScaleRefused";
/// A HorizontalPodAutoscaler scales the same target.
pub const REASON_HPA_CONFLICT: &str = "HPAConflict";
/// The one action flyball takes.
pub const ACTION_SCALE: &str = "Scale";

/// `events.k8s.io/v1` caps `note` at 1 KiB; longer notes are rejected as invalid.
const MAX_NOTE_BYTES: usize = 1024;

fn truncate(note: String) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// Writes flyball's events. Repeats of the same event within kube's cache window become a
/// series (one object, a count) rather than new objects.
#[derive(Clone)]
pub struct ScaleEvents {
    recorder: Recorder,
}

impl std::fmt::Debug for ScaleEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleEvents").finish_non_exhaustive()
    }
}

// === impl ScaleEvents ===

impl ScaleEvents {
    /// `instance` is this replica of the control service (the pod name).
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_string(),
            instance: Some(instance.to_string()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    async fn publish(&self, event: Event, regarding: &ObjectReference) -> Result<(), Error> {
        let what = format!(
            "Event {} on {}/{}",
            event.reason,
            regarding.namespace.as_deref().unwrap_or(""),
            regarding.name.as_deref().unwrap_or("")
        );
        self.recorder
            .publish(&event, regarding)
            .await
            .map_err(|e| error::from_kube(&what, 1, e))
    }

    /// `target` went from `from` to `to` replicas because of `reason`.
    pub async fn scaled(
        &self,
        autoscaler: &ObjectReference,
        target: &ScaleTargetRef,
        from: u32,
        to: u32,
        reason: &str,
    ) -> Result<(), Error> {
        let event = Event {
            type_: EventType::Normal,
            reason: if to >= from {
                REASON_SCALED_UP
            } else {
                REASON_SCALED_DOWN
            }
            .to_string(),
            note: Some(truncate(format!(
                "scaled {target} from {from} to {to}: {reason}"
            ))),
            action: ACTION_SCALE.to_string(),
            secondary: Some(target.object_reference()),
        };
        self.publish(event, autoscaler).await
    }

    /// flyball wanted `wanted` replicas of `target` but could not or would not set them.
    pub async fn refused(
        &self,
        autoscaler: &ObjectReference,
        target: &ScaleTargetRef,
        wanted: u32,
        why: &str,
    ) -> Result<(), Error> {
        let event = Event {
            type_: EventType::Warning,
            reason: REASON_SCALE_REFUSED.to_string(),
            note: Some(truncate(format!(
                "did not scale {target} to {wanted}: {why}"
            ))),
            action: ACTION_SCALE.to_string(),
            secondary: Some(target.object_reference()),
        };
        self.publish(event, autoscaler).await
    }

    /// `hpa` scales `target` too: the two will undo each other's changes.
    pub async fn hpa_conflict(
        &self,
        autoscaler: &ObjectReference,
        target: &ScaleTargetRef,
        hpa: &HpaConflict,
    ) -> Result<(), Error> {
        let event = Event {
            type_: EventType::Warning,
            reason: REASON_HPA_CONFLICT.to_string(),
            note: Some(truncate(format!(
                "HorizontalPodAutoscaler {}/{} also scales {target}; it and flyball will undo \
                 each other's changes to spec.replicas",
                hpa.namespace, hpa.name
            ))),
            action: ACTION_SCALE.to_string(),
            secondary: Some(target.object_reference()),
        };
        self.publish(event, autoscaler).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn long_notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_NOTE_BYTES);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }
}
