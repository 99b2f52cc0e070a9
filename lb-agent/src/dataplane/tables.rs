//! Where Maglev tables sit in the one flat slot array, and who uses each. A table belongs to
//! one Service port and one set of backends: every frontend of that port that selects the same
//! backends (its ClusterIP, NodePort, LoadBalancer IPs, ExternalIPs) points at the same slots,
//! so a Service costs one table, not one per address.
use std::{collections::HashMap, sync::Arc};

use super::{id_index::IdIndex, slices::SliceAllocator, Backends, Frontend};

/// What a table holds: the Service port it serves and the backends it spreads flows over.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableKey {
    /// `namespace/name:port/PROTO` (both scopes of a frontend are one port).
    port: Arc<str>,
    backends: Backends,
}

impl TableKey {
    pub fn of(frontend: &Frontend) -> Self {
        let port = match frontend.name.strip_suffix(super::LOCAL_VIEW_SUFFIX) {
            Some(port) => port.into(),
            None => frontend.name.clone(),
        };
        Self { port, backends: frontend.backends.clone() }
    }

    /// A table found in pinned maps: its content is unknown, so it matches no frontend.
    fn adopted(offset: u32) -> Self {
        Self { port: format!("adopted@{offset}").into(), backends: Backends::default() }
    }
}

#[derive(Debug)]
struct Table {
    key: TableKey,
    size: u32,
    /// Frontends whose entry points at it.
    users: u32,
}

#[derive(Debug)]
pub struct Tables {
    slices: SliceAllocator,
    at: HashMap<u32, Table>,
    /// The offsets in `at`, by their table's key (held once, in `at`).
    by_key: IdIndex,
}

impl Tables {
    pub fn new(slots: u32) -> Self {
        Self { slices: SliceAllocator::new(slots), at: HashMap::new(), by_key: IdIndex::default() }
    }

    /// The table already holding `key`, now used once more: (offset, size).
    pub fn share(&mut self, key: &TableKey) -> Option<(u32, u32)> {
        let offset = self.by_key.find(key, |offset| &self.at[&offset].key)?;
        let table = self.at.get_mut(&offset).expect("both indexes agree");
        table.users += 1;
        Some((offset, table.size))
    }

    /// A fresh slice of `size` slots for `key`, used once; `None` when no free range fits.
    pub fn alloc(&mut self, key: TableKey, size: u32) -> Option<u32> {
        let offset = self.slices.alloc(size)?;
        self.insert(offset, Table { key, size, users: 1 });
        Some(offset)
    }

    /// The table at `offset` was rewritten in place to hold `key`, and is used once more.
    pub fn rekey(&mut self, offset: u32, key: TableKey) {
        let mut table = self.remove(offset).expect("rekeying a live table");
        table.key = key;
        table.users += 1;
        self.insert(offset, table);
    }

    /// One user fewer; the slice is freed with the last.
    pub fn release(&mut self, offset: u32) {
        let Some(table) = self.at.get_mut(&offset) else { return };
        table.users -= 1;
        if table.users == 0 {
            let table = self.remove(offset).expect("present");
            self.slices.free(offset, table.size);
        }
    }

    fn insert(&mut self, offset: u32, table: Table) {
        self.at.insert(offset, table);
        self.by_key.insert(offset, &self.at[&offset].key, |offset| &self.at[&offset].key);
    }

    fn remove(&mut self, offset: u32) -> Option<Table> {
        let table = self.at.remove(&offset)?;
        self.by_key.remove(offset, &table.key);
        Some(table)
    }

    /// How many frontends point at the table at `offset`.
    pub fn users(&self, offset: u32) -> usize {
        self.at.get(&offset).map_or(0, |t| t.users as usize)
    }

    /// Takes over a table a pinned service entry points at (shared ones once). False when it
    /// overlaps another table.
    pub fn adopt(&mut self, offset: u32, size: u32) -> bool {
        if let Some(table) = self.at.get_mut(&offset) {
            if table.size != size {
                return false;
            }
            table.users += 1;
            return true;
        }
        if !self.slices.reserve(offset, size) {
            return false;
        }
        self.insert(offset, Table { key: TableKey::adopted(offset), size, users: 1 });
        true
    }

    pub fn free_slots(&self) -> u64 {
        self.slices.free_slots()
    }

    /// Tables in the slot array.
    pub fn count(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::BackendSpec;

    fn key(port: &str, n: u8) -> TableKey {
        let backends = (1..=n).map(|i| BackendSpec { addr: [10, 0, 0, i].into(), port: 80, local: true, weight: 1 }).collect();
        TableKey { port: port.into(), backends }
    }

    #[test]
    fn frontends_of_one_port_share_a_table_until_the_last_leaves() {
        let mut t = Tables::new(1000);
        let a = t.alloc(key("ns/web:http/TCP", 3), 251).unwrap();
        assert_eq!(t.share(&key("ns/web:http/TCP", 3)), Some((a, 251)), "the NodePort shares the ClusterIP's table");
        assert_eq!(t.share(&key("ns/api:http/TCP", 3)), None, "another Service never shares it");
        assert_eq!(t.share(&key("ns/web:http/TCP", 2)), None, "nor other backends");
        assert_eq!((t.users(a), t.count()), (2, 1));
        t.release(a);
        assert_eq!(t.free_slots(), 749, "still used once");
        t.release(a);
        assert_eq!((t.free_slots(), t.count()), (1000, 0));
    }

    #[test]
    fn a_table_rewritten_in_place_is_found_by_its_new_backends() {
        let mut t = Tables::new(300);
        let a = t.alloc(key("ns/web:http/TCP", 3), 251).unwrap();
        t.share(&key("ns/web:http/TCP", 3));
        assert_eq!(t.alloc(key("ns/web:http/TCP", 2), 251), None, "no room for a fresh one");
        t.rekey(a, key("ns/web:http/TCP", 2));
        assert_eq!(t.share(&key("ns/web:http/TCP", 2)), Some((a, 251)));
        assert_eq!(t.share(&key("ns/web:http/TCP", 3)), None);
        // Each frontend drops its old reference: the table stays for its two new ones.
        t.release(a);
        t.release(a);
        assert_eq!(t.users(a), 2);
    }

    #[test]
    fn adopted_tables_are_shared_by_offset_and_match_no_frontend() {
        let mut t = Tables::new(1000);
        assert!(t.adopt(0, 251));
        assert!(t.adopt(0, 251), "a second pinned entry on the same slots");
        assert!(!t.adopt(100, 251), "overlaps");
        assert_eq!(t.users(0), 2);
        assert_eq!(t.share(&key("ns/web:http/TCP", 3)), None);
    }
}
