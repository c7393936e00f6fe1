#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn round_trip(codec: &str, dtype: DType, data: &[u8]) -> Result<Vec<u8>, CodecError> {
    let codec = Codec::parse(codec)?;
    let encoded = codec.encode(dtype, data)?;
    let mut out = vec![0u8; data.len()];
    codec.decode_into(dtype, &encoded, &mut out)?;
    Ok(out)
}

#[test]
fn parse_and_name_round_trip() {
    for spec in ["none", "zstd:3", "fp16", "bf16", "int8", "int8-256", "int8+zstd:1", "bf16+zstd:-3"] {
        let c = Codec::parse(spec).unwrap();
        assert_eq!(Codec::parse(&c.name()).unwrap(), c, "{spec}");
    }
    assert_eq!(Codec::parse("zstd").unwrap().zstd_level, Some(DEFAULT_ZSTD_LEVEL));
    assert_eq!(Codec::parse("ZSTD+INT8-64").unwrap(), Codec::parse("int8+zstd").unwrap());
    for bad in ["", "gzip", "zstd:x", "fp16+bf16", "zstd+zstd", "none+zstd", "int8:3", "int8-128"] {
        assert!(Codec::parse(bad).is_err(), "{bad:?} should not parse");
    }
    assert_eq!(Codec::parse("zstd:99"), Err(CodecError::BadLevel(99)));
}

#[test]
fn wire_codes_round_trip() {
    for spec in ["none", "zstd", "fp16", "bf16+zstd", "int8", "int8-256+zstd"] {
        let c = Codec::parse(spec).unwrap();
        let (l, z) = c.wire();
        let back = Codec::from_wire(l, z).unwrap();
        assert_eq!(back.lossy, c.lossy);
        assert_eq!(back.zstd_level.is_some(), c.zstd_level.is_some());
    }
    assert_eq!(Codec::from_wire(9, 0), Err(CodecError::UnknownCode(9)));
    assert_eq!(Codec::from_wire(0, 2), Err(CodecError::UnknownCode(2)));
}

#[test]
fn lossy_codecs_refuse_wrong_dtypes() {
    assert!(matches!(round_trip("fp16", DType::I64, &[0; 16]), Err(CodecError::Unsupported { .. })));
    assert!(matches!(round_trip("bf16", DType::F16, &[0; 16]), Err(CodecError::Unsupported { .. })));
    assert!(matches!(round_trip("int8", DType::F64, &[0; 16]), Err(CodecError::Unsupported { .. })));
    assert!(round_trip("int8", DType::BF16, &[0; 16]).is_ok());
}

#[test]
fn int8_refuses_non_finite_and_handles_edge_values() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![1.0f32; 130];
        v[70] = bad;
        let err = round_trip("int8", DType::F32, &f32_bytes(&v)).unwrap_err();
        assert_eq!(err, CodecError::NonFinite { block: 1 });
    }
    // All zeros, tiny subnormals and f32::MAX must not produce garbage.
    for v in [vec![0.0f32; 64], vec![1e-45f32, -1e-45, 0.0, 5e-45], vec![f32::MAX, -f32::MAX, 1.0]] {
        let out = f32_from(&round_trip("int8", DType::F32, &f32_bytes(&v)).unwrap());
        let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in v.iter().zip(&out) {
            assert!((a - b).abs() <= absmax / 254.0 * 1.0001 + 1.5e-45, "{a} vs {b}");
        }
    }
}

#[test]
fn zstd_decode_is_bounded_and_checked() {
    let codec = Codec::parse("zstd").unwrap();
    let data = vec![7u8; 4096];
    let enc = codec.encode(DType::U8, &data).unwrap();
    // Output buffer smaller than the stream decodes to: refused, not truncated.
    let mut small = vec![0u8; 1024];
    assert!(codec.decode_into(DType::U8, &enc, &mut small).is_err());
    let mut big = vec![0u8; 8192];
    assert!(codec.decode_into(DType::U8, &enc, &mut big).is_err());
    assert!(codec.decode_into(DType::U8, b"garbage", &mut big).is_err());
}

#[test]
fn fp16_matches_ieee_behaviour() {
    let v = [1.0f32, 65504.0, 70000.0, -1e-8, f32::NAN, 0.1];
    let out = f32_from(&round_trip("fp16", DType::F32, &f32_bytes(&v)).unwrap());
    assert_eq!(out[0], 1.0);
    assert_eq!(out[1], 65504.0);
    assert_eq!(out[2], f32::INFINITY);
    assert!(out[4].is_nan());
    assert!((out[5] - 0.1).abs() <= 0.1 * 2f32.powi(-11));
}

fn floats() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(prop_oneof![-1e4f32..1e4f32, -1.0f32..1.0, Just(0.0f32)], 0..700)
}

proptest! {
    #[test]
    fn lossless_round_trip_is_identity(data in prop::collection::vec(any::<u8>(), 0..5000), level in -7i32..10) {
        let spec = format!("zstd:{level}");
        prop_assert_eq!(round_trip(&spec, DType::U8, &data).unwrap(), data.clone());
        prop_assert_eq!(round_trip("none", DType::U8, &data).unwrap(), data);
    }

    #[test]
    fn int8_error_within_bound(v in floats(), block in prop_oneof![Just(64usize), Just(256)], zstd in any::<bool>()) {
        let spec = format!("int8-{block}{}", if zstd { "+zstd" } else { "" });
        let out = f32_from(&round_trip(&spec, DType::F32, &f32_bytes(&v)).unwrap());
        for (b, (xs, ys)) in v.chunks(block).zip(out.chunks(block)).enumerate() {
            let absmax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in xs.iter().zip(ys) {
                prop_assert!((x - y).abs() <= absmax / 254.0 * (1.0 + 1e-4), "block {} {} vs {}", b, x, y);
            }
        }
    }

    #[test]
    fn half_codecs_within_relative_bound(v in floats()) {
        let f16 = f32_from(&round_trip("fp16", DType::F32, &f32_bytes(&v)).unwrap());
        let bf16 = f32_from(&round_trip("bf16+zstd", DType::F32, &f32_bytes(&v)).unwrap());
        for ((x, a), b) in v.iter().zip(&f16).zip(&bf16) {
            prop_assert!((x - a).abs() <= x.abs() * 2f32.powi(-11) + 2f32.powi(-25));
            prop_assert!((x - b).abs() <= x.abs() * 2f32.powi(-8));
        }
    }

    #[test]
    fn int8_from_half_sources(v in floats()) {
        let halves: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        let out = round_trip("int8", DType::BF16, &halves).unwrap();
        for (blk_in, blk_out) in halves.chunks(128).zip(out.chunks(128)) {
            let xs: Vec<f32> = blk_in.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            let absmax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, c) in xs.iter().zip(blk_out.chunks(2)) {
                let y = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                // half a quantisation step, then half a bf16 ulp of the result
                prop_assert!((x - y).abs() <= absmax / 254.0 * (1.0 + 1e-4) + y.abs() * 2f32.powi(-8));
            }
        }
    }
}
