//! The protobuf codec of Tandem's services: prost, with small stream buffers.
//!
//! tonic's default encoder gathers messages until 32 KiB before yielding them, and a
//! stream's buffer keeps the largest size it ever reached: a control plane with
//! thousands of watch streams would hold that much per stream, forever. Discovery
//! messages are small (snapshots come in chunks), so small buffers lose nothing.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Bytes a stream's encode buffer starts with, and after which it yields a batch.
const ENCODE_BUFFER: usize = 4 * 1024;

#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(ENCODE_BUFFER, ENCODE_BUFFER))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::default())
    }
}
