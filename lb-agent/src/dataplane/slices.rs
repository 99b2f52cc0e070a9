//! First-fit allocation of Maglev slices inside the one flat slot array.

/// Free ranges of `[0, capacity)`, sorted by start and never adjacent (they are merged).
#[derive(Debug)]
pub struct SliceAllocator {
    free: Vec<(u32, u32)>,
}

impl SliceAllocator {
    pub fn new(capacity: u32) -> Self {
        Self { free: vec![(0, capacity)] }
    }

    /// Claims `len` slots; `None` when no free range is long enough.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    /// Marks `[start, start+len)` as claimed (used when adopting slices found in pinned maps).
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(i) = self.free.iter().position(|&(s, l)| s <= start && start + len <= s + l) else {
            return false;
        };
        let (s, l) = self.free.remove(i);
        if start + len < s + l {
            self.free.insert(i, (start + len, s + l - start - len));
        }
        if s < start {
            self.free.insert(i, (s, start - s));
        }
        true
    }

    pub fn free(&mut self, start: u32, len: u32) {
        let i = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(i, (start, len));
        // Merge with the right neighbour, then the left one.
        if i + 1 < self.free.len() && start + len == self.free[i + 1].0 {
            self.free[i].1 += self.free.remove(i + 1).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            self.free[i - 1].1 += self.free.remove(i).1;
        }
    }

    pub fn free_slots(&self) -> u64 {
        self.free.iter().map(|&(_, l)| l as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merges_back_to_one_range() {
        let mut a = SliceAllocator::new(100);
        let x = a.alloc(10).unwrap();
        let y = a.alloc(20).unwrap();
        let z = a.alloc(30).unwrap();
        assert_eq!((x, y, z), (0, 10, 30));
        assert_eq!(a.alloc(41), None);
        a.free(y, 20);
        assert_eq!(a.alloc(15), Some(10), "first fit reuses the hole");
        a.free(10, 15);
        a.free(x, 10);
        a.free(z, 30);
        assert_eq!(a.free, vec![(0, 100)]);
    }

    #[test]
    fn reserve_splits_a_free_range() {
        let mut a = SliceAllocator::new(100);
        assert!(a.reserve(40, 10));
        assert!(!a.reserve(45, 10), "overlaps a reserved range");
        assert_eq!(a.free, vec![(0, 40), (50, 50)]);
        assert_eq!(a.free_slots(), 90);
    }
}
