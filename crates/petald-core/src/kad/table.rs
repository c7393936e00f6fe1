//! The k-bucket routing table (Maymounkov & Mazières 2002, §2.2, §2.4, §4.1).
//!
//! Instead of §2.4's tree of splitting buckets we keep the 256 fixed
//! buckets of §2.2 (bucket `i` holds peers at XOR distance `[2^i, 2^(i+1))`
//! from us); with uniformly hashed keys that is equivalent and far simpler.
//! Next to the buckets sits one ordered index of every entry's key: key
//! order flattens the §2.4 binary tree (a subtree is a contiguous range),
//! which is what lets [`RoutingTable::closest`] walk the tree in XOR order
//! without scanning the table.

use std::collections::{BTreeMap, VecDeque};

use super::key::KEY_BITS;
use super::{KadError, Key, PeerId};

mod query;
#[cfg(test)]
mod tests;

/// Tunables of the routing table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    /// Bucket capacity, the paper's `k` (§2.2).
    pub k: usize,
    /// How many recently seen peers each full bucket remembers as
    /// stand-ins for entries that stop answering (§4.1).
    pub replacement_cache_size: usize,
    /// Consecutive failures after which an entry is evicted even when no
    /// replacement is waiting (§4.1: tolerate transient loss, but do not
    /// keep a dead peer forever).
    pub stale_after_failures: u32,
    /// Seconds without a lookup in a bucket's range before it needs a
    /// refresh (§2.3: one hour).
    pub refresh_interval: f64,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig { k: 20, replacement_cache_size: 20, stale_after_failures: 5, refresh_interval: 3600.0 }
    }
}

impl TableConfig {
    /// Rejects values that would make the table degenerate.
    pub fn validate(&self) -> Result<(), KadError> {
        if self.k == 0 {
            return Err(KadError::InvalidConfig("k must be at least 1".into()));
        }
        if self.stale_after_failures == 0 {
            return Err(KadError::InvalidConfig("stale_after_failures must be at least 1".into()));
        }
        // +inf is allowed and means "never refresh".
        if self.refresh_interval.is_nan() || self.refresh_interval <= 0.0 {
            return Err(KadError::InvalidConfig("refresh_interval must be positive".into()));
        }
        Ok(())
    }
}

/// What [`RoutingTable::update`] did with a peer that was seen alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The peer was new and its bucket had room.
    Inserted,
    /// The peer was already known; it is now the most recently seen.
    Refreshed,
    /// The bucket is full. The new peer waits in the replacement cache (if
    /// its size is not 0); the caller should ping `ping` (the least recently
    /// seen entry) and report the outcome with `update` or `on_failure`
    /// (§2.2), so that a dead entry makes room for the newcomer.
    Pending {
        /// Peer to ping.
        ping: PeerId,
    },
    /// The peer is the local node, which never enters its own table.
    Ignored,
}

/// What [`RoutingTable::on_failure`] did with an unresponsive peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The peer is gone from the table (or from a replacement cache);
    /// `replaced_by` is the cached peer promoted into its slot, if any.
    Evicted {
        /// Promoted replacement.
        replaced_by: Option<PeerId>,
    },
    /// The peer stays, having now failed `failures` times in a row.
    Kept {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// The peer was not in the table.
    Unknown,
}

#[derive(Debug, Clone)]
struct Entry {
    peer: PeerId,
    /// Position in its bucket's least-recently-seen order.
    seq: u64,
    failures: u32,
    last_seen: f64,
}

#[derive(Debug, Clone)]
struct Replacement {
    peer: PeerId,
    key: Key,
    last_seen: f64,
}

#[derive(Debug, Clone)]
struct Bucket {
    /// Sequence number -> key, least recently seen first. A map rather
    /// than a list so that moving an entry to the tail stays O(log k)
    /// even when `k` is configured very large.
    by_age: BTreeMap<u64, Key>,
    /// Most recently seen first (§4.1).
    replacements: VecDeque<Replacement>,
    last_refreshed: f64,
}

impl Bucket {
    fn remove_replacement(&mut self, key: &Key) -> bool {
        match self.replacements.iter().position(|r| r.key == *key) {
            Some(pos) => self.replacements.remove(pos).is_some(),
            None => false,
        }
    }
}

/// A Kademlia routing table for one local node.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    local_key: Key,
    config: TableConfig,
    buckets: Vec<Bucket>,
    /// Every bucket entry (replacements excluded), keyed by its Kademlia key.
    index: BTreeMap<Key, Entry>,
    next_seq: u64,
}

impl RoutingTable {
    /// An empty table; every bucket counts as refreshed at `now`, so the
    /// first refreshes fall due one interval after start-up.
    pub fn new(local_peer: &[u8], config: TableConfig, now: f64) -> Result<Self, KadError> {
        config.validate()?;
        let local_key = Key::from_peer_id(local_peer)?;
        let bucket = Bucket { by_age: BTreeMap::new(), replacements: VecDeque::new(), last_refreshed: now };
        Ok(RoutingTable {
            local_key,
            config,
            buckets: vec![bucket; KEY_BITS],
            index: BTreeMap::new(),
            next_seq: 0,
        })
    }

    /// The local node's key.
    pub fn local_key(&self) -> Key {
        self.local_key
    }

    /// The configuration the table was built with.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// Number of bucket entries (replacement caches not counted).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no bucket holds an entry.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `peer` is a bucket entry (not merely a replacement).
    pub fn contains(&self, peer: &[u8]) -> bool {
        Key::from_peer_id(peer).is_ok_and(|k| self.index.contains_key(&k))
    }

    /// The bucket a key belongs in; `None` for the local key.
    pub fn bucket_index(&self, peer_key: &Key) -> Option<usize> {
        self.local_key.distance(peer_key).bucket_index()
    }

    fn bump_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Record that `peer` was just heard from (§2.2).
    ///
    /// Live entries are never displaced by newcomers: the paper observes
    /// that peers which have been up long are likely to stay up, and this
    /// also means an attacker cannot flush a bucket by flooding new ids.
    pub fn update(&mut self, peer: &[u8], now: f64) -> Result<Update, KadError> {
        let key = Key::from_peer_id(peer)?;
        let Some(b) = self.bucket_index(&key) else {
            return Ok(Update::Ignored);
        };
        let seq = self.bump_seq();
        let bucket = &mut self.buckets[b];
        if let Some(entry) = self.index.get_mut(&key) {
            bucket.by_age.remove(&entry.seq);
            bucket.by_age.insert(seq, key);
            entry.seq = seq;
            entry.failures = 0;
            entry.last_seen = now;
            return Ok(Update::Refreshed);
        }
        if bucket.by_age.len() < self.config.k {
            bucket.remove_replacement(&key);
            bucket.by_age.insert(seq, key);
            let peer = peer.to_vec();
            let entry = Entry { peer, seq, failures: 0, last_seen: now };
            self.index.insert(key, entry);
            return Ok(Update::Inserted);
        }
        // Full bucket: remember the newcomer (freshest first, §4.1) and let
        // the caller decide, by pinging, whether the oldest entry is dead.
        bucket.remove_replacement(&key);
        if self.config.replacement_cache_size > 0 {
            let peer = peer.to_vec();
            let last_seen = now;
            bucket.replacements.push_front(Replacement { peer, key, last_seen });
            bucket.replacements.truncate(self.config.replacement_cache_size);
        }
        let lrs = bucket.by_age.first_key_value().map(|(_, k)| *k);
        match lrs.and_then(|k| self.index.get(&k)) {
            Some(entry) => Ok(Update::Pending { ping: entry.peer.clone() }),
            None => Ok(Update::Ignored),
        }
    }

    /// Record that `peer` failed to answer a ping or RPC (§4.1).
    ///
    /// With a replacement at hand the entry goes at once: the slot is
    /// better spent on a peer known to be alive. Without one it is kept
    /// until it has failed `stale_after_failures` times in a row, since
    /// an empty slot helps nobody and the failure may have been transient.
    pub fn on_failure(&mut self, peer: &[u8], _now: f64) -> FailureOutcome {
        let Ok(key) = Key::from_peer_id(peer) else {
            return FailureOutcome::Unknown;
        };
        let Some(b) = self.bucket_index(&key) else {
            return FailureOutcome::Unknown;
        };
        let bucket = &mut self.buckets[b];
        if let Some(entry) = self.index.get_mut(&key) {
            entry.failures = entry.failures.saturating_add(1);
            let failures = entry.failures;
            if bucket.replacements.is_empty() && failures < self.config.stale_after_failures {
                return FailureOutcome::Kept { failures };
            }
            bucket.by_age.remove(&entry.seq);
            self.index.remove(&key);
            let replaced_by = self.promote_replacement(b);
            return FailureOutcome::Evicted { replaced_by };
        }
        if bucket.remove_replacement(&key) {
            return FailureOutcome::Evicted { replaced_by: None };
        }
        FailureOutcome::Unknown
    }

    /// Forget `peer` entirely (bucket entry or replacement). A vacated
    /// bucket slot is refilled from the replacement cache, so that a
    /// non-empty cache always implies a full bucket. Returns whether
    /// anything was removed.
    pub fn remove(&mut self, peer: &[u8]) -> bool {
        let Ok(key) = Key::from_peer_id(peer) else {
            return false;
        };
        let Some(b) = self.bucket_index(&key) else {
            return false;
        };
        if let Some(entry) = self.index.remove(&key) {
            self.buckets[b].by_age.remove(&entry.seq);
            self.promote_replacement(b);
            return true;
        }
        self.buckets[b].remove_replacement(&key)
    }

    /// Move the freshest cached peer into bucket `b` as its most recently
    /// seen entry (§4.1).
    fn promote_replacement(&mut self, b: usize) -> Option<PeerId> {
        let r = self.buckets.get_mut(b)?.replacements.pop_front()?;
        let seq = self.bump_seq();
        self.buckets[b].by_age.insert(seq, r.key);
        let promoted = r.peer.clone();
        let entry = Entry { peer: r.peer, seq, failures: 0, last_seen: r.last_seen };
        self.index.insert(r.key, entry);
        Some(promoted)
    }
}
