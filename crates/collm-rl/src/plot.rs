//! Learning-curve plots as PNG files, drawn here (lines, axes and a small bitmap font), so a run
//! needs no plotting library or system fonts.

use anyhow::{Context, Result};
use std::path::Path;

/// One panel: a title and named series of (x, y) points.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

const COLORS: [[u8; 3]; 8] =
    [[31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [127, 127, 127]];

/// 5×7 glyphs, one string of 7 rows per character ('#' = ink).
fn glyph(c: char) -> [&'static str; 7] {
    match c.to_ascii_lowercase() {
        '0' => [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
        '1' => ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        '2' => [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
        '3' => ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
        '4' => ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
        '5' => ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
        '6' => ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
        '7' => ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
        '8' => [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
        '9' => [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
        'a' => ["     ", "     ", " ### ", "    #", " ####", "#   #", " ####"],
        'b' => ["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#### "],
        'c' => ["     ", "     ", " ### ", "#    ", "#    ", "#   #", " ### "],
        'd' => ["    #", "    #", " ## #", "#  ##", "#   #", "#   #", " ####"],
        'e' => ["     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "],
        'f' => ["  ## ", " #  #", " #   ", "###  ", " #   ", " #   ", " #   "],
        'g' => ["     ", " ####", "#   #", "#   #", " ####", "    #", " ### "],
        'h' => ["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'i' => ["  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "],
        'j' => ["   # ", "     ", "  ## ", "   # ", "   # ", "#  # ", " ##  "],
        'k' => ["#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "],
        'l' => [" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        'm' => ["     ", "     ", "## # ", "# # #", "# # #", "#   #", "#   #"],
        'n' => ["     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'o' => ["     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "],
        'p' => ["     ", "     ", "#### ", "#   #", "#### ", "#    ", "#    "],
        'q' => ["     ", "     ", " ## #", "#  ##", " ####", "    #", "    #"],
        'r' => ["     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "],
        's' => ["     ", "     ", " ### ", "#    ", " ### ", "    #", "#### "],
        't' => [" #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## "],
        'u' => ["     ", "     ", "#   #", "#   #", "#   #", "#  ##", " ## #"],
        'v' => ["     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "],
        'w' => ["     ", "     ", "#   #", "#   #", "# # #", "# # #", " # # "],
        'x' => ["     ", "     ", "#   #", " # # ", "  #  ", " # # ", "#   #"],
        'y' => ["     ", "     ", "#   #", "#   #", " ####", "    #", " ### "],
        'z' => ["     ", "     ", "#####", "   # ", "  #  ", " #   ", "#####"],
        '.' => ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
        '-' => ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
        '_' => ["     ", "     ", "     ", "     ", "     ", "     ", "#####"],
        ':' => ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "],
        '(' => ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
        ')' => [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
        '/' => ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "],
        '=' => ["     ", "     ", "#####", "     ", "#####", "     ", "     "],
        _ => ["     "; 7],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self { w, h, px: vec![255; w * h * 3] }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=n {
            let t = s as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (n, ch) in s.chars().enumerate() {
            for (r, row) in glyph(ch).iter().enumerate() {
                for (col, b) in row.bytes().enumerate() {
                    if b == b'#' {
                        self.set(x + n as i64 * 6 + col as i64, y + r as i64, c);
                    }
                }
            }
        }
    }
    fn save(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&self.px)?;
        Ok(())
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// Draws panels side by side into a PNG, one color per series name (shared legend).
pub fn panels(panels: &[Panel], path: &Path) -> Result<()> {
    let (pw, ph, pad_l, pad_b, pad_t) = (360usize, 260usize, 48.0, 30.0, 22.0);
    let mut names: Vec<String> = vec![];
    for p in panels {
        for (n, _) in &p.series {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let legend_h = 14 * names.len() + 8;
    let mut cv = Canvas::new(pw * panels.len().max(1), ph + legend_h);
    for (pi, p) in panels.iter().enumerate() {
        let ox = (pi * pw) as f64;
        let pts: Vec<(f64, f64)> =
            p.series.iter().flat_map(|s| s.1.iter().cloned()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let (mut x0, mut x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, &(x, _)| (a.0.min(x), a.1.max(x)));
        let (mut y0, mut y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, &(_, y)| (a.0.min(y), a.1.max(y)));
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-9 {
            y0 -= 0.5;
            y1 += 0.5;
        }
        let (l, r, t, b) = (ox + pad_l, ox + pw as f64 - 12.0, pad_t, ph as f64 - pad_b);
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
        let sy = |y: f64| b - (y - y0) / (y1 - y0) * (b - t);
        let axis = [60, 60, 60];
        cv.line((l, t), (l, b), axis, 1);
        cv.line((l, b), (r, b), axis, 1);
        for k in 0..=4 {
            let y = y0 + (y1 - y0) * k as f64 / 4.0;
            cv.line((l - 3.0, sy(y)), (l, sy(y)), axis, 1);
            cv.line((l + 1.0, sy(y)), (r, sy(y)), [230, 230, 230], 1);
            cv.text(ox as i64 + 4, sy(y) as i64 - 3, &fmt_num(y), axis);
        }
        cv.text(l as i64, b as i64 + 6, &fmt_num(x0), axis);
        let xs = fmt_num(x1);
        cv.text(r as i64 - 6 * xs.len() as i64, b as i64 + 6, &xs, axis);
        cv.text((l + r) as i64 / 2 - 3 * p.x_label.len() as i64, b as i64 + 16, &p.x_label, axis);
        cv.text(l as i64, 6, &p.title, [0, 0, 0]);
        for (name, s) in &p.series {
            let c = COLORS[names.iter().position(|n| n == name).unwrap_or(0) % COLORS.len()];
            for w in s.windows(2) {
                if w[0].1.is_finite() && w[1].1.is_finite() {
                    cv.line((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)), c, 2);
                }
            }
        }
    }
    for (i, n) in names.iter().enumerate() {
        let y = (ph + 6 + 14 * i) as f64;
        let c = COLORS[i % COLORS.len()];
        cv.line((pad_l, y + 3.0), (pad_l + 24.0, y + 3.0), c, 3);
        cv.text(pad_l as i64 + 32, y as i64, n, [0, 0, 0]);
    }
    cv.save(path)
}

/// Moving average over `w` points.
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(w.saturating_sub(1));
            let ys = &points[lo..=i];
            (points[i].0, ys.iter().map(|p| p.1).sum::<f64>() / ys.len() as f64)
        })
        .collect()
}

/// The study's learning curves: a panel per setting, a line per algorithm (mean over seeds of
/// each run's smoothed train reward, on a common grid of env steps).
pub fn study_curves(results: &[crate::study::RunResult], settings: &[String], algos: &[String], path: &Path) -> Result<()> {
    let mut ps = vec![];
    for st in settings {
        let mut series = vec![];
        for a in algos {
            let runs: Vec<Vec<(f64, f64)>> = results
                .iter()
                .filter(|r| &r.setting == st && &r.algo == a)
                .map(|r| smooth(&r.curve.iter().map(|&(x, y)| (x as f64, y)).collect::<Vec<_>>(), 10))
                .collect();
            let Some(xmax) = runs.iter().filter_map(|r| r.last().map(|p| p.0)).reduce(f64::min) else { continue };
            let grid: Vec<(f64, f64)> = (0..=50)
                .map(|g| {
                    let x = xmax * g as f64 / 50.0;
                    let ys: Vec<f64> = runs.iter().filter_map(|r| r.iter().rev().find(|p| p.0 <= x).or(r.first()).map(|p| p.1)).collect();
                    (x, ys.iter().sum::<f64>() / ys.len().max(1) as f64)
                })
                .collect();
            series.push((a.clone(), grid));
        }
        ps.push(Panel { title: st.clone(), x_label: "env steps".into(), series });
    }
    panels(&ps, path)
}
