//! NumPy's `.npy` arrays inside a `.npz` zip (stored, as `numpy.savez` writes them), so exports
//! load with `numpy.load` and nothing else.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// One array: numpy dtype string (`|u1`, `<i8`), C-order shape, raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl NpyArray {
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> NpyArray {
        NpyArray {
            descr: "|u1".into(),
            shape,
            data,
        }
    }
    pub fn i64(shape: Vec<usize>, values: &[i64]) -> NpyArray {
        NpyArray {
            descr: "<i8".into(),
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn as_i64(&self) -> Option<Vec<i64>> {
        (self.descr == "<i8").then(|| {
            self.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
    }
    fn item_size(&self) -> usize {
        if self.descr == "<i8" {
            8
        } else {
            1
        }
    }

    /// The `.npy` encoding (format version 1.0, header padded to 64 bytes).
    pub fn to_npy(&self) -> Vec<u8> {
        let shape = match self.shape.len() {
            1 => format!("({},)", self.shape[0]),
            _ => format!(
                "({})",
                self.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
            self.descr, shape
        );
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + self.data.len());
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    pub fn from_npy(bytes: &[u8], name: &str) -> Result<NpyArray, NpyError> {
        let bad = |problem: String| NpyError::Bad {
            name: name.to_string(),
            problem,
        };
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err(bad("not an .npy array".into()));
        }
        let (hlen, start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 if bytes.len() >= 12 => (
                u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
                12,
            ),
            v => return Err(bad(format!("unsupported .npy version {v}"))),
        };
        let header = std::str::from_utf8(
            bytes
                .get(start..start + hlen)
                .ok_or_else(|| bad("truncated header".into()))?,
        )
        .map_err(|_| bad("header is not text".into()))?;
        let field = |key: &str| -> Result<&str, NpyError> {
            let at = header
                .find(&format!("'{key}':"))
                .ok_or_else(|| bad(format!("header lacks {key}")))?;
            Ok(header[at + key.len() + 3..].trim_start())
        };
        let descr = field("descr")?
            .trim_start_matches('\'')
            .split('\'')
            .next()
            .unwrap_or("")
            .to_string();
        if field("fortran_order")?.starts_with("True") {
            return Err(bad("Fortran-order arrays are not supported".into()));
        }
        let shape_text = field("shape")?;
        let inner = shape_text
            .trim_start_matches('(')
            .split(')')
            .next()
            .unwrap_or("");
        let shape: Vec<usize> = inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| bad(format!("bad shape {inner}"))))
            .collect::<Result<_, _>>()?;
        let data = bytes[start + hlen..].to_vec();
        let a = NpyArray { descr, shape, data };
        if !matches!(a.descr.as_str(), "|u1" | "<i8") {
            return Err(bad(format!(
                "dtype {} not supported (expected |u1 or <i8)",
                a.descr
            )));
        }
        if a.data.len() != a.len() * a.item_size() {
            return Err(bad(format!(
                "{} data bytes for shape {:?}",
                a.data.len(),
                a.shape
            )));
        }
        Ok(a)
    }
}

/// A file writer that, after its first failed write, accepts and drops everything. The zip
/// writer's `Drop` finalises an archive an error left unfinished, and when that fails too (a
/// full disk) prints to stderr beside our one-line error; the first error is the one reported,
/// and the half-written file is discarded by the caller.
struct StopAfterError<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for StopAfterError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Ok(buf.len());
        }
        let result = self.inner.write(buf);
        self.note(&result);
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.failed {
            return Ok(());
        }
        let result = self.inner.flush();
        self.note(&result);
        result
    }
}

impl<W> StopAfterError<W> {
    fn note<T>(&mut self, result: &std::io::Result<T>) {
        if let Err(e) = result {
            self.failed |= e.kind() != std::io::ErrorKind::Interrupted;
        }
    }
}

impl<W: std::io::Seek> std::io::Seek for StopAfterError<W> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// A zip error as the I/O error under it, where there is one (a full disk stays one).
fn zip_io(e: zip::result::ZipError) -> std::io::Error {
    match e {
        zip::result::ZipError::Io(e) => e,
        other => std::io::Error::other(other),
    }
}

pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> std::io::Result<()> {
    let file = StopAfterError {
        inner: std::fs::File::create(path)?,
        failed: false,
    };
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(arrays.iter().any(|(_, a)| a.data.len() > (1 << 31)));
    for (name, a) in arrays {
        zip.start_file(format!("{name}.npy"), options)
            .map_err(zip_io)?;
        zip.write_all(&a.to_npy())?;
    }
    let mut inner = zip.finish().map_err(zip_io)?;
    inner.flush()?;
    if inner.get_ref().failed {
        return Err(std::io::Error::other(
            "a write failed while the archive was finished",
        ));
    }
    inner.get_ref().inner.sync_all()
}

/// An `.npy` array or `.npz` archive this reader cannot take.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// `name` says where the array came from (archive:member).
    #[error("{name}: {problem}")]
    Bad { name: String, problem: String },
    #[error(transparent)]
    Io(#[from] crate::base::fs::PathError),
    #[error("{path}: not a zip archive: {source}")]
    NotZip {
        path: std::path::PathBuf,
        source: zip::result::ZipError,
    },
    #[error("{path}: {source}")]
    Entry {
        path: std::path::PathBuf,
        source: zip::result::ZipError,
    },
    #[error("{path}: {name}: {source}")]
    Read {
        path: std::path::PathBuf,
        name: String,
        source: std::io::Error,
    },
}

pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>, NpyError> {
    let file = std::fs::File::open(path).map_err(crate::base::fs::failed("open", path))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|source| NpyError::NotZip {
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|source| NpyError::Entry {
            path: path.to_path_buf(),
            source,
        })?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|source| NpyError::Read {
                path: path.to_path_buf(),
                name: name.clone(),
                source,
            })?;
        out.insert(
            name.clone(),
            NpyArray::from_npy(&bytes, &format!("{}:{name}", path.display()))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails every write like a full disk.
    struct Room(usize);

    impl Write for Room {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn after_the_first_failed_write_everything_is_dropped_quietly() {
        let mut w = StopAfterError {
            inner: Room(4),
            failed: false,
        };
        assert_eq!(w.write(b"abc").unwrap(), 3);
        assert!(!w.failed);
        let err = w.write_all(b"defg").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
        assert!(w.failed);
        assert_eq!(w.write(b"more").unwrap(), 4);
        w.flush().unwrap();
    }

    /// On a full disk the first error comes back as it is.
    #[test]
    fn a_full_disk_is_reported() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let a = NpyArray::u8(vec![64, 64], vec![7; 64 * 64]);
        let err = write_npz(full, &[("a", &a)]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
    }
}
