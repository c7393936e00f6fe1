#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::header::TENSOR_HEADER_FIXED;
use super::*;

fn enc(data: &[u8], dtype: DType, shape: &[u64], codec: &str, chunk: usize) -> Vec<u8> {
    encode(data, dtype, shape, Codec::parse(codec).unwrap(), chunk).unwrap()
}

fn decode_all(frame: &[u8]) -> Result<(TensorHeader, Vec<u8>), FrameError> {
    let d = decode(frame, &Limits::default())?;
    let mut out = vec![0u8; d.header.raw_len().unwrap() as usize];
    d.payload.decode_into(&d.header, &mut out)?;
    Ok((d.header, out))
}

/// One chunk carrying an arbitrary (possibly hostile) body, with a valid checksum.
fn chunk(index: u32, count: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; CHUNK_HEADER_LEN + body.len()];
    out[CHUNK_HEADER_LEN..].copy_from_slice(body);
    ChunkHeader::write(index, count, body, &mut out[..CHUNK_HEADER_LEN]);
    out
}

fn tensor_header(dtype: u8, lossy: u8, zstd: u8, shape: &[u64], payload_len: u64) -> Vec<u8> {
    let mut h = vec![dtype, lossy, zstd, shape.len() as u8, 0, 0, 0, 0];
    h.extend_from_slice(&payload_len.to_le_bytes());
    for d in shape {
        h.extend_from_slice(&d.to_le_bytes());
    }
    h
}

#[test]
fn single_chunk_is_zero_copy_and_aligned() {
    let data: Vec<u8> = (0..4096u32).flat_map(|x| (x as f32).to_le_bytes()).collect();
    let frame = enc(&data, DType::F32, &[64, 64], "none", DEFAULT_CHUNK_SIZE);
    let d = decode(&frame, &Limits::default()).unwrap();
    assert!(matches!(d.payload, Payload::Contiguous(std::borrow::Cow::Borrowed(_))));
    let off = d.payload_offset.unwrap();
    assert_eq!(off % 8, 0);
    assert_eq!(&frame[off..], &data[..]);
    assert_eq!(d.header.shape, vec![64, 64]);
}

#[test]
fn multi_chunk_round_trip_and_counts() {
    let data: Vec<u8> = (0..10_000u32).map(|x| (x * 31 % 251) as u8).collect();
    let frame = enc(&data, DType::U8, &[100, 100], "none", 256);
    let body = TENSOR_HEADER_FIXED + 16 + data.len();
    assert_eq!(frame.len(), body.div_ceil(256) * CHUNK_HEADER_LEN + body);
    assert_eq!(decode_all(&frame).unwrap().1, data);
}

#[test]
fn scalars_and_empty_tensors() {
    let frame = enc(&7i64.to_le_bytes(), DType::I64, &[], "none", 1024);
    assert_eq!(decode_all(&frame).unwrap().1, 7i64.to_le_bytes());
    let frame = enc(&[], DType::F32, &[0, 5], "int8+zstd", 1024);
    let (h, out) = decode_all(&frame).unwrap();
    assert_eq!((h.shape, out.len()), (vec![0, 5], 0));
}

#[test]
fn encode_validates_arguments() {
    let c = Codec::NONE;
    assert!(matches!(encode(&[0; 7], DType::F32, &[2], c, 1024), Err(FrameError::BufferSize { .. })));
    assert!(matches!(encode(&[0; 4], DType::F32, &[1; 9], c, 1024), Err(FrameError::TooManyDims { .. })));
    assert!(matches!(encode(&[0; 4], DType::F32, &[1], c, 8), Err(FrameError::BadChunkSize(8))));
    assert!(matches!(encode(&[0; 4], DType::F32, &[u64::MAX, 2], c, 1024), Err(FrameError::ShapeOverflow)));
}

#[test]
fn hostile_headers_are_refused_before_allocating() {
    let limits = Limits::default();
    // 2^40 float32 elements claimed, a few bytes sent.
    let f = chunk(0, 1, &tensor_header(1, 0, 0, &[1 << 20, 1 << 20], 4 << 40));
    assert!(matches!(decode(&f, &limits), Err(FrameError::TooLarge { .. })));
    let f = chunk(0, 1, &tensor_header(1, 0, 0, &[u64::MAX, u64::MAX], 0));
    assert_eq!(decode(&f, &limits).unwrap_err(), FrameError::ShapeOverflow);
    let f = chunk(0, 1, &tensor_header(99, 0, 0, &[1], 4));
    assert_eq!(decode(&f, &limits).unwrap_err(), FrameError::UnknownDtype(99));
    let f = chunk(0, 1, &tensor_header(1, 7, 0, &[1], 4));
    assert!(matches!(decode(&f, &limits), Err(FrameError::Codec(_))));
    let f = chunk(0, 1, &tensor_header(1, 0, 0, &[1; 9], 4));
    assert!(matches!(decode(&f, &limits), Err(FrameError::TooManyDims { .. })));
    // Payload length that no codec output could have.
    let f = chunk(0, 1, &tensor_header(1, 0, 0, &[4], 3));
    assert!(matches!(decode(&f, &limits), Err(FrameError::PayloadLength { .. })));
    // Many chunks claimed, payload declared within limits but larger than the input.
    let mut f = chunk(0, u32::MAX, &tensor_header(9, 0, 0, &[1 << 29], 1 << 29));
    f.extend(chunk(1, u32::MAX, &[0; 8]));
    assert!(matches!(decode(&f, &limits), Err(FrameError::Truncated { .. })));
    // A small limit applies to decoded size.
    let small = Limits { max_tensor_bytes: 1000, ..limits };
    let ok = enc(&[0; 2000], DType::U8, &[2000], "zstd", 4096);
    assert!(matches!(decode(&ok, &small), Err(FrameError::TooLarge { .. })));
}

#[test]
fn chunk_level_corruption_is_caught() {
    let data = vec![3u8; 3000];
    let frame = enc(&data, DType::U8, &[3000], "none", 1024);
    let limits = Limits::default();
    let mut bad = frame.clone();
    bad[0] = b'X';
    assert!(matches!(decode(&bad, &limits), Err(FrameError::BadMagic(_))));
    let mut bad = frame.clone();
    bad[4] = 2;
    assert_eq!(decode(&bad, &limits).unwrap_err(), FrameError::UnsupportedVersion(2));
    let mut bad = frame.clone();
    bad[CHUNK_HEADER_LEN + 100] ^= 1;
    assert_eq!(decode(&bad, &limits).unwrap_err(), FrameError::BadChecksum { index: 0 });
    // Swap chunks 1 and 2 (each 32 + 1024 bytes, the last shorter).
    let c = CHUNK_HEADER_LEN + 1024;
    let mut swapped = frame[..c].to_vec();
    swapped.extend_from_slice(&frame[2 * c..]);
    swapped.extend_from_slice(&frame[c..2 * c]);
    assert_eq!(decode(&swapped, &limits).unwrap_err(), FrameError::OutOfOrder { expected: 1, got: 2 });
    let mut trailing = frame.clone();
    trailing.push(0);
    assert_eq!(decode(&trailing, &limits).unwrap_err(), FrameError::TrailingBytes(1));
    let tight = Limits { max_chunk_body: 512, ..limits };
    assert!(matches!(decode(&frame, &tight), Err(FrameError::ChunkTooLarge { .. })));
}

#[test]
fn streaming_decoder_stops_at_frame_end() {
    let a = enc(&[1u8; 5000], DType::U8, &[5000], "none", 1024);
    let b = enc(&[2u8; 10], DType::U8, &[10], "zstd", 1024);
    let stream = [a.clone(), b.clone()].concat();
    let mut dec = FrameDecoder::new(Limits::default());
    let used = dec.feed(&stream).unwrap();
    assert_eq!(used, a.len());
    assert!(dec.is_complete());
    let mut dec2 = FrameDecoder::new(Limits::default());
    assert_eq!(dec2.feed(&stream[used..]).unwrap(), b.len());
    let (h, payload) = dec2.finish().unwrap();
    let mut out = vec![0u8; 10];
    decode_payload(&h, &payload, &mut out).unwrap();
    assert_eq!(out, vec![2u8; 10]);
    let mut partial = FrameDecoder::new(Limits::default());
    partial.feed(&a[..a.len() - 1]).unwrap();
    assert_eq!(partial.finish().unwrap_err(), FrameError::Incomplete);
}

#[test]
fn streaming_decoder_is_poisoned_after_error() {
    let mut dec = FrameDecoder::new(Limits::default());
    assert!(dec.feed(&[0u8; 64]).is_err());
    assert_eq!(dec.feed(&[0u8; 1]).unwrap_err(), FrameError::Poisoned);
}

proptest! {
    #[test]
    fn round_trip_any_chunking(
        data in prop::collection::vec(any::<u8>(), 0..20_000),
        chunk in 256usize..5000,
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("zstd:-5")],
        pieces in prop::collection::vec(1usize..3000, 1..40),
    ) {
        let frame = enc(&data, DType::U8, &[data.len() as u64], codec, chunk);
        prop_assert_eq!(&decode_all(&frame).unwrap().1, &data);
        // The same frame fed to the streaming decoder in arbitrary pieces.
        let mut dec = FrameDecoder::new(Limits::default());
        let mut pos = 0;
        for p in pieces.iter().cycle().take(100_000) {
            if pos == frame.len() { break; }
            let end = (pos + p).min(frame.len());
            prop_assert_eq!(dec.feed(&frame[pos..end]).unwrap(), end - pos);
            pos = end;
        }
        let (h, payload) = dec.finish().unwrap();
        let mut out = vec![0u8; data.len()];
        decode_payload(&h, &payload, &mut out).unwrap();
        prop_assert_eq!(out, data);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let _ = decode(&bytes, &Limits::default());
        let mut dec = FrameDecoder::new(Limits::default());
        let _ = dec.feed(&bytes);
    }

    #[test]
    fn every_bit_flip_is_an_error(flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let data: Vec<u8> = (0..2500u32).map(|x| (x % 256) as u8).collect();
        let frame = enc(&data, DType::U8, &[50, 50], "none", 1024);
        let mut bad = frame.clone();
        let i = flip.index(frame.len());
        bad[i] ^= 1 << bit;
        prop_assert!(decode(&bad, &Limits::default()).is_err(), "flip at {} undetected", i);
    }
}

/// Every proper prefix of a frame (here 3 chunks, so the cuts include both chunk boundaries and
/// every byte of each chunk header and body) is an error for the whole-frame decoder, and leaves
/// the streaming decoder incomplete, its `finish` an error. Catches: a decoder that accepts a
/// frame ending at a chunk boundary, or that takes a short last chunk for the end.
#[test]
fn every_truncation_is_an_error() {
    let data: Vec<u8> = (0..2500u32).map(|x| (x % 256) as u8).collect();
    for codec in ["none", "zstd:1"] {
        let frame = enc(&data, DType::U8, &[50, 50], codec, 1024);
        assert_eq!(decode_all(&frame).unwrap().1, data);
        for n in 0..frame.len() {
            assert!(decode(&frame[..n], &Limits::default()).is_err(), "{codec}: {n} bytes decoded");
            let mut dec = FrameDecoder::new(Limits::default());
            assert_eq!(dec.feed(&frame[..n]).unwrap(), n, "{codec}: {n} bytes");
            assert!(!dec.is_complete(), "{codec}: complete after {n} bytes");
            let finished = dec.finish().map(|(h, payload)| (h, payload.len()));
            assert!(matches!(finished, Err(FrameError::Incomplete)), "{codec}: {n} bytes: {finished:?}");
        }
    }
}
