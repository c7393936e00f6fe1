//! 256-bit Kademlia keys and the XOR metric (Maymounkov & Mazières 2002, §2.1).
//!
//! Node ids are SHA-256 digests of libp2p peer ids, so they are spread
//! uniformly over the key space no matter how peer ids are chosen. That
//! uniformity is what makes the bucket sizes in §2.2 logarithmic.

use sha2::{Digest, Sha256};

use super::{KadError, MAX_PEER_ID_LEN};

/// Number of bits in a key.
pub const KEY_BITS: usize = 256;

/// A point in the 256-bit Kademlia key space.
///
/// The derived `Ord` is the big-endian numeric order of the key, which the
/// routing table relies on: all keys that share a prefix form one
/// contiguous range in that order (§2.4's binary tree, flattened).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Key(pub [u8; 32]);

/// The XOR distance between two keys (§2.1), read as a 256-bit unsigned
/// integer.
///
/// Byte arrays compare lexicographically, which for a big-endian integer
/// is exactly numeric order, so the derived `Ord` is the metric's order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Distance(pub [u8; 32]);

impl Key {
    /// The key of a peer: SHA-256 of its peer id bytes.
    ///
    /// Hashing (rather than using the peer id directly) stops peers from
    /// choosing where they land in the key space, and gives every id the
    /// same width.
    pub fn from_peer_id(peer: &[u8]) -> Result<Key, KadError> {
        validate_peer_id(peer)?;
        Ok(Key(Sha256::digest(peer).into()))
    }

    /// A key given directly as 32 bytes (for example a content key).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KadError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KadError::BadKeyLength { len: bytes.len() })?;
        Ok(Key(arr))
    }

    /// The raw key bytes, most significant first.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// XOR distance to `other` (§2.1).
    pub fn distance(&self, other: &Key) -> Distance {
        let mut out = [0u8; 32];
        for (o, (a, b)) in out.iter_mut().zip(self.0.iter().zip(other.0.iter())) {
            *o = a ^ b;
        }
        Distance(out)
    }

    /// Bit `i` of the key, counting from the most significant bit.
    ///
    /// Out-of-range indices (`i >= 256`) read as `false` rather than
    /// panicking, because bit positions are sometimes derived from data.
    pub fn bit(&self, i: usize) -> bool {
        match self.0.get(i / 8) {
            Some(byte) => (byte >> (7 - (i % 8))) & 1 == 1,
            None => false,
        }
    }

    /// Length of the longest common prefix with `other`, in bits (256 for
    /// equal keys). This is the depth at which the two keys part ways in
    /// the §2.4 tree.
    pub fn common_prefix_len(&self, other: &Key) -> u32 {
        self.distance(other).leading_zeros()
    }

    /// The key whose distance from `self` is `d` (XOR is its own inverse,
    /// so this is how one picks a key at a prescribed distance).
    pub fn xor(&self, d: &Distance) -> Key {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(d.0.iter()) {
            *o ^= b;
        }
        Key(out)
    }
}

impl Distance {
    /// The zero distance (a key's distance to itself).
    pub const ZERO: Distance = Distance([0u8; 32]);

    /// Number of leading zero bits (256 for the zero distance).
    pub fn leading_zeros(&self) -> u32 {
        let mut total = 0u32;
        for byte in self.0 {
            if byte == 0 {
                total += 8;
            } else {
                return total + byte.leading_zeros();
            }
        }
        total
    }

    /// The k-bucket this distance falls into (§2.2): bucket `i` holds
    /// distances in `[2^i, 2^(i+1))`. The zero distance (the local node
    /// itself) belongs to no bucket.
    pub fn bucket_index(&self) -> Option<usize> {
        let lz = self.leading_zeros() as usize;
        (lz < KEY_BITS).then(|| KEY_BITS - 1 - lz)
    }

    /// The raw distance bytes, most significant first.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Check a peer id's length without hashing it.
fn validate_peer_id(peer: &[u8]) -> Result<(), KadError> {
    if peer.is_empty() {
        return Err(KadError::EmptyPeerId);
    }
    if peer.len() > MAX_PEER_ID_LEN {
        return Err(KadError::PeerIdTooLong { len: peer.len(), max: MAX_PEER_ID_LEN });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 256-bit addition with carry out, to state the triangle inequality
    /// without overflow: returns `None` when the sum exceeds 2^256 - 1
    /// (then the inequality holds trivially, the left side being smaller).
    fn add256(a: &Distance, b: &Distance) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = u16::from(a.0[i]) + u16::from(b.0[i]) + carry;
            out[i] = (s & 0xff) as u8;
            carry = s >> 8;
        }
        (carry == 0).then_some(out)
    }

    fn key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    proptest! {
        #[test]
        fn identity(x in key()) {
            prop_assert_eq!(x.distance(&x), Distance::ZERO);
        }

        #[test]
        fn symmetry(x in key(), y in key()) {
            prop_assert_eq!(x.distance(&y), y.distance(&x));
        }

        #[test]
        fn zero_distance_means_equal(x in key(), y in key()) {
            prop_assert_eq!(x.distance(&y) == Distance::ZERO, x == y);
        }

        #[test]
        fn xor_composition_and_triangle(x in key(), y in key(), z in key()) {
            let dxy = x.distance(&y);
            let dyz = y.distance(&z);
            let dxz = x.distance(&z);
            prop_assert_eq!(dxz, Key(dxy.0).distance(&Key(dyz.0)));
            if let Some(sum) = add256(&dxy, &dyz) {
                prop_assert!(dxz.0 <= sum);
            }
        }

        #[test]
        fn bucket_index_matches_leading_zeros(x in key(), y in key()) {
            let d = x.distance(&y);
            let lz = d.leading_zeros();
            match d.bucket_index() {
                None => prop_assert_eq!(lz, 256),
                Some(i) => {
                    prop_assert_eq!(i, 255 - lz as usize);
                    // The bucket's defining property: bit i (from the
                    // least significant end) is the highest bit set.
                    prop_assert!(x.bit(255 - i) != y.bit(255 - i));
                }
            }
            prop_assert_eq!(x.common_prefix_len(&y), lz);
        }

        #[test]
        fn xor_inverts_distance(x in key(), y in key()) {
            prop_assert_eq!(x.xor(&x.distance(&y)), y);
        }

        #[test]
        fn order_is_numeric(a in any::<u128>(), b in any::<u128>()) {
            let mut da = [0u8; 32];
            let mut db = [0u8; 32];
            da[16..].copy_from_slice(&a.to_be_bytes());
            db[16..].copy_from_slice(&b.to_be_bytes());
            prop_assert_eq!(Distance(da).cmp(&Distance(db)), a.cmp(&b));
        }
    }

    #[test]
    fn single_bit_distances_land_in_their_bucket() {
        for i in 0..256usize {
            let mut d = [0u8; 32];
            let from_lsb = i;
            d[31 - from_lsb / 8] = 1 << (from_lsb % 8);
            assert_eq!(Distance(d).bucket_index(), Some(i));
            assert_eq!(Distance(d).leading_zeros(), 255 - i as u32);
        }
        assert_eq!(Distance::ZERO.bucket_index(), None);
    }

    #[test]
    fn bits_read_msb_first() {
        let mut b = [0u8; 32];
        b[0] = 0b1000_0001;
        b[31] = 1;
        let k = Key(b);
        assert!(k.bit(0));
        assert!(!k.bit(1));
        assert!(k.bit(7));
        assert!(k.bit(255));
        assert!(!k.bit(256));
        assert!(!k.bit(usize::MAX));
    }

    #[test]
    fn peer_id_validation() {
        assert_eq!(Key::from_peer_id(b""), Err(KadError::EmptyPeerId));
        let long = vec![7u8; MAX_PEER_ID_LEN + 1];
        assert_eq!(
            Key::from_peer_id(&long),
            Err(KadError::PeerIdTooLong { len: MAX_PEER_ID_LEN + 1, max: MAX_PEER_ID_LEN })
        );
        assert!(Key::from_peer_id(&long[..MAX_PEER_ID_LEN]).is_ok());
        // SHA-256("abc"), the FIPS 180-2 test vector.
        let k = Key::from_peer_id(b"abc").unwrap();
        assert_eq!(k.0[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(k.0[28..], [0xf2, 0x00, 0x15, 0xad]);
    }

    #[test]
    fn from_bytes_requires_32() {
        assert_eq!(Key::from_bytes(&[0; 31]), Err(KadError::BadKeyLength { len: 31 }));
        assert_eq!(Key::from_bytes(&[0; 33]), Err(KadError::BadKeyLength { len: 33 }));
        assert_eq!(Key::from_bytes(&[9; 32]), Ok(Key([9; 32])));
    }
}
