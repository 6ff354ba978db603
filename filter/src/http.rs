//! One HTTP stream: decides whether the request is an LLM call, inspects (and, for usage
//! injection, rewrites) its body, feeds response chunks to the core's tracker, and accounts the
//! request exactly once in `on_log`, which Envoy calls for every stream, resets included.

use crate::now_nanos;
use crate::root::Worker;
use crate::shared::SharedLabels;
use crate::stats::FilterStats;
use flyball_filter_core::{KeyId, Phase, ResponseTracker, classify_outcome, inspect_request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::cell::RefCell;
use std::rc::Rc;

/// Filter state carrying the request's TTFT in microseconds, for access logs.
const TTFT_PROPERTY: &str = "flyball_ttft_us";

enum State {
    /// Not an LLM call (or already given up on): every callback passes straight through.
    PassThrough,
    /// Request headers seen; the body is being buffered to read the model.
    ReadingRequest { started_at: u64, backend: String },
    /// The request is accounted under `key`; the response is being tracked.
    Tracking {
        key: KeyId,
        started_at: u64,
        // Boxed: the tracker is large and most streams are in the other states.
        tracker: Box<ResponseTracker>,
    },
}

pub(crate) struct FlyballRequest {
    worker: Rc<RefCell<Worker>>,
    state: State,
    response_complete: bool,
}

// === impl FlyballRequest ===

impl FlyballRequest {
    pub(crate) fn new(worker: Rc<RefCell<Worker>>, _created_at: u64) -> Self {
        FlyballRequest {
            worker,
            state: State::PassThrough,
            response_complete: false,
        }
    }

    fn now(&self) -> u64 {
        self.worker
            .try_borrow()
            .map(|w| now_nanos(w.epoch))
            .unwrap_or_default()
    }

    fn header(name: &str, map: MapType) -> Option<String> {
        hostcalls::get_map_value(map, name).ok().flatten()
    }

    fn property_u64(path: &[&str]) -> Option<u64> {
        let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
        let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(array))
    }

    fn property_string(path: &[&str]) -> Option<String> {
        let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
        String::from_utf8(bytes).ok()
    }

    /// Starts accounting a request under (backend, model) and returns its key.
    fn start(&mut self, backend: &str, model: Option<&str>) -> Option<KeyId> {
        let mut worker = self.worker.try_borrow_mut().ok()?;
        let mut admission = SharedLabels {
            max_backends: worker.config.max_backends,
            max_models_per_backend: worker.config.max_models_per_backend,
        };
        let (key, _) = worker.accumulator.key_with(backend, model, &mut admission);
        worker.accumulator.request_started(key);
        worker.stats.request_started(key.0 as usize);
        Some(key)
    }

    fn give_up_inspection(&mut self, started_at: u64, backend: &str) {
        let Some(key) = self.start(backend, None) else {
            self.state = State::PassThrough;
            return;
        };
        let Ok(worker) = self.worker.try_borrow() else {
            self.state = State::PassThrough;
            return;
        };
        FilterStats::count(worker.filter_stats.requests_uninspected);
        let tracker = ResponseTracker::for_uninspected_with(started_at, &worker.config);
        drop(worker);
        self.state = State::Tracking {
            key,
            started_at,
            tracker: Box::new(tracker),
        };
    }
}

impl Context for FlyballRequest {}

impl HttpContext for FlyballRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Ok(worker) = self.worker.try_borrow() else {
            return Action::Continue;
        };
        let started_at = now_nanos(worker.epoch);
        let config = Rc::clone(&worker.config);
        drop(worker);

        let method = Self::header(":method", MapType::HttpRequestHeaders);
        let path = Self::header(":path", MapType::HttpRequestHeaders).unwrap_or_default();
        if method.as_deref() != Some("POST") || !config.measures_path(&path) {
            return Action::Continue;
        }
        let backend = config
            .backend
            .clone()
            .or_else(|| Self::property_string(&["xds", "cluster_name"]))
            .unwrap_or_else(|| "unknown".to_owned());
        if end_of_stream {
            self.give_up_inspection(started_at, &backend);
            return Action::Continue;
        }
        // The body may be rewritten (usage injection), so its length may change. These are the
        // last header edits possible: the router sends the headers upstream when this returns.
        if config.inject_include_usage {
            for name in ["content-length", "accept-encoding"] {
                // A compressed stream could not be stripped of the injected usage chunk, so ask
                // the server for an uncompressed one. The client then gets it uncompressed too,
                // unless Envoy's compressor filter, before this one, compresses it again.
                if let Err(status) =
                    hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None)
                {
                    log::debug!("flyball: cannot remove request {name}: {status:?}");
                }
            }
        }
        self.state = State::ReadingRequest {
            started_at,
            backend,
        };
        // Pausing here would stop the body callbacks too (Envoy turns it into "stop all
        // iteration"); the body callback pauses instead, and Envoy buffers.
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let State::ReadingRequest {
            started_at,
            backend,
        } = &self.state
        else {
            return Action::Continue;
        };
        let (started_at, backend) = (*started_at, backend.clone());
        let Ok(worker) = self.worker.try_borrow() else {
            return Action::Continue;
        };
        let config = Rc::clone(&worker.config);
        drop(worker);
        if body_size > config.max_request_body_bytes {
            // Too big to inspect without risking Envoy's buffer limit (a 413 for the client):
            // let it through unread.
            self.give_up_inspection(started_at, &backend);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => {
                self.give_up_inspection(started_at, &backend);
                return Action::Continue;
            }
        };
        let options = config.rewrite_options(&backend);
        let inspection = match inspect_request(&body, &options) {
            Ok(inspection) => inspection,
            Err(error) => {
                log::debug!("flyball: request body not inspected: {error}");
                self.give_up_inspection(started_at, &backend);
                return Action::Continue;
            }
        };
        if let Some(rewritten) = &inspection.rewritten
            && let Err(status) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, rewritten)
        {
            log::warn!("flyball: request body rewrite refused: {status:?}");
        }
        let Some(key) = self.start(&backend, inspection.model.as_deref()) else {
            self.state = State::PassThrough;
            return Action::Continue;
        };
        let tracker = ResponseTracker::new(started_at, &inspection, &config);
        self.state = State::Tracking {
            key,
            started_at,
            tracker: Box::new(tracker),
        };
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let State::Tracking { tracker, .. } = &mut self.state else {
            return Action::Continue;
        };
        let status = Self::header(":status", MapType::HttpResponseHeaders)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let content_type = Self::header("content-type", MapType::HttpResponseHeaders);
        let content_encoding = Self::header("content-encoding", MapType::HttpResponseHeaders);
        let verdict = tracker.on_response_headers(
            status,
            content_type.as_deref(),
            content_encoding.as_deref(),
        );
        if verdict.remove_content_length
            && let Err(status) =
                hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None)
        {
            log::debug!("flyball: cannot remove response content-length: {status:?}");
        }
        if end_of_stream {
            self.response_complete = true;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let now = self.now();
        if end_of_stream {
            self.response_complete = true;
        }
        let State::Tracking {
            key,
            started_at,
            tracker,
        } = &mut self.state
        else {
            return Action::Continue;
        };
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return Action::Continue;
        };
        let chunk = if body_size == 0 || !tracker.wants_body() {
            Vec::new()
        } else {
            match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                Ok(chunk) => chunk.unwrap_or_default(),
                Err(_) => return Action::Continue,
            }
        };
        let mut scratch = std::mem::take(&mut worker.scratch);
        scratch.clear();
        let verdict = tracker.on_response_body(&chunk, end_of_stream, now, &mut scratch);
        if verdict.rewrite
            && let Err(status) =
                hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &scratch)
        {
            log::warn!("flyball: response chunk rewrite refused: {status:?}");
        }
        worker.scratch = scratch;
        if verdict.first_content {
            // For access logs: %FILTER_STATE(wasm.flyball_ttft_us:PLAIN)%.
            let ttft_us = now.saturating_sub(*started_at) / 1_000;
            if let Err(status) =
                hostcalls::set_property(vec![TTFT_PROPERTY], Some(ttft_us.to_string().as_bytes()))
            {
                log::debug!("flyball: cannot set {TTFT_PROPERTY}: {status:?}");
            }
            worker.accumulator.first_token(*key);
            worker.stats.first_token(key.0 as usize);
        }
        if let Some(gap) = verdict.itl {
            worker.accumulator.record_itl(*key, gap);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // A response that ends in trailers (an HTTP/2 upstream) ends here: no body callback sees
        // `end_of_stream`, and without this a complete answer would count as a server error.
        self.response_complete = true;
        Action::Continue
    }

    fn on_log(&mut self) {
        let now = self.now();
        let state = std::mem::replace(&mut self.state, State::PassThrough);
        let (key, mut tracker) = match state {
            State::Tracking { key, tracker, .. } => (key, tracker),
            State::ReadingRequest {
                started_at,
                backend,
            } => {
                // The request never finished arriving (client gone, reset, local reply).
                let Some(key) = self.start(&backend, None) else {
                    return;
                };
                let tracker = match self.worker.try_borrow() {
                    Ok(worker) => ResponseTracker::for_uninspected_with(started_at, &worker.config),
                    Err(_) => ResponseTracker::for_uninspected(started_at),
                };
                (key, Box::new(tracker))
            }
            State::PassThrough => return,
        };
        let status = Self::property_u64(&["response", "code"]).and_then(|c| u16::try_from(c).ok());
        let details = Self::property_string(&["response", "code_details"]).unwrap_or_default();
        let flags = Self::property_u64(&["response", "flags"]).unwrap_or(0);
        let outcome = classify_outcome(status, self.response_complete, &details, flags);
        let phase = tracker.phase();
        let record = tracker.finish(now, outcome);
        let Ok(mut worker) = self.worker.try_borrow_mut() else {
            return;
        };
        worker.accumulator.request_finished(key, phase, &record);
        worker.define_held_stats();
        worker
            .stats
            .request_finished(key.0 as usize, phase == Phase::Decoding, &record);
        if worker.retired {
            // No tick will merge this any more.
            worker.merge_into_shared();
        }
    }
}
