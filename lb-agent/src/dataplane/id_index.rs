//! An index of ids by a key that another structure already holds for each id: it keeps only
//! the ids (4 bytes a slot), hashed by that key, never a second copy of the key.
use std::hash::{BuildHasher, Hash, RandomState};

use hashbrown::HashTable;

#[derive(Debug, Default)]
pub struct IdIndex {
    ids: HashTable<u32>,
    hasher: RandomState,
}

impl IdIndex {
    /// The id whose key is `key`; `key_of` gives the key each indexed id stands for.
    pub fn find<'a, K: Hash + Eq + 'a>(&self, key: &K, key_of: impl Fn(u32) -> &'a K) -> Option<u32> {
        self.ids.find(self.hasher.hash_one(key), |&id| key_of(id) == key).copied()
    }

    /// Indexes `id`, whose key is `key`.
    pub fn insert<'a, K: Hash + 'a>(&mut self, id: u32, key: &K, key_of: impl Fn(u32) -> &'a K) {
        let hasher = &self.hasher;
        self.ids.insert_unique(hasher.hash_one(key), id, |&id| hasher.hash_one(key_of(id)));
    }

    /// Forgets `id`, whose key is `key` (found by id: two ids never share a slot).
    pub fn remove<K: Hash>(&mut self, id: u32, key: &K) {
        if let Ok(found) = self.ids.find_entry(self.hasher.hash_one(key), |&other| other == id) {
            found.remove();
        }
    }
}
