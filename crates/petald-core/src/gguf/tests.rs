use proptest::prelude::*;

use super::*;

/// A GGUF writer for tests: metadata as (key, type code, encoded value) and tensors.
fn gguf(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, ty, value) in kv {
        out.extend(string(key));
        out.extend(ty.to_le_bytes());
        out.extend(value);
    }
    for (name, dims, ty, offset) in tensors {
        out.extend(string(name));
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

fn string_array(items: &[&str]) -> Vec<u8> {
    let mut out = 8u32.to_le_bytes().to_vec();
    out.extend((items.len() as u64).to_le_bytes());
    for s in items {
        out.extend(string(s));
    }
    out
}

fn sample() -> Vec<u8> {
    gguf(
        &[
            ("general.architecture", 8, string("llama")),
            ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
            ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
            ("tokenizer.ggml.tokens", 9, string_array(&["<s>", "é", "x"])),
            ("tokenizer.ggml.add_bos_token", 7, vec![1]),
            ("some.i8", 1, vec![0xff]),
        ],
        &[("blk.0.attn_q.weight", &[576, 576], 3, 0), ("output_norm.weight", &[576], 0, 64)],
    )
}

#[test]
fn reads_metadata_and_tensors() {
    let buf = sample();
    let index = parse(&buf).expect("valid");
    assert_eq!(index.version, 3);
    assert_eq!(index.metadata[0], ("general.architecture".into(), Value::Str("llama".into())));
    assert_eq!(index.metadata[1].1, Value::Uint(30));
    assert_eq!(index.metadata[2].1, Value::Float(10000.0));
    let tokens = ["<s>", "é", "x"].map(|s| Value::Str(s.into())).to_vec();
    assert_eq!(index.metadata[3].1, Value::Array(tokens));
    assert_eq!(index.metadata[4].1, Value::Bool(true));
    assert_eq!(index.metadata[5].1, Value::Int(-1));
    assert_eq!(index.data_start, (buf.len() as u64).next_multiple_of(32));
    assert_eq!(index.tensors[0].dims, vec![576, 576]);
    assert_eq!(index.tensors[0].ggml_type, 3);
    assert_eq!(index.tensors[0].offset, index.data_start);
    assert_eq!(index.tensors[1].offset, index.data_start + 64);
}

#[test]
fn alignment_comes_from_the_metadata() {
    let kv = [("general.alignment", 4, 256u32.to_le_bytes().to_vec())];
    let buf = gguf(&kv, &[("t", &[1], 0, 0)]);
    assert_eq!(parse(&buf).expect("valid").data_start, 256);
    let bad = gguf(&[("general.alignment", 4, 48u32.to_le_bytes().to_vec())], &[]);
    assert_eq!(parse(&bad), Err(GgufError::BadAlignment(48)));
}

#[test]
fn every_truncation_is_an_error() {
    let buf = sample();
    let end = parse(&buf).expect("valid");
    // The header ends where the last tensor info ends; every shorter prefix must fail.
    let header_len = buf.len();
    assert!(end.data_start as usize >= header_len);
    for n in 0..header_len {
        assert!(parse(&buf[..n]).is_err(), "prefix of {n} bytes parsed");
    }
}

#[test]
fn hostile_counts_fail_before_allocating() {
    let mut buf = b"GGUF".to_vec();
    buf.extend(3u32.to_le_bytes());
    buf.extend(u64::MAX.to_le_bytes());
    buf.extend(u64::MAX.to_le_bytes());
    assert_eq!(parse(&buf), Err(GgufError::Truncated(24)));
    // An array claiming 2^60 elements in a 40-byte file.
    let mut array = 4u32.to_le_bytes().to_vec();
    array.extend((1u64 << 60).to_le_bytes());
    let buf = gguf(&[("a", 9, array)], &[]);
    assert!(matches!(parse(&buf), Err(GgufError::Truncated(_))));
    let buf = gguf(&[("a", 13, vec![0; 8])], &[]);
    assert!(matches!(parse(&buf), Err(GgufError::UnknownType(13, _))));
}

#[test]
fn rejects_other_files_and_duplicates() {
    assert_eq!(parse(b"PK\x03\x04rest"), Err(GgufError::BadMagic(*b"PK\x03\x04")));
    let mut v1 = b"GGUF".to_vec();
    v1.extend(1u32.to_le_bytes());
    assert_eq!(parse(&v1), Err(GgufError::UnsupportedVersion(1)));
    let dup = gguf(&[], &[("t", &[1], 0, 0), ("t", &[1], 0, 32)]);
    assert_eq!(parse(&dup), Err(GgufError::DuplicateTensor("t".into())));
    let deep = gguf(&[], &[("t", &[1; 9], 0, 0)]);
    assert!(matches!(parse(&deep), Err(GgufError::TooManyDims { n: 9, .. })));
    let mut bad = string("k");
    bad.extend(8u32.to_le_bytes());
    bad.extend(2u64.to_le_bytes());
    bad.extend([0xff, 0xfe]);
    let mut buf = b"GGUF".to_vec();
    buf.extend(3u32.to_le_bytes());
    buf.extend(0u64.to_le_bytes());
    buf.extend(1u64.to_le_bytes());
    buf.extend(bad);
    assert!(matches!(parse(&buf), Err(GgufError::NotUtf8(_))));
}

proptest! {
    /// Any bytes after a valid preamble: an index or an error, never a panic or a huge allocation.
    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = b"GGUF".to_vec();
        buf.extend(3u32.to_le_bytes());
        buf.extend(tail);
        let _ = parse(&buf);
    }

    /// Flipping any byte of a valid header gives an index or an error, never a panic.
    #[test]
    fn corrupted_headers_never_panic(at in 0usize..400, byte in any::<u8>()) {
        let mut buf = sample();
        let i = at % buf.len();
        buf[i] = byte;
        let _ = parse(&buf);
    }
}
