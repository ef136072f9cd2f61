//! Fuzz targets for the dataset files tasks read: JSON lists, JSONL, gzipped JSONL and Parquet
//! (through the coding and writing loaders), the Minecraft CSV and JSON files and the writing
//! lexicons. Each starts from the real files in `../shared/data` and `tests/data`; every case must
//! load or fail with an error naming the file. See `fuzz/mutate.rs` (`COLLM_FUZZ_CASES=N`).

#[path = "../../../fuzz/mutate.rs"]
mod mutate;

use collm_envs::coding::{load_problems, Columns};
use collm_envs::minecraft::{HouseBuild, StrBuild};
use collm_envs::writing::Lexicons;
use collm_envs::Env;
use mutate::{cases, mutate_bytes, mutate_json, Rng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn setup() {
    static CAP: std::sync::Once = std::sync::Once::new();
    // 4 GiB of address space: far more than any of these small files can justify.
    CAP.call_once(|| mutate::cap_address_space(4 << 30));
}

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions")
}

fn shared(rel: &str) -> PathBuf {
    let p = collm_envs::resolve_data_path(&Path::new("../shared/data").join(rel));
    assert!(p.exists(), "{} is missing: the fuzz targets start from the shared data", p.display());
    p
}

fn local(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn case_dir(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("collm-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn names(e: &anyhow::Error, path: &Path) -> Result<bool, String> {
    let msg = format!("{e:#}");
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    if msg.contains(&name) {
        Ok(false)
    } else {
        Err(format!("the error does not name {}: {msg}", path.display()))
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// The seeds of a JSON-lines target: a JSON list file as a list, as JSONL and as gzipped JSONL.
fn json_seeds(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let jsonl: String = v.as_array().unwrap().iter().map(|r| format!("{r}\n")).collect();
    (v, jsonl.into_bytes())
}

/// Case bytes and the file name they are written under (the name picks the format).
fn encode_case(name: &str, bytes: Vec<u8>) -> Vec<u8> {
    let mut out = name.as_bytes().to_vec();
    out.push(0);
    out.extend(bytes);
    out
}

fn decode_case(case: &[u8]) -> (&str, &[u8]) {
    let cut = case.iter().position(|&b| b == 0).unwrap_or(0);
    (std::str::from_utf8(&case[..cut]).unwrap_or("case.json"), &case[(cut + 1).min(case.len())..])
}

/// A JSON document target over any of the formats: mutated as a list (written as JSON, JSONL or
/// gzipped JSONL), or as the file's bytes.
fn json_case(rng: &mut Rng, doc: &serde_json::Value, jsonl: &[u8]) -> Vec<u8> {
    let mutated = mutate_json(rng, doc);
    let lines = || -> Vec<u8> {
        match mutated.as_array() {
            Some(a) => a.iter().map(|r| format!("{r}\n")).collect::<String>().into_bytes(),
            None => mutated.to_string().into_bytes(),
        }
    };
    match rng.below(5) {
        0 => encode_case("case.json", mutated.to_string().into_bytes()),
        1 => encode_case("case.jsonl", lines()),
        2 => encode_case("case.jsonl.gz", gzip(&lines())),
        3 => encode_case("case.jsonl", mutate_bytes(rng, jsonl, &[])),
        _ => encode_case("case.jsonl.gz", mutate_bytes(rng, &gzip(jsonl), &[])),
    }
}

#[test]
fn fuzz_coding_datasets() {
    let (doc, jsonl) = json_seeds(&shared("coding/coop_humaneval.json"));
    let parquet = std::fs::read(local("coding_sample.parquet")).unwrap();
    let dir = case_dir("coding");
    setup();
    mutate::run(
        "coding_dataset",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| {
            if rng.chance(0.25) {
                encode_case("case.parquet", mutate_bytes(rng, &parquet, &[]))
            } else {
                json_case(rng, &doc, &jsonl)
            }
        },
        move |case: &[u8]| {
            let (name, bytes) = decode_case(case);
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            match load_problems(&p, &Columns::default()) {
                Ok(_) => Ok(true),
                Err(e) => names(&e, &p),
            }
        },
    );
}

#[test]
fn fuzz_text_datasets() {
    let rows: Vec<serde_json::Value> =
        (0..6).map(|i| serde_json::json!({"prompt": format!("Post {i}: the cat sat on the mat."), "id": i})).collect();
    let doc = serde_json::Value::Array(rows);
    let jsonl: Vec<u8> = doc.as_array().unwrap().iter().map(|r| format!("{r}\n")).collect::<String>().into_bytes();
    let parquet = [std::fs::read(local("tldr_sample.parquet")).unwrap(), std::fs::read(local("arxiv_sample.parquet")).unwrap()];
    let dir = case_dir("texts");
    setup();
    mutate::run(
        "text_dataset",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| {
            if rng.chance(0.3) {
                let i = rng.below(2);
                encode_case(["case.parquet", "case-arxiv.parquet"][i], mutate_bytes(rng, &parquet[i], &[]))
            } else {
                json_case(rng, &doc, &jsonl)
            }
        },
        move |case: &[u8]| {
            let (name, bytes) = decode_case(case);
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let field = if name.contains("arxiv") { "abstract" } else { "prompt" };
            match collm_envs::Texts::load(Some(&p), None, field, &[], 0) {
                Ok(_) => Ok(true),
                Err(e) => names(&e, &p),
            }
        },
    );
}

#[test]
fn fuzz_minecraft_files() {
    let csv = std::fs::read(shared("minecraft/str_build.csv")).unwrap();
    let house: serde_json::Value = serde_json::from_slice(&std::fs::read(shared("minecraft/house_build.json")).unwrap()).unwrap();
    let house_bytes = house.to_string().into_bytes();
    let dir = case_dir("minecraft");
    setup();
    mutate::run(
        "minecraft",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| match rng.below(4) {
            0 => {
                // Line-level: rows duplicated, dropped or with cells replaced.
                let text = String::from_utf8_lossy(&csv).into_owned();
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(lines.len());
                    match rng.below(3) {
                        0 => lines.push(lines[i].clone()),
                        1 => {
                            lines.remove(i);
                            if lines.is_empty() {
                                lines.push(String::new());
                            }
                        }
                        _ => lines[i] = format!("{},{}", mutate::nasty_string(rng), mutate::nasty_string(rng)),
                    }
                }
                encode_case("case.csv", lines.join("\n").into_bytes())
            }
            1 => encode_case("case.csv", mutate_bytes(rng, &csv, &[])),
            2 => encode_case("case.json", mutate_json(rng, &house).to_string().into_bytes()),
            _ => encode_case("case.json", mutate_bytes(rng, &house_bytes, &[])),
        },
        move |case: &[u8]| {
            let (name, bytes) = decode_case(case);
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let r = if name.ends_with(".csv") { StrBuild::load(&p).map(|_| ()) } else { HouseBuild::load(&p).map(|_| ()) };
            match r {
                Ok(()) => Ok(true),
                Err(e) => names(&e, &p),
            }
        },
    );
}

#[test]
fn fuzz_lexicons() {
    let path = shared("writing/lexicons.json");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let bytes = doc.to_string().into_bytes();
    let dir = case_dir("lexicons");
    let p = dir.join("lexicons.json");
    setup();
    mutate::run(
        "lexicons",
        &regressions(),
        cases(300),
        DEADLINE,
        move |rng: &mut Rng| if rng.chance(0.8) { mutate_json(rng, &doc).to_string().into_bytes() } else { mutate_bytes(rng, &bytes, &[]) },
        move |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            match Lexicons::load(&p) {
                Ok(_) => Ok(true),
                Err(e) => names(&e, &p),
            }
        },
    );
}

/// The external task protocol: a worker whose replies to `observe` and `step` are mutated
/// protocol objects (and bytes). Every reply must be taken (a sane outcome) or refused with an
/// error naming the task program, the item and the turn; garbage restarts the worker.
#[test]
fn fuzz_task_protocol() {
    setup();
    let dir = case_dir("protocol");
    let reply_file = dir.join("reply.txt");
    let hello_file = dir.join("hello.txt");
    let good_hello = serde_json::json!({"protocol": 1, "agents": 2, "turns": 2, "name": "fuzz"});
    std::fs::write(&hello_file, good_hello.to_string()).unwrap();
    let program = dir.join("proto.py");
    std::fs::write(
        &program,
        format!(
            "import json, sys\nfor line in sys.stdin:\n    msg = json.loads(line)\n    path = {:?} if msg['op'] == 'hello' else {:?}\n    sys.stdout.write(open(path, encoding='utf-8', errors='replace').read().replace('\\n', ' ') + '\\n')\n    sys.stdout.flush()\n",
            hello_file.display().to_string(),
            reply_file.display().to_string()
        ),
    )
    .unwrap();
    let spec = collm_envs::external::Spec {
        command: vec!["python3".into(), program.display().to_string()],
        options: Default::default(),
        workers: 1,
        timeout: Duration::from_secs(10),
        // Unbounded: a request that keeps getting garbage must still fail (after 2 retries).
        restarts: usize::MAX,
    };
    let row = serde_json::json!({"question": "2 + 3?", "answer": 5}).as_object().unwrap().clone();
    let env = collm_envs::external::External::start(spec.clone(), vec![row.clone()], vec![]).unwrap();
    let hellos = [good_hello.clone(), serde_json::json!({"protocol": 1, "agents": 3}), serde_json::json!({"protocol": 2, "agents": 2})];
    let seeds = [
        serde_json::json!({"reward": 0.4, "metrics": {"exact": 0.0, "numeric": 1.0}, "done": false, "observations": ["next 0", "next 1"]}),
        serde_json::json!({"observations": ["first 0", "first 1"]}),
        serde_json::json!({"reward": 1.4, "done": true}),
        serde_json::json!({"error": "ValueError: bad"}),
    ];
    mutate::run(
        "task_protocol",
        &regressions(),
        // Each garbage reply costs worker restarts (a Python start each): a small CI budget.
        cases(40),
        DEADLINE,
        move |rng: &mut Rng| {
            if rng.chance(0.25) {
                // The handshake's reply.
                let seed = rng.pick(&hellos).clone();
                let body = if rng.chance(0.8) {
                    mutate_json(rng, &seed).to_string().into_bytes()
                } else {
                    mutate_bytes(rng, seed.to_string().as_bytes(), &[])
                };
                return encode_case("hello", body);
            }
            let seed = rng.pick(&seeds).clone();
            let observe = seed.get("reward").is_none() && seed.get("error").is_none();
            let body = if rng.chance(0.8) {
                mutate_json(rng, &seed).to_string().into_bytes()
            } else {
                mutate_bytes(rng, seed.to_string().as_bytes(), &[])
            };
            encode_case(if observe { "observe" } else { "step" }, body)
        },
        move |case: &[u8]| {
            let (op, body) = decode_case(case);
            if op == "hello" {
                std::fs::write(&hello_file, body).unwrap();
                let started = collm_envs::external::External::start(spec.clone(), vec![row.clone()], vec![]);
                std::fs::write(&hello_file, good_hello.to_string()).unwrap();
                return match started {
                    Ok(e) if (1..=64).contains(&e.num_agents()) => Ok(true),
                    Ok(e) => Err(format!("a handshake giving {} agents was accepted", e.num_agents())),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if msg.contains("proto.py") {
                            Ok(false)
                        } else {
                            Err(format!("the handshake's error does not name the program: {msg}"))
                        }
                    }
                };
            }
            std::fs::write(&reply_file, body).unwrap();
            let joint = vec![vec!["2 plus 3".to_string(), "5".to_string()]];
            let r = if op == "observe" {
                env.reset(collm_envs::Split::Train, 0).map(|o| o.len() == 2)
            } else {
                env.step(collm_envs::Split::Train, 0, 0, &joint).map(|o| o.reward.is_finite() && o.next_observations.len() == 2)
            };
            match r {
                Ok(true) => Ok(true),
                Ok(false) => Err("an outcome with a non-finite reward or the wrong number of observations was accepted".into()),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if msg.contains("proto.py") && msg.contains("item 0") {
                        Ok(false)
                    } else {
                        Err(format!("the error names neither the program nor the item: {msg}"))
                    }
                }
            }
        },
    );
}
