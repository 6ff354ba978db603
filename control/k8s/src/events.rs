//! Kubernetes Events for each replica change and each refusal, on the FlyballAutoscaler (so
//! `kubectl describe fba` shows them) with the scaled workload as the related object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
/// The target's replicas cannot be read (it does not exist, or RBAC refuses its `/scale`).
pub const REASON_TARGET_UNREADABLE: &str = "TargetUnreadable";
/// The one action flyball takes.
pub const ACTION_SCALE: &str = "Scale";

/// `events.k8s.io/v1` caps `note` at 1 KiB; longer notes are rejected as invalid.
const MAX_NOTE_BYTES: usize = 1024;
/// ... and `reportingInstance` at 128 bytes. The instance is the replica's Lease identity
/// (`$POD_NAME@<advertise address>`), which a DNS advertise address can take past it.
const MAX_REPORTING_INSTANCE_BYTES: usize = 128;

fn truncate(note: String) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    let end = char_boundary_at_most(&note, MAX_NOTE_BYTES - '…'.len_utf8());
    format!("{}…", &note[..end])
}

/// The longest prefix of `instance` the API takes; the pod name comes first, so it survives.
fn reporting_instance(instance: &str) -> String {
    let end = char_boundary_at_most(instance, MAX_REPORTING_INSTANCE_BYTES);
    instance[..end].to_string()
}

fn char_boundary_at_most(s: &str, mut end: usize) -> usize {
    if end >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// How long kube's `Recorder` keeps an event to make repeats a series; past it a repeat is a
/// new Event anyway, so a series entry older than this is no longer worth keeping.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// At most this many series are tracked; beyond it the least recently published is forgotten
/// (its next repeat becomes a new Event rather than a count).
const MAX_SERIES: usize = 1024;

/// Writes flyball's events. An exact repeat (same note) within kube's cache window becomes a
/// series (one object, a count); an event whose note differs becomes a new object.
///
/// kube's `Recorder` keys its series on everything but the note and sends a repeat as a copy of
/// the first event, so "scaled from 4 to 6" would show as a second count of "from 2 to 4".
/// client-go keys on the note too. So each series gets a `Recorder` of its own, replaced by a
/// fresh one (whose empty cache creates a new Event) when the note changes.
#[derive(Clone)]
pub struct ScaleEvents {
    client: kube::Client,
    reporter: Reporter,
    series: Arc<Mutex<SeriesCache>>,
}

#[derive(Default)]
struct SeriesCache {
    by_key: HashMap<SeriesKey, Series>,
    /// Counts publications: the least recently used series is found by this rather than by
    /// `Instant`, which two quick publications may share on a coarse clock.
    publications: u64,
}

/// What kube's `Recorder` keys a series on, less the reporter (the same for all of ours).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: EventType,
    action: String,
    reason: String,
    regarding: ObjectKey,
    related: Option<ObjectKey>,
}

/// The fields of an `ObjectReference` kube's `Recorder` compares.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl From<&ObjectReference> for ObjectKey {
    fn from(r: &ObjectReference) -> Self {
        Self {
            api_version: r.api_version.clone(),
            kind: r.kind.clone(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
        }
    }
}

/// The recorder that published the last event of a series, and that event's note.
struct Series {
    note: Option<String>,
    recorder: Recorder,
    last_published: Instant,
    last_publication: u64,
}

impl std::fmt::Debug for ScaleEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScaleEvents").finish_non_exhaustive()
    }
}

// === impl ScaleEvents ===

impl ScaleEvents {
    /// `instance` is this replica of the control service (its Lease identity, pod name first);
    /// cut to the 128 bytes the API takes as `reportingInstance`.
    pub fn new(client: kube::Client, instance: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_string(),
            instance: Some(reporting_instance(instance)),
        };
        Self {
            client,
            reporter,
            series: Arc::default(),
        }
    }

    /// The recorder to publish `event` with: the one of its series when the note repeats, a
    /// fresh one (so a new Event) when it does not.
    fn recorder_for(&self, event: &Event, regarding: &ObjectReference) -> Recorder {
        let key = SeriesKey {
            type_: event.type_,
            action: event.action.clone(),
            reason: event.reason.clone(),
            regarding: regarding.into(),
            related: event.secondary.as_ref().map(ObjectKey::from),
        };
        let now = Instant::now();
        let mut cache = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        cache.publications += 1;
        let publication = cache.publications;
        let series = &mut cache.by_key;
        if let Some(known) = series.get_mut(&key)
            && known.note == event.note
        {
            known.last_published = now;
            known.last_publication = publication;
            return known.recorder.clone();
        }
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            series.retain(|_, s| now.duration_since(s.last_published) < SERIES_WINDOW);
            if series.len() >= MAX_SERIES
                && let Some(least_recent) = series
                    .iter()
                    .min_by_key(|(_, s)| s.last_publication)
                    .map(|(k, _)| k.clone())
            {
                series.remove(&least_recent);
            }
        }
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        series.insert(
            key,
            Series {
                note: event.note.clone(),
                recorder: recorder.clone(),
                last_published: now,
                last_publication: publication,
            },
        );
        recorder
    }

    async fn publish(&self, event: Event, regarding: &ObjectReference) -> Result<(), Error> {
        let what = format!(
            "Event {} on {}/{}",
            event.reason,
            regarding.namespace.as_deref().unwrap_or(""),
            regarding.name.as_deref().unwrap_or("")
        );
        self.recorder_for(&event, regarding)
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
                "did not scale {target} to {wanted}: {}",
                target.strip_from(why)
            ))),
            action: ACTION_SCALE.to_string(),
            secondary: Some(target.object_reference()),
        };
        self.publish(event, autoscaler).await
    }

    /// flyball cannot read `target`'s replicas, so it does not size it; `why` is the API's
    /// answer.
    pub async fn unreadable(
        &self,
        autoscaler: &ObjectReference,
        target: &ScaleTargetRef,
        why: &str,
    ) -> Result<(), Error> {
        let event = Event {
            type_: EventType::Warning,
            reason: REASON_TARGET_UNREADABLE.to_string(),
            note: Some(truncate(format!(
                "cannot read the replicas of {target}, so it is not sized: {}",
                target.strip_from(why)
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

    fn refusal(why: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: REASON_SCALE_REFUSED.to_string(),
            note: Some(why.to_string()),
            action: ACTION_SCALE.to_string(),
            secondary: None,
        }
    }

    fn autoscaler(name: &str) -> ObjectReference {
        ObjectReference {
            name: Some(name.to_string()),
            ..ObjectReference::default()
        }
    }

    #[tokio::test]
    async fn series_beyond_the_bound_forget_the_least_recently_published() {
        // Nothing is sent: choosing a recorder makes no call.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let events = ScaleEvents::new(kube::Client::try_from(config).unwrap(), "pod-a");
        for i in 0..MAX_SERIES {
            events.recorder_for(&refusal("why"), &autoscaler(&format!("fba-{i}")));
        }
        // fba-0 is published again, so fba-1 is now the least recent.
        events.recorder_for(&refusal("why"), &autoscaler("fba-0"));
        events.recorder_for(&refusal("why"), &autoscaler("one-too-many"));

        let series = &events.series.lock().unwrap().by_key;
        assert_eq!(series.len(), MAX_SERIES);
        let tracked = |name: &str| {
            series
                .keys()
                .any(|k| k.regarding.name.as_deref() == Some(name))
        };
        assert!(tracked("fba-0") && tracked("one-too-many"));
        assert!(!tracked("fba-1"));
    }

    #[test]
    fn long_notes_are_cut_to_the_api_limit_on_a_char_boundary() {
        let long = "é".repeat(2000);
        let cut = truncate(long);
        assert!(cut.len() <= MAX_NOTE_BYTES);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }
}
