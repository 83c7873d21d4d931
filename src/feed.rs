//! Reading a batch file on a thread of its own: its rows in chunks, each made ready one
//! chunk ahead of the one being applied (so that at most two are held), then the fault that
//! ended the file, if any. It also makes the first pass of a set-based dry run (see
//! [`crate::sightings`]).

use crate::bulk::Chunk;
use crate::error::RowError;
use crate::incoming::BatchFile;
use crate::row::{self, FileKind, ReadOptions, Row, Rows, Span};
use crate::sightings::Sightings;
use crate::update::CustomFieldDefinitions;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the reader thread sends: chunks of rows in file order, then possibly a file fault
/// (the end).
pub enum Parcel {
    Chunk(Chunk),
    Fault(RowError),
}

/// The chunks of one file, as the reader thread makes them.
pub struct Feed {
    receiver: mpsc::Receiver<Parcel>,
    reader: JoinHandle<Option<Span>>,
}

impl Feed {
    /// Starts reading `file` in chunks of `chunk_rows` rows, each made by `prepare` on the
    /// reader thread.
    pub fn start(
        file: &BatchFile,
        options: ReadOptions,
        definitions: Arc<CustomFieldDefinitions>,
        chunk_rows: usize,
        prepare: impl Fn(Vec<Row>) -> Chunk + Send + 'static,
    ) -> Feed {
        // The reader takes the channel's one place before it gathers a chunk: it reads one
        // chunk ahead of the one being applied, and no further.
        let (sender, receiver) = mpsc::channel::<Parcel>(1);
        let (path, kind) = (file.path.clone(), file.kind);
        let reader = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Handle::current();
            let send = |parcel: Parcel| {
                if let Ok(place) = runtime.block_on(sender.reserve()) {
                    place.send(parcel);
                }
            };
            let rows = match open_rows(&path, kind, &options, &definitions) {
                Ok(rows) => rows,
                Err(fault) => {
                    send(Parcel::Fault(fault));
                    return None;
                }
            };
            let header_span = rows.header_span();
            read_chunks(rows, chunk_rows, &sender, &runtime, prepare);
            header_span
        });
        Feed { receiver, reader }
    }

    /// The next chunk or fault; `None` after the end.
    pub async fn next(&mut self) -> Option<Parcel> {
        self.receiver.recv().await
    }

    /// Stops the reader thread (it ends at its next send) and gives the header's span, for
    /// CSV.
    pub async fn finish(self) -> Option<Span> {
        drop(self.receiver);
        self.reader.await.expect("the reader thread does not panic")
    }
}

/// The first pass of a set-based dry run: the codes every row of `file` names or sets (see
/// [`crate::sightings`]). `None` when the file cannot be read; the second pass says why.
pub async fn sightings(
    file: &BatchFile,
    options: ReadOptions,
    definitions: Arc<CustomFieldDefinitions>,
) -> Option<Sightings> {
    let (path, kind) = (file.path.clone(), file.kind);
    tokio::task::spawn_blocking(move || {
        let rows = open_rows(&path, kind, &options, &definitions).ok()?;
        let mut sightings = Sightings::default();
        for row in rows.flatten() {
            if let Ok(update) = &row.update {
                sightings.record(update);
            }
        }
        Some(sightings)
    })
    .await
    .expect("the first pass does not panic")
}

/// The rows of the file at `path`, or the file-level fault that keeps them from being read.
fn open_rows<'d>(
    path: &Path,
    kind: FileKind,
    options: &ReadOptions,
    definitions: &'d CustomFieldDefinitions,
) -> Result<Rows<'d>, RowError> {
    let input = row::open(path, kind, options.max_file_bytes).map_err(|e| row::file_fault(&e))?;
    Rows::new(input, kind.format, options, definitions)
}

/// Sends the rows in chunks of `chunk_rows`, each made by `prepare`, then the file fault
/// that ended them, if any. It waits for the channel's place to be free before it gathers
/// a chunk, so it reads one chunk ahead of the one being applied. Stops early when the
/// receiver is gone.
fn read_chunks(
    rows: Rows,
    chunk_rows: usize,
    sender: &mpsc::Sender<Parcel>,
    runtime: &tokio::runtime::Handle,
    prepare: impl Fn(Vec<Row>) -> Chunk,
) {
    let mut rows = rows.peekable();
    while rows.peek().is_some() {
        let Ok(place) = runtime.block_on(sender.reserve()) else {
            return;
        };
        let mut gathered = Vec::with_capacity(chunk_rows);
        let mut fault = None;
        while gathered.len() < chunk_rows {
            match rows.next() {
                Some(Ok(row)) => gathered.push(row),
                Some(Err(error)) => {
                    fault = Some(error);
                    break;
                }
                None => break,
            }
        }
        if !gathered.is_empty() {
            place.send(Parcel::Chunk(prepare(gathered)));
        } else if let Some(fault) = fault.take() {
            place.send(Parcel::Fault(fault));
        }
        if let Some(fault) = fault {
            if let Ok(place) = runtime.block_on(sender.reserve()) {
                place.send(Parcel::Fault(fault));
            }
            return;
        }
    }
}
