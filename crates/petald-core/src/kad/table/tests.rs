//! Tests of the routing table: §2.2 bucket behaviour, §4.1 eviction, the
//! XOR-ordered `closest` against brute force, and refresh bookkeeping.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use proptest::prelude::*;

use super::*;

fn pid(i: u64) -> PeerId {
    format!("peer-{i}").into_bytes()
}

fn key(p: &[u8]) -> Key {
    Key::from_peer_id(p).unwrap()
}

fn table(k: usize, cache: usize, stale: u32) -> RoutingTable {
    let config = TableConfig {
        k,
        replacement_cache_size: cache,
        stale_after_failures: stale,
        refresh_interval: 3600.0,
    };
    RoutingTable::new(b"local", config, 0.0).unwrap()
}

/// The first `n` test peers that fall into bucket `b` of `t`.
fn peers_in_bucket(t: &RoutingTable, b: usize, n: usize) -> Vec<PeerId> {
    (0..).map(pid).filter(|p| t.bucket_index(&key(p)) == Some(b)).take(n).collect()
}

/// Every bucket entry, from the buckets' own bookkeeping.
fn all_entries(t: &RoutingTable) -> Vec<PeerId> {
    (0..256).flat_map(|i| t.bucket_entries(i).unwrap()).collect()
}

fn brute_closest(peers: &[PeerId], target: &Key, n: usize) -> Vec<(PeerId, Key)> {
    let mut v: Vec<_> = peers.iter().map(|p| (p.clone(), key(p))).collect();
    v.sort_by_key(|(_, k)| k.distance(target));
    v.truncate(n);
    v
}

#[test]
fn config_validation() {
    assert!(TableConfig::default().validate().is_ok());
    let bad = [
        TableConfig { k: 0, ..Default::default() },
        TableConfig { stale_after_failures: 0, ..Default::default() },
        TableConfig { refresh_interval: 0.0, ..Default::default() },
        TableConfig { refresh_interval: f64::NAN, ..Default::default() },
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(KadError::InvalidConfig(_))), "{c:?}");
        assert!(RoutingTable::new(b"me", c, 0.0).is_err());
    }
    let err = RoutingTable::new(b"", TableConfig::default(), 0.0).unwrap_err();
    assert_eq!(err, KadError::EmptyPeerId);
}

#[test]
fn peer_id_validation_and_local_peer() {
    let mut t = table(20, 20, 5);
    assert_eq!(t.update(b"", 0.0), Err(KadError::EmptyPeerId));
    let long = vec![1u8; 129];
    assert_eq!(t.update(&long, 0.0), Err(KadError::PeerIdTooLong { len: 129, max: 128 }));
    assert_eq!(t.update(b"local", 0.0), Ok(Update::Ignored));
    assert!(t.is_empty());
    assert_eq!(t.on_failure(b"", 0.0), FailureOutcome::Unknown);
    assert_eq!(t.on_failure(b"nobody", 0.0), FailureOutcome::Unknown);
    assert!(!t.remove(&long));
    assert!(!t.contains(b"local"));
    assert_eq!(t.bucket_index(&t.local_key()), None);
    assert_eq!(t.bucket_entries(256), Err(KadError::BucketOutOfRange { index: 256 }));
    assert_eq!(t.replacements(999), Err(KadError::BucketOutOfRange { index: 999 }));
    assert!(t.mark_refreshed(256, 1.0).is_err());
}

#[test]
fn lrs_order_and_refresh_moves_to_tail() {
    let mut t = table(20, 20, 5);
    let ps = peers_in_bucket(&t, 255, 3);
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(t.update(p, i as f64), Ok(Update::Inserted));
    }
    assert_eq!(t.bucket_entries(255).unwrap(), ps);
    assert_eq!(t.update(&ps[0], 10.0), Ok(Update::Refreshed));
    assert_eq!(t.bucket_entries(255).unwrap(), vec![ps[1].clone(), ps[2].clone(), ps[0].clone()]);
    assert_eq!(t.last_seen(&ps[0]), Some(10.0));
    assert_eq!(t.bucket_sizes(), vec![(255, 3)]);
    assert_eq!(t.len(), 3);
}

#[test]
fn full_bucket_pends_and_caches_newest_first() {
    let mut t = table(2, 2, 5);
    let ps = peers_in_bucket(&t, 255, 5);
    assert_eq!(t.update(&ps[0], 0.0), Ok(Update::Inserted));
    assert_eq!(t.update(&ps[1], 0.0), Ok(Update::Inserted));
    let ping = Update::Pending { ping: ps[0].clone() };
    assert_eq!(t.update(&ps[2], 1.0), Ok(ping.clone()));
    assert_eq!(t.update(&ps[3], 2.0), Ok(ping.clone()));
    assert_eq!(t.replacements(255).unwrap(), vec![ps[3].clone(), ps[2].clone()]);
    // Hearing from a cached peer again makes it the freshest candidate.
    assert_eq!(t.update(&ps[2], 3.0), Ok(ping.clone()));
    assert_eq!(t.replacements(255).unwrap(), vec![ps[2].clone(), ps[3].clone()]);
    // The cache is bounded; the stalest candidate goes.
    assert_eq!(t.update(&ps[4], 4.0), Ok(ping));
    assert_eq!(t.replacements(255).unwrap(), vec![ps[4].clone(), ps[2].clone()]);
    assert!(!t.contains(&ps[4]));
    // The LRS answering the ping is simply refreshed; the next newcomer
    // then asks for the other entry to be pinged.
    assert_eq!(t.update(&ps[0], 5.0), Ok(Update::Refreshed));
    assert_eq!(t.update(&ps[3], 6.0), Ok(Update::Pending { ping: ps[1].clone() }));
}

#[test]
fn failure_with_replacement_evicts_and_promotes() {
    let mut t = table(2, 3, 5);
    let ps = peers_in_bucket(&t, 255, 4);
    for p in &ps {
        t.update(p, 0.0).unwrap();
    }
    let out = t.on_failure(&ps[0], 1.0);
    assert_eq!(out, FailureOutcome::Evicted { replaced_by: Some(ps[3].clone()) });
    assert_eq!(t.bucket_entries(255).unwrap(), vec![ps[1].clone(), ps[3].clone()]);
    assert_eq!(t.replacements(255).unwrap(), vec![ps[2].clone()]);
    assert!(!t.contains(&ps[0]));
    // A peer that is only a replacement is dropped from the cache.
    let out = t.on_failure(&ps[2], 1.0);
    assert_eq!(out, FailureOutcome::Evicted { replaced_by: None });
    assert!(t.replacements(255).unwrap().is_empty());
}

#[test]
fn failures_without_replacement_count_to_stale() {
    let mut t = table(20, 20, 3);
    let p = pid(1);
    t.update(&p, 0.0).unwrap();
    assert_eq!(t.on_failure(&p, 1.0), FailureOutcome::Kept { failures: 1 });
    assert_eq!(t.on_failure(&p, 2.0), FailureOutcome::Kept { failures: 2 });
    // Only failures in a row count: hearing from it resets the count.
    assert_eq!(t.update(&p, 3.0), Ok(Update::Refreshed));
    assert_eq!(t.on_failure(&p, 4.0), FailureOutcome::Kept { failures: 1 });
    assert_eq!(t.on_failure(&p, 5.0), FailureOutcome::Kept { failures: 2 });
    assert_eq!(t.on_failure(&p, 6.0), FailureOutcome::Evicted { replaced_by: None });
    assert!(t.is_empty());
    assert_eq!(t.on_failure(&p, 7.0), FailureOutcome::Unknown);
}

#[test]
fn remove_refills_from_cache() {
    let mut t = table(1, 2, 5);
    let ps = peers_in_bucket(&t, 255, 3);
    for p in &ps {
        t.update(p, 0.0).unwrap();
    }
    assert!(t.remove(&ps[0]));
    assert_eq!(t.bucket_entries(255).unwrap(), vec![ps[2].clone()]);
    assert!(t.remove(&ps[1])); // from the cache
    assert!(!t.remove(&ps[1]));
    assert_eq!(t.len(), 1);
}

#[test]
fn refresh_bookkeeping() {
    let mut t = table(20, 20, 5);
    assert!(t.buckets_to_refresh(1e9).is_empty(), "empty table: nobody to ask");
    for i in 0..50 {
        t.update(&pid(i), 0.0).unwrap();
    }
    let lowest = t.bucket_sizes()[0].0;
    assert!(t.buckets_to_refresh(3599.0).is_empty());
    let due: Vec<usize> = (lowest..256).collect();
    assert_eq!(t.buckets_to_refresh(3600.0), due);
    t.mark_refreshed(255, 3000.0).unwrap();
    let target = t.random_key_in_bucket(254, &[7; 32]).unwrap();
    t.note_lookup(&target, 3000.0);
    let due = t.buckets_to_refresh(3600.0);
    assert!(!due.contains(&255) && !due.contains(&254) && due.contains(&lowest));
    assert_eq!(t.buckets_to_refresh(6600.0).len(), 256 - lowest);
    assert!(t.random_key_in_bucket(256, &[0; 32]).is_err());
}

#[test]
fn closest_never_returns_replacements() {
    let mut t = table(2, 5, 5);
    let mut pending = 0;
    for i in 0..500 {
        if let Ok(Update::Pending { .. }) = t.update(&pid(i), 0.0) {
            pending += 1;
        }
    }
    assert!(pending > 400, "k = 2 must overflow most buckets");
    let cached: Vec<PeerId> = (0..256).flat_map(|i| t.replacements(i).unwrap()).collect();
    assert!(cached.len() >= 5);
    let entries = all_entries(&t);
    assert_eq!(entries.len(), t.len());
    for j in 0..50u8 {
        let target = Key([j; 32]);
        let got = t.closest(&target, 1000);
        assert_eq!(got, brute_closest(&entries, &target, 1000));
        assert!(got.iter().all(|(p, _)| !cached.contains(p)));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Update(u16),
    Remove(u16),
    Fail(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u16..400).prop_map(Op::Update),
        1 => (0u16..400).prop_map(Op::Remove),
        1 => (0u16..400).prop_map(Op::Fail),
    ]
}

proptest! {
    #[test]
    fn closest_matches_brute_force(
        ops in prop::collection::vec(op(), 0..400),
        k in prop_oneof![1usize..4, Just(1_000_000usize)],
        cache in 0usize..3,
        stale in 1u32..3,
        targets in prop::collection::vec(any::<[u8; 32]>(), 1..5),
        extra in 0usize..8,
    ) {
        let mut t = table(k, cache, stale);
        for o in &ops {
            match *o {
                Op::Update(i) => { t.update(&pid(u64::from(i)), 0.0).unwrap(); }
                Op::Remove(i) => { t.remove(&pid(u64::from(i))); }
                Op::Fail(i) => { t.on_failure(&pid(u64::from(i)), 0.0); }
            }
        }
        let entries = all_entries(&t);
        prop_assert_eq!(entries.len(), t.len());
        for b in 0..256 {
            let reps = t.replacements(b).unwrap();
            prop_assert!(reps.len() <= cache);
            prop_assert!(reps.iter().all(|p| !t.contains(p)));
            prop_assert!(t.bucket_entries(b).unwrap().len() <= k);
        }
        for raw in &targets {
            let target = Key(*raw);
            for n in [0, 1, 3, entries.len(), entries.len() + extra] {
                prop_assert_eq!(t.closest(&target, n), brute_closest(&entries, &target, n));
            }
            // Targets that coincide with an entry exercise the deepest paths.
            if let Some(p) = entries.first() {
                let tk = key(p);
                prop_assert_eq!(t.closest(&tk, 5), brute_closest(&entries, &tk, 5));
            }
        }
    }

    #[test]
    fn closest_tracks_inserts_and_removals_with_big_k(
        ops in prop::collection::vec((any::<bool>(), 0u16..300), 0..600),
        raw in any::<[u8; 32]>(),
        n in 0usize..40,
    ) {
        let mut t = table(1_000_000, 0, 1);
        let mut model = std::collections::BTreeSet::new();
        for &(insert, i) in &ops {
            let p = pid(u64::from(i));
            if insert {
                t.update(&p, 0.0).unwrap();
                model.insert(p);
            } else {
                prop_assert_eq!(t.remove(&p), model.remove(&p));
            }
        }
        let peers: Vec<PeerId> = model.into_iter().collect();
        prop_assert_eq!(t.len(), peers.len());
        let target = Key(raw);
        prop_assert_eq!(t.closest(&target, n), brute_closest(&peers, &target, n));
    }

    #[test]
    fn random_key_lands_in_bucket(seed in any::<[u8; 32]>(), local in 0u64..1000) {
        let t = RoutingTable::new(&pid(local), TableConfig::default(), 0.0).unwrap();
        for index in 0..256 {
            let k = t.random_key_in_bucket(index, &seed).unwrap();
            prop_assert_eq!(t.bucket_index(&k), Some(index));
        }
    }
}

/// Run with `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_100k() {
    let config = TableConfig { k: 1_000_000, ..Default::default() };
    let mut t = RoutingTable::new(b"local", config, 0.0).unwrap();
    let peers: Vec<PeerId> = (0..100_000).map(pid).collect();
    let start = Instant::now();
    for p in &peers {
        assert_eq!(t.update(p, 0.0).unwrap(), Update::Inserted);
    }
    let insert = start.elapsed();
    assert_eq!(t.len(), 100_000);
    // Hashes of a counter: reproducible and uniformly spread.
    let targets: Vec<Key> = (0..10_000u64).map(|i| key(format!("target-{i}").as_bytes())).collect();
    let start = Instant::now();
    let mut total = 0usize;
    for target in &targets {
        total += t.closest(target, 20).len();
    }
    let per = start.elapsed() / targets.len() as u32;
    assert_eq!(total, 20 * targets.len());
    // Spot-check correctness at full size.
    let entries = all_entries(&t);
    for target in targets.iter().take(5) {
        assert_eq!(t.closest(target, 20), brute_closest(&entries, target, 20));
    }
    println!("bulk insert of 100000 peers via update: {insert:?}");
    println!("closest(target, 20) on 100000 entries: mean {per:?} over 10000 targets");
}
