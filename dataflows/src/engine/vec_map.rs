//! `VecMap`: a map kept as a sorted `Vec` of pairs, for the small per-key maps of the keyed
//! operators (a workflow's tasks and task rows). A `BTreeMap` allocates a whole leaf (room
//! for 11 pairs, ~300 bytes here) for its first entry; a workflow has a handful of tasks,
//! and most of them one, so this grows one pair at a time up to four and then doubles.
//! Iteration is in key order, as a `BTreeMap`'s.

use std::borrow::Borrow;

#[derive(Debug, Clone)]
pub(crate) struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(x, _)| x.borrow().cmp(k))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }
    /// Inserts `v` under `k`, returning the value it replaced.
    pub(crate) fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.reserve_one();
                self.0.insert(i, (k, v));
                None
            }
        }
    }
    /// The value under `k`, inserted with `V::default()` if absent (`entry(k).or_default()`).
    pub(crate) fn get_or_default(&mut self, k: &K) -> &mut V
    where
        K: Clone,
        V: Default,
    {
        let i = match self.find(k) {
            Ok(i) => i,
            Err(i) => {
                self.reserve_one();
                self.0.insert(i, (k.clone(), V::default()));
                i
            }
        };
        &mut self.0[i].1
    }
    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
    pub(crate) fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| f(k, v));
    }
    pub(crate) fn clear(&mut self) {
        self.0 = Vec::new();
    }
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// Room for one more pair: exact while small, doubling from four.
    fn reserve_one(&mut self) {
        if self.0.len() == self.0.capacity() {
            let len = self.0.len();
            self.0.reserve_exact(if len < 4 { 1 } else { len });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::VecMap;
    use std::collections::BTreeMap;

    /// Random operations on a `VecMap` and a `BTreeMap` leave the same pairs, in the same order.
    #[test]
    fn a_vec_map_behaves_as_a_btree_map() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..200 {
            let mut a: VecMap<u64, u64> = VecMap::default();
            let mut b: BTreeMap<u64, u64> = BTreeMap::new();
            for _ in 0..60 {
                let k = next(20);
                match next(5) {
                    0 => assert_eq!(a.insert(k, next(100)).is_some(), {
                        let v = a.get_mut(&k).map(|v| *v).unwrap();
                        b.insert(k, v).is_some()
                    }),
                    1 => assert_eq!(a.remove(&k), b.remove(&k)),
                    2 => {
                        *a.get_or_default(&k) += 1;
                        *b.entry(k).or_default() += 1;
                    }
                    3 => {
                        let m = next(3) + 2;
                        a.retain(|k, _| k % m != 0);
                        b.retain(|k, _| k % m != 0);
                    }
                    _ => assert_eq!(a.get_mut(&k).copied(), b.get_mut(&k).copied()),
                }
                assert_eq!(a.len(), b.len());
                assert_eq!(a.is_empty(), b.is_empty());
                let pairs: Vec<(u64, u64)> = a.0.to_vec();
                let expected: Vec<(u64, u64)> = b.iter().map(|(k, v)| (*k, *v)).collect();
                assert_eq!(pairs, expected);
                assert!(a.values().copied().eq(b.values().copied()));
            }
            a.clear();
            assert!(a.is_empty());
        }
    }
}
