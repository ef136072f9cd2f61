//! TensorBoard event files (`events.out.tfevents.*`): TFRecord framing (length, masked CRC-32C)
//! around `Event` protocol buffers holding scalar summaries, written by hand so collm needs no
//! protobuf or TensorFlow dependency. Point `tensorboard --logdir` at a run directory.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise-reflected, as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0x82F6_3B78 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// An `Event` with wall time, step and either a file version or scalar values.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = vec![];
        for (tag, v) in scalars {
            let mut value = vec![];
            bytes_field(1, tag.as_bytes(), &mut value);
            value.push(0x15);
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(1, &value, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

pub struct EventWriter {
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<time>.collm` with its file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(format!("events.out.tfevents.{}.collm", now() as u64));
        let w = Self { path };
        w.append(&event(now(), 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    fn append(&self, rec: &[u8]) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let len = (rec.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(rec.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(rec);
        buf.extend_from_slice(&masked_crc(rec).to_le_bytes());
        f.write_all(&buf)?;
        Ok(())
    }

    /// Writes every number of a metrics line as a scalar (arrays as `key/i`), under `prefix/`.
    pub fn scalars(&self, step: u64, prefix: &str, line: &serde_json::Value) -> Result<()> {
        let mut s = vec![];
        if let Some(obj) = line.as_object() {
            for (k, v) in obj {
                if k == "step" {
                    continue;
                }
                match v {
                    serde_json::Value::Number(n) => s.push((format!("{prefix}/{k}"), n.as_f64().unwrap_or(f64::NAN) as f32)),
                    serde_json::Value::Array(a) => {
                        for (i, x) in a.iter().enumerate() {
                            if let Some(x) = x.as_f64() {
                                s.push((format!("{prefix}/{k}/{i}"), x as f32));
                            }
                        }
                    }
                    serde_json::Value::Object(o) => {
                        for (name, x) in o {
                            if let Some(x) = x.as_f64() {
                                s.push((format!("{prefix}/{k}/{name}"), x as f32));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.append(&event(now(), step as i64, None, &s))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The step of every scalar event in an event file, in file order (the file-version record has
/// none); an error if a record's length or CRC is wrong.
pub fn scalar_steps(path: &Path) -> Result<Vec<u64>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    let mut i = 0;
    while i < data.len() {
        let bad = || anyhow::anyhow!("{}: damaged record at byte {i}", path.display());
        let head = data.get(i..i + 12).ok_or_else(bad)?;
        let len = u64::from_le_bytes(head[..8].try_into()?) as usize;
        if u32::from_le_bytes(head[8..12].try_into()?) != masked_crc(&head[..8]) {
            return Err(bad());
        }
        let rec = data.get(i + 12..(i + 12).saturating_add(len)).ok_or_else(bad)?;
        let crc = data.get(i + 12 + len..i + 16 + len).ok_or_else(bad)?;
        if u32::from_le_bytes(crc.try_into()?) != masked_crc(rec) {
            return Err(bad());
        }
        // Field 1 is the wall time (8 bytes), field 2 the step (a varint), then the payload:
        // field 5 (a summary) for scalars.
        if rec.len() > 10 && rec[0] == 0x09 && rec[9] == 0x10 {
            let (mut step, mut shift, mut j) = (0u64, 0, 10);
            while j < rec.len() && shift < 64 {
                step |= ((rec[j] & 0x7f) as u64) << shift;
                shift += 7;
                j += 1;
                if rec[j - 1] & 0x80 == 0 {
                    break;
                }
            }
            if rec.get(j) == Some(&0x2a) {
                out.push(step);
            }
        }
        i += 16 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// Reads the records back, checking both CRCs of each.
    fn records(path: &Path) -> Vec<Vec<u8>> {
        let data = std::fs::read(path).unwrap();
        let mut out = vec![];
        let mut i = 0;
        while i < data.len() {
            let len = u64::from_le_bytes(data[i..i + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(data[i + 8..i + 12].try_into().unwrap()), masked_crc(&data[i..i + 8]));
            let rec = data[i + 12..i + 12 + len].to_vec();
            assert_eq!(u32::from_le_bytes(data[i + 12 + len..i + 16 + len].try_into().unwrap()), masked_crc(&rec));
            out.push(rec);
            i += 16 + len;
        }
        out
    }

    #[test]
    fn events_round_trip() {
        let dir = std::env::temp_dir().join(format!("collm-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = EventWriter::create(&dir).unwrap();
        w.scalars(7, "train", &serde_json::json!({"step": 7, "reward_mean": 0.5, "policy_loss": [1.0, -2.0], "note": "x"})).unwrap();
        let recs = records(w.path());
        assert_eq!(recs.len(), 2);
        assert!(recs[0].windows(13).any(|x| x == b"brain.Event:2"));
        let r = &recs[1];
        assert_eq!(r[9], 0x10);
        assert_eq!(r[10], 7, "step");
        for tag in ["train/reward_mean", "train/policy_loss/0", "train/policy_loss/1"] {
            assert!(r.windows(tag.len()).any(|x| x == tag.as_bytes()), "{tag}");
        }
        let pos = r.windows(17).position(|x| x == b"train/reward_mean").unwrap() + 17;
        assert_eq!(r[pos], 0x15);
        assert_eq!(f32::from_le_bytes(r[pos + 1..pos + 5].try_into().unwrap()), 0.5);
    }
}
