//! The seeded, structure-aware mutator and case runner behind every crate's fuzz tests
//! (`tests/fuzz.rs`, which include this file).
//!
//! A fuzz target starts from real files, mutates them (bytes, the numeric fields of a binary
//! header, or the values of a parsed JSON/TOML document), and feeds each case to a parser. Every
//! case must end in `Ok` or in an error that names the input; a panic, a hang past the case
//! deadline, or an error that names nothing fails the test and leaves the case in
//! `target/fuzz-failures/` to be moved into `tests/fuzz-regressions/<target>/`, whose files run
//! first on every run. An abort (allocation beyond the address-space cap the target sets) kills
//! the test binary; the case it was running is in `target/fuzz-failures/<target>.current`.
//!
//! CI runs each target's default budget; `COLLM_FUZZ_CASES=N` runs N cases per target (and
//! `COLLM_FUZZ_SEED=S` starts at another seed).
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// SplitMix64: a small, seedable generator whose stream never changes between versions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x853c_49e6_748f_ea9b)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Integers that break parsers: zero, one, all ones, signed edges, powers of two near limits.
pub const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    7,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    1 << 62,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// The number of cases per target: `COLLM_FUZZ_CASES`, or the target's CI budget.
pub fn cases(default: usize) -> usize {
    std::env::var("COLLM_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn first_seed() -> u64 {
    std::env::var("COLLM_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Mutates bytes: a few of bit flips, interesting values written over a numeric field (`fields`:
/// the (position, width) of the header's integers, for structure-aware cases) or anywhere,
/// deleted, duplicated or inserted ranges, and truncation.
pub fn mutate_bytes(rng: &mut Rng, input: &[u8], fields: &[(usize, usize)]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        match rng.below(7) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 | 2 if !fields.is_empty() => {
                let &(pos, width) = rng.pick(fields);
                let v = if rng.chance(0.7) { *rng.pick(&INTERESTING) } else { rng.next() };
                let bytes = v.to_le_bytes();
                for k in 0..width.min(8) {
                    if pos + k < b.len() {
                        b[pos + k] = bytes[k];
                    }
                }
            }
            1 | 2 | 3 => {
                let width = *rng.pick(&[1usize, 2, 4, 8]);
                let pos = rng.below(b.len());
                let bytes = rng.pick(&INTERESTING).to_le_bytes();
                for k in 0..width {
                    if pos + k < b.len() {
                        b[pos + k] = bytes[k];
                    }
                }
            }
            4 => {
                let i = rng.below(b.len());
                let n = rng.below((b.len() - i).min(256)) + 1;
                b.drain(i..i + n);
            }
            5 => {
                let i = rng.below(b.len());
                let n = rng.below((b.len() - i).min(256)) + 1;
                let piece = b[i..i + n].to_vec();
                let at = rng.below(b.len());
                b.splice(at..at, piece);
            }
            _ => {
                let keep = rng.below(b.len());
                b.truncate(keep);
            }
        }
    }
    b
}

/// A string that breaks text handling: empty, huge, control characters, unpaired braces,
/// template syntax, non-ASCII, numbers as text.
pub fn nasty_string(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => String::new(),
        1 => "x".repeat(1 + rng.below(20_000)),
        2 => "\u{0}\u{1}\u{7f}\r\n\t".into(),
        3 => "{{ }} {% for %} {# ".into(),
        4 => "é☃🦀\u{202e}".into(),
        5 => "nan".into(),
        6 => "-1e309".into(),
        7 => "18446744073709551616".into(),
        8 => "../../../../etc/passwd".into(),
        _ => format!("{}", rng.next()),
    }
}

/// A value of a random kind, often an edge one.
pub fn nasty_value(rng: &mut Rng) -> Value {
    match rng.below(9) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(0.5)),
        2 => serde_json::json!(*rng.pick(&INTERESTING)),
        3 => serde_json::json!(-(rng.below(1 << 20) as i64) - 1),
        4 => serde_json::json!(*rng.pick(&[0.0f64, -0.0, 1e308, -1e308, 1e-320, 0.5, 1e9])),
        5 => Value::String(nasty_string(rng)),
        6 => Value::Array(vec![]),
        7 => serde_json::json!({}),
        _ => serde_json::json!([nasty_string(rng), *rng.pick(&INTERESTING)]),
    }
}

/// Every path (object keys and array indices) of a JSON document, outermost first.
fn paths(v: &Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                here.push(PathStep::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            // Long arrays: a sample of their elements.
            for i in (0..a.len()).step_by((a.len() / 16).max(1)) {
                here.push(PathStep::Index(i));
                paths(&a[i], here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathStep]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        PathStep::Key(k) => &mut v[k.as_str()],
        PathStep::Index(i) => &mut v[*i],
    })
}

/// Structure-aware mutation of a parsed document: a few nodes replaced by edge values of any
/// kind, removed, duplicated into another place, or (strings) cut or extended.
pub fn mutate_json(rng: &mut Rng, doc: &Value) -> Value {
    let mut v = doc.clone();
    for _ in 0..1 + rng.below(3) {
        let mut all = vec![];
        paths(&v, &mut vec![], &mut all);
        let path = rng.pick(&all).clone();
        match rng.below(5) {
            0 | 1 => *at(&mut v, &path) = nasty_value(rng),
            2 => {
                // Remove the node from its parent.
                if let Some((last, parent)) = path.split_last() {
                    match (at(&mut v, parent), last) {
                        (Value::Object(m), PathStep::Key(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), PathStep::Index(i)) if *i < a.len() => {
                            a.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            3 => {
                let copy = at(&mut v, &path).clone();
                let other = rng.pick(&all).clone();
                if !other.is_empty() {
                    *at(&mut v, &other) = copy;
                }
            }
            _ => {
                let node = at(&mut v, &path);
                if let Value::String(s) = node {
                    let cut = rng.below(s.len() + 1);
                    let cut = (0..=cut).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.truncate(cut);
                    s.push_str(&nasty_string(rng));
                } else if let Value::Array(a) = node {
                    if let Some(x) = a.first().cloned() {
                        for _ in 0..rng.below(64) {
                            a.push(x.clone());
                        }
                    }
                } else {
                    *node = nasty_value(rng);
                }
            }
        }
    }
    v
}

/// Runs a target: every regression file, then `n` generated cases. `gen` makes a case's input
/// from its seed's stream; `check` parses it and says whether the outcome is acceptable:
/// `Ok(true)` loaded, `Ok(false)` a clear error, `Err(why)` an error that names nothing. Panics, hangs past `deadline` and unacceptable
/// errors fail the test, naming the case and leaving its input in `target/fuzz-failures/`.
pub fn run<G, C>(target: &str, regressions: &Path, n: usize, deadline: Duration, gen: G, check: C)
where
    G: Fn(&mut Rng) -> Vec<u8> + Send + 'static,
    C: FnMut(&[u8]) -> Result<bool, String> + Send + 'static,
{
    let failures = failures_dir();
    std::fs::create_dir_all(&failures).unwrap();
    let current = failures.join(format!("{target}.current"));
    let mut inputs: Vec<(String, Option<Vec<u8>>)> = vec![];
    if let Ok(rd) = std::fs::read_dir(regressions.join(target)) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            inputs.push((format!("regression {}", f.display()), Some(std::fs::read(&f).unwrap())));
        }
    }
    let seed0 = first_seed();
    for s in seed0..seed0 + n as u64 {
        inputs.push((format!("seed {s}"), None));
    }
    let total = inputs.len();
    let (tx, rx) = mpsc::channel::<(String, Vec<u8>, Result<bool, String>)>();
    let (start_tx, start_rx) = mpsc::channel::<String>();
    let worker = std::thread::spawn(move || {
        let mut check = check;
        for (name, given) in inputs {
            let bytes = given.unwrap_or_else(|| {
                let seed: u64 = name.trim_start_matches("seed ").parse().unwrap();
                gen(&mut Rng::new(seed))
            });
            std::fs::write(&current, &bytes).unwrap();
            start_tx.send(name.clone()).unwrap();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes)));
            let outcome = match outcome {
                Ok(r) => r,
                Err(p) => {
                    let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(format!("panicked: {}", msg.unwrap_or_default()))
                }
            };
            let failed = outcome.is_err();
            tx.send((name, bytes, outcome)).unwrap();
            if failed {
                return;
            }
        }
        let _ = std::fs::remove_file(&current);
    });
    let mut loaded = 0;
    for _ in 0..total {
        let name = start_rx.recv().expect("the fuzz worker stopped");
        match rx.recv_timeout(deadline) {
            Ok((_, _, Ok(ok))) => loaded += ok as usize,
            Ok((name, bytes, Err(why))) => {
                let f = failures.join(format!("{target}-{}", name.replace(' ', "-").replace('/', "_")));
                std::fs::write(&f, &bytes).unwrap();
                panic!("fuzz target {target}, {name}: {why}\n(input saved as {})", f.display());
            }
            Err(_) => panic!(
                "fuzz target {target}, {name}: no result within {deadline:?} (a hang; the input is in {})",
                failures.join(format!("{target}.current")).display()
            ),
        }
    }
    worker.join().unwrap();
    eprintln!("fuzz target {target}: {total} cases: {loaded} loaded, {} clear errors", total - loaded);
}

/// `target/fuzz-failures` of the workspace.
pub fn failures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures")
}

/// Caps this process's address space, so that an allocation the input cannot justify fails (and
/// aborts the test binary) instead of exhausting the machine.
pub fn cap_address_space(bytes: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid struct only read and lower this process's
    // soft limit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_AS, &mut lim);
        lim.rlim_cur = bytes.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}
