//! Tests of the §2.3 lookup: unit behaviour, and whole lookups over a
//! simulated network whose nodes answer from their own routing tables.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};

use super::*;
use crate::kad::{RoutingTable, TableConfig};

fn pid(i: u64) -> PeerId {
    format!("node-{i}").into_bytes()
}

fn key(p: &[u8]) -> Key {
    Key::from_peer_id(p).unwrap()
}

fn config(alpha: usize, num_results: usize) -> LookupConfig {
    LookupConfig { alpha, num_results, ..Default::default() }
}

/// splitmix64: a tiny deterministic PRNG, so no `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn key(&mut self) -> Key {
        let mut b = [0u8; 32];
        for chunk in b.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_be_bytes());
        }
        Key(b)
    }
}

#[test]
fn config_validation() {
    assert!(LookupConfig::default().validate().is_ok());
    for c in [
        LookupConfig { alpha: 0, ..Default::default() },
        LookupConfig { num_results: 0, ..Default::default() },
        LookupConfig { max_closer_per_response: 0, ..Default::default() },
        LookupConfig { peer_timeout: -1.0, ..Default::default() },
        LookupConfig { peer_timeout: f64::NAN, ..Default::default() },
    ] {
        let r = ClosestPeersLookup::new(Key([0; 32]), vec![], None, c, 0.0);
        assert!(matches!(r, Err(KadError::InvalidConfig(_))));
    }
    let r = ClosestPeersLookup::new(Key([0; 32]), vec![], Some(b""), config(3, 20), 0.0);
    assert_eq!(r.unwrap_err(), KadError::EmptyPeerId);
}

#[test]
fn seeds_are_filtered_and_empty_lookup_finishes() {
    let seeds = vec![pid(1), vec![], vec![0; 500], pid(1), pid(2), b"me".to_vec()];
    let mut l = ClosestPeersLookup::new(Key([3; 32]), seeds, Some(b"me"), config(3, 20), 0.0).unwrap();
    assert_eq!(l.num_candidates(), 2);
    let mut asked = HashSet::new();
    while let LookupStep::Query(p) = l.next(0.0) {
        asked.insert(p);
    }
    assert_eq!(asked, HashSet::from([pid(1), pid(2)]));

    let mut empty = ClosestPeersLookup::new(Key([3; 32]), vec![], None, config(3, 20), 0.0).unwrap();
    assert_eq!(empty.next(0.0), LookupStep::Finished);
    assert!(empty.is_finished() && empty.result().is_empty());
}

#[test]
fn parallelism_stall_and_termination() {
    let target = Key([0; 32]);
    let seeds: Vec<PeerId> = (0..6).map(pid).collect();
    let mut l = ClosestPeersLookup::new(target, seeds.clone(), None, config(2, 4), 0.0).unwrap();
    let a = l.next(0.0);
    let b = l.next(0.0);
    assert!(matches!((&a, &b), (LookupStep::Query(_), LookupStep::Query(_))));
    assert_eq!(l.next(0.0), LookupStep::Waiting, "alpha = 2 in flight");
    let (LookupStep::Query(a), LookupStep::Query(b)) = (a, b) else { unreachable!() };
    assert!(!l.on_success(&pid(99), &[], 0.0), "never queried");
    // Two answers with nobody new make a stalled round (§2.3) ...
    assert!(l.on_success(&a, &[], 0.0));
    assert!(!l.on_success(&a, &[], 0.0), "answer counted once");
    assert!(l.on_failure(&b, 0.0));
    assert!(l.is_stalled());
    // ... so the rest of the 4 closest are all asked at once.
    let mut burst = Vec::new();
    while let LookupStep::Query(p) = l.next(0.0) {
        burst.push(p);
    }
    assert_eq!(burst.len(), 3, "4 closest minus the one that answered");
    for p in &burst {
        assert!(l.on_success(p, &[], 1.0));
    }
    assert_eq!(l.next(1.0), LookupStep::Finished);
    assert_eq!((l.num_queried(), l.num_succeeded(), l.num_failed()), (5, 4, 1));
    let res = l.result();
    assert_eq!(res.len(), 4);
    assert!(!res.contains(&b));
    let dists: Vec<Distance> = res.iter().map(|p| key(p).distance(&target)).collect();
    assert!(dists.windows(2).all(|w| w[0] < w[1]));
    assert!(!l.on_success(&burst[0], &[], 2.0), "finished lookups ignore input");
}

#[test]
fn timeouts_free_slots_but_late_answers_count() {
    let target = Key([9; 32]);
    let seeds: Vec<PeerId> = (0..3).map(pid).collect();
    let mut l = ClosestPeersLookup::new(target, seeds, None, config(1, 3), 0.0).unwrap();
    let LookupStep::Query(slow) = l.next(0.0) else { panic!() };
    assert_eq!(l.next(5.0), LookupStep::Waiting);
    assert_eq!(l.num_in_flight(5.0), 1);
    let LookupStep::Query(other) = l.next(10.0) else { panic!() };
    assert_ne!(slow, other);
    assert!(l.on_success(&slow, &[], 11.0), "late success accepted");
    assert!(l.on_success(&other, &[], 11.0));
    let LookupStep::Query(last) = l.next(11.0) else { panic!() };
    // A silent peer cannot hold the lookup up: once it times out the
    // lookup finishes with the peers that did answer.
    assert_eq!(l.next(20.0), LookupStep::Waiting);
    assert_eq!(l.next(21.0), LookupStep::Finished);
    assert!(!l.result().contains(&last));
    assert_eq!(l.result().len(), 2);
}

#[test]
fn hostile_responses_are_bounded() {
    let target = Key([0x55; 32]);
    let mut l = ClosestPeersLookup::new(target, vec![pid(0)], None, config(3, 20), 0.0).unwrap();
    let LookupStep::Query(p) = l.next(0.0) else { panic!() };
    let mut flood: Vec<Vec<u8>> = (0..10_000u64).map(|i| format!("fake-{i}").into_bytes()).collect();
    // Beyond the first `max_closer_per_response`, nothing is even looked at.
    flood[5000] = vec![0; 10_000];
    assert!(l.on_success(&p, &flood, 0.0));
    assert!(l.num_candidates() <= 1 + 20);
    let mut now = 0.0;
    for round in 0..200 {
        match l.next(now) {
            LookupStep::Query(p) => {
                let offset = 10_000 * (round + 1);
                let flood: Vec<Vec<u8>> =
                    (offset..offset + 10_000).map(|i| format!("fake-{i}").into_bytes()).collect();
                assert!(l.on_success(&p, &flood, now));
            }
            LookupStep::Waiting => now += 1.0,
            LookupStep::Finished => break,
        }
        assert!(l.num_candidates() <= l.candidate_cap() + l.num_queried());
        assert!(l.num_candidates() <= l.candidate_cap() + 20 + 3);
    }
}

/// A static network where every node answers FIND_NODE from its own
/// routing table. Tables are filled in random order from the whole
/// network, so buckets hold k arbitrary peers of their range, as §2.2
/// would leave them, and the Kademlia guarantee should make lookups exact.
struct Net {
    nodes: Vec<PeerId>,
    tables: HashMap<PeerId, RoutingTable>,
}

impl Net {
    fn new(n: u64, rng: &mut Rng) -> Net {
        let nodes: Vec<PeerId> = (0..n).map(pid).collect();
        let mut tables = HashMap::new();
        for me in &nodes {
            let mut t = RoutingTable::new(me, TableConfig::default(), 0.0).unwrap();
            let mut order = nodes.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            for p in &order {
                t.update(p, 0.0).unwrap();
            }
            tables.insert(me.clone(), t);
        }
        Net { nodes, tables }
    }

    fn answer(&self, peer: &[u8], target: &Key) -> Vec<Vec<u8>> {
        let t = &self.tables[peer];
        t.closest(target, 20).into_iter().map(|(p, _)| p).collect()
    }

    fn true_closest(&self, target: &Key, k: usize, skip: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = self.nodes.iter().filter(|p| !skip(p)).cloned().collect();
        v.sort_by_key(|p| key(p).distance(target));
        v.truncate(k);
        v
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Answers,
    Refuses,
    Silent,
}

/// Drive one lookup to completion, checking §2.3's parallelism bound.
fn drive(
    net: &Net,
    me: &PeerId,
    target: Key,
    rng: &mut Rng,
    behaviour: impl Fn(&[u8]) -> Behaviour,
) -> ClosestPeersLookup {
    let cfg = config(3, 20);
    let seeds = net.tables[me].closest(&target, 20).into_iter().map(|(p, _)| p).collect();
    let mut l = ClosestPeersLookup::new(target, seeds, Some(me), cfg.clone(), 0.0).unwrap();
    let mut now = 0.0;
    let mut pending: Vec<(PeerId, f64)> = Vec::new();
    for _ in 0..100_000 {
        match l.next(now) {
            LookupStep::Query(p) => {
                let live = pending.iter().filter(|(_, t)| now - t < cfg.peer_timeout).count();
                assert!(l.is_stalled() || live < cfg.alpha, "normal phase exceeded alpha");
                assert_eq!(l.num_in_flight(now), live + 1);
                pending.push((p, now));
            }
            LookupStep::Waiting => {
                let ready: Vec<usize> =
                    (0..pending.len()).filter(|&i| behaviour(&pending[i].0) != Behaviour::Silent).collect();
                if ready.is_empty() {
                    now += cfg.peer_timeout;
                    continue;
                }
                let (p, _) = pending.swap_remove(ready[rng.below(ready.len())]);
                now += 0.01;
                match behaviour(&p) {
                    Behaviour::Answers => assert!(l.on_success(&p, &net.answer(&p, &target), now)),
                    _ => assert!(l.on_failure(&p, now)),
                }
            }
            LookupStep::Finished => return l,
        }
    }
    panic!("lookup did not terminate");
}

#[test]
fn lookups_find_the_true_closest() {
    let mut rng = Rng(7);
    let net = Net::new(300, &mut rng);
    for _ in 0..25 {
        let me = net.nodes[rng.below(net.nodes.len())].clone();
        let target = rng.key();
        let l = drive(&net, &me, target, &mut rng, |_| Behaviour::Answers);
        assert_eq!(l.result(), net.true_closest(&target, 20, |p| *p == me));
        assert_eq!(l.num_failed(), 0);
    }
}

#[test]
fn lookups_survive_failing_and_silent_nodes() {
    let mut rng = Rng(11);
    let net = Net::new(300, &mut rng);
    let behaviour = |p: &[u8]| match key(p).0[0] % 10 {
        0 => Behaviour::Refuses,
        1 => Behaviour::Silent,
        _ => Behaviour::Answers,
    };
    for _ in 0..25 {
        let me = loop {
            let me = net.nodes[rng.below(net.nodes.len())].clone();
            if behaviour(&me) == Behaviour::Answers {
                break me;
            }
        };
        let target = rng.key();
        let l = drive(&net, &me, target, &mut rng, behaviour);
        let res = l.result();
        assert!(res.iter().all(|p| behaviour(p) == Behaviour::Answers));
        // Responders return only their 20 closest, dead ones included, so
        // live nodes ranked below 20 overall may be unknowable; but every
        // live node among the true 20 closest must be found, in order.
        let top = net.true_closest(&target, 20, |p| *p == me);
        let must: Vec<PeerId> = top.into_iter().filter(|p| behaviour(p) == Behaviour::Answers).collect();
        assert_eq!(res[..must.len()], must[..]);
        let d: Vec<Distance> = res.iter().map(|p| key(p).distance(&target)).collect();
        assert!(d.windows(2).all(|w| w[0] < w[1]));
        assert!(l.num_failed() > 0 || l.num_queried() > l.num_succeeded());
    }
}

#[test]
fn hostile_node_in_the_network_cannot_blow_up_memory() {
    let mut rng = Rng(3);
    let net = Net::new(200, &mut rng);
    let liar = net.nodes[17].clone();
    let target = rng.key();
    let me = net.nodes[0].clone();
    let seeds: Vec<PeerId> = vec![liar.clone()];
    let mut l = ClosestPeersLookup::new(target, seeds, Some(&me), config(3, 20), 0.0).unwrap();
    let mut fake = 0u64;
    for _ in 0..10_000 {
        match l.next(0.0) {
            LookupStep::Query(p) if p == liar || p.starts_with(b"node-") => {
                let mut answer = net.answer(&p, &target);
                if p == liar {
                    answer = (fake..fake + 10_000).map(|i| format!("fake-{i}").into_bytes()).collect();
                    fake += 10_000;
                }
                l.on_success(&p, &answer, 0.0);
            }
            LookupStep::Query(p) => {
                l.on_failure(&p, 0.0);
            }
            LookupStep::Waiting => unreachable!("every query is answered at once"),
            LookupStep::Finished => break,
        }
        assert!(l.num_candidates() <= l.candidate_cap() + l.num_queried());
    }
    assert!(l.is_finished());
    assert!(l.result().iter().all(|p| p.starts_with(b"node-")));
}
