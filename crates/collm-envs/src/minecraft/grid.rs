//! The simulated world: an axis-aligned box of cells, each holding a block name, all air at first.

/// A cell's absolute coordinates (x, y, z); y is up.
pub type Pos = [i32; 3];

/// Blocks that count as empty.
pub fn is_air(block: &str) -> bool {
    matches!(block, "air" | "cave_air" | "void_air")
}

/// An inclusive box of cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bbox {
    pub min: Pos,
    pub max: Pos,
}

impl Bbox {
    /// The box spanned by two corners given in any order.
    pub fn new(a: Pos, b: Pos) -> Self {
        Self { min: [a[0].min(b[0]), a[1].min(b[1]), a[2].min(b[2])], max: [a[0].max(b[0]), a[1].max(b[1]), a[2].max(b[2])] }
    }

    pub fn contains(&self, p: Pos) -> bool {
        (0..3).all(|i| self.min[i] <= p[i] && p[i] <= self.max[i])
    }

    /// Extent along x, y, z in cells.
    pub fn size(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| (self.max[i] - self.min[i] + 1) as usize)
    }

    pub fn volume(&self) -> usize {
        self.size().iter().product()
    }

    /// Every cell, y outermost, then z, then x.
    pub fn cells(&self) -> impl Iterator<Item = Pos> + '_ {
        (self.min[1]..=self.max[1])
            .flat_map(move |y| (self.min[2]..=self.max[2]).flat_map(move |z| (self.min[0]..=self.max[0]).map(move |x| [x, y, z])))
    }
}

/// The blocks in a box. Block names are interned; index 0 is air.
#[derive(Clone, Debug)]
pub struct Grid {
    pub bbox: Bbox,
    cells: Vec<u16>,
    names: Vec<String>,
}

impl Grid {
    pub fn new(bbox: Bbox) -> Self {
        Self { bbox, cells: vec![0; bbox.volume()], names: vec!["air".to_string()] }
    }

    fn index(&self, p: Pos) -> Option<usize> {
        if !self.bbox.contains(p) {
            return None;
        }
        let [sx, _, sz] = self.bbox.size();
        let [x, y, z] = [0, 1, 2].map(|i| (p[i] - self.bbox.min[i]) as usize);
        Some((y * sz + z) * sx + x)
    }

    fn intern(&mut self, block: &str) -> u16 {
        if is_air(block) {
            return 0;
        }
        match self.names.iter().position(|n| n == block) {
            Some(i) => i as u16,
            None => {
                self.names.push(block.to_string());
                (self.names.len() - 1) as u16
            }
        }
    }

    /// Sets one cell; a cell outside the box is left alone (returns false).
    pub fn set(&mut self, p: Pos, block: &str) -> bool {
        let id = self.intern(block);
        match self.index(p) {
            Some(i) => {
                self.cells[i] = id;
                true
            }
            None => false,
        }
    }

    /// Sets every cell of the box spanned by `a` and `b` (any corner order) that lies inside the grid.
    pub fn fill(&mut self, a: Pos, b: Pos, block: &str) {
        let id = self.intern(block);
        let r = Bbox::new(a, b);
        for p in r.cells() {
            if let Some(i) = self.index(p) {
                self.cells[i] = id;
            }
        }
    }

    /// The block at `p` ("air" outside the box).
    pub fn get(&self, p: Pos) -> &str {
        self.index(p).map_or("air", |i| &self.names[self.cells[i] as usize])
    }

    pub fn is_air_at(&self, p: Pos) -> bool {
        self.index(p).is_none_or(|i| self.cells[i] == 0)
    }

    /// The non-air cells and their blocks, in [`Bbox::cells`] order.
    pub fn blocks(&self) -> impl Iterator<Item = (Pos, &str)> + '_ {
        self.bbox.cells().filter(|p| !self.is_air_at(*p)).map(|p| (p, self.get(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbox_and_grid() {
        let b = Bbox::new([2, 0, 1], [0, 1, 0]);
        assert_eq!((b.min, b.max, b.size(), b.volume()), ([0, 0, 0], [2, 1, 1], [3, 2, 2], 12));
        assert!(b.contains([2, 1, 1]) && !b.contains([3, 0, 0]) && !b.contains([0, -1, 0]));
        let mut g = Grid::new(b);
        assert!(g.set([1, 1, 0], "stone"));
        assert!(!g.set([5, 0, 0], "stone"));
        g.fill([2, 0, 1], [1, 0, 0], "obsidian");
        g.fill([0, 0, 0], [0, 0, 0], "cave_air");
        assert_eq!(g.get([1, 1, 0]), "stone");
        assert_eq!(g.get([9, 9, 9]), "air");
        let blocks: Vec<_> = g.blocks().collect();
        assert_eq!(
            blocks,
            vec![([1, 0, 0], "obsidian"), ([2, 0, 0], "obsidian"), ([1, 0, 1], "obsidian"), ([2, 0, 1], "obsidian"), ([1, 1, 0], "stone")]
        );
    }
}
