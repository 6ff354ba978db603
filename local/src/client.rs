//! An HTTP client that keeps what the tests compare: the exact response bytes, when the first
//! body byte arrived, and whether the client gave up on purpose.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP/2 (prior knowledge) client, to check the filter on h2 streams too.
pub fn http2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// From sending the request to the first body byte.
    pub first_byte_after: Option<Duration>,
    /// For each body frame: the body length once it arrived, and when (from sending the
    /// request), so a test can tell when any given byte reached the client.
    pub arrivals: Vec<(usize, Duration)>,
    /// The client stopped reading and dropped the connection on purpose.
    pub aborted_by_client: bool,
    /// The body ended with an error (the server or Envoy reset the stream).
    pub body_error: Option<String>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// When the body's first `len` bytes had all arrived.
    pub fn arrived_by(&self, len: usize) -> Option<Duration> {
        self.arrivals
            .iter()
            .find(|(received, _)| *received >= len)
            .map(|(_, at)| *at)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// POSTs `body` to `addr` + `path`; with `abort_after_bytes`, stops reading (dropping the
/// connection) once that many body bytes have arrived.
pub async fn post(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    headers: &[(&str, String)],
    abort_after_bytes: Option<usize>,
) -> anyhow::Result<Response> {
    let mut request = hyper::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body)))?;
    let sent_at = Instant::now();
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut first_byte_after = None;
    let mut arrivals = Vec::new();
    let mut body_error = None;
    let mut aborted_by_client = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(error)) => {
                body_error = Some(error.to_string());
                break;
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() && first_byte_after.is_none() {
                        first_byte_after = Some(sent_at.elapsed());
                    }
                    bytes.extend_from_slice(&data);
                    arrivals.push((bytes.len(), sent_at.elapsed()));
                }
                if abort_after_bytes.is_some_and(|limit| bytes.len() >= limit) {
                    aborted_by_client = true;
                    break;
                }
            }
        }
    }
    Ok(Response {
        status,
        headers,
        body: bytes,
        first_byte_after,
        arrivals,
        aborted_by_client,
        body_error,
    })
}

/// GETs a URL and returns (status, body text).
pub async fn get(client: &HttpClient, url: &str) -> anyhow::Result<(u16, String)> {
    let request = hyper::Request::get(url).body(Full::new(Bytes::new()))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
