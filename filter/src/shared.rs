//! Envoy shared data, the only place the workers of one Envoy process meet.
//!
//! Every worker thread runs its own VM; a value set here is seen by all of them (same `vm_id`).
//! Writes go through compare-and-swap so concurrent workers never overwrite each other: a
//! mismatch means another worker wrote first, and the update is recomputed from the new value.

use flyball_filter_core::aggregate::{Admission, LabelAdmission};
use flyball_filter_core::shared::LabelTable;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// The reporter's state: next sequence, the unacknowledged report, who is sending.
pub(crate) use flyball_filter_core::report::REPORTER_KEY;
/// Deltas and in-flight gauges of all workers, waiting for the next report.
pub(crate) use flyball_filter_core::shared::ACCUM_KEY as ACCUMULATION_KEY;
/// The names with labels of their own, so the label caps hold for the process.
pub(crate) use flyball_filter_core::shared::LABELS_KEY;

/// How often an update is recomputed after losing a race before it gives up for this tick.
/// Each worker writes at most a few times per tick (four ticks per report interval), so more
/// than a few losses in a row means something is wrong, not busy.
const MAX_ATTEMPTS: usize = 32;

#[derive(Debug)]
pub(crate) enum SharedError {
    /// Lost the compare-and-swap race `MAX_ATTEMPTS` times.
    Contended,
    Host(Status),
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedError::Contended => {
                write!(f, "lost {MAX_ATTEMPTS} compare-and-swap races in a row")
            }
            SharedError::Host(status) => write!(f, "host refused shared data access: {status:?}"),
        }
    }
}

/// Reads `key` and, when `update` returns new bytes, writes them if nobody wrote in between,
/// recomputing from the fresh value otherwise. `update` returns `None` to write nothing.
pub(crate) fn update<T>(
    key: &str,
    mut update: impl FnMut(Option<&[u8]>) -> Option<(Vec<u8>, T)>,
) -> Result<Option<T>, SharedError> {
    for _ in 0..MAX_ATTEMPTS {
        let (current, cas) = hostcalls::get_shared_data(key).map_err(SharedError::Host)?;
        let Some((bytes, result)) = update(current.as_deref()) else {
            return Ok(None);
        };
        // A missing key has no CAS: the write below then creates it unconditionally. That is
        // safe because `initialize` creates every key when the VM starts, long before any worker
        // has a delta to merge, so only empty values can race there.
        match hostcalls::set_shared_data(key, Some(&bytes), cas) {
            Ok(()) => return Ok(Some(result)),
            Err(Status::CasMismatch) => continue,
            Err(status) => return Err(SharedError::Host(status)),
        }
    }
    Err(SharedError::Contended)
}

/// Creates `key` with `initial` unless it exists (a config reload keeps the running sums).
pub(crate) fn initialize(key: &str, initial: &[u8]) -> Result<(), SharedError> {
    let (current, _) = hostcalls::get_shared_data(key).map_err(SharedError::Host)?;
    if current.is_none() {
        hostcalls::set_shared_data(key, Some(initial), None).map_err(SharedError::Host)?;
    }
    Ok(())
}

/// Admits names new to a worker against the process-wide [`LabelTable`]. Asked once per name a
/// worker has not seen (until the caps are reached, after which the worker asks no more).
pub(crate) struct SharedLabels {
    pub(crate) max_backends: usize,
    pub(crate) max_models_per_backend: usize,
}

impl LabelAdmission for SharedLabels {
    fn backend(&mut self, backend: &str) -> Admission {
        let max = self.max_backends;
        admit(|table| table.admit_backend(backend, max))
    }

    fn model(&mut self, backend: &str, model: &str) -> Admission {
        let max = self.max_models_per_backend;
        admit(|table| table.admit_model(backend, model, max))
    }
}

fn admit(mut decide: impl FnMut(&mut LabelTable) -> (Admission, bool)) -> Admission {
    let mut answer = Admission::Unknown;
    let result = update(LABELS_KEY, |current| {
        let mut table = LabelTable::decode_or_empty(current);
        let (admission, changed) = decide(&mut table);
        answer = admission;
        changed.then(|| (table.encode_to_vec(), ()))
    });
    match result {
        Ok(_) => answer,
        Err(error) => {
            // The worker's own count decides this name: a cap may be exceeded, traffic is not
            // affected.
            log::warn!("flyball: label table in shared data: {error}");
            Admission::Unknown
        }
    }
}
