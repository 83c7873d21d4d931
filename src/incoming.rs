//! The incoming folder: which of its files are batch files ready to be taken (SPEC 2.1),
//! and the SHA-256 that identifies a file's content.

use crate::row::FileKind;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A batch file found in `paths.incoming`.
#[derive(Debug, Clone)]
pub struct BatchFile {
    pub path: PathBuf,
    pub name: String,
    pub kind: FileKind,
}

impl BatchFile {
    /// The batch file at `path`, if its name is one of a batch file (SPEC 2.1).
    pub fn from_path(path: &Path) -> Option<BatchFile> {
        let name = path.file_name()?.to_str()?.to_owned();
        let kind = FileKind::from_name(&name)?;
        Some(BatchFile {
            path: path.to_owned(),
            name,
            kind,
        })
    }
}

/// The files of `incoming` ready to be taken, in lexical order of their names: batch file
/// names, not hidden, regular files (links are skipped), unmodified for `min_file_age`.
///
/// # Errors
/// When the folder cannot be listed.
pub fn ready_files(incoming: &Path, min_file_age: Duration) -> io::Result<Vec<BatchFile>> {
    let now = SystemTime::now();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(incoming)? {
        let entry = entry?;
        let path = entry.path();
        let Some(file) = BatchFile::from_path(&path) else {
            let name = entry.file_name();
            let lossy = name.to_string_lossy();
            if name.to_str().is_none() && FileKind::from_name(&lossy).is_some() {
                crate::telemetry::file_name_not_utf8(&lossy);
            }
            continue;
        };
        if file.name.starts_with('.') {
            continue;
        }
        // `DirEntry::metadata` does not follow links, so a link is never a regular file.
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.file_type().is_file() {
            continue;
        }
        let age = metadata
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok());
        if age.unwrap_or_default() < min_file_age && !min_file_age.is_zero() {
            continue;
        }
        files.push(file);
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The hex SHA-256 of a file as stored (compressed if it is).
///
/// # Errors
/// When the file cannot be read.
pub async fn sha256_of(path: &Path) -> io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .expect("the hashing thread does not panic")
}
