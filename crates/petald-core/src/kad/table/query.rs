//! Read-side queries of the routing table: XOR-ordered nearest entries
//! (§2.1, §2.4), bucket introspection and the §2.3 refresh bookkeeping.

use super::{Bucket, Entry, RoutingTable};
use crate::kad::key::KEY_BITS;
use crate::kad::{Distance, KadError, Key, PeerId};

impl RoutingTable {
    /// When `peer` (a bucket entry) was last heard from.
    pub fn last_seen(&self, peer: &[u8]) -> Option<f64> {
        let key = Key::from_peer_id(peer).ok()?;
        self.index.get(&key).map(|e| e.last_seen)
    }

    /// The `n` entries nearest to `target`, nearest first.
    ///
    /// Walks the key-ordered index as the §2.4 tree. Keys sharing exactly
    /// `d` leading bits with `target` form one subtree (the sibling of
    /// `target`'s own at depth `d`), and by §2.1 every key in it is closer
    /// than any key sharing fewer bits; so the answer is these subtrees
    /// taken from the deepest outwards. The deepest non-empty one is found
    /// from `target`'s two neighbours in key order (the longest shared
    /// prefix is always with a neighbour), and only the last subtree
    /// needed is searched further. Cost is about O((n + log N) · log N)
    /// instead of a scan of all N entries.
    pub fn closest(&self, target: &Key, n: usize) -> Vec<(PeerId, Key)> {
        let mut out = Vec::with_capacity(n.min(self.index.len()));
        if n == 0 {
            return out;
        }
        let below = self.index.range(..=*target).next_back();
        let above = self.index.range(*target..).next();
        let Some(deepest) =
            [below, above].into_iter().flatten().map(|(k, _)| k.common_prefix_len(target) as usize).max()
        else {
            return out;
        };
        if let Some(e) = self.index.get(target) {
            out.push((e.peer.clone(), *target));
        }
        let mut scratch = Vec::with_capacity(n.saturating_add(1).min(64));
        for depth in (0..=deepest.min(KEY_BITS - 1)).rev() {
            let want = n - out.len();
            if want == 0 {
                break;
            }
            let side = !target.bit(depth);
            let lo = subtree_bound(target, depth, side, false);
            let hi = subtree_bound(target, depth, side, true);
            self.collect_closest(target, lo, hi, want, &mut out, &mut scratch);
        }
        out
    }

    /// Append to `out` the `want` keys in `[lo, hi]` nearest to `target`
    /// and return how many were appended. `[lo, hi]` is always the key
    /// range of one subtree, so all its keys share their leading bits.
    fn collect_closest<'a>(
        &'a self,
        target: &Key,
        lo: Key,
        hi: Key,
        want: usize,
        out: &mut Vec<(PeerId, Key)>,
        scratch: &mut Vec<(&'a Key, &'a Entry)>,
    ) -> usize {
        scratch.clear();
        let mut range = self.index.range(lo..=hi);
        for item in range.by_ref() {
            scratch.push(item);
            if scratch.len() > want {
                break;
            }
        }
        if scratch.len() <= want {
            // The whole subtree is needed; order it and take it.
            scratch.sort_unstable_by_key(|(k, _)| k.distance(target));
            out.extend(scratch.iter().map(|(k, e)| (e.peer.clone(), **k)));
            return scratch.len();
        }
        let (Some(&(first, _)), Some(&(tail, _))) = (scratch.first(), scratch.last()) else {
            return 0;
        };
        let first = *first;
        let last = range.next_back().map_or(*tail, |(k, _)| *k);
        // Depths where the subtree does not branch cannot reorder anything;
        // jump straight to the first bit on which its keys disagree.
        let depth = first.common_prefix_len(&last) as usize;
        let zeros = (first, subtree_bound(&first, depth, false, true));
        let ones = (subtree_bound(&first, depth, true, false), last);
        let (near, far) = if target.bit(depth) { (ones, zeros) } else { (zeros, ones) };
        let got = self.collect_closest(target, near.0, near.1, want, out, scratch);
        if got >= want {
            return got;
        }
        got + self.collect_closest(target, far.0, far.1, want - got, out, scratch)
    }

    fn bucket(&self, index: usize) -> Result<&Bucket, KadError> {
        self.buckets.get(index).ok_or(KadError::BucketOutOfRange { index })
    }

    /// Entries of bucket `index`, least recently seen first.
    pub fn bucket_entries(&self, index: usize) -> Result<Vec<PeerId>, KadError> {
        let bucket = self.bucket(index)?;
        Ok(bucket.by_age.values().filter_map(|k| self.index.get(k).map(|e| e.peer.clone())).collect())
    }

    /// `(index, len)` of every non-empty bucket, closest bucket first.
    pub fn bucket_sizes(&self) -> Vec<(usize, usize)> {
        let sizes = self.buckets.iter().map(|b| b.by_age.len()).enumerate();
        sizes.filter(|&(_, len)| len > 0).collect()
    }

    /// Replacement cache of bucket `index`, most recently seen first.
    pub fn replacements(&self, index: usize) -> Result<Vec<PeerId>, KadError> {
        let bucket = self.bucket(index)?;
        Ok(bucket.replacements.iter().map(|r| r.peer.clone()).collect())
    }

    /// Record that a lookup covering bucket `index` was just performed.
    pub fn mark_refreshed(&mut self, index: usize, now: f64) -> Result<(), KadError> {
        let bucket = self.buckets.get_mut(index).ok_or(KadError::BucketOutOfRange { index })?;
        bucket.last_refreshed = now;
        Ok(())
    }

    /// Record a lookup for `target`: it refreshes the bucket `target`
    /// falls in (§2.3), whatever the reason for the lookup was.
    pub fn note_lookup(&mut self, target: &Key, now: f64) {
        if let Some(b) = self.bucket_index(target) {
            self.mark_refreshed(b, now).ok();
        }
    }

    /// Buckets due for a refresh lookup (§2.3: no lookup in their range
    /// for `refresh_interval`), closest first.
    ///
    /// Only buckets from the closest non-empty one outwards are offered.
    /// Closer buckets are, with hashed ids, almost surely empty; the
    /// lookup of our own key that a node performs when joining (§2.3)
    /// already searches them, and refreshing all 256 hourly would be
    /// wasted traffic. An empty table offers nothing: with no contacts
    /// there is nobody to ask, and bootstrapping is the caller's job.
    pub fn buckets_to_refresh(&self, now: f64) -> Vec<usize> {
        let Some(lowest) = self.buckets.iter().position(|b| !b.by_age.is_empty()) else {
            return Vec::new();
        };
        let interval = self.config.refresh_interval;
        (lowest..KEY_BITS).filter(|&i| now - self.buckets[i].last_refreshed >= interval).collect()
    }

    /// A key in bucket `index`'s range, for a refresh lookup. Randomness
    /// comes from `seed` so the table stays deterministic (sans-IO): the
    /// distance's bits below the bucket's leading bit are taken from it.
    pub fn random_key_in_bucket(&self, index: usize, seed: &[u8; 32]) -> Result<Key, KadError> {
        if index >= KEY_BITS {
            return Err(KadError::BucketOutOfRange { index });
        }
        // Bucket `index` = distances whose highest set bit is bit `index`
        // counted from the least significant end, i.e. MSB-first bit
        // `255 - index`: zero above it, one there, anything below.
        let top = KEY_BITS - 1 - index;
        let mut bytes = *seed;
        for (i, byte) in bytes.iter_mut().enumerate() {
            let start = i * 8;
            if start + 8 <= top {
                *byte = 0;
            } else if start <= top {
                let at = 0x80u8 >> (top - start);
                // Clear the bits above `top`, set the one at `top`.
                *byte = (*byte & (at - 1)) | at;
            }
        }
        Ok(self.local_key.xor(&Distance(bytes)))
    }
}

/// Boundary key of a subtree: `key`'s bits before `depth`, then `bit` at
/// `depth`, then all ones (`rest_ones`, the subtree's last key) or all
/// zeros (its first key) after it.
fn subtree_bound(key: &Key, depth: usize, bit: bool, rest_ones: bool) -> Key {
    let mut out = key.0;
    let rest = if rest_ones { 0xff } else { 0x00 };
    for (i, byte) in out.iter_mut().enumerate() {
        let start = i * 8;
        if start + 8 <= depth {
            continue;
        }
        if start > depth {
            *byte = rest;
            continue;
        }
        let at = 0x80u8 >> (depth - start);
        let below = at - 1;
        let above = !(at | below);
        *byte = (*byte & above) | (if bit { at } else { 0 }) | (rest & below);
    }
    Key(out)
}
