//! Weights on 2 MiB pages.
//!
//! A decode step reads every weight of the model once. On 4 KiB pages that is a page-table entry
//! per 4 KiB, far more than the TLB holds, and under a virtual machine each miss walks two sets
//! of page tables (the guest's and the host's). Where Linux has transparent huge pages in
//! `madvise` mode (the common default), memory goes on 2 MiB pages only where a process asks.
//! [`back_with_huge_pages`] asks for the pages under given buffers: `MADV_HUGEPAGE` marks them
//! and `MADV_COLLAPSE` (Linux 6.1+) moves what is already written onto huge pages at once. The
//! contents never change. Where the kernel cannot (an older kernel, THP off, no free 2 MiB
//! blocks), the buffers stay on small pages and nothing else happens.
//!
//! Measured with `collm bench train --workload ../shared/bench/tldr_like.json --algo cc` (Intel
//! Xeon, family 6 model 167, a 2-core VM, 2026-12-08), in turn: generation 10.4 and 10.7 s on
//! small pages, 8.4 and 8.9 s with the team's weights on huge pages.

const HUGE: usize = 2 << 20;

/// Byte ranges [start, end), merged where they touch or overlap, sorted; empty ones dropped.
fn merged(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.retain(|r| r.1 > r.0);
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = vec![];
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The 2 MiB pages that hold any byte of the ranges, merged.
fn huge_pages_over(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    merged(ranges.iter().map(|&(s, e)| (s / HUGE * HUGE, e.next_multiple_of(HUGE))).collect())
}

/// The 2 MiB pages wholly inside a range, if any.
fn huge_pages_inside((s, e): (usize, usize)) -> Option<(usize, usize)> {
    let r = (s.next_multiple_of(HUGE), e / HUGE * HUGE);
    (r.1 > r.0).then_some(r)
}

/// A slice as the (address, length in bytes) that [`back_with_huge_pages`] takes.
pub fn span<T>(xs: &[T]) -> (usize, usize) {
    (xs.as_ptr() as usize, std::mem::size_of_val(xs))
}

/// Asks the kernel to hold the buffers, (address, length in bytes) of live host memory, on 2 MiB
/// pages; returns the bytes it moved. Runs of buffers shorter than a huge page are left alone
/// (a small model fits the TLB anyway). The pages around the buffers go too: a huge page holding
/// the end of one weight and the start of the next serves both. Where those pages reach past
/// the mapping (the first page of the heap, say), only the pages wholly inside each buffer do.
pub fn back_with_huge_pages(buffers: impl IntoIterator<Item = (usize, usize)>) -> u64 {
    let buffers: Vec<(usize, usize)> =
        merged(buffers.into_iter().map(|(p, n)| (p, p + n)).collect()).into_iter().filter(|r| r.1 - r.0 >= HUGE).collect();
    let mut moved = 0u64;
    for (s, e) in huge_pages_over(&buffers) {
        if advise(s, e - s) {
            moved += (e - s) as u64;
            continue;
        }
        for (s, e) in buffers.iter().filter(|b| b.0 < e && b.1 > s).filter_map(|&b| huge_pages_inside(b)) {
            if advise(s, e - s) {
                moved += (e - s) as u64;
            }
        }
    }
    moved
}

#[cfg(target_os = "linux")]
fn advise(start: usize, len: usize) -> bool {
    // SAFETY: [start, start + len) is whole pages of this process's memory; both advices keep
    // the contents and the mapping's permissions as they are, and fail on pages not mapped.
    unsafe {
        let p = start as *mut libc::c_void;
        libc::madvise(p, len, libc::MADV_HUGEPAGE) == 0 && libc::madvise(p, len, libc::MADV_COLLAPSE) == 0
    }
}

/// Whether this kernel can move written memory onto huge pages when asked: THP in `madvise`
/// or `always` mode, and Linux 6.1 or later (MADV_COLLAPSE).
pub fn can_collapse() -> bool {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
    let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    cfg!(target_os = "linux") && (mode.contains("[madvise]") || mode.contains("[always]")) && version >= (6, 1)
}

#[cfg(not(target_os = "linux"))]
fn advise(_start: usize, _len: usize) -> bool {
    false
}

/// The bytes of `[start, start + len)` that lie on huge pages, from `/proc/self/smaps`: the
/// `AnonHugePages` of each mapping, counted where the mapping lies wholly inside the range (an
/// advice splits a mapping at the range's huge-page edges).
#[cfg(target_os = "linux")]
pub fn huge_bytes_in(start: usize, len: usize) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let (mut inside, mut total) = (false, 0u64);
    for line in smaps.lines() {
        if let Some((lo, hi)) = line.split_whitespace().next().and_then(|r| r.split_once('-')) {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                inside = lo >= start / HUGE * HUGE && hi <= (start + len).next_multiple_of(HUGE);
                continue;
            }
        }
        if inside && line.starts_with("AnonHugePages:") {
            total += crate::devcheck::kb_line(line).unwrap_or(0);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = 1 << 20;

    #[test]
    fn ranges_merge_and_round_to_the_huge_pages_they_touch() {
        // Out of order, one inside another, two touching, one empty.
        let r = merged(vec![(10 * M, 11 * M), (M, 3 * M), (2 * M, 2 * M + 5), (3 * M, 4 * M), (7 * M, 7 * M)]);
        assert_eq!(r, vec![(M, 4 * M), (10 * M, 11 * M)]);
        // [1, 4) MiB touches the pages [0, 2) and [2, 4); [10, 11) the page [10, 12).
        assert_eq!(huge_pages_over(&r), vec![(0, 4 * M), (10 * M, 12 * M)]);
        // Pages that would overlap after rounding merge: [3, 5) and [5.5, 7) share [4, 6).
        assert_eq!(huge_pages_over(&[(3 * M, 5 * M), (5 * M + M / 2, 7 * M)]), vec![(2 * M, 8 * M)]);
        assert_eq!(huge_pages_inside((M, 5 * M + 1)), Some((2 * M, 4 * M)));
        assert_eq!(huge_pages_inside((M, 3 * M)), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn written_buffers_move_onto_huge_pages_with_their_values() {
        // 24 MiB of written values, as a loaded weight is.
        let xs: Vec<f32> = (0..6 * M).map(|i| (i % 9973) as f32 * 0.5).collect();
        let (p, n) = (xs.as_ptr() as usize, xs.len() * 4);
        let before = huge_bytes_in(p, n).unwrap();
        let moved = back_with_huge_pages([(p, n)]);
        let after = huge_bytes_in(p, n).unwrap();
        assert!(xs.iter().enumerate().all(|(i, &x)| x == (i % 9973) as f32 * 0.5), "the values changed");
        if !can_collapse() {
            // A kernel without MADV_COLLAPSE or with THP off: the values are all that must hold.
            eprintln!("this kernel cannot move memory onto huge pages (THP off or Linux before 6.1): checked the values only");
            return;
        }
        // All but the pages at the ends lie inside the buffer: at least 20 MiB of it is huge.
        assert!(moved >= (20 * M) as u64, "moved {moved} bytes of {n}");
        // (Under THP's `always` mode the buffer may have been on huge pages before.)
        assert!(after >= (20 * M) as u64, "smaps shows {before} -> {after} huge bytes in the buffer");
    }
}
