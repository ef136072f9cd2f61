//! Dataset files in the formats users have: a JSON list of objects, JSONL, either gzipped
//! (`.gz`), and Parquet (Hugging Face dataset exports; snappy, gzip or zstd pages). Every row
//! comes back as a JSON object; tasks pick their columns by name (configurable), and a missing
//! or mistyped column is an error naming the file, the row and the column.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

pub type Row = Map<String, Value>;

/// Reads every row of a dataset file; a file without rows is an error naming it.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let rows = read_any_rows(path)?;
    if rows.is_empty() {
        bail!("{}: the dataset holds no rows", path.display());
    }
    Ok(rows)
}

fn read_any_rows(path: &Path) -> Result<Vec<Row>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_lowercase();
    if name.ends_with(".parquet") {
        return read_parquet(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = if name.ends_with(".gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{}: not valid gzipped UTF-8", path.display()))?;
        s
    } else {
        String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))?
    };
    let values: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("{}: not a JSON list", path.display()))?;
        v.into_iter().enumerate().collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map(|v| (i, v)).with_context(|| format!("{}: line {}: not JSON", path.display(), i + 1)))
            .collect::<Result<_>>()?
    };
    values
        .into_iter()
        .map(|(i, v)| match v {
            Value::Object(m) => Ok(m),
            other => bail!("{}: row {i} is not an object but {}", path.display(), kind(&other)),
        })
        .collect()
}

/// Reads a Parquet file. The parquet crate panics on some damaged files (negative column chunk
/// ranges, short bit-packed runs): such a panic becomes an error naming the file.
fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    match std::panic::catch_unwind(|| read_parquet_rows(path)) {
        Ok(r) => r,
        Err(p) => {
            let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            bail!("{}: a damaged Parquet file (the reader failed inside: {why})", path.display())
        }
    }
}

fn read_parquet_rows(path: &Path) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(f).with_context(|| format!("{}: not a Parquet file", path.display()))?;
    // The row count is the file's own claim: reserve no more than its bytes could hold.
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let claimed = reader.metadata().file_metadata().num_rows().max(0) as u64;
    let mut rows = Vec::with_capacity(claimed.min(len) as usize);
    for (i, row) in reader.get_row_iter(None).with_context(|| format!("{}: reading rows", path.display()))?.enumerate() {
        let row = row.with_context(|| format!("{}: row {i}", path.display()))?;
        match row.to_json_value() {
            Value::Object(m) => rows.push(m),
            other => bail!("{}: row {i} is not a record but {}", path.display(), kind(&other)),
        }
    }
    Ok(rows)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The string in `column` of row `i`; the error names the file, row and column, and says how to
/// map a differently named column (`hint`, e.g. "task.columns.prompt").
pub fn string_field<'a>(path: &Path, i: usize, row: &'a Row, column: &str, hint: &str) -> Result<&'a str> {
    match row.get(column) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("{}: row {i}: column '{column}' is {}, not a string", path.display(), kind(other)),
        None => {
            let have: Vec<&str> = row.keys().map(|k| k.as_str()).collect();
            bail!("{}: row {i} has no column '{column}' (it has: {}; map another column with `{hint}`)", path.display(), have.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("collm-dataset-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn json_list_jsonl_and_gzip_give_the_same_rows() {
        let a = tmp("a.json", br#"[{"prompt": "x", "n": 1}, {"prompt": "y\u00e9"}]"#);
        let b = tmp("b.jsonl", "{\"prompt\": \"x\", \"n\": 1}\n\n{\"prompt\": \"y\u{e9}\"}\n".as_bytes());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &std::fs::read(&b).unwrap()).unwrap();
        let c = tmp("c.jsonl.gz", &gz.finish().unwrap());
        let (ra, rb, rc) = (read_rows(&a).unwrap(), read_rows(&b).unwrap(), read_rows(&c).unwrap());
        assert_eq!(ra.len(), 2);
        assert_eq!(ra, rb);
        assert_eq!(rb, rc);
        assert_eq!(string_field(&a, 1, &ra[1], "prompt", "x").unwrap(), "yé");
    }

    #[test]
    fn bad_rows_name_the_file_row_and_column() {
        let p = tmp("bad.jsonl", b"{\"prompt\": \"ok\"}\n{\"prompt\": 3}\nnot json\n");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("bad.jsonl: line 3: not JSON"), "{e}");
        let p = tmp("bad2.jsonl", b"{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n[1]\n");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("row 2 is not an object but a list"), "{e}");
        let p = tmp("bad3.jsonl", b"{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n");
        let rows = read_rows(&p).unwrap();
        let e = format!("{:#}", string_field(&p, 1, &rows[1], "prompt", "task.columns.prompt").unwrap_err());
        assert!(e.contains("bad3.jsonl: row 1: column 'prompt' is a number, not a string"), "{e}");
        let e = format!("{:#}", string_field(&p, 0, &rows[0], "text", "task.text_field").unwrap_err());
        assert!(e.contains("row 0 has no column 'text' (it has: prompt; map another column with `task.text_field`)"), "{e}");
        let e = format!("{:#}", read_rows(Path::new("/nonexistent/x.parquet")).unwrap_err());
        assert!(e.contains("/nonexistent/x.parquet"), "{e}");
        for (name, bytes) in [("empty.jsonl", &b"\n\n"[..]), ("empty.json", b"[]")] {
            let e = format!("{:#}", read_rows(&tmp(name, bytes)).unwrap_err());
            assert!(e.contains(&format!("{name}: the dataset holds no rows")), "{e}");
        }
        let p = tmp("fake.parquet", b"PAR1 not really");
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("fake.parquet: not a Parquet file"), "{e}");
    }

    /// Files written by pyarrow 26 (as `datasets` exports them): snappy, zstd and gzip pages.
    #[test]
    fn parquet_exports_written_by_pyarrow() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let rows = read_rows(&d.join("tldr_sample.parquet")).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2]["completion"], " Tomatoes cracked after heavy rain.");
        assert!(rows[1]["prompt"].as_str().unwrap().contains("Caf\u{e9} owner"));
        let rows = read_rows(&d.join("coding_sample.parquet")).unwrap();
        assert_eq!(rows[0]["fn"], "add");
        assert_eq!(rows[0]["difficulty"], 1);
        assert!(rows[0]["tests"].as_str().unwrap().starts_with("def check(candidate):\n    assert candidate(1, 2) == 3"));
        let rows = read_rows(&d.join("arxiv_sample.parquet")).unwrap();
        assert_eq!(rows.iter().map(|r| r["abstract"].as_str().unwrap()).collect::<Vec<_>>(), ["We study X.", "We propose Y."]);
    }
}
