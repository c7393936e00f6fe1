//! Python face of `petald_core::kad`: `RoutingTable`, `ClosestPeersLookup` and key helpers.
//! Peer ids are the binary libp2p peer id (`PeerID.to_bytes()`), keys are 32-byte `bytes`.

use petald_core::kad::{
    self, ClosestPeersLookup as CoreLookup, FailureOutcome, Key, LookupConfig, LookupStep,
    RoutingTable as CoreTable, TableConfig, Update,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::kad_err;

fn key(bytes: &[u8]) -> PyResult<Key> {
    Key::from_bytes(bytes).map_err(kad_err)
}

fn to_bytes<'py>(py: Python<'py>, peers: Vec<kad::PeerId>) -> Vec<Bound<'py, PyBytes>> {
    peers.iter().map(|p| PyBytes::new(py, p)).collect()
}

/// SHA-256 of a peer id: its position in the Kademlia key space.
#[pyfunction]
pub fn peer_key<'py>(py: Python<'py>, peer: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, Key::from_peer_id(peer).map_err(kad_err)?.as_bytes()))
}

/// XOR distance of two 32-byte keys, big-endian (compare as bytes or `int.from_bytes`).
#[pyfunction]
pub fn xor_distance<'py>(py: Python<'py>, a: &[u8], b: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, key(a)?.distance(&key(b)?).bytes()))
}

#[pyclass(module = "petald._native")]
pub struct RoutingTable {
    inner: CoreTable,
}

#[pymethods]
impl RoutingTable {
    #[new]
    #[pyo3(signature = (local_peer, *, k = 20, replacement_cache_size = None, stale_after_failures = 5, refresh_interval = 3600.0, now = 0.0))]
    fn new(
        local_peer: &[u8],
        k: usize,
        replacement_cache_size: Option<usize>,
        stale_after_failures: u32,
        refresh_interval: f64,
        now: f64,
    ) -> PyResult<Self> {
        let config = TableConfig {
            k,
            replacement_cache_size: replacement_cache_size.unwrap_or(k),
            stale_after_failures,
            refresh_interval,
        };
        Ok(RoutingTable { inner: CoreTable::new(local_peer, config, now).map_err(kad_err)? })
    }

    #[getter]
    fn local_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.local_key().as_bytes())
    }

    #[getter]
    fn k(&self) -> usize {
        self.inner.config().k
    }

    /// Records that `peer` was seen alive. Returns ("inserted" | "refreshed" | "ignored", None)
    /// or ("pending", peer_to_ping) when its bucket is full.
    fn update<'py>(
        &mut self,
        py: Python<'py>,
        peer: &[u8],
        now: f64,
    ) -> PyResult<(&'static str, Option<Bound<'py, PyBytes>>)> {
        Ok(match self.inner.update(peer, now).map_err(kad_err)? {
            Update::Inserted => ("inserted", None),
            Update::Refreshed => ("refreshed", None),
            Update::Ignored => ("ignored", None),
            Update::Pending { ping } => ("pending", Some(PyBytes::new(py, &ping))),
        })
    }

    /// Records that `peer` failed to answer. Returns ("evicted", replaced_by | None, 0),
    /// ("kept", None, consecutive_failures) or ("unknown", None, 0).
    fn on_failure<'py>(
        &mut self,
        py: Python<'py>,
        peer: &[u8],
        now: f64,
    ) -> (&'static str, Option<Bound<'py, PyBytes>>, u32) {
        match self.inner.on_failure(peer, now) {
            FailureOutcome::Evicted { replaced_by } => {
                ("evicted", replaced_by.map(|p| PyBytes::new(py, &p)), 0)
            }
            FailureOutcome::Kept { failures } => ("kept", None, failures),
            FailureOutcome::Unknown => ("unknown", None, 0),
        }
    }

    fn remove(&mut self, peer: &[u8]) -> bool {
        self.inner.remove(peer)
    }

    fn __contains__(&self, peer: &[u8]) -> bool {
        self.inner.contains(peer)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// The `n` peers nearest to the 32-byte `target` key, nearest first.
    fn closest<'py>(&self, py: Python<'py>, target: &[u8], n: usize) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let target = key(target)?;
        let found = self.inner.closest(&target, n);
        Ok(found.iter().map(|(peer, _)| PyBytes::new(py, peer)).collect())
    }

    fn bucket_entries<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        Ok(to_bytes(py, self.inner.bucket_entries(index).map_err(kad_err)?))
    }

    fn replacements<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        Ok(to_bytes(py, self.inner.replacements(index).map_err(kad_err)?))
    }

    /// (bucket index, entries) for every non-empty bucket.
    fn bucket_sizes(&self) -> Vec<(usize, usize)> {
        self.inner.bucket_sizes()
    }

    fn buckets_to_refresh(&self, now: f64) -> Vec<usize> {
        self.inner.buckets_to_refresh(now)
    }

    fn mark_refreshed(&mut self, index: usize, now: f64) -> PyResult<()> {
        self.inner.mark_refreshed(index, now).map_err(kad_err)
    }

    /// A key in bucket `index`'s range, for refreshing it; `seed` is 32 random bytes.
    fn random_key_in_bucket<'py>(
        &self,
        py: Python<'py>,
        index: usize,
        seed: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let seed: [u8; 32] = key(seed)?.0;
        let k = self.inner.random_key_in_bucket(index, &seed).map_err(kad_err)?;
        Ok(PyBytes::new(py, k.as_bytes()))
    }
}

#[pyclass(module = "petald._native")]
pub struct ClosestPeersLookup {
    inner: CoreLookup,
}

#[pymethods]
impl ClosestPeersLookup {
    #[new]
    #[pyo3(signature = (target, seeds, *, local_peer = None, alpha = 3, num_results = 20, peer_timeout = 10.0, max_closer_per_response = 20, now = 0.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: &[u8],
        seeds: Vec<Vec<u8>>,
        local_peer: Option<&[u8]>,
        alpha: usize,
        num_results: usize,
        peer_timeout: f64,
        max_closer_per_response: usize,
        now: f64,
    ) -> PyResult<Self> {
        let config = LookupConfig { alpha, num_results, peer_timeout, max_closer_per_response };
        let inner = CoreLookup::new(key(target)?, seeds, local_peer, config, now).map_err(kad_err)?;
        Ok(ClosestPeersLookup { inner })
    }

    /// ("query", peer) to send FIND_NODE to peer, ("waiting", None) or ("finished", None).
    fn next<'py>(&mut self, py: Python<'py>, now: f64) -> (&'static str, Option<Bound<'py, PyBytes>>) {
        match self.inner.next(now) {
            LookupStep::Query(peer) => ("query", Some(PyBytes::new(py, &peer))),
            LookupStep::Waiting => ("waiting", None),
            LookupStep::Finished => ("finished", None),
        }
    }

    fn on_success(&mut self, peer: &[u8], closer_peers: Vec<Vec<u8>>, now: f64) -> bool {
        self.inner.on_success(peer, &closer_peers, now)
    }

    fn on_failure(&mut self, peer: &[u8], now: f64) -> bool {
        self.inner.on_failure(peer, now)
    }

    #[getter]
    fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    fn finish(&mut self) {
        self.inner.finish()
    }

    fn result<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        to_bytes(py, self.inner.result())
    }

    #[getter]
    fn num_queried(&self) -> usize {
        self.inner.num_queried()
    }

    #[getter]
    fn num_succeeded(&self) -> usize {
        self.inner.num_succeeded()
    }

    #[getter]
    fn num_failed(&self) -> usize {
        self.inner.num_failed()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KEY_LEN", 32)?;
    m.add("MAX_PEER_ID_LEN", kad::MAX_PEER_ID_LEN)?;
    m.add_function(wrap_pyfunction!(peer_key, m)?)?;
    m.add_function(wrap_pyfunction!(xor_distance, m)?)?;
    m.add_class::<RoutingTable>()?;
    m.add_class::<ClosestPeersLookup>()?;
    Ok(())
}
