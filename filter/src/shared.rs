//! Envoy shared data, the only place the workers of one Envoy process meet.
//!
//! Every worker thread runs its own VM; a value set here is seen by all of them (same `vm_id`).
//! Writes go through compare-and-swap so concurrent workers never overwrite each other: a
//! mismatch means another worker wrote first, and the update is recomputed from the new value.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// The reporter's state: next sequence, the unacknowledged report, who is sending.
pub(crate) use flyball_filter_core::report::REPORTER_KEY;
/// Deltas and in-flight gauges of all workers, waiting for the next report.
pub(crate) use flyball_filter_core::shared::ACCUM_KEY as ACCUMULATION_KEY;

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
