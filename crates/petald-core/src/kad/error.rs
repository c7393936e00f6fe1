//! Errors raised by the Kademlia routing table and lookup.
//!
//! Peer ids and keys reach us from untrusted peers, so every constructor
//! that takes raw bytes validates them and reports the problem as a value
//! instead of panicking.

/// Everything that can go wrong when feeding the routing table or a lookup.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KadError {
    /// A zero-length peer id would hash to a valid key, but no real peer
    /// has one, so it is almost certainly a decoding bug or an attack.
    #[error("peer id is empty")]
    EmptyPeerId,

    /// Peer ids are bounded so that a hostile peer cannot make us hash and
    /// store arbitrarily large blobs.
    #[error("peer id is {len} bytes long, the maximum is {max}")]
    PeerIdTooLong {
        /// Length of the rejected peer id.
        len: usize,
        /// The limit it exceeded ([`super::MAX_PEER_ID_LEN`]).
        max: usize,
    },

    /// Keys are exactly 256 bits.
    #[error("a key must be exactly 32 bytes, got {len}")]
    BadKeyLength {
        /// Length of the rejected byte string.
        len: usize,
    },

    /// Bucket indices run from 0 (closest) to 255 (farthest).
    #[error("bucket index {index} is out of range (0..=255)")]
    BucketOutOfRange {
        /// The rejected index.
        index: usize,
    },

    /// A configuration value makes the algorithm meaningless (for example
    /// `k = 0`, or a non-positive timeout).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_offending_values() {
        assert_eq!(KadError::EmptyPeerId.to_string(), "peer id is empty");
        assert_eq!(
            KadError::PeerIdTooLong { len: 200, max: 128 }.to_string(),
            "peer id is 200 bytes long, the maximum is 128"
        );
        assert_eq!(KadError::BadKeyLength { len: 7 }.to_string(), "a key must be exactly 32 bytes, got 7");
        assert_eq!(
            KadError::BucketOutOfRange { index: 300 }.to_string(),
            "bucket index 300 is out of range (0..=255)"
        );
        assert_eq!(
            KadError::InvalidConfig("k must be at least 1".into()).to_string(),
            "invalid configuration: k must be at least 1"
        );
    }
}
