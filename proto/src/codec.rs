//! The gRPC codecs: `TelemetryService`'s (prost, with buffers sized for reports and acks; its
//! server keeps each report's bytes as they arrived, [`ReceivedReport`]) and [`WireCodec`], with
//! which reports go on as they arrived: from a leader to its followers (`ReplicationService`), and
//! from a follower to the leader.
//!
//! tonic's default codec buffers are 8 KiB each way. A unary call frees them when it ends, but a
//! `ReportStream` keeps its pair for as long as the gateway stays connected, and the control
//! service holds one stream per gateway: at 10,000 gateways the defaults alone are
//! 160 MB. A report is about 1-3 KiB and an ack a few bytes; the buffers still grow on demand
//! for a larger message (up to the service's size limit), so this only sets where they start.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::{packed, v1};

/// Initial size of the buffer a message is decoded from. tonic reserves a message's length again
/// once its whole body is in the buffer, so a stream's buffer ends up at least twice its largest
/// message: from 2 KiB it doubles once, to 4 KiB, at the first report over about 1 KiB, and then
/// holds every report up to about 2 KiB without growing. Starting smaller ends larger (256 B,
/// tried: each report a little longer than the last doubled it again, to ~5 KB a stream, 11.9 KB
/// a gateway under load against 11.1 for 10,000 streams over 100 connections).
pub const DECODE_BUFFER_BYTES: usize = 2 * 1024;
/// Initial size of the buffer a message is encoded into.
pub const ENCODE_BUFFER_BYTES: usize = 256;
/// A stream's encoder yields to the runtime after this many bytes (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// [`ProstCodec`] with smaller starting buffers; see the module documentation.
#[derive(Debug)]
pub struct ReportCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ReportCodec<T, U> {
    fn default() -> Self {
        ReportCodec(PhantomData)
    }
}

impl<T, U> Codec for ReportCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
            DECODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }
}

/// A report as the control service's `TelemetryService` receives it: read (its sketches left
/// packed, [`packed::ReportRequest`]), and the bytes it arrived as. A leader keeps those bytes
/// for its followers as they are: encoding the report again cost it about 5 us of the 40 a
/// report took (`cargo bench -p flyball-control --bench ingest`). They are copied out of the
/// connection's buffer, so that keeping a report holds its own size and not the buffer it was
/// read into.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReceivedReport {
    pub report: packed::ReportRequest,
    pub encoded: EncodedReport,
}

impl ReceivedReport {
    /// A report as if it had arrived encoded as prost encodes it (tests, and callers in
    /// process).
    pub fn new(report: v1::ReportRequest) -> Self {
        let encoded = EncodedReport::encode(&report);
        let report = packed::ReportRequest::from(&report);
        ReceivedReport { report, encoded }
    }
}

/// The codec of `TelemetryService`'s server: [`ReportCodec`]'s buffers, and reports decoded
/// into [`ReceivedReport`]s.
#[derive(Debug)]
pub struct IngestCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for IngestCodec<T, U> {
    fn default() -> Self {
        IngestCodec(PhantomData)
    }
}

impl<T: prost::Message + Send + 'static> Codec for IngestCodec<T, ReceivedReport> {
    type Encode = T;
    type Decode = ReceivedReport;
    type Encoder = ProstEncoder<T>;
    type Decoder = ReceivedReportDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, v1::ReportRequest>::raw_encoder(BufferSettings::new(
            ENCODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReceivedReportDecoder
    }
}

#[derive(Debug)]
pub struct ReceivedReportDecoder;

impl Decoder for ReceivedReportDecoder {
    type Item = ReceivedReport;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<ReceivedReport>, tonic::Status> {
        // Copied straight out of the connection's buffer: splitting the report off it first
        // (`copy_to_bytes`) made that buffer shared, and raised and dropped its count each
        // report, only to copy the report and drop the split.
        let mut encoded = BytesMut::with_capacity(src.remaining());
        encoded.put(&mut *src);
        let encoded = encoded.freeze();
        // As tonic's prost codec answers what does not decode, so that ingest's refusal of it
        // reads the same whichever decoder met it.
        let report = packed::ReportRequest::decode(&encoded)
            .map_err(|error| tonic::Status::internal(error.to_string()))?;
        Ok(Some(ReceivedReport {
            report,
            encoded: EncodedReport(encoded),
        }))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }
}

/// A `flyball.v1.ReportRequest` as encoded once: a leader keeps what it merged this way for its
/// followers, and sends it to each as it is (its bytes shared, not copied or encoded again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedReport(pub Bytes);

impl EncodedReport {
    pub fn encode(report: &v1::ReportRequest) -> Self {
        EncodedReport(report.encode_to_vec().into())
    }

    pub fn decode(&self) -> Result<packed::ReportRequest, prost::DecodeError> {
        packed::ReportRequest::decode(&self.0)
    }

    /// The same report with `held_ms` set to `held_ms`. Protobuf takes the last value of a
    /// singular field it meets, so the field is appended rather than the report encoded again.
    pub fn with_held_ms(&self, held_ms: u64) -> Self {
        let mut bytes = Vec::with_capacity(self.0.len() + 11);
        bytes.extend_from_slice(&self.0);
        prost::encoding::uint64::encode(HELD_MS_FIELD, &held_ms, &mut bytes);
        EncodedReport(bytes.into())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `ReportRequest.held_ms`'s field number.
const HELD_MS_FIELD: u32 = 6;

/// A message as [`WireCodec`] puts it on the wire: an [`EncodedReport`] as it is, anything else
/// through prost.
pub trait WireMessage: Send + 'static + Sized {
    fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status>;
    fn read(src: &mut DecodeBuf<'_>) -> Result<Self, tonic::Status>;
}

impl WireMessage for EncodedReport {
    fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&self.0);
        Ok(())
    }

    fn read(src: &mut DecodeBuf<'_>) -> Result<Self, tonic::Status> {
        Ok(EncodedReport(src.copy_to_bytes(src.remaining())))
    }
}

/// Messages that go through prost as [`WireMessage`]s.
macro_rules! prost_wire_message {
    ($($message:ty),*) => {$(
        impl WireMessage for $message {
            fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
                self.encode(dst)
                    .map_err(|error| tonic::Status::internal(error.to_string()))
            }

            fn read(src: &mut DecodeBuf<'_>) -> Result<Self, tonic::Status> {
                <$message>::decode(src).map_err(|error| tonic::Status::internal(error.to_string()))
            }
        }
    )*};
}

prost_wire_message!(v1::FollowRequest, v1::ReportResponse);

/// The codec of `ReplicationService`, and of the client a follower forwards reports with: reports
/// go as the bytes they arrived as.
#[derive(Debug)]
pub struct WireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        WireCodec(PhantomData)
    }
}

impl<T: WireMessage, U: WireMessage> Codec for WireCodec<T, U> {
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct WireEncoder<T>(PhantomData<T>);

impl<T: WireMessage> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        item.write(dst)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }
}

#[derive(Debug)]
pub struct WireDecoder<U>(PhantomData<U>);

impl<U: WireMessage> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, tonic::Status> {
        U::read(src).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_report_decodes_to_the_report_and_takes_a_new_held_ms() {
        let report = v1::ReportRequest {
            reporter: Some(v1::Reporter {
                gateway: "gw".into(),
                process_start_unix_ms: 7,
                filter_version: "v".into(),
            }),
            sequence: 9,
            held_ms: 40,
            ..v1::ReportRequest::default()
        };
        let encoded = EncodedReport::encode(&report);
        assert_eq!(
            encoded.decode().unwrap(),
            packed::ReportRequest::from(&report)
        );
        let later = encoded.with_held_ms(1_040);
        assert_eq!(
            later.decode().unwrap(),
            packed::ReportRequest::from(&v1::ReportRequest {
                held_ms: 1_040,
                ..report
            })
        );
    }
}
