//! Weighted Maglev consistent hashing.
//!
//! Each backend walks its own permutation of the table's slots (`offset + j * skip mod M`,
//! from two seeded hashes of its key) and, round by round, claims the next free slot on its
//! path. Weights are credits: every round a backend earns `weight` credits and claims one slot
//! per `max_weight` credits, so shares follow the weights and equal weights stay within one
//! slot of each other.
//!
//! Backends are sorted by key before the table is filled, so the table depends only on the
//! set of backends, never on the order they were given in.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The table sizes we accept: primes, roughly doubling. Bigger tables spread load more evenly
/// and move fewer flows when the backend set changes; they cost memory and build time.
pub const TABLE_SIZES: [u32; 10] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("table size {0} is not one of the supported primes {TABLE_SIZES:?}")]
    UnsupportedSize(u32),
    #[error("no backends")]
    NoBackends,
    #[error("total weight is zero")]
    ZeroTotalWeight,
    #[error("backend key {0:?} appears more than once")]
    DuplicateBackend(String),
    #[error("{backends} backends do not fit a table of {size} slots")]
    TooManyBackends { backends: usize, size: u32 },
}

/// One backend. `key` identifies it (for example its `ip:port`); equal keys mean the same
/// backend, and the key alone decides the backend's permutation.
#[derive(Clone, Debug)]
pub struct Backend<'a, Id> {
    pub id: Id,
    pub key: &'a [u8],
    pub weight: u32,
}

/// A table builder for one size and seed.
#[derive(Clone, Copy, Debug)]
pub struct Maglev {
    size: u32,
    seed: u64,
}

impl Maglev {
    pub fn new(size: u32, seed: u64) -> Result<Self, MaglevError> {
        if !TABLE_SIZES.contains(&size) {
            return Err(MaglevError::UnsupportedSize(size));
        }
        Ok(Self { size, seed })
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Fills a table of `size` slots with backend ids. Backends of weight 0 get no slot.
    pub fn build<Id: Copy>(&self, backends: &[Backend<'_, Id>]) -> Result<Vec<Id>, MaglevError> {
        if backends.is_empty() {
            return Err(MaglevError::NoBackends);
        }
        let mut sorted: Vec<&Backend<'_, Id>> = backends.iter().collect();
        sorted.sort_unstable_by(|a, b| a.key.cmp(b.key));
        if let Some(pair) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
            return Err(MaglevError::DuplicateBackend(String::from_utf8_lossy(pair[0].key).into_owned()));
        }
        sorted.retain(|b| b.weight > 0);
        if sorted.is_empty() {
            return Err(MaglevError::ZeroTotalWeight);
        }
        if sorted.len() > self.size as usize {
            return Err(MaglevError::TooManyBackends { backends: sorted.len(), size: self.size });
        }

        let m = self.size as u64;
        let max_weight = sorted.iter().map(|b| b.weight).max().unwrap_or(1) as u64;
        let mut walkers: Vec<Walker> = sorted
            .iter()
            .map(|b| {
                let offset = xxh3_64_with_seed(b.key, self.seed) % m;
                let skip = xxh3_64_with_seed(b.key, self.seed ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
                Walker { next: offset, skip, credit: 0, weight: b.weight as u64 }
            })
            .collect();

        let mut table: Vec<Option<Id>> = vec![None; self.size as usize];
        let mut filled = 0u64;
        'rounds: loop {
            for (walker, backend) in walkers.iter_mut().zip(&sorted) {
                walker.credit += walker.weight;
                while walker.credit >= max_weight {
                    walker.credit -= max_weight;
                    // M is prime and 0 < skip < M, so the walk visits every slot: this ends.
                    let slot = loop {
                        let s = walker.next;
                        walker.next = (walker.next + walker.skip) % m;
                        if table[s as usize].is_none() {
                            break s;
                        }
                    };
                    table[slot as usize] = Some(backend.id);
                    filled += 1;
                    if filled == m {
                        break 'rounds;
                    }
                }
            }
        }
        Ok(table.into_iter().map(|slot| slot.expect("every slot is filled")).collect())
    }
}

struct Walker {
    next: u64,
    skip: u64,
    credit: u64,
    weight: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)).collect()
    }

    fn backends(keys: &[String], weight: impl Fn(usize) -> u32) -> Vec<Backend<'_, u32>> {
        keys.iter().enumerate().map(|(i, k)| Backend { id: i as u32, key: k.as_bytes(), weight: weight(i) }).collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for id in table {
            *c.entry(*id).or_default() += 1;
        }
        c
    }

    #[test]
    fn same_table_for_same_input_in_any_order() {
        let k = keys(13);
        let mut input = backends(&k, |i| 1 + (i as u32 % 3));
        let m = Maglev::new(4093, 42).unwrap();
        let first = m.build(&input).unwrap();
        input.reverse();
        assert_eq!(first, m.build(&input).unwrap());
        input.swap(2, 9);
        input.rotate_left(5);
        assert_eq!(first, m.build(&input).unwrap());
        // ... and a different seed gives a different table.
        assert_ne!(first, Maglev::new(4093, 43).unwrap().build(&input).unwrap());
    }

    #[test]
    fn equal_weights_give_counts_within_one() {
        for (n, m) in [(3, 251), (7, 1021), (100, 16381), (1000, 65521)] {
            let k = keys(n);
            let table = Maglev::new(m, 7).unwrap().build(&backends(&k, |_| 1)).unwrap();
            let c = counts(&table);
            assert_eq!(c.len(), n, "every backend gets slots");
            let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(max - min <= 1, "n={n} m={m}: min {min} max {max}");
        }
    }

    #[test]
    fn removing_one_backend_moves_under_one_percent_of_survivor_slots() {
        // The disruption of Maglev shrinks as M/N grows. At M = 65521 (M > 100 N for every N here)
        // it stays under 1%; at the smallest prime above 100 N it measures 1.2-2.4% (README).
        for (n, m) in [(10usize, 65521), (25, 65521), (50, 65521), (100, 65521), (1000, 131071)] {
            let k = keys(n);
            let all = backends(&k, |_| 1);
            let maglev = Maglev::new(m, 3).unwrap();
            let before = maglev.build(&all).unwrap();
            let removed = (n / 2) as u32;
            let rest: Vec<_> = all.iter().filter(|b| b.id != removed).cloned().collect();
            let after = maglev.build(&rest).unwrap();
            let survivor_slots = before.iter().filter(|&&id| id != removed).count();
            let moved = before.iter().zip(&after).filter(|(b, a)| **b != removed && b != a).count();
            let share = moved as f64 / survivor_slots as f64;
            assert!(share < 0.01, "n={n} m={m}: {moved} of {survivor_slots} survivor slots moved ({share:.4})");
            assert!(!after.contains(&removed));
        }
    }

    #[test]
    fn weights_one_two_three_give_proportional_shares() {
        let k = keys(3);
        let m = 65521;
        let table = Maglev::new(m, 11).unwrap().build(&backends(&k, |i| i as u32 + 1)).unwrap();
        let c = counts(&table);
        for (id, want) in [(0u32, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            let got = c[&id] as f64 / m as f64;
            assert!((got - want).abs() < 0.01, "backend {id}: share {got:.4}, want {want:.4}");
        }
    }

    #[test]
    fn zero_weight_backends_get_nothing() {
        let k = keys(3);
        let table = Maglev::new(251, 1).unwrap().build(&backends(&k, |i| if i == 1 { 0 } else { 1 })).unwrap();
        assert!(!table.contains(&1));
    }

    #[test]
    fn sizes_outside_the_prime_list_are_rejected() {
        for bad in [0, 1, 250, 252, 257, 1000, 16383, 65537, 131072] {
            assert_eq!(Maglev::new(bad, 0).unwrap_err(), MaglevError::UnsupportedSize(bad));
        }
        for good in TABLE_SIZES {
            assert!(Maglev::new(good, 0).is_ok());
        }
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let m = Maglev::new(251, 0).unwrap();
        assert_eq!(m.build::<u32>(&[]).unwrap_err(), MaglevError::NoBackends);
        let k = keys(2);
        assert_eq!(m.build(&backends(&k, |_| 0)).unwrap_err(), MaglevError::ZeroTotalWeight);
        let dup = vec![
            Backend { id: 1u32, key: b"10.0.0.1:80".as_slice(), weight: 1 },
            Backend { id: 2, key: b"10.0.0.1:80".as_slice(), weight: 1 },
        ];
        assert_eq!(m.build(&dup).unwrap_err(), MaglevError::DuplicateBackend("10.0.0.1:80".into()));
        let many = keys(252);
        assert!(matches!(m.build(&backends(&many, |_| 1)), Err(MaglevError::TooManyBackends { .. })));
    }
}
