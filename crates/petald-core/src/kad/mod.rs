//! Kademlia (Maymounkov & Mazières, "Kademlia: A Peer-to-peer Information
//! System Based on the XOR Metric", IPTPS 2002) for petald's peer discovery.
//!
//! Everything here is sans-IO: no sockets, no clocks, no randomness. The
//! caller passes the current monotonic time (`now`, in seconds) and any
//! random bytes it wants used, and performs the RPCs the state machines ask
//! for. That keeps the logic deterministic and testable, and lets the
//! Python side drive it from its own event loop.
//!
//! - [`key`]: 256-bit keys and the XOR metric (§2.1).
//! - [`table`]: the k-bucket routing table (§2.2, §2.4, §4.1).
//! - [`lookup`]: the iterative node lookup (§2.3).
//! - [`error`]: validation errors for untrusted input and bad configs.

pub mod error;
pub mod key;
pub mod lookup;
pub mod table;

pub use error::KadError;
pub use key::{Distance, Key};
pub use lookup::{ClosestPeersLookup, LookupConfig, LookupStep};
pub use table::{FailureOutcome, RoutingTable, TableConfig, Update};

/// A libp2p peer id in its binary (multihash) form.
pub type PeerId = Vec<u8>;

/// Upper bound on peer id length. libp2p peer ids are about 38-42 bytes;
/// they arrive from untrusted peers, so anything much larger is refused
/// before it is hashed or stored.
pub const MAX_PEER_ID_LEN: usize = 128;
