//! Fuzz targets for experiment configs: the TOML files in `configs/` mutated as documents (values
//! of every kind and size, keys removed or moved) and as text, and `--set key=value` overrides of
//! real and made-up keys. A config that parses is also built as far as it can be here (its task,
//! and a tiny team); every case must succeed or fail with an error naming the file, the key or the
//! `--set`. See `fuzz/mutate.rs` (`COLLM_FUZZ_CASES=N`).

#[path = "../../../fuzz/mutate.rs"]
mod mutate;

use collm_rl::Config;
use mutate::{cases, mutate_bytes, mutate_json, nasty_string, Rng};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn configs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut out: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml") && !p.to_string_lossy().contains("study"))
        .map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    out.sort();
    assert!(out.len() >= 10, "the configs directory holds the seeds");
    out.into_iter().map(|x| x.1).collect()
}

/// A JSON document as TOML (nulls dropped, as TOML has none); None when it is not a table.
fn to_toml(v: &serde_json::Value) -> Option<String> {
    fn strip(v: &serde_json::Value) -> Option<toml::Value> {
        use serde_json::Value as J;
        Some(match v {
            J::Null => return None,
            J::Bool(b) => toml::Value::Boolean(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => toml::Value::Integer(i),
                None => toml::Value::Float(n.as_f64()?),
            },
            J::String(s) => toml::Value::String(s.clone()),
            J::Array(a) => toml::Value::Array(a.iter().filter_map(strip).collect()),
            J::Object(m) => toml::Value::Table(m.iter().filter_map(|(k, v)| Some((k.clone(), strip(v)?))).collect()),
        })
    }
    match strip(v)? {
        toml::Value::Table(t) => toml::to_string(&t).ok(),
        _ => None,
    }
}

/// Keys of a config, dotted.
fn keys(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if let toml::Value::Table(t) = v {
            keys(t, &key, out);
        }
        out.push(key);
    }
}

const VALUES: [&str; 20] = [
    "0",
    "-1",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "18446744073709551615",
    "4294967296",
    "1e-300",
    "\"\"",
    "\"x\"",
    "true",
    "[]",
    "{}",
    "[1, \"a\"]",
    "{ a = 1 }",
    "0.5",
    "2",
    "\"../../etc\"",
    "1_000_000",
];

/// A case: the config text, then a NUL and the `--set` overrides, one per line.
fn gen(rng: &mut Rng, seeds: &[String]) -> Vec<u8> {
    let text = rng.pick(seeds).clone();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let body = match rng.below(4) {
        0 | 1 => {
            let json = serde_json::to_value(&table).unwrap();
            to_toml(&mutate_json(rng, &json)).unwrap_or(text.clone())
        }
        2 => String::from_utf8_lossy(&mutate_bytes(rng, text.as_bytes(), &[])).into_owned(),
        _ => text.clone(),
    };
    let mut known = vec![];
    keys(&table, "", &mut known);
    known.extend(
        ["k", "steps", "buffer", "task.turns", "agents.tiny.hidden", "agents.tiny.layers", "critic.lr", "sampling.temperature"]
            .map(String::from),
    );
    let mut sets = vec![];
    for _ in 0..rng.below(4) {
        let key = if rng.chance(0.85) { rng.pick(&known).clone() } else { nasty_string(rng) };
        let value = if rng.chance(0.8) { rng.pick(&VALUES).to_string() } else { nasty_string(rng) };
        sets.push(if rng.chance(0.95) { format!("{key}={value}") } else { key });
    }
    let mut out = body.into_bytes();
    out.push(0);
    out.extend(sets.join("\n").into_bytes());
    out
}

fn check(case: &[u8]) -> Result<bool, String> {
    let cut = case.iter().position(|&b| b == 0).unwrap_or(case.len());
    let text = String::from_utf8_lossy(&case[..cut]);
    let sets: Vec<String> =
        String::from_utf8_lossy(case.get(cut + 1..).unwrap_or(&[])).lines().filter(|l| !l.is_empty()).map(String::from).collect();
    let cfg = match Config::from_toml(&text, "fuzz.toml", &sets) {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{e:#}");
            return if msg.contains("fuzz.toml") || msg.contains("--set") {
                Ok(false)
            } else {
                Err(format!("names neither the file nor the --set: {msg}"))
            };
        }
    };
    // Tasks that load without the network (HumanEval is fetched with pip) or a sandbox probe.
    let offline = ["synthetic", "summary", "tldr", "arxiv", "str_build", "house_build"];
    if !offline.contains(&cfg.task.name.as_str()) {
        return Ok(true);
    }
    let env = match collm_rl::trainer::make_env(&cfg) {
        Ok(e) => e,
        Err(e) if !format!("{e:#}").is_empty() => return Ok(false),
        Err(_) => return Err("an empty error from the task".into()),
    };
    let tiny = (0..env.num_agents()).all(|i| cfg.agent_spec(i).model == "tiny") && cfg.critic_spec().model == "tiny";
    if tiny {
        if let Err(e) = collm_rl::team::Team::load(&cfg, env.num_agents()) {
            if format!("{e:#}").is_empty() {
                return Err("an empty error from the team".into());
            }
            return Ok(false);
        }
    }
    Ok(true)
}

#[test]
fn fuzz_configs_and_set_overrides() {
    static CAP: std::sync::Once = std::sync::Once::new();
    // 8 GiB of address space: a tiny team needs a few MiB.
    CAP.call_once(|| mutate::cap_address_space(8 << 30));
    let seeds = configs();
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    mutate::run("config", &regressions, cases(1000), Duration::from_secs(60), move |rng: &mut Rng| gen(rng, &seeds), check);
}
