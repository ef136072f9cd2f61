//! A GGUF file's layout, checked against its length before anything is read into memory.
//!
//! candle's reader trusts the header: a string or array length of 2^60, a tensor count of
//! billions, or a tensor whose offset points into another tensor's bytes would abort on
//! allocation or load garbage. [`check`] walks the header once, bounding every count by the bytes
//! that are left, and checks each tensor's type, dimensions, alignment and byte range (inside the
//! data section, no two overlapping), so a damaged file is an error naming the field or tensor.

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;

/// At most this many dimensions per tensor (ggml's limit).
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused.
const MAX_DEPTH: usize = 4;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Version 1 stores counts and lengths in 32 bits, later versions in 64.
    v1: bool,
    source: &'a str,
    /// Where each integer field was read: (byte position, width).
    fields: Vec<(usize, usize)>,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            bail!(
                "{}: {what} at byte {} needs {n} bytes but the file has {} left (truncated or damaged)",
                self.source,
                self.pos,
                self.left()
            );
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.fields.push((self.pos, 4));
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into()?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.fields.push((self.pos, 8));
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into()?))
    }

    /// A count or length: 32 bits in version 1, 64 after.
    fn count(&mut self, what: &str) -> Result<u64> {
        if self.v1 {
            Ok(self.u32(what)? as u64)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what)?;
        if n > self.left() as u64 {
            bail!("{}: {what} claims {n} bytes at byte {} but the file has {} left", self.source, self.pos, self.left());
        }
        let b = self.take(n as usize, what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// Skips one metadata value of type `ty`.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<()> {
        match ty {
            0 | 1 | 7 => self.take(1, what).map(|_| ()),
            2 | 3 => self.take(2, what).map(|_| ()),
            4..=6 => self.take(4, what).map(|_| ()),
            10..=12 => self.take(8, what).map(|_| ()),
            8 => self.string(what).map(|_| ()),
            9 => {
                if depth >= MAX_DEPTH {
                    bail!("{}: {what}: arrays nested deeper than {MAX_DEPTH}", self.source);
                }
                let elem = self.u32(what)?;
                let n = self.count(what)?;
                // Every element takes at least one byte (a string at least its length field).
                if n > self.left() as u64 {
                    bail!("{}: {what}: an array of {n} elements cannot fit in the {} bytes left", self.source, self.left());
                }
                for _ in 0..n {
                    self.value(elem, what, depth + 1)?;
                }
                Ok(())
            }
            t => bail!("{}: {what}: unknown value type {t}", self.source),
        }
    }
}

/// The ggml tensor types candle reads, by their number in the file.
fn ggml_type(t: u32) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match t {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2K,
        11 => Q3K,
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        15 => Q8K,
        30 => BF16,
        _ => return None,
    })
}

/// Checks a whole GGUF file (its bytes): header, metadata and tensor table, and that every
/// tensor's data lies inside the file without overlapping another's.
pub fn check(bytes: &[u8], source: &str) -> Result<()> {
    header_fields(bytes, source).map(|_| ())
}

/// [`check`], returning where the header's integer fields are (position, width): counts,
/// lengths, types, dimensions and offsets, for structure-aware fuzzing.
pub fn header_fields(bytes: &[u8], source: &str) -> Result<Vec<(usize, usize)>> {
    let mut r = Reader { bytes, pos: 0, v1: false, source, fields: vec![] };
    let magic = r.take(4, "the magic number")?;
    if magic != b"GGUF" {
        bail!("{source}: not a GGUF file (it starts with {magic:?}, not \"GGUF\")");
    }
    let version = r.u32("the version")?;
    if !(1..=3).contains(&version) {
        bail!("{source}: GGUF version {version} is not supported (1 to 3 are)");
    }
    r.v1 = version == 1;
    let n_tensors = r.count("the tensor count")?;
    let n_kv = r.count("the metadata count")?;
    // A metadata entry takes at least 9 bytes, a tensor entry at least 24.
    if n_kv > (r.left() / 9) as u64 || n_tensors > (r.left() / 24) as u64 {
        bail!(
            "{source}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file's {} bytes can hold",
            bytes.len()
        );
    }
    let mut alignment = 32u64;
    for i in 0..n_kv {
        let key = r.string(&format!("metadata entry {i}'s key"))?;
        let ty = r.u32(&format!("metadata '{key}''s type"))?;
        let start = r.pos;
        r.value(ty, &format!("metadata '{key}'"), 0)?;
        if key == "general.alignment" {
            alignment = match ty {
                4 => u32::from_le_bytes(bytes[start..start + 4].try_into()?) as u64,
                _ => bail!("{source}: metadata 'general.alignment' must be a u32 (type 4), not type {ty}"),
            };
            if alignment == 0 || !alignment.is_power_of_two() {
                bail!("{source}: metadata 'general.alignment' = {alignment} must be a power of two");
            }
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor {i}'s name"))?;
        if !names.insert(name.clone()) {
            bail!("{source}: tensor '{name}' is listed twice");
        }
        let n_dims = r.u32(&format!("tensor '{name}''s dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("{source}: tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)");
        }
        let mut elems = 1u64;
        let mut dims = vec![];
        for _ in 0..n_dims {
            let d = r.count(&format!("tensor '{name}''s dimensions"))?;
            dims.push(d);
            elems = elems
                .checked_mul(d)
                .with_context(|| format!("{source}: tensor '{name}' has dimensions {dims:?} whose product overflows"))?;
        }
        let ty = r.u32(&format!("tensor '{name}''s type"))?;
        let dtype = ggml_type(ty).with_context(|| format!("{source}: tensor '{name}' has type {ty}, which collm cannot read"))?;
        let offset = r.u64(&format!("tensor '{name}''s offset"))?;
        let block = dtype.block_size() as u64;
        if elems == 0 || elems % block != 0 {
            bail!("{source}: tensor '{name}' has dimensions {dims:?}: {elems} elements, not a positive multiple of its type's block of {block}");
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .with_context(|| format!("{source}: tensor '{name}': its size overflows"))?;
        if offset % alignment != 0 {
            bail!("{source}: tensor '{name}' has offset {offset}, not a multiple of the alignment {alignment}");
        }
        tensors.push((offset, size, name));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    tensors.sort();
    let mut end_of_last = 0u64;
    let mut last = String::new();
    for (offset, size, name) in &tensors {
        let end = offset.checked_add(*size).unwrap_or(u64::MAX);
        if end > data_len {
            bail!(
                "{source}: tensor '{name}' ({size} bytes at offset {offset}) runs past the end of the file's {data_len} data bytes (truncated download, or a damaged offset or dimension?)"
            );
        }
        if *offset < end_of_last {
            bail!("{source}: tensor '{name}' (offset {offset}) overlaps tensor '{last}' (which ends at {end_of_last}): a damaged offset or dimension");
        }
        end_of_last = end;
        last = name.clone();
    }
    Ok(r.fields)
}
