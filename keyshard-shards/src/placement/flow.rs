//! Maximum flow (Edmonds-Karp) on a small dense network: the feasibility check of placement.
//!
//! The network has one node per region and operator plus a source and a sink, so a capacity
//! matrix is small; shortest augmenting paths keep the work bounded by the flow asked for.

use std::collections::VecDeque;

/// Residual capacities, `size` x `size`, row-major.
pub(super) struct Network {
    size: usize,
    residual: Vec<usize>,
}

impl Network {
    pub(super) fn new(size: usize) -> Self {
        Self {
            size,
            residual: vec![0; size.saturating_mul(size)],
        }
    }

    fn slot(&mut self, from: usize, to: usize) -> Option<&mut usize> {
        let at = from.checked_mul(self.size)?.checked_add(to)?;
        if from >= self.size || to >= self.size {
            return None;
        }
        self.residual.get_mut(at)
    }

    fn capacity(&self, from: usize, to: usize) -> usize {
        if from >= self.size || to >= self.size {
            return 0;
        }
        from.checked_mul(self.size)
            .and_then(|row| row.checked_add(to))
            .and_then(|at| self.residual.get(at).copied())
            .unwrap_or(0)
    }

    /// Adds `amount` of capacity from `from` to `to`.
    pub(super) fn add(&mut self, from: usize, to: usize, amount: usize) {
        if let Some(c) = self.slot(from, to) {
            *c = c.saturating_add(amount);
        }
    }

    /// The maximum flow from `source` to `sink`, stopping once it reaches `limit`.
    pub(super) fn max_flow(&mut self, source: usize, sink: usize, limit: usize) -> usize {
        let mut flow = 0;
        while flow < limit {
            let Some(path) = self.shortest_path(source, sink) else {
                break;
            };
            let bottleneck = path
                .windows(2)
                .filter_map(|pair| match pair {
                    [a, b] => Some(self.capacity(*a, *b)),
                    _ => None,
                })
                .min()
                .unwrap_or(0)
                .min(limit - flow);
            if bottleneck == 0 {
                break;
            }
            for pair in path.windows(2) {
                if let [a, b] = pair {
                    if let Some(c) = self.slot(*a, *b) {
                        *c = c.saturating_sub(bottleneck);
                    }
                    self.add(*b, *a, bottleneck);
                }
            }
            flow += bottleneck;
        }
        flow
    }

    /// A shortest path with residual capacity, source first, by breadth-first search.
    fn shortest_path(&self, source: usize, sink: usize) -> Option<Vec<usize>> {
        let mut parent: Vec<Option<usize>> = vec![None; self.size];
        let mut queue = VecDeque::from([source]);
        *parent.get_mut(source)? = Some(source);
        while let Some(node) = queue.pop_front() {
            if node == sink {
                break;
            }
            for next in 0..self.size {
                let unseen = parent.get(next).is_some_and(Option::is_none);
                if unseen && self.capacity(node, next) > 0 {
                    *parent.get_mut(next)? = Some(node);
                    queue.push_back(next);
                }
            }
        }
        let mut path = vec![sink];
        let mut node = sink;
        while node != source {
            node = (*parent.get(node)?)?;
            path.push(node);
        }
        path.reverse();
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_maximum_flow_through_a_bottleneck() {
        // 0 -> {1, 2} -> 3, with 1 -> 2 as a cross edge; the min cut is 0's outgoing 5.
        let mut n = Network::new(4);
        n.add(0, 1, 3);
        n.add(0, 2, 2);
        n.add(1, 2, 5);
        n.add(1, 3, 1);
        n.add(2, 3, 9);
        assert_eq!(n.max_flow(0, 3, 100), 5);
        let mut n = Network::new(4);
        n.add(0, 1, 3);
        n.add(1, 3, 1);
        assert_eq!(n.max_flow(0, 3, 100), 1);
        let mut n = Network::new(4);
        n.add(0, 1, 7);
        n.add(1, 3, 7);
        assert_eq!(n.max_flow(0, 3, 4), 4, "stops at the limit");
        assert_eq!(Network::new(2).max_flow(0, 1, 3), 0);
    }

    #[test]
    fn uses_reverse_edges_to_reroute() {
        // The classic case where the first shortest path must be partly undone.
        let mut n = Network::new(6);
        n.add(0, 1, 1);
        n.add(0, 2, 1);
        n.add(1, 3, 1);
        n.add(1, 4, 1);
        n.add(2, 3, 1);
        n.add(3, 5, 1);
        n.add(4, 5, 1);
        assert_eq!(n.max_flow(0, 5, 10), 2);
    }
}
