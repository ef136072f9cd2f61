//! A 5×5 block font for A–Z and 0–9 ('#' a block, '.' air; the first string is the top row).

use anyhow::{bail, Result};

pub const GLYPH_SIZE: usize = 5;

#[rustfmt::skip]
const GLYPHS: [(char, [&str; 5]); 36] = [
    ('A', [".###.", "#...#", "#####", "#...#", "#...#"]),
    ('B', ["####.", "#...#", "####.", "#...#", "####."]),
    ('C', [".####", "#....", "#....", "#....", ".####"]),
    ('D', ["####.", "#...#", "#...#", "#...#", "####."]),
    ('E', ["#####", "#....", "####.", "#....", "#####"]),
    ('F', ["#####", "#....", "####.", "#....", "#...."]),
    ('G', [".####", "#....", "#..##", "#...#", ".###."]),
    ('H', ["#...#", "#...#", "#####", "#...#", "#...#"]),
    ('I', ["#####", "..#..", "..#..", "..#..", "#####"]),
    ('J', ["..###", "...#.", "...#.", "#..#.", ".##.."]),
    ('K', ["#...#", "#..#.", "###..", "#..#.", "#...#"]),
    ('L', ["#....", "#....", "#....", "#....", "#####"]),
    ('M', ["#...#", "##.##", "#.#.#", "#...#", "#...#"]),
    ('N', ["#...#", "##..#", "#.#.#", "#..##", "#...#"]),
    ('O', [".###.", "#...#", "#...#", "#...#", ".###."]),
    ('P', ["####.", "#...#", "####.", "#....", "#...."]),
    ('Q', [".###.", "#...#", "#.#.#", "#..#.", ".##.#"]),
    ('R', ["####.", "#...#", "####.", "#..#.", "#...#"]),
    ('S', [".####", "#....", ".###.", "....#", "####."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#.."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", ".###."]),
    ('V', ["#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('W', ["#...#", "#...#", "#.#.#", "##.##", "#...#"]),
    ('X', ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('Y', ["#...#", ".#.#.", "..#..", "..#..", "..#.."]),
    ('Z', ["#####", "...#.", "..#..", ".#...", "#####"]),
    ('0', [".###.", "#..##", "#.#.#", "##..#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "..##.", ".#...", "#####"]),
    ('3', ["####.", "....#", ".###.", "....#", "####."]),
    ('4', ["#..#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "####."]),
    ('6', [".###.", "#....", "####.", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", "..#.."]),
    ('8', [".###.", "#...#", ".###.", "#...#", ".###."]),
    ('9', [".###.", "#...#", ".####", "....#", ".###."]),
];

/// The glyph of a character (letters in either case).
pub fn glyph(c: char) -> Option<[&'static str; 5]> {
    let c = c.to_ascii_uppercase();
    GLYPHS.iter().find(|(g, _)| *g == c).map(|(_, rows)| *rows)
}

/// The rows (top first) of `text` drawn glyph by glyph, `spacing` air columns between glyphs.
pub fn render(text: &str, spacing: usize) -> Result<Vec<String>> {
    if text.is_empty() {
        bail!("an empty string has nothing to draw");
    }
    let mut rows = vec![String::new(); GLYPH_SIZE];
    for (i, c) in text.chars().enumerate() {
        let Some(g) = glyph(c) else { bail!("no glyph for {c:?} (the font has A-Z and 0-9)") };
        for (row, line) in rows.iter_mut().zip(g) {
            if i > 0 {
                row.push_str(&".".repeat(spacing));
            }
            row.push_str(line);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_5x5_and_distinct() {
        for (c, rows) in GLYPHS {
            assert!(rows.iter().all(|r| r.len() == 5 && r.chars().all(|ch| ch == '#' || ch == '.')), "{c}");
            assert_eq!(GLYPHS.iter().filter(|(_, r)| *r == rows).count(), 1, "{c} duplicates another glyph");
        }
        assert_eq!(glyph('m'), glyph('M'));
        assert_eq!(glyph('!'), None);
        let cells = |c| glyph(c).unwrap().iter().map(|r| r.matches('#').count()).sum::<usize>();
        assert_eq!([cells('I'), cells('C'), cells('M'), cells('L')], [13, 11, 13, 9]);
    }

    #[test]
    fn render_spacing_and_errors() {
        assert_eq!(render("LI", 2).unwrap(), vec!["#......#####", "#........#..", "#........#..", "#........#..", "#####..#####"]);
        assert_eq!(render("I", 2).unwrap()[0], "#####");
        assert!(render("", 2).is_err());
        assert!(render("A B", 2).unwrap_err().to_string().contains("' '"));
    }
}
