//! The iterative node lookup (Maymounkov & Mazières 2002, §2.3) as a
//! sans-IO state machine. The caller asks [`ClosestPeersLookup::next`]
//! what to do, sends the FIND_NODE RPCs itself and reports each answer or
//! failure back. Time is passed in, so the same code runs under any event
//! loop and in tests.

use std::collections::BTreeMap;

use super::{Distance, KadError, Key, PeerId};

#[cfg(test)]
mod tests;

/// Live (not failed) candidates kept, as a multiple of `num_results`.
/// Some slack beyond `num_results` lets a candidate that fails be replaced
/// by the next closest without asking the network again; a hard cap keeps
/// memory bounded however many peers hostile responders announce.
const CANDIDATE_FACTOR: usize = 4;

/// Tunables of one lookup.
#[derive(Debug, Clone, PartialEq)]
pub struct LookupConfig {
    /// Queries in flight in the normal phase, the paper's `alpha` (§2.3).
    pub alpha: usize,
    /// How many closest peers the lookup must find, the paper's `k`.
    pub num_results: usize,
    /// Seconds after which a silent peer stops occupying a parallelism
    /// slot and stops blocking termination (its late answer still counts).
    pub peer_timeout: f64,
    /// Peers taken from one response; the rest are ignored, since a
    /// responder is untrusted and honest ones return at most `k`.
    pub max_closer_per_response: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig { alpha: 3, num_results: 20, peer_timeout: 10.0, max_closer_per_response: 20 }
    }
}

impl LookupConfig {
    /// Rejects values that would stall or trivialise the lookup.
    pub fn validate(&self) -> Result<(), KadError> {
        let bad = |msg: &str| Err(KadError::InvalidConfig(msg.into()));
        if self.alpha == 0 {
            return bad("alpha must be at least 1");
        }
        if self.num_results == 0 {
            return bad("num_results must be at least 1");
        }
        if self.max_closer_per_response == 0 {
            return bad("max_closer_per_response must be at least 1");
        }
        // +inf is allowed and means "never time out".
        if self.peer_timeout.is_nan() || self.peer_timeout <= 0.0 {
            return bad("peer_timeout must be positive");
        }
        Ok(())
    }
}

/// What the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupStep {
    /// Send FIND_NODE(target) to this peer.
    Query(PeerId),
    /// Nothing to send now; call `next` again after a response arrives or
    /// a timeout may have passed.
    Waiting,
    /// Done: read [`ClosestPeersLookup::result`].
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PeerState {
    NotContacted,
    Waiting { since: f64 },
    Succeeded,
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate {
    peer: PeerId,
    state: PeerState,
}

/// One iterative FIND_NODE lookup for `target`.
#[derive(Debug, Clone)]
pub struct ClosestPeersLookup {
    target: Key,
    local_key: Option<Key>,
    config: LookupConfig,
    /// Keyed by distance to the target: iteration is nearest first, and
    /// distinct keys have distinct distances, so this also deduplicates.
    candidates: BTreeMap<Distance, Candidate>,
    closest_seen: Option<Distance>,
    /// Consecutive responses that brought nobody closer.
    no_progress: usize,
    stalled: bool,
    finished: bool,
    num_queried: usize,
    num_succeeded: usize,
    num_failed: usize,
}

impl ClosestPeersLookup {
    /// Start a lookup from `seeds` (typically the routing table's closest
    /// entries to `target`). Invalid or duplicate seeds and the local peer
    /// are skipped; an invalid `local_peer` is an error.
    pub fn new(
        target: Key,
        seeds: Vec<PeerId>,
        local_peer: Option<&[u8]>,
        config: LookupConfig,
        _now: f64,
    ) -> Result<Self, KadError> {
        config.validate()?;
        let local_key = local_peer.map(Key::from_peer_id).transpose()?;
        let mut lookup = ClosestPeersLookup {
            target,
            local_key,
            config,
            candidates: BTreeMap::new(),
            closest_seen: None,
            no_progress: 0,
            stalled: false,
            finished: false,
            num_queried: 0,
            num_succeeded: 0,
            num_failed: 0,
        };
        for seed in &seeds {
            lookup.add_candidate(seed);
        }
        lookup.prune();
        Ok(lookup)
    }

    /// The key being looked up.
    pub fn target(&self) -> Key {
        self.target
    }

    /// Add a not-yet-contacted candidate; returns whether it was new and
    /// closer than anything seen before.
    fn add_candidate(&mut self, peer: &[u8]) -> bool {
        let Ok(key) = Key::from_peer_id(peer) else {
            return false;
        };
        if Some(key) == self.local_key {
            return false;
        }
        let d = key.distance(&self.target);
        if self.candidates.contains_key(&d) {
            return false;
        }
        let (peer, state) = (peer.to_vec(), PeerState::NotContacted);
        self.candidates.insert(d, Candidate { peer, state });
        let closer = !matches!(self.closest_seen, Some(c) if c <= d);
        if closer {
            self.closest_seen = Some(d);
        }
        closer
    }

    fn timed_out(&self, since: f64, now: f64) -> bool {
        now - since >= self.config.peer_timeout
    }

    /// Drop candidates that can no longer matter, then enforce the cap.
    fn prune(&mut self) {
        let n = self.config.num_results;
        // Beyond the n-th success nothing can enter the result or be queried
        // (the n closest live candidates are all nearer). Successes only
        // accumulate, so this horizon only moves inwards and a dropped peer
        // announced again is dropped again. In-flight peers stay so that
        // their answers are recognised.
        let horizon = self
            .candidates
            .iter()
            .filter(|(_, c)| c.state == PeerState::Succeeded)
            .nth(n - 1)
            .map(|(d, _)| *d);
        if let Some(h) = horizon {
            // `range(h..)` starts at `h` itself, which stays.
            let far = self.candidates.range(h..).skip(1);
            let drop: Vec<Distance> =
                far.filter(|(_, c)| !matches!(c.state, PeerState::Waiting { .. })).map(|(d, _)| *d).collect();
            for d in &drop {
                self.candidates.remove(d);
            }
        }
        // Failed peers are remembered (so they are never retried) and are
        // bounded by the queries sent; the rest is capped here, shedding
        // the farthest uncontacted candidates first.
        let cap = n.saturating_mul(CANDIDATE_FACTOR);
        let live = self.candidates.values().filter(|c| c.state != PeerState::Failed).count();
        let excess = live.saturating_sub(cap);
        let spare = self.candidates.iter().rev();
        let drop: Vec<Distance> =
            spare.filter(|(_, c)| c.state == PeerState::NotContacted).take(excess).map(|(d, _)| *d).collect();
        for d in &drop {
            self.candidates.remove(d);
        }
    }

    /// What to do next at time `now`.
    ///
    /// §2.3: keep `alpha` queries in flight to the closest candidates not
    /// yet asked; once a round brings nobody closer, ask all of the
    /// `num_results` closest not yet asked at once. The lookup ends when
    /// the `num_results` closest candidates that have not failed have all
    /// answered. Silent peers past `peer_timeout` are skipped for both
    /// purposes, so one dead peer cannot hold the lookup up.
    pub fn next(&mut self, now: f64) -> LookupStep {
        if self.finished {
            return LookupStep::Finished;
        }
        let parallelism = if self.stalled { self.config.num_results } else { self.config.alpha };
        let in_flight = self.num_in_flight(now);
        let mut live = 0usize;
        let mut waiting_in_top = false;
        let mut pick = None;
        for (d, c) in &self.candidates {
            match c.state {
                PeerState::Failed => continue,
                PeerState::Waiting { since } if self.timed_out(since, now) => continue,
                PeerState::Waiting { .. } => waiting_in_top = true,
                PeerState::NotContacted => {
                    pick = Some(*d);
                    break;
                }
                PeerState::Succeeded => {}
            }
            live += 1;
            if live >= self.config.num_results {
                break;
            }
        }
        if let Some(d) = pick {
            if in_flight >= parallelism {
                return LookupStep::Waiting;
            }
            if let Some(c) = self.candidates.get_mut(&d) {
                c.state = PeerState::Waiting { since: now };
                self.num_queried += 1;
                return LookupStep::Query(c.peer.clone());
            }
        }
        if waiting_in_top {
            return LookupStep::Waiting;
        }
        self.finished = true;
        LookupStep::Finished
    }

    /// `peer` answered with `closer_peers`. Returns false (and ignores the
    /// answer) if `peer` was not being queried or the lookup is over.
    pub fn on_success(&mut self, peer: &[u8], closer_peers: &[Vec<u8>], _now: f64) -> bool {
        if !self.settle(peer, PeerState::Succeeded) {
            return false;
        }
        self.num_succeeded += 1;
        let mut progress = false;
        // Invalid entries count against the limit too, so a hostile
        // response costs at most `max_closer_per_response` hashes.
        for p in closer_peers.iter().take(self.config.max_closer_per_response) {
            progress |= self.add_candidate(p);
        }
        self.end_of_response(progress);
        self.prune();
        true
    }

    /// `peer` failed to answer (error or transport timeout). Returns false
    /// if it was not being queried or the lookup is over.
    pub fn on_failure(&mut self, peer: &[u8], _now: f64) -> bool {
        if !self.settle(peer, PeerState::Failed) {
            return false;
        }
        self.num_failed += 1;
        self.end_of_response(false);
        true
    }

    /// Move an in-flight (possibly timed-out) `peer` to `state`.
    fn settle(&mut self, peer: &[u8], state: PeerState) -> bool {
        if self.finished {
            return false;
        }
        let Ok(key) = Key::from_peer_id(peer) else {
            return false;
        };
        match self.candidates.get_mut(&key.distance(&self.target)) {
            Some(c) if c.peer == peer && matches!(c.state, PeerState::Waiting { .. }) => {
                c.state = state;
                true
            }
            _ => false,
        }
    }

    /// §2.3's stall rule: a round (`alpha` replies; a failure brings nobody
    /// closer either) without anyone closer switches to querying all of the
    /// closest candidates at once; progress switches back.
    fn end_of_response(&mut self, progress: bool) {
        if progress {
            self.no_progress = 0;
            self.stalled = false;
        } else {
            self.no_progress = self.no_progress.saturating_add(1);
            if self.no_progress >= self.config.alpha {
                self.stalled = true;
            }
        }
    }

    /// Whether the lookup is over (done or aborted).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Abort: `next` returns `Finished`, later answers are ignored, and
    /// `result` returns what was found so far.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Whether the lookup is in §2.3's "no progress" phase, querying all
    /// of the closest candidates rather than `alpha` at a time.
    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Up to `num_results` peers that answered, closest to target first.
    pub fn result(&self) -> Vec<PeerId> {
        self.candidates
            .values()
            .filter(|c| c.state == PeerState::Succeeded)
            .take(self.config.num_results)
            .map(|c| c.peer.clone())
            .collect()
    }

    /// Queries issued so far.
    pub fn num_queried(&self) -> usize {
        self.num_queried
    }

    /// Queries answered successfully.
    pub fn num_succeeded(&self) -> usize {
        self.num_succeeded
    }

    /// Queries reported failed.
    pub fn num_failed(&self) -> usize {
        self.num_failed
    }

    /// Queries still occupying a parallelism slot at `now`.
    pub fn num_in_flight(&self, now: f64) -> usize {
        let live =
            |c: &&Candidate| matches!(c.state, PeerState::Waiting { since } if !self.timed_out(since, now));
        self.candidates.values().filter(live).count()
    }

    /// Candidates currently remembered (for monitoring memory use).
    pub fn num_candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Memory bound: the lookup never holds more than `candidate_cap() +
    /// num_queried()` candidates, whatever responders send, because only
    /// peers it actually queried can outlive the cap.
    pub fn candidate_cap(&self) -> usize {
        self.config.num_results.saturating_mul(CANDIDATE_FACTOR)
    }
}
