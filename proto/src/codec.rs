//! The gRPC codec of `TelemetryService`: prost, with buffers sized for reports and acks.
//!
//! tonic's default codec buffers are 8 KiB each way. A unary call frees them when it ends, but a
//! `ReportStream` keeps its pair for as long as the gateway stays connected, and the control
//! service holds one stream per gateway: at 10,000 gateways the defaults alone are
//! 160 MB. A report is about 1-3 KiB and an ack a few bytes; the buffers still grow on demand
//! for a larger message (up to the service's size limit), so this only sets where they start.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of the buffer a message is decoded from.
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
