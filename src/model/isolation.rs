//! Isolation: an isolation forest (Liu, Ting & Zhou 2008), written here because no
//! well-kept crate fits ndarray 0.16 and snapshots, over each window's feature vector
//! (the per-token models' standardised residuals). Points that are isolated in few random
//! splits are unusual *combinations* of individually mild residuals. The raw score is
//! calibrated against the scores of the training windows: its tail probability is the
//! share of training windows that scored at least as high.

use std::collections::BinaryHeap;

use rand::Rng;
use rand_xoshiro::rand_core::SeedableRng;
use rand_xoshiro::Xoshiro256Plus;

use super::codec::{Reader, Writer};
use super::{DecodeError, FEATURES};

/// One feature vector.
pub type Point = [f32; FEATURES];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Node {
    Split {
        f: u8,
        t: f32,
        l: u32,
        r: u32,
    },
    /// `adj` = c(n), the expected remaining depth of the n points left here,
    /// precomputed so scoring does no logarithms.
    Leaf {
        n: u32,
        adj: f32,
    },
}

fn leaf(n: usize) -> Node {
    Node::Leaf {
        n: n as u32,
        adj: c(n as f64) as f32,
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Tree {
    nodes: Vec<Node>,
}

/// Average path length of an unsuccessful search in a binary search tree of n points.
fn c(n: f64) -> f64 {
    if n <= 1.0 {
        0.0
    } else if n <= 2.0 {
        1.0
    } else {
        2.0 * ((n - 1.0).ln() + 0.577_215_664_9) - 2.0 * (n - 1.0) / n
    }
}

impl Tree {
    fn build(
        data: &[Point],
        idx: &mut [usize],
        depth: usize,
        max: usize,
        rng: &mut Xoshiro256Plus,
        nodes: &mut Vec<Node>,
    ) -> u32 {
        let me = nodes.len() as u32;
        if depth >= max || idx.len() <= 1 {
            nodes.push(leaf(idx.len()));
            return me;
        }
        // Try features in random order until one has a range to split.
        let start = rng.gen_range(0..FEATURES);
        for off in 0..FEATURES {
            let f = (start + off) % FEATURES;
            let (mut lo, mut hi) = (f32::MAX, f32::MIN);
            for &i in idx.iter() {
                lo = lo.min(data[i][f]);
                hi = hi.max(data[i][f]);
            }
            if hi <= lo {
                continue;
            }
            let t = lo + rng.gen::<f32>() * (hi - lo);
            let mut m = 0;
            for j in 0..idx.len() {
                if data[idx[j]][f] < t {
                    idx.swap(j, m);
                    m += 1;
                }
            }
            if m == 0 || m == idx.len() {
                continue;
            }
            nodes.push(leaf(0)); // placeholder, replaced below
            let (left, right) = idx.split_at_mut(m);
            let l = Tree::build(data, left, depth + 1, max, rng, nodes);
            let r = Tree::build(data, right, depth + 1, max, rng, nodes);
            nodes[me as usize] = Node::Split {
                f: f as u8,
                t,
                l,
                r,
            };
            return me;
        }
        nodes.push(leaf(idx.len()));
        me
    }

    /// A tree as [`Tree::build`] makes it: every child after its parent and inside the tree
    /// (so no path can loop), thresholds finite.
    fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no nodes".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if let Node::Split { t, l, r, .. } = n {
                for c in [*l, *r] {
                    if c as usize <= i || c as usize >= self.nodes.len() {
                        return Err(format!("node {i} points to {c} (of {})", self.nodes.len()));
                    }
                }
                if !t.is_finite() {
                    return Err(format!("node {i} has threshold {t}"));
                }
            }
        }
        Ok(())
    }

    fn path(&self, x: &Point) -> f32 {
        let mut i = 0usize;
        let mut depth = 0.0f32;
        loop {
            match self.nodes.get(i) {
                Some(Node::Split { f, t, l, r }) => {
                    i = if x[*f as usize] < *t { *l } else { *r } as usize;
                    depth += 1.0;
                }
                Some(Node::Leaf { adj, .. }) => return depth + adj,
                None => return depth,
            }
        }
    }
}

/// A fitted, calibrated isolation forest.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationModel {
    trees: Vec<Tree>,
    psi: usize,
    /// Scores of the training windows, ascending.
    calib: Vec<f32>,
}

impl IsolationModel {
    /// Fewer training windows than this and no model is fitted.
    pub const MIN_POINTS: usize = 64;

    /// Fit `trees` trees on sub-samples of `psi` points.
    pub fn fit(data: &[Point], trees: usize, psi: usize, seed: u64) -> Option<Self> {
        if data.len() < Self::MIN_POINTS {
            return None;
        }
        let mut rng = Xoshiro256Plus::seed_from_u64(seed);
        let psi = psi.min(data.len());
        let max_depth = (psi as f64).log2().ceil() as usize;
        let mut forest = Vec::with_capacity(trees);
        for _ in 0..trees {
            let mut idx: Vec<usize> = (0..psi).map(|_| rng.gen_range(0..data.len())).collect();
            let mut nodes = Vec::new();
            Tree::build(data, &mut idx, 0, max_depth, &mut rng, &mut nodes);
            forest.push(Tree { nodes });
        }
        let mut m = IsolationModel {
            trees: forest,
            psi,
            calib: Vec::new(),
        };
        let mut calib: Vec<f32> = data.iter().map(|x| m.raw(x) as f32).collect();
        calib.sort_by(|a, b| a.total_cmp(b));
        m.calib = calib;
        Some(m)
    }

    /// Raw anomaly score in (0, 1): 2^(-E[h] / c(psi)).
    pub fn raw(&self, x: &Point) -> f64 {
        let h: f64 = self.trees.iter().map(|t| t.path(x)).sum::<f32>() as f64
            / self.trees.len().max(1) as f64;
        2f64.powf(-h / c(self.psi as f64).max(1e-9))
    }

    /// The smallest tail probability this model can give (1 / (training windows + 1)).
    pub fn min_p(&self) -> f64 {
        1.0 / (self.calib.len() as f64 + 1.0)
    }

    /// A window whose standardised residuals are all within two units sits in the bulk
    /// of the training data: its isolation p is high whatever the trees say, so it is
    /// not scored (the common case, kept cheap). Raw count is not a residual.
    pub fn is_ordinary(x: &Point) -> bool {
        x.iter()
            .enumerate()
            .all(|(i, v)| i == super::feature::LOG_COUNT || v.abs() <= 2.0)
    }

    /// (raw score, tail probability among training windows).
    pub fn score(&self, x: &Point) -> (f64, f64) {
        let s = self.raw(x);
        let below = self.calib.partition_point(|&v| (v as f64) < s);
        let at_least = self.calib.len() - below;
        (s, (at_least as f64 + 1.0) / (self.calib.len() as f64 + 1.0))
    }

    /// Serialise for snapshots.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.psi as u32);
        w.u32(self.trees.len() as u32);
        for t in &self.trees {
            w.u32(t.nodes.len() as u32);
            for n in &t.nodes {
                match n {
                    Node::Split { f, t, l, r } => {
                        w.u8(1);
                        w.u8(*f);
                        w.f32(*t);
                        w.u32(*l);
                        w.u32(*r);
                    }
                    Node::Leaf { n, .. } => {
                        w.u8(0);
                        w.u32(*n);
                    }
                }
            }
        }
        w.u32(self.calib.len() as u32);
        for c in &self.calib {
            w.f32(*c);
        }
    }

    /// Read back [`IsolationModel::encode`].
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let psi = r.u32()? as usize;
        let nt = r.u32()? as usize;
        let mut trees = Vec::with_capacity(nt.min(4096));
        for _ in 0..nt {
            let nn = r.u32()? as usize;
            let mut nodes = Vec::with_capacity(nn.min(1 << 16));
            for _ in 0..nn {
                nodes.push(match r.u8()? {
                    1 => Node::Split {
                        f: r.u8()?.min(FEATURES as u8 - 1),
                        t: r.f32()?,
                        l: r.u32()?,
                        r: r.u32()?,
                    },
                    _ => leaf(r.u32()? as usize),
                });
            }
            let tree = Tree { nodes };
            tree.validate().map_err(|e| {
                DecodeError::Invalid(format!("isolation tree {}: {e}", trees.len()))
            })?;
            trees.push(tree);
        }
        let nc = r.u32()? as usize;
        let mut calib = Vec::with_capacity(nc.min(1 << 20));
        for _ in 0..nc {
            calib.push(r.f32()?);
        }
        if calib.iter().any(|c| !c.is_finite()) || calib.windows(2).any(|w| w[0] > w[1]) {
            return Err(DecodeError::Invalid(
                "isolation calibration scores are not finite and ascending".into(),
            ));
        }
        if psi < 2 {
            return Err(DecodeError::Invalid(format!("isolation sample size {psi}")));
        }
        Ok(IsolationModel { trees, psi, calib })
    }
}

/// A bottom-k sample of training windows by a hash of (token, window): the same windows
/// are kept whatever the shard layout, so fits do not depend on it.
#[derive(Debug, Clone, Default)]
pub struct Reservoir {
    cap: usize,
    heap: BinaryHeap<Entry>,
}

#[derive(Debug, Clone)]
struct Entry(u64, Point);

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.cmp(&o.0)
    }
}

impl Reservoir {
    /// Keep at most `cap` points.
    pub fn new(cap: usize) -> Self {
        Reservoir {
            cap,
            heap: BinaryHeap::with_capacity(cap + 1),
        }
    }

    /// Offer a point with its hash.
    #[inline]
    pub fn offer(&mut self, hash: u64, p: &Point) {
        if self.heap.len() < self.cap {
            self.heap.push(Entry(hash, *p));
        } else if let Some(top) = self.heap.peek() {
            if hash < top.0 {
                self.heap.pop();
                self.heap.push(Entry(hash, *p));
            }
        }
    }

    /// Fold another reservoir's points in (the bottom-k of both is kept).
    pub fn merge_from(&mut self, other: &Reservoir) {
        for e in other.heap.iter() {
            self.offer(e.0, &e.1);
        }
    }

    /// Merge several reservoirs into the points of the global bottom-k, in hash order.
    pub fn merged(parts: &[&Reservoir], cap: usize) -> Vec<Point> {
        let mut all: Vec<(u64, Point)> = parts
            .iter()
            .flat_map(|r| r.heap.iter().map(|e| (e.0, e.1)))
            .collect();
        all.sort_by_key(|e| e.0);
        all.truncate(cap);
        all.into_iter().map(|e| e.1).collect()
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Write the held points with their hashes.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.heap.len() as u32);
        for e in self.heap.iter() {
            w.u64(e.0);
            for &f in &e.1 {
                w.f32(f);
            }
        }
    }

    /// Offer every point [`Reservoir::encode`] wrote (bottom-k is order independent).
    pub fn absorb(&mut self, r: &mut Reader) -> Result<(), DecodeError> {
        let n = r.count(8 + 4 * FEATURES)?;
        for _ in 0..n {
            let h = r.u64()?;
            let mut p: Point = [0.0; FEATURES];
            for f in p.iter_mut() {
                *f = r.f32()?;
            }
            self.offer(h, &p);
        }
        Ok(())
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud(n: usize, seed: u64) -> Vec<Point> {
        let mut rng = Xoshiro256Plus::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut p = [0f32; FEATURES];
                // Like real residuals: mostly near zero, a few features moving together.
                let common = rng.gen::<f32>() - 0.5;
                for x in p.iter_mut() {
                    *x = 0.5 * common + 0.2 * (rng.gen::<f32>() + rng.gen::<f32>() - 1.0);
                }
                p
            })
            .collect()
    }

    #[test]
    fn outlier_scores_higher_and_is_deterministic() {
        let data = cloud(2000, 1);
        let m = IsolationModel::fit(&data, 50, 256, 7).unwrap();
        let m2 = IsolationModel::fit(&data, 50, 256, 7).unwrap();
        assert_eq!(m, m2);
        let (s_in, p_in) = m.score(&[0.0; FEATURES]);
        let mut out = [0.0; FEATURES];
        out[0] = 3.0;
        out[1] = -3.0;
        out[3] = 3.0;
        let (s_out, p_out) = m.score(&out);
        assert!(s_out > s_in, "{s_out} vs {s_in}");
        assert!(p_out < 0.05 && p_in > 0.1, "{p_out} {p_in}");
    }

    #[test]
    fn snapshot_round_trip() {
        let m = IsolationModel::fit(&cloud(500, 2), 10, 64, 3).unwrap();
        let mut w = Writer::default();
        m.encode(&mut w);
        let back = IsolationModel::decode(&mut Reader::new(&w.buf)).unwrap();
        assert_eq!(m, back);
        assert!(IsolationModel::decode(&mut Reader::new(&w.buf[..w.buf.len() / 2])).is_err());
    }

    #[test]
    fn a_cyclic_or_out_of_range_tree_is_refused() {
        let bad = |nodes: Vec<Node>| {
            let m = IsolationModel {
                trees: vec![Tree { nodes }],
                psi: 64,
                calib: vec![0.1, 0.2],
            };
            let mut w = Writer::default();
            m.encode(&mut w);
            IsolationModel::decode(&mut Reader::new(&w.buf))
        };
        let split = |l, r| Node::Split { f: 0, t: 0.5, l, r };
        // A node pointing to itself (it would loop for ever at scoring), back to its parent,
        // or past the end.
        for nodes in [
            vec![split(0, 0)],
            vec![split(1, 2), split(0, 2), leaf(1)],
            vec![split(1, 9), leaf(1)],
            vec![],
        ] {
            assert!(matches!(bad(nodes), Err(DecodeError::Invalid(_))));
        }
        let nan = Node::Split {
            f: 0,
            t: f32::NAN,
            l: 1,
            r: 2,
        };
        assert!(bad(vec![nan, leaf(1), leaf(1)]).is_err());
        assert!(bad(vec![split(1, 2), leaf(1), leaf(1)]).is_ok());
    }

    #[test]
    fn reservoir_is_layout_independent() {
        let pts = cloud(100, 3);
        let mut one = Reservoir::new(10);
        let (mut a, mut b) = (Reservoir::new(10), Reservoir::new(10));
        for (i, p) in pts.iter().enumerate() {
            let h = crate::model::sketch::mix(i as u64);
            one.offer(h, p);
            if i % 2 == 0 {
                a.offer(h, p)
            } else {
                b.offer(h, p)
            }
        }
        assert_eq!(
            Reservoir::merged(&[&one], 10),
            Reservoir::merged(&[&a, &b], 10)
        );
    }
}
